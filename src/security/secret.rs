//! CLUSTER_SECRET: what makes a process a member. Two keys are derived from it (HMAC-SHA-256
//! with a label each, so neither reveals the secret or the other): one makes the credential
//! members send on every peer call (`x-cluster-auth`), the other signs every gossip datagram.
//! The credential is a bearer: on a network others can read, run the cluster with TLS too.
//!
//! A gossip datagram travels as `payload | sent_at_ms (8 bytes) | HMAC tag (32 bytes)`; the
//! receiver drops a datagram whose tag is wrong, whose time is outside REPLAY_WINDOW of its
//! own clock, or that it already took within the window (a replay). Members' clocks must
//! agree within the window, as Kerberos asks.

use ring::hmac;
use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Shorter secrets are refused at start.
pub const MIN_SECRET_LEN: usize = 16;
/// How far a datagram's time may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);
/// Tags remembered for replay detection; gossip sends a few datagrams a second per member,
/// so this covers the window for hundreds of members before the oldest are forgotten.
const MAX_SEEN: usize = 65_536;
const TIME_BYTES: usize = 8;
const TAG_BYTES: usize = 32;
/// What sealing adds to a datagram.
pub const SEAL_BYTES: usize = TIME_BYTES + TAG_BYTES;

const PEER_LABEL: &[u8] = b"distributed-cache peer plane v1";
const GOSSIP_LABEL: &[u8] = b"distributed-cache gossip v1";

