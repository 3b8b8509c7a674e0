//! A request's header block as the server reads it ([`Head`]): the decoded fields kept in one
//! buffer, and the checks of RFC 9113 8.2 and 8.3 made as each field arrives. Runs on the
//! connection's executor thread: filled inside the HPACK decoder's callback, read by the
//! owner when the request comes out as an event.

use super::MAX_HEADER_LIST;

/// A request's header block, decoded and checked (RFC 9113, 8.2 and 8.3): valid names and
/// values, the pseudo-header fields each once and before the others, no connection-specific
/// field. Reused from request to request: reading it allocates nothing once warm.
#[derive(Default)]
pub struct Head {
    /// Names and values of every field, one after another.
    bytes: Vec<u8>,
    /// Regular fields: (name start, name end, value end) in `bytes`.
    fields: Vec<(u32, u32, u32)>,
    method: (u32, u32),
    path: (u32, u32),
    authority: Option<(u32, u32)>,
    /// Bytes of the decoded list, as MAX_HEADER_LIST counts them.
    size: usize,
    pub(super) malformed: bool,
    /// PSEUDO_* bits of the pseudo-header fields present.
    pub(super) pseudo: u8,
    pub(super) content_length: Option<u64>,
}

/// Bits of `Head::pseudo`: which request pseudo-header fields were present.
const PSEUDO_METHOD: u8 = 1;
const PSEUDO_PATH: u8 = 2;
const PSEUDO_SCHEME: u8 = 4;
const PSEUDO_AUTHORITY: u8 = 8;
/// What every request other than CONNECT carries (RFC 9113, 8.3.1); we serve no CONNECT.
pub(super) const PSEUDO_REQUIRED: u8 = PSEUDO_METHOD | PSEUDO_PATH | PSEUDO_SCHEME;

impl Head {
    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.fields.clear();
        self.method = (0, 0);
        self.path = (0, 0);
        self.authority = None;
        self.size = 0;
        self.malformed = false;
        self.pseudo = 0;
        self.content_length = None;
    }

    fn at(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.bytes[start as usize..end as usize]
    }

    /// `:method`.
    pub fn method(&self) -> &[u8] {
        self.at(self.method)
    }

    /// `:path`.
    pub fn path(&self) -> &[u8] {
        self.at(self.path)
    }

    /// `:authority`.
    pub fn authority(&self) -> Option<&[u8]> {
        self.authority.map(|a| self.at(a))
    }

    /// The regular fields, in their order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|&(name, value, end)| {
            (
                &self.bytes[name as usize..value as usize],
                &self.bytes[value as usize..end as usize],
            )
        })
    }

    /// Whether the block decoded to more than MAX_HEADER_LIST: the fields past it are
    /// missing, and the request is best answered with an error.
    pub fn oversized(&self) -> bool {
        self.size > MAX_HEADER_LIST
    }

    /// One decoded field; `checked` is the verdict of `valid_field` when the decoder knows
    /// it. Returns that verdict.
    pub(super) fn add(
        &mut self,
        name: &[u8],
        value: &[u8],
        checked: Option<bool>,
        regular_seen: &mut bool,
    ) -> bool {
        let valid = checked.unwrap_or_else(|| valid_field(name, value));
        self.malformed |= !valid;
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST {
            return valid;
        }
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        let mid = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        let end = self.bytes.len() as u32;
        if name.first() == Some(&b':') {
            self.malformed |= *regular_seen;
            let seen = match name {
                b":method" => {
                    self.malformed |= !valid_token(value);
                    self.method = (mid, end);
                    PSEUDO_METHOD
                }
                b":path" => {
                    self.malformed |= value.is_empty();
                    self.path = (mid, end);
                    PSEUDO_PATH
                }
                b":authority" => {
                    self.authority = Some((mid, end));
                    PSEUDO_AUTHORITY
                }
                b":scheme" => PSEUDO_SCHEME,
                _ => {
                    self.malformed = true;
                    0
                }
            };
            // Each at most once.
            self.malformed |= self.pseudo & seen != 0;
            self.pseudo |= seen;
            return valid;
        }
        *regular_seen = true;
        match name {
            // Connection-specific fields have no place in HTTP/2 (RFC 9113, 8.2.2).
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => self.malformed = true,
            b"te" => self.malformed |= value != b"trailers",
            b"content-length" => match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                Some(n) if self.content_length.is_none_or(|m| m == n) => {
                    self.content_length = Some(n)
                }
                _ => self.malformed = true,
            },
            _ => {}
        }
        self.fields.push((start, mid, end));
        valid
    }
}

/// Bits of `CHARS`: what a byte may be.
const TCHAR: u8 = 1;
const LOWER_TCHAR: u8 = 2;
const NOT_IN_VALUE: u8 = 4;

/// Byte classes, one load per byte.
static CHARS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let tchar = matches!(c, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.'
            | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'^' | b'`' | b'|' | b'~');
        if tchar {
            t[b] |= TCHAR;
            if !c.is_ascii_uppercase() {
                t[b] |= LOWER_TCHAR;
            }
        }
        if matches!(c, 0 | b'\r' | b'\n') {
            t[b] |= NOT_IN_VALUE;
        }
        b += 1;
    }
    t
};

/// A field as RFC 9113 8.2.1 allows it: a name of lowercase token characters (after the
/// colon of a pseudo-header field), a value without NUL, CR or LF, nor white space at either
/// end.
fn valid_field(name: &[u8], value: &[u8]) -> bool {
    let name = name.strip_prefix(b":").unwrap_or(name);
    !name.is_empty()
        && name.iter().all(|&b| CHARS[b as usize] & LOWER_TCHAR != 0)
        && value.iter().all(|&b| CHARS[b as usize] & NOT_IN_VALUE == 0)
        && !matches!(value.first(), Some(b' ' | b'\t'))
        && !matches!(value.last(), Some(b' ' | b'\t'))
}

/// A method: token characters (RFC 9110, 9.1).
fn valid_token(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| CHARS[b as usize] & TCHAR != 0)
}
