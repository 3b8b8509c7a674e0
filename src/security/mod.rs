//! Who may talk to a node, and how: TLS for connections ([`tls`]), bearer tokens for clients
//! ([`tokens`]), and the cluster secret for members ([`secret`]). What is read from files is
//! loaded on the main thread (at start, and again on SIGHUP) into a [`Material`]; each core
//! keeps the [`Gate`] made from it and checks every request against it, remembering per
//! connection the credential it already checked ([`Shown`]), so a request on a connection
//! costs a byte comparison, not a hash.
//!
//! - [`tls`]: rustls configurations from TLS_* files, and the reasons a handshake fails.
//! - [`tokens`]: AUTH_TOKENS_FILE, kept as keyed hashes, checked in constant time.
//! - [`secret`]: CLUSTER_SECRET: the peer-call credential and the gossip seal.

pub mod secret;
pub mod tls;
pub mod tokens;

use secret::ClusterSecret;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};
use tokens::{Role, Tokens};

/// A file that cannot be used, named by its variable and path (one start-up line).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}={path:?}: {reason}")]
pub struct LoadError {
    pub var: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl LoadError {
    pub fn new(var: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        LoadError {
            var,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The security variables, validated (config.rs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub tls: Option<tls::TlsFiles>,
    pub tokens_file: Option<PathBuf>,
    pub cluster: Option<ClusterSecret>,
}

/// What the files held, ready for the cores.
#[derive(Clone)]
pub struct Material {
    pub tls: Option<tls::Tls>,
    pub tokens: Option<Arc<Tokens>>,
}

impl Material {
    pub fn load(settings: &Settings) -> Result<Material, LoadError> {
        Ok(Material {
            tls: settings.tls.as_ref().map(tls::Tls::load).transpose()?,
            tokens: settings
                .tokens_file
                .as_deref()
                .map(Tokens::load)
                .transpose()?
                .map(Arc::new),
        })
    }
}

/// A core's security state: the gate requests pass, the TLS configuration new connections
/// get, and what it counted. Single-threaded: replaced by a message on reload.
#[derive(Default)]
pub struct CoreSecurity {
    pub gate: std::cell::RefCell<Gate>,
    pub tls: std::cell::RefCell<Option<Arc<rustls::ServerConfig>>>,
    pub handshakes: std::cell::Cell<u64>,
    /// By `tls::HandshakeFailure::ALL`'s order.
    pub handshake_failures: [std::cell::Cell<u64>; 4],
    /// By `Refusal::ALL`'s order.
    pub refused: [std::cell::Cell<u64>; 3],
}

impl CoreSecurity {
    pub fn new(material: &Material, cluster: Option<ClusterSecret>) -> Self {
        let me = CoreSecurity::default();
        me.gate.borrow_mut().cluster = cluster;
        me.install(material);
        me
    }

    /// Takes reloaded material: new connections get the new certificate; open ones keep
    /// theirs; every connection checks its next request against the new tokens.
    pub fn install(&self, material: &Material) {
        let mut gate = self.gate.borrow_mut();
        gate.tokens = material.tokens.clone();
        gate.generation += 1;
        *self.tls.borrow_mut() = material.tls.as_ref().map(|t| Arc::clone(&t.server));
    }

    pub fn count_refusal(&self, refusal: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == refusal).unwrap_or(0);
        self.refused[i].set(self.refused[i].get() + 1);
    }

    pub fn count_handshake(&self, result: Result<(), tls::HandshakeFailure>) {
        match result {
            Ok(()) => self.handshakes.set(self.handshakes.get() + 1),
            Err(failure) => {
                let i = tls::HandshakeFailure::ALL
                    .iter()
                    .position(|f| *f == failure)
                    .unwrap_or(0);
                let c = &self.handshake_failures[i];
                c.set(c.get() + 1);
            }
        }
    }
}

/// What a request needs, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health checks: open to probes.
    Nothing,
    /// Any client token: Get, NodeService, reflection, anything not named below.
    Read,
    /// A read-write token: Set, Delete.
    Write,
    /// The members' credential: PeerService.
    Member,
}

impl Need {
    pub fn of_path(path: &[u8]) -> Need {
        if path.starts_with(b"/grpc.health.v1.Health/") {
            Need::Nothing
        } else if path.starts_with(b"/pb.PeerService/") {
            Need::Member
        } else if path == b"/pb.CacheService/Set" || path == b"/pb.CacheService/Delete" {
            Need::Write
        } else {
            Need::Read
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or not one of ours: UNAUTHENTICATED.
    Unauthenticated,
    /// A read-only token writing: PERMISSION_DENIED.
    PermissionDenied,
    /// A peer call without the members' credential: UNAUTHENTICATED, counted apart.
    NotMember,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::Unauthenticated,
        Refusal::PermissionDenied,
        Refusal::NotMember,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::NotMember => "not_member",
        }
    }

    pub fn status(self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated => tonic::Status::unauthenticated(
                "missing or unknown bearer token (send `authorization: Bearer TOKEN`)",
            ),
            Refusal::PermissionDenied => {
                tonic::Status::permission_denied("a read-only token cannot Set or Delete")
            }
            Refusal::NotMember => tonic::Status::unauthenticated(
                "PeerService is for cluster members (their CLUSTER_SECRET credential)",
            ),
        }
    }
}

/// The header members send their credential in.
pub const MEMBER_HEADER: &[u8] = b"x-cluster-auth";

/// A core's rules: the tokens and the cluster secret in force. Replaced whole on reload,
/// with a new generation, which voids what connections remembered.
#[derive(Default)]
pub struct Gate {
    pub tokens: Option<Arc<Tokens>>,
    pub cluster: Option<ClusterSecret>,
    pub generation: u64,
}

/// The credentials a connection already showed and that passed, under which generation.
#[derive(Default)]
pub struct Shown {
    generation: u64,
    token: Option<(Vec<u8>, Role)>,
    member: Option<Vec<u8>>,
}

impl Gate {
    /// No tokens and no secret: every request passes.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && self.cluster.is_none()
    }

