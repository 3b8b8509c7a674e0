//! Client bearer tokens (AUTH_TOKENS_FILE): each line a token and its role. Kept only as
//! HMAC-SHA-256 tags under a key drawn at load, so memory never holds a token, and a
//! presented token is checked against every tag in constant time (no early exit, ring's
//! constant-time compare), so timing tells nothing of how close a guess came.

use super::LoadError;
use ring::hmac;
use std::path::Path;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Get, NodeService, reflection.
    ReadOnly,
    /// Also Set and Delete.
    ReadWrite,
}

/// Shorter tokens are refused at load: a bearer token is a password that is never typed.
pub const MIN_TOKEN_LEN: usize = 16;

pub struct Tokens {
    key: hmac::Key,
    tags: Vec<(hmac::Tag, Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.tags.len())
    }
}

impl Tokens {
    /// Reads the file: `TOKEN ROLE` per line, ROLE `read-only` or `read-write`; blank lines
    /// and lines from `#` are skipped. An error names the file and line, never the token.
    pub fn load(path: &Path) -> Result<Tokens, LoadError> {
        const VAR: &str = "AUTH_TOKENS_FILE";
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::new(VAR, path, format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|reason| LoadError::new(VAR, path, reason))
    }

    pub fn parse(text: &str) -> Result<Tokens, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the token key".to_string())?;
        let mut tags = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let n = i + 1;
            let mut words = line.split_whitespace();
            let (Some(token), role, None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {n}: expected `TOKEN read-only|read-write`"));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {n}: a token must be at least {MIN_TOKEN_LEN} characters"
                ));
            }
            let role = match role {
                Some("read-only" | "ro") => Role::ReadOnly,
                Some("read-write" | "rw") => Role::ReadWrite,
                Some(other) => {
                    return Err(format!(
                        "line {n}: role {other:?} is not read-only or read-write"
                    ))
                }
                None => return Err(format!("line {n}: no role (read-only or read-write)")),
            };
            tags.push((hmac::sign(&key, token.as_bytes()), role));
        }
        if tags.is_empty() {
            return Err("no token in the file".to_string());
        }
        Ok(Tokens { key, tags })
    }

    /// The role of `token`, if it is one of ours. Checks every tag whatever matched.
    pub fn role(&self, token: &[u8]) -> Option<Role> {
        let mut found = None;
        for (tag, role) in &self.tags {
            if hmac::verify(&self.key, token, tag.as_ref()).is_ok() {
                found = found.or(Some(*role));
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_read_and_bad_lines_named() {
        let t = Tokens::parse(
            "# ops\n0123456789abcdef read-write\n\n  fedcba9876543210 read-only # the dashboards\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.role(b"0123456789abcdef"), Some(Role::ReadWrite));
        assert_eq!(t.role(b"fedcba9876543210"), Some(Role::ReadOnly));
        assert_eq!(t.role(b"0123456789abcdeF"), None);
        assert_eq!(t.role(b""), None);

        let err = Tokens::parse("0123456789abcdef read-write\nshort rw\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(
            !err.contains("short"),
            "the token must not be echoed: {err}"
        );
        assert!(Tokens::parse("0123456789abcdef admin")
            .unwrap_err()
            .contains("role"));
        assert!(Tokens::parse("0123456789abcdef")
            .unwrap_err()
            .contains("no role"));
        assert!(Tokens::parse("# nothing\n").is_err());
    }
}
