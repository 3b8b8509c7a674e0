//! Which replica a read asks first, and how long it waits before asking one more: a dynamic
//! snitch and adaptive speculative retry, as Cassandra and Scylla have them. Each core keeps
//! its own [`PeerLatency`] per peer (plain data beside its peer connections: no lock, no
//! sharing) fed by every call it makes, and its own copy of the failure detector's verdicts
//! ([`super::membership::Health`], published by the control plane on every change). Pure:
//! callers pass `now`.
//!
//! A peer that stops answering gives no latency samples, so a score made of samples alone
//! would keep sending reads to a dead replica until its calls time out. The score therefore
//! also counts how long a peer with calls outstanding has been silent: a replica cut off a
//! millisecond ago already ranks behind one that answers in half that.

use std::time::{Duration, Instant};

/// SPECULATIVE_RETRY: when a read that is still waiting for a replica asks one more.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpeculativeRetry {
    /// After the waited-for peer's observed latency at this percentile (0 < p < 100).
    Percentile(f64),
    /// After a fixed delay.
    Fixed(Duration),
    /// Never before the replica fails.
    Off,
}

impl Default for SpeculativeRetry {
    fn default() -> Self {
        SpeculativeRetry::Percentile(99.0)
    }
}

/// An adaptive delay never goes below this: below it, a healthy replica's ordinary jitter
/// would send a second read for a large share of requests.
pub const SPECULATIVE_FLOOR: Duration = Duration::from_micros(500);
/// Nor above this (the fixed delay every read paid before the delay adapted).
pub const SPECULATIVE_CEILING: Duration = Duration::from_millis(50);
/// The delay for a peer not measured yet.
const UNMEASURED: Duration = Duration::from_millis(5);

impl std::str::FromStr for SpeculativeRetry {
    type Err = String;

    /// `p99`, `p99.9`, `50ms`, `2.5ms`, `off` (Cassandra's spellings; `NNpercentile` too).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "off" || s == "none" {
            return Ok(SpeculativeRetry::Off);
        }
        if let Some(ms) = s.strip_suffix("ms") {
            let ms: f64 = ms
                .trim()
                .parse()
                .map_err(|_| "expected p<percentile>, <n>ms or off".to_string())?;
            if !(ms.is_finite() && ms > 0.0 && ms <= 60_000.0) {
                return Err("a delay must be above 0 and at most 60000ms".into());
            }
            return Ok(SpeculativeRetry::Fixed(Duration::from_secs_f64(
                ms / 1000.0,
            )));
        }
        let p = s
            .strip_prefix('p')
            .or_else(|| s.strip_suffix("percentile"))
            .ok_or_else(|| "expected p<percentile>, <n>ms or off".to_string())?;
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| "expected p<percentile>, <n>ms or off".to_string())?;
        if !(p > 0.0 && p < 100.0) {
            return Err("a percentile must be above 0 and below 100".into());
        }
        Ok(SpeculativeRetry::Percentile(p))
    }
}

/// Latency buckets: four per power of two of microseconds, up to 2^29 us (about 9 minutes).
const BUCKETS: usize = 4 * 28;
/// Every this many samples the histogram's counts are halved, so it follows the last few
/// hundred calls rather than the node's whole life.
const DECAY_EVERY: u32 = 256;
/// The cached percentile is recomputed after this many samples.
const REQUANTILE_EVERY: u32 = 16;
/// Weight of a new sample in the moving average (as TCP's smoothed RTT).
const EWMA_WEIGHT: f64 = 0.125;
/// What a failed call (refused, reset) adds to a peer's score; it halves every PENALTY_HALF_LIFE,
/// so a peer that came back is tried first again within seconds even if no read asks it.
const ERROR_PENALTY_US: f64 = 10_000.0;
const PENALTY_HALF_LIFE: Duration = Duration::from_secs(1);
const PENALTY_MAX_US: f64 = 60e6;

fn bucket_of(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    // From 4 on, the octave (>= 2) and the two bits after its leading one.
    let octave = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (octave - 2)) & 3) as usize;
    ((octave - 1) * 4 + sub).min(BUCKETS - 1)
}

/// The largest value that falls in bucket `i`.
fn bucket_top_us(i: usize) -> u64 {
    if i < 4 {
        return i as u64;
    }
    let (octave, sub) = (i / 4 + 1, (i % 4) as u64);
    ((4 + sub + 1) << (octave - 2)) - 1
}

/// How a call to a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// The peer answered (whatever it answered).
    Answered,
    /// It failed without an answer: refused, reset, handshake failed.
    Failed,
    /// No answer before the deadline.
    TimedOut,
}

/// One core's record of one peer's recent latency.
#[derive(Debug, Clone)]
pub struct PeerLatency {
    ewma_us: f64,
    measured: bool,
    penalty_us: f64,
    penalty_at: Option<Instant>,
    in_flight: u32,
    /// Since when the peer has had calls outstanding without answering any.
    silent_since: Option<Instant>,
    histogram: [u32; BUCKETS],
    samples_since_decay: u32,
    samples_since_quantile: u32,
    /// (percentile, its value) as last computed.
    cached: Option<(f64, Duration)>,
}

