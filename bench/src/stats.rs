//! What a run measured: an HDR latency histogram, counts by outcome, and the report printed
//! and written as JSON.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Per-worker counters, merged at the end.
pub struct Recorder {
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub gets: u64,
    pub hits: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            // 1 µs .. 60 s at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            gets: 0,
            hits: 0,
        }
    }
}

impl Recorder {
    pub fn record_latency(&mut self, micros: u64) {
        self.latency_us.saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency_us.add(&other.latency_us).expect("same bounds");
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.gets += other.gets;
        self.hits += other.hits;
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

pub fn latency_of(h: &Histogram<u64>) -> Latency {
    Latency {
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        mean_us: h.mean(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub throughput_rps: f64,
    pub latency: Latency,
    /// Gets that found their key, over all Gets that succeeded or missed.
    pub hit_ratio: Option<f64>,
}

pub fn report(r: &Recorder, seconds: f64) -> Report {
    let requests = r.ok + r.errors.values().sum::<u64>();
    Report {
        requests,
        ok: r.ok,
        errors: r.errors.clone(),
        seconds,
        throughput_rps: requests as f64 / seconds.max(1e-9),
        latency: latency_of(&r.latency_us),
        hit_ratio: (r.gets > 0).then(|| r.hits as f64 / r.gets as f64),
    }
}

pub fn print_report(label: &str, r: &Report) {
    println!("{label}");
    println!(
        "  throughput {:>10.0} req/s   requests {} ok {} in {:.2}s",
        r.throughput_rps, r.requests, r.ok, r.seconds
    );
    let l = &r.latency;
    println!(
        "  latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
    );
    if let Some(h) = r.hit_ratio {
        println!("  hit ratio {:.4}", h);
    }
    if !r.errors.is_empty() {
        println!("  errors {:?}", r.errors);
    }
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_histogram() {
        let mut r = Recorder::default();
        for v in 1..=1000u64 {
            r.record_latency(v);
        }
        let l = latency_of(&r.latency_us);
        // HDR at 3 significant digits is exact below 2048.
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.p90_us, 900);
        assert_eq!(l.p99_us, 990);
        assert_eq!(l.p999_us, 999);
        assert_eq!(l.max_us, 1000);
        assert!((l.mean_us - 500.5).abs() < 0.01);
    }

    #[test]
    fn merge_and_report() {
        let mut a = Recorder {
            ok: 10,
            gets: 4,
            hits: 3,
            ..Default::default()
        };
        a.record_latency(100);
        let mut b = Recorder {
            ok: 5,
            ..Default::default()
        };
        b.errors.insert("NotFound".into(), 2);
        b.record_latency(200);
        a.merge(&b);
        let rep = report(&a, 2.0);
        assert_eq!(rep.requests, 17);
        assert_eq!(rep.throughput_rps, 8.5);
        assert_eq!(rep.hit_ratio, Some(0.75));
        assert_eq!(rep.latency.max_us, 200);
    }
}