#[derive(Clone)]
pub struct ClusterSecret {
    secret: hmac::Key,
    gossip: hmac::Key,
    /// The credential as sent: hex of HMAC(secret, PEER_LABEL).
    credential: String,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl PartialEq for ClusterSecret {
    fn eq(&self, other: &Self) -> bool {
        self.credential == other.credential
    }
}

impl Eq for ClusterSecret {}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    text.chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Why a gossip datagram was dropped, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipRefusal {
    /// No tag, or not ours: a sender without the secret, or a datagram changed on the way.
    BadTag,
    /// Sent longer ago (or further ahead) than REPLAY_WINDOW.
    Stale,
    /// Already taken.
    Replayed,
}

impl GossipRefusal {
    pub const ALL: [GossipRefusal; 3] = [
        GossipRefusal::BadTag,
        GossipRefusal::Stale,
        GossipRefusal::Replayed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GossipRefusal::BadTag => "bad_tag",
            GossipRefusal::Stale => "stale",
            GossipRefusal::Replayed => "replayed",
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ClusterSecret {
    pub fn new(secret: &[u8]) -> Result<ClusterSecret, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "must be at least {MIN_SECRET_LEN} bytes (it is {})",
                secret.len()
            ));
        }
        let secret = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let gossip = hmac::Key::new(
            hmac::HMAC_SHA256,
            hmac::sign(&secret, GOSSIP_LABEL).as_ref(),
        );
        let credential = hex(hmac::sign(&secret, PEER_LABEL).as_ref());
        Ok(ClusterSecret {
            secret,
            gossip,
            credential,
        })
    }

    /// The `x-cluster-auth` value members send.
    pub fn credential(&self) -> &str {
        &self.credential
    }

    /// Whether `presented` is the members' credential, compared in constant time.
    pub fn admits(&self, presented: &[u8]) -> bool {
        unhex(presented).is_some_and(|tag| hmac::verify(&self.secret, PEER_LABEL, &tag).is_ok())
    }

    /// Appends the time and tag to a datagram's payload.
    pub fn seal(&self, payload: &[u8]) -> Vec<u8> {
        self.seal_at(payload, now_ms())
    }

    fn seal_at(&self, payload: &[u8], sent_at_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + SEAL_BYTES);
        out.extend_from_slice(payload);
        out.extend_from_slice(&sent_at_ms.to_be_bytes());
        let tag = hmac::sign(&self.gossip, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// A receiver's side: the secret and the tags it took within the window.
pub struct GossipOpener {
    secret: ClusterSecret,
    seen: HashSet<[u8; TAG_BYTES]>,
    by_time: VecDeque<(u64, [u8; TAG_BYTES])>,
}

impl GossipOpener {
    pub fn new(secret: ClusterSecret) -> Self {
        GossipOpener {
            secret,
            seen: HashSet::new(),
            by_time: VecDeque::new(),
        }
    }

    /// The payload of a sealed datagram, or why it is dropped.
    pub fn open<'a>(&mut self, datagram: &'a [u8]) -> Result<&'a [u8], GossipRefusal> {
        self.open_at(datagram, now_ms())
    }

    fn open_at<'a>(&mut self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], GossipRefusal> {
        let Some(signed_len) = datagram.len().checked_sub(TAG_BYTES) else {
            return Err(GossipRefusal::BadTag);
        };
        if signed_len < TIME_BYTES {
            return Err(GossipRefusal::BadTag);
        }
        let (signed, tag) = datagram.split_at(signed_len);
        hmac::verify(&self.secret.gossip, signed, tag).map_err(|_| GossipRefusal::BadTag)?;
        let (payload, time) = signed.split_at(signed_len - TIME_BYTES);
        let sent_at = u64::from_be_bytes(time.try_into().expect("8 bytes by the split above"));
        let window = REPLAY_WINDOW.as_millis() as u64;
        if sent_at.abs_diff(now_ms) > window {
            return Err(GossipRefusal::Stale);
        }
        while let Some(&(at, old)) = self.by_time.front() {
            if at.saturating_add(window) >= now_ms && self.by_time.len() < MAX_SEEN {
                break;
            }
            self.seen.remove(&old);
            self.by_time.pop_front();
        }
        let tag: [u8; TAG_BYTES] = tag.try_into().expect("32 bytes by the split above");
        if !self.seen.insert(tag) {
            return Err(GossipRefusal::Replayed);
        }
        self.by_time.push_back((sent_at, tag));
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_checked_and_bound_to_the_secret() {
        let a = ClusterSecret::new(b"0123456789abcdef-a").unwrap();
        let b = ClusterSecret::new(b"0123456789abcdef-b").unwrap();
        assert!(a.admits(a.credential().as_bytes()));
        assert!(!a.admits(b.credential().as_bytes()));
        assert!(!a.admits(b""));
        assert!(!a.admits(b"zz"));
        assert!(!a.credential().contains("0123456789"));
        assert!(ClusterSecret::new(b"short").is_err());
    }

    #[test]
    fn gossip_is_opened_once_within_the_window() {
        let secret = ClusterSecret::new(b"0123456789abcdef").unwrap();
        let mut opener = GossipOpener::new(secret.clone());
        let now = 1_000_000_000;
        let sealed = secret.seal_at(b"ping", now);
        assert_eq!(opener.open_at(&sealed, now + 5), Ok(&b"ping"[..]));
        assert_eq!(
            opener.open_at(&sealed, now + 6),
            Err(GossipRefusal::Replayed)
        );

        let mut forged = secret.seal_at(b"ping", now + 1);
        forged[0] ^= 1;
        assert_eq!(opener.open_at(&forged, now + 2), Err(GossipRefusal::BadTag));
        assert_eq!(opener.open_at(b"ping", now), Err(GossipRefusal::BadTag));
        assert_eq!(opener.open_at(b"", now), Err(GossipRefusal::BadTag));
        let other = ClusterSecret::new(b"fedcba9876543210").unwrap();
        assert_eq!(
            opener.open_at(&other.seal_at(b"ping", now), now),
            Err(GossipRefusal::BadTag)
        );

        let window = REPLAY_WINDOW.as_millis() as u64;
        let old = secret.seal_at(b"old", now - window - 1);
        assert_eq!(opener.open_at(&old, now), Err(GossipRefusal::Stale));
        let ahead = secret.seal_at(b"ahead", now + window + 1);
        assert_eq!(opener.open_at(&ahead, now), Err(GossipRefusal::Stale));
        // Remembered tags are forgotten once their time is out of the window.
        assert_eq!(
            opener.open_at(&secret.seal_at(b"late", now + window), now + window),
            Ok(&b"late"[..])
        );
        assert!(opener.seen.len() <= 2);
    }
}
