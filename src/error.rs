//! The errors a request can end in, and the one table that maps them to gRPC status codes.
//!
//! Built on the owning core (engine errors travel back over the mesh as values) or at ingress;
//! converted to `tonic::Status` only at ingress.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("key {key:?} not found")]
    NotFound { key: String },
    #[error("{0}")]
    InvalidArgument(&'static str),
    #[error(
        "unknown consistency level {0} (known: QUORUM = 0, ONE = 1, ALL = 2, LINEARIZABLE = 3)"
    )]
    UnknownConsistency(i32),
    #[error("core {core} is saturated; request shed")]
    Overloaded { core: usize },
    #[error("rate limit exceeded")]
    RateLimited,
    #[error("deadline exceeded before the request was served")]
    DeadlineExceeded,
    #[error("value of {bytes} bytes exceeds MAX_SEND_MSG_SIZE ({limit} bytes)")]
    ResponseTooLarge { bytes: usize, limit: usize },
    #[error("entry of {bytes} bytes is larger than the node's memory budget (MAX_MEMORY {budget} bytes)")]
    TooLarge { bytes: u64, budget: u64 },
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("not enough replicas: {answered} of {needed} needed answered ({total} replicas)")]
    Unavailable {
        answered: usize,
        needed: usize,
        total: usize,
    },
    /// The failure detector holds too many replicas DOWN for the level: refused before any
    /// replica is waited for.
    #[error("not enough live replicas: {live} of {total} up, {needed} needed")]
    TooFewLive {
        live: usize,
        needed: usize,
        total: usize,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn not_found(key: &[u8]) -> Self {
        Error::NotFound {
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } => Code::NotFound,
            Error::InvalidArgument(_) | Error::UnknownConsistency(_) => Code::InvalidArgument,
            Error::Overloaded { .. }
            | Error::RateLimited
            | Error::ResponseTooLarge { .. }
            | Error::TooLarge { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::ShuttingDown | Error::Unavailable { .. } | Error::TooFewLive { .. } => {
                Code::Unavailable
            }
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases = [
            (Error::not_found(b"foo"), Code::NotFound),
            (
                Error::InvalidArgument("key must not be empty"),
                Code::InvalidArgument,
            ),
            (Error::UnknownConsistency(7), Code::InvalidArgument),
            (Error::Overloaded { core: 1 }, Code::ResourceExhausted),
            (Error::RateLimited, Code::ResourceExhausted),
            (
                Error::TooLarge {
                    bytes: 10,
                    budget: 5,
                },
                Code::ResourceExhausted,
            ),
            (Error::DeadlineExceeded, Code::DeadlineExceeded),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::TooFewLive {
                    live: 1,
                    needed: 2,
                    total: 3,
                },
                Code::Unavailable,
            ),
            (Error::Internal("boom".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
        assert!(Status::from(Error::not_found(b"foo"))
            .message()
            .contains("\"foo\""));
    }
}