    /// Whether a request that needs `need` and carries these fields may go on. `shown` is
    /// its connection's memory: a credential it already checked is compared byte for byte
    /// (with the connection's own earlier value, so nothing secret is timed).
    pub fn admit(
        &self,
        need: Need,
        authorization: Option<&[u8]>,
        member: Option<&[u8]>,
        shown: &mut Shown,
    ) -> Result<(), Refusal> {
        if need == Need::Nothing || self.is_open() {
            return Ok(());
        }
        if shown.generation != self.generation {
            *shown = Shown {
                generation: self.generation,
                ..Shown::default()
            };
        }
        if let (Some(cluster), Some(presented)) = (&self.cluster, member) {
            // Members may do anything a client may: they ask each other's layouts.
            if shown.member.as_deref() == Some(presented) {
                return Ok(());
            }
            if cluster.admits(presented) {
                shown.member = Some(presented.to_vec());
                return Ok(());
            }
        }
        if need == Need::Member {
            return match self.cluster {
                Some(_) => Err(Refusal::NotMember),
                None => Ok(()),
            };
        }
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let token = authorization
            .and_then(bearer)
            .ok_or(Refusal::Unauthenticated)?;
        let role = match &shown.token {
            Some((known, role)) if known.as_slice() == token => *role,
            _ => {
                let role = tokens.role(token).ok_or(Refusal::Unauthenticated)?;
                shown.token = Some((token.to_vec(), role));
                role
            }
        };
        match (need, role) {
            (Need::Write, Role::ReadOnly) => Err(Refusal::PermissionDenied),
            _ => Ok(()),
        }
    }
}

/// The token of an `authorization: Bearer TOKEN` value (the scheme in any case, RFC 9110).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate {
            tokens: Some(Arc::new(
                Tokens::parse("rw-0123456789abcdef read-write\nro-0123456789abcdef read-only\n")
                    .unwrap(),
            )),
            cluster: Some(ClusterSecret::new(b"the cluster's secret").unwrap()),
            generation: 1,
        }
    }

    #[test]
    fn requests_need_what_their_path_says() {
        let g = gate();
        let mut shown = Shown::default();
        let rw = Some(&b"Bearer rw-0123456789abcdef"[..]);
        let ro = Some(&b"bearer ro-0123456789abcdef"[..]);
        let member = g.cluster.as_ref().unwrap().credential().as_bytes().to_vec();
        let write = Need::of_path(b"/pb.CacheService/Set");
        let read = Need::of_path(b"/pb.CacheService/Get");
        let peer = Need::of_path(b"/pb.PeerService/Apply");
        let health = Need::of_path(b"/grpc.health.v1.Health/Check");
        let reflection =
            Need::of_path(b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo");

        assert_eq!(g.admit(health, None, None, &mut shown), Ok(()));
        assert_eq!(
            g.admit(read, None, None, &mut shown),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            g.admit(reflection, None, None, &mut shown),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            g.admit(read, Some(b"Bearer wrong-token-0123456"), None, &mut shown),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            g.admit(read, Some(b"Basic abc"), None, &mut shown),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(g.admit(read, ro, None, &mut shown), Ok(()));
        assert_eq!(
            g.admit(write, ro, None, &mut shown),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(g.admit(write, rw, None, &mut shown), Ok(()));
        // A client token never opens the peer plane.
        assert_eq!(g.admit(peer, rw, None, &mut shown), Err(Refusal::NotMember));
        assert_eq!(
            g.admit(peer, rw, Some(b"00ff"), &mut shown),
            Err(Refusal::NotMember)
        );
        assert_eq!(g.admit(peer, None, Some(&member), &mut shown), Ok(()));
        assert_eq!(g.admit(write, None, Some(&member), &mut shown), Ok(()));

        // A new generation forgets what was shown: a token dropped on reload stops working.
        let reloaded = Gate {
            tokens: Some(Arc::new(
                Tokens::parse("ro-0123456789abcdef read-only\n").unwrap(),
            )),
            cluster: None,
            generation: 2,
        };
        assert_eq!(
            reloaded.admit(write, rw, None, &mut shown),
            Err(Refusal::Unauthenticated)
        );
        // Without a secret the peer plane stays as open as the network.
        assert_eq!(reloaded.admit(peer, None, None, &mut shown), Ok(()));
        assert_eq!(Gate::default().admit(write, None, None, &mut shown), Ok(()));
    }
}