impl Default for PeerLatency {
    fn default() -> Self {
        PeerLatency {
            ewma_us: 0.0,
            measured: false,
            penalty_us: 0.0,
            penalty_at: None,
            in_flight: 0,
            silent_since: None,
            histogram: [0; BUCKETS],
            samples_since_decay: 0,
            samples_since_quantile: 0,
            cached: None,
        }
    }
}

impl PeerLatency {
    /// A call to the peer starts.
    pub fn started(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.silent_since = Some(now);
        }
        self.in_flight += 1;
    }

    /// A call that started `elapsed` ago ended.
    pub fn ended(&mut self, now: Instant, elapsed: Duration, end: CallEnd) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match end {
            CallEnd::Answered => {
                self.silent_since = (self.in_flight > 0).then_some(now);
                self.sample(elapsed);
            }
            CallEnd::Failed => {
                self.silent_since = (self.in_flight > 0).then_some(now);
                self.penalize(now, ERROR_PENALTY_US);
            }
            CallEnd::TimedOut => {
                // Silence continues for the calls still outstanding.
                if self.in_flight == 0 {
                    self.silent_since = None;
                }
                self.sample(elapsed);
                self.penalize(now, elapsed.as_micros() as f64);
            }
        }
    }

    fn sample(&mut self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        if self.measured {
            self.ewma_us += EWMA_WEIGHT * (us as f64 - self.ewma_us);
        } else {
            self.ewma_us = us as f64;
            self.measured = true;
        }
        self.histogram[bucket_of(us)] += 1;
        self.samples_since_quantile += 1;
        self.samples_since_decay += 1;
        if self.samples_since_decay >= DECAY_EVERY {
            self.samples_since_decay = 0;
            for n in &mut self.histogram {
                *n /= 2;
            }
            self.cached = None;
        }
    }

    fn penalty_at(&self, now: Instant) -> f64 {
        match self.penalty_at {
            None => 0.0,
            Some(at) => {
                let halvings = now.saturating_duration_since(at).as_secs_f64()
                    / PENALTY_HALF_LIFE.as_secs_f64();
                self.penalty_us * (-halvings).exp2()
            }
        }
    }

    fn penalize(&mut self, now: Instant, us: f64) {
        self.penalty_us = (self.penalty_at(now) + us).min(PENALTY_MAX_US);
        self.penalty_at = Some(now);
    }

    /// How long the peer has been silent with calls outstanding.
    pub fn silent_for(&self, now: Instant) -> Duration {
        match self.silent_since {
            Some(since) if self.in_flight > 0 => now.saturating_duration_since(since),
            _ => Duration::ZERO,
        }
    }

    /// Lower is better: recent latency, or the silence so far if longer, plus what recent
    /// failures cost.
    pub fn score_us(&self, now: Instant) -> f64 {
        let silent = self.silent_for(now).as_micros() as f64;
        self.ewma_us.max(silent) + self.penalty_at(now)
    }

    /// The latency at percentile `p` of the recent samples; None before any.
    pub fn percentile(&mut self, p: f64) -> Option<Duration> {
        if let Some((cached_p, value)) = self.cached {
            if cached_p == p && self.samples_since_quantile < REQUANTILE_EVERY {
                return Some(value);
            }
        }
        let total: u64 = self.histogram.iter().map(|&n| n as u64).sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * p / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        let mut value = Duration::ZERO;
        for (i, &n) in self.histogram.iter().enumerate() {
            seen += n as u64;
            if seen >= rank {
                value = Duration::from_micros(bucket_top_us(i));
                break;
            }
        }
        self.cached = Some((p, value));
        self.samples_since_quantile = 0;
        Some(value)
    }

    /// How long a read waiting for this peer waits before asking another replica.
    pub fn speculate_after(&mut self, policy: SpeculativeRetry) -> Option<Duration> {
        match policy {
            SpeculativeRetry::Off => None,
            SpeculativeRetry::Fixed(d) => Some(d),
            SpeculativeRetry::Percentile(p) => Some(
                self.percentile(p)
                    .unwrap_or(UNMEASURED)
                    .clamp(SPECULATIVE_FLOOR, SPECULATIVE_CEILING),
            ),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let mut last_top = 0;
        for i in 0..BUCKETS {
            let top = bucket_top_us(i);
            assert!(i == 0 || top > last_top, "bucket {i}");
            assert_eq!(bucket_of(top), i, "top of bucket {i} is {top}");
            last_top = top;
        }
        for us in [0u64, 1, 5, 99, 1000, 123_456, 10_000_000] {
            let i = bucket_of(us);
            assert!(bucket_top_us(i) >= us);
            assert!(i == 0 || bucket_top_us(i - 1) < us);
            // Four buckets per octave: a bucket's top is within 25% of any value in it.
            assert!(bucket_top_us(i) as f64 <= us as f64 * 1.25 + 1.0);
        }
    }

    #[test]
    fn percentile_follows_the_samples() {
        let mut p = PeerLatency::default();
        let t0 = Instant::now();
        assert_eq!(p.percentile(99.0), None);
        for i in 0..1000u64 {
            p.started(t0);
            // 1% of calls take 20 ms, the rest 200 us.
            let took = if i % 100 == 0 { 20 * MS } else { MS / 5 };
            p.ended(t0, took, CallEnd::Answered);
        }
        let p50 = p.percentile(50.0).unwrap();
        assert!(p50 >= MS / 5 && p50 <= MS / 4, "{p50:?}");
        let p99 = p.percentile(99.0).unwrap();
        assert!(p99 >= MS / 5 && p99 <= MS / 4, "{p99:?}");
        let p999 = p.percentile(99.9).unwrap();
        assert!(p999 >= 20 * MS && p999 <= 25 * MS, "{p999:?}");
        // The delay is clamped.
        assert_eq!(
            p.speculate_after(SpeculativeRetry::Percentile(50.0)),
            Some(SPECULATIVE_FLOOR)
        );
        assert_eq!(p.speculate_after(SpeculativeRetry::Off), None);
        assert_eq!(
            p.speculate_after(SpeculativeRetry::Fixed(7 * MS)),
            Some(7 * MS)
        );
    }

    #[test]
    fn old_samples_fade() {
        let mut p = PeerLatency::default();
        let t0 = Instant::now();
        for _ in 0..2000 {
            p.started(t0);
            p.ended(t0, 30 * MS, CallEnd::Answered);
        }
        for _ in 0..3000 {
            p.started(t0);
            p.ended(t0, MS, CallEnd::Answered);
        }
        let p99 = p.percentile(99.0).unwrap();
        assert!(p99 <= 2 * MS, "slow past still dominates: {p99:?}");
        assert!(p.score_us(t0) < 1500.0);
    }

    #[test]
    fn a_silent_peer_ranks_behind_a_slower_answering_one() {
        let t0 = Instant::now();
        let mut fast = PeerLatency::default();
        let mut slow = PeerLatency::default();
        for _ in 0..100 {
            fast.started(t0);
            fast.ended(t0, MS / 5, CallEnd::Answered);
            slow.started(t0);
            slow.ended(t0, MS, CallEnd::Answered);
        }
        assert!(fast.score_us(t0) < slow.score_us(t0));
        // `fast` is cut off: its calls stop coming back.
        fast.started(t0);
        fast.started(t0 + MS / 2);
        assert!(fast.score_us(t0 + MS / 2) < slow.score_us(t0 + MS / 2));
        assert!(fast.score_us(t0 + 2 * MS) > slow.score_us(t0 + 2 * MS));
        assert_eq!(fast.silent_for(t0 + 2 * MS), 2 * MS);
        // An answer ends the silence.
        fast.ended(t0 + 3 * MS, MS / 5, CallEnd::Answered);
        fast.ended(t0 + 3 * MS, MS / 5, CallEnd::Answered);
        assert_eq!(fast.silent_for(t0 + 4 * MS), Duration::ZERO);
        assert_eq!(fast.in_flight(), 0);
    }

    #[test]
    fn failures_cost_for_a_while_then_fade() {
        let t0 = Instant::now();
        let mut p = PeerLatency::default();
        p.started(t0);
        p.ended(t0, MS / 5, CallEnd::Answered);
        p.started(t0);
        p.ended(t0, MS / 10, CallEnd::Failed);
        assert!(p.score_us(t0) > 10_000.0);
        assert!(p.score_us(t0 + Duration::from_secs(10)) < 300.0);
        // A timeout costs what it waited.
        p.started(t0);
        p.ended(t0 + 5 * MS, 5 * MS, CallEnd::TimedOut);
        assert!(p.score_us(t0 + 5 * MS) >= 5_000.0);
    }

    #[test]
    fn parses_cassandra_spellings() {
        use SpeculativeRetry::*;
        assert_eq!("p99".parse(), Ok(Percentile(99.0)));
        assert_eq!("P99.9".parse(), Ok(Percentile(99.9)));
        assert_eq!("95percentile".parse(), Ok(Percentile(95.0)));
        assert_eq!("20ms".parse(), Ok(Fixed(20 * MS)));
        assert_eq!("0.5ms".parse(), Ok(Fixed(MS / 2)));
        assert_eq!("off".parse(), Ok(Off));
        for bad in ["", "p100", "p0", "fast", "-3ms", "0ms", "99", "pxx"] {
            assert!(bad.parse::<SpeculativeRetry>().is_err(), "{bad:?} accepted");
        }
    }
}
