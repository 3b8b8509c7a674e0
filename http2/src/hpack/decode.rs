//! HPACK decoding (RFC 7541): the header blocks a peer sends. One decoder per connection, on
//! that connection's thread; the Huffman tree is built once and shared read-only.
//!
//! Ours because the crates on offer cost more than the rest of a request: loona-hpack builds a
//! hash map of the whole Huffman code for every Huffman-coded string it decodes (a client's
//! `grpc-timeout` is one per request), 97% of the node's instructions under callgrind. Here
//! the code is a tree built once per process, an indexed field is a lookup, and the only
//! allocation is a dynamic-table entry's. loona-hpack stays as the oracle of the tests.

use std::{collections::VecDeque, sync::OnceLock};

#[derive(Debug, PartialEq, Eq)]
pub struct Error(pub &'static str);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Per-entry overhead in the table size (RFC 7541, 4.1).
const ENTRY_OVERHEAD: usize = 32;

pub struct Decoder {
    /// Newest first: index 62 is `table[0]`. Each entry is name and value in one allocation,
    /// with the name's length and what the caller's check said of it (see `decode_checked`).
    table: VecDeque<(Box<[u8]>, usize, bool)>,
    size: usize,
    /// The size the encoder last set (a size update), at most `limit`.
    max: usize,
    /// Our SETTINGS_HEADER_TABLE_SIZE.
    limit: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max: limit,
            limit,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Decodes one whole header block, handing each field to `f` in order.
    pub fn decode(&mut self, block: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<(), Error> {
        self.decode_checked(block, |name, value, _| {
            f(name, value);
            true
        })
    }

    /// [`Decoder::decode`], for a caller that checks each field (RFC 9113's rules on names
    /// and values, say): `f` returns what its check found, and is told it beforehand for a
    /// field that comes whole from a table (the static table's fields pass; a dynamic entry
    /// keeps the verdict its field had when it was added), so a field a peer repeats is
    /// checked once per connection rather than once per request.
    pub fn decode_checked(
        &mut self,
        block: &[u8],
        mut f: impl FnMut(&[u8], &[u8], Option<bool>) -> bool,
    ) -> Result<(), Error> {
        let mut pos = 0;
        // Size updates may only open a block (RFC 7541, 4.2).
        let mut fields = false;
        while pos < block.len() {
            let first = block[pos];
            fields |= first & 0xe0 != 0x20;
            if first & 0x80 != 0 {
                let index = int(block, &mut pos, 7)?;
                let (name, value, checked) = entry(&self.table, index)?;
                f(name, value, Some(checked));
            } else if first & 0xe0 == 0x20 {
                if fields {
                    return Err(Error("table size update after a field"));
                }
                let size = int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(Error("table size update over the limit"));
                }
                self.max = size;
                self.evict(0);
            } else {
                let indexing = first & 0xc0 == 0x40;
                let index = int(block, &mut pos, if indexing { 6 } else { 4 })?;
                let Decoder {
                    table,
                    name_buf,
                    value_buf,
                    ..
                } = self;
                let name = match index {
                    0 => string(block, &mut pos, name_buf)?,
                    i => entry(table, i)?.0,
                };
                let value = string(block, &mut pos, value_buf)?;
                let checked = f(name, value, None);
                if !indexing {
                    continue;
                }
                let mut e = Vec::with_capacity(name.len() + value.len());
                e.extend_from_slice(name);
                e.extend_from_slice(value);
                let name_len = name.len();
                self.insert(e.into_boxed_slice(), name_len, checked);
            }
        }
        Ok(())
    }

    fn insert(&mut self, e: Box<[u8]>, name_len: usize, checked: bool) {
        let size = e.len() + ENTRY_OVERHEAD;
        self.evict(size);
        // An entry larger than the table empties it and is not added (RFC 7541, 4.4).
        if size <= self.max {
            self.size += size;
            self.table.push_front((e, name_len, checked));
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((e, _, _)) = self.table.pop_back() else {
                break;
            };
            self.size -= e.len() + ENTRY_OVERHEAD;
        }
    }
}

/// Entry `index`: name, value, and the check's verdict.
fn entry(
    table: &VecDeque<(Box<[u8]>, usize, bool)>,
    index: usize,
) -> Result<(&[u8], &[u8], bool), Error> {
    match index {
        0 => Err(Error("index 0")),
        1..=61 => {
            let (name, value) = STATIC_TABLE[index - 1];
            Ok((name, value, true))
        }
        _ => table
            .get(index - 62)
            .map(|(e, n, checked)| {
                let (name, value) = e.split_at(*n);
                (name, value, *checked)
            })
            .ok_or(Error("index past the dynamic table")),
    }
}

/// An integer with an `n`-bit prefix (RFC 7541, 5.1).
fn int(block: &[u8], pos: &mut usize, n: u8) -> Result<usize, Error> {
    let max = (1usize << n) - 1;
    let first = *block.get(*pos).ok_or(Error("truncated integer"))? as usize & max;
    *pos += 1;
    if first < max {
        return Ok(first);
    }
    let mut value = max;
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(Error("truncated integer"))?;
        *pos += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        // Nothing in a header block needs more than 2^28; larger is an attack or garbage.
        if shift > 21 {
            return Err(Error("integer too large"));
        }
    }
}

/// A string literal: in place, or Huffman-decoded into `buf`.
fn string<'a>(block: &'a [u8], pos: &mut usize, buf: &'a mut Vec<u8>) -> Result<&'a [u8], Error> {
    let huffman = block.get(*pos).ok_or(Error("truncated string"))? & 0x80 != 0;
    let len = int(block, pos, 7)?;
    let raw = block
        .get(*pos..*pos + len)
        .ok_or(Error("string past the end of the block"))?;
    *pos += len;
    if !huffman {
        return Ok(raw);
    }
    buf.clear();
    huffman_decode(raw, buf)?;
    Ok(buf)
}

/// Huffman tree: node i has children `[i][0]` and `[i][1]`; a child with LEAF set is a symbol.
const LEAF: u16 = 0x8000;

fn tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        // Canonical code: symbols in order of (length, symbol), each code the previous one
        // plus one, shifted left when the length grows.
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
        let mut nodes = vec![[0u16; 2]];
        let mut code: u32 = 0;
        let mut prev_len = CODE_LENGTHS[order[0]];
        for (i, &sym) in order.iter().enumerate() {
            let len = CODE_LENGTHS[sym];
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            let mut node = 0;
            for bit in (0..len).rev() {
                let b = ((code >> bit) & 1) as usize;
                if bit == 0 {
                    nodes[node][b] = LEAF | sym as u16;
                } else {
                    if nodes[node][b] == 0 {
                        nodes.push([0, 0]);
                        nodes[node][b] = (nodes.len() - 1) as u16;
                    }
                    node = nodes[node][b] as usize;
                }
            }
        }
        nodes
    })
}

fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let tree = tree();
    let mut node = 0usize;
    // Bits since the last symbol, and whether all were ones: the padding must be at most 7
    // bits of EOS's prefix (RFC 7541, 5.2).
    let mut pending = 0u32;
    let mut ones = true;
    for &byte in src {
        for bit in (0..8).rev() {
            let b = (byte >> bit) & 1;
            pending += 1;
            ones &= b == 1;
            let next = tree[node][b as usize];
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == 256 {
                    return Err(Error("EOS in a Huffman string"));
                }
                out.push(sym as u8);
                node = 0;
                pending = 0;
                ones = true;
            } else if next == 0 {
                return Err(Error("invalid Huffman code"));
            } else {
                node = next as usize;
            }
        }
    }
    if pending > 7 || !ones {
        return Err(Error("invalid Huffman padding"));
    }
    Ok(())
}

/// Code length in bits of each symbol of HPACK's Huffman code (RFC 7541, Appendix B), 256 being
/// EOS. The code is canonical, so the lengths alone determine it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The static table (RFC 7541, Appendix A); index 1 is the first entry.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Huffman-encodes with the code the tree is built from, so that the oracle checks both.
    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
        let mut codes = [0u32; 257];
        let mut code = 0u32;
        for (i, &sym) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (CODE_LENGTHS[sym] - CODE_LENGTHS[order[i - 1]]);
            }
            codes[sym] = code;
        }
        let (mut acc, mut bits, mut out) = (0u64, 0u32, vec![]);
        for &c in s {
            acc = acc << CODE_LENGTHS[c as usize] | codes[c as usize] as u64;
            bits += CODE_LENGTHS[c as usize] as u32;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
        }
        out
    }

    fn lit(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        let bytes = if huffman {
            huffman_encode(s)
        } else {
            s.to_vec()
        };
        let mut len = vec![];
        crate::hpack::put_int(&mut len, 7, if huffman { 0x80 } else { 0 }, bytes.len());
        out.extend_from_slice(&len);
        out.extend_from_slice(&bytes);
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn ours(d: &mut Decoder, block: &[u8]) -> Result<Fields, Error> {
        let mut got = vec![];
        d.decode(block, |n, v| got.push((n.to_vec(), v.to_vec())))?;
        Ok(got)
    }

    fn oracle(d: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Fields {
        d.decode(block).expect("the oracle decodes it")
    }

    #[test]
    fn every_static_entry_matches_the_oracle() {
        for i in 1..=61u8 {
            let block = [0x80 | i];
            let want = oracle(&mut loona_hpack::Decoder::new(), &block);
            assert_eq!(
                ours(&mut Decoder::new(4096), &block).unwrap(),
                want,
                "index {i}"
            );
        }
    }

    #[test]
    fn every_byte_huffman_codes_and_decodes_as_the_oracle_does() {
        let all: Vec<u8> = (0..=255).collect();
        let mut samples = vec![
            all.clone(),
            b"4999998u".to_vec(),
            b"".to_vec(),
            b"a".to_vec(),
        ];
        samples.extend(all.iter().map(|&b| vec![b, b, b]));
        for s in samples {
            let mut block = vec![0x00];
            lit(&mut block, b"x-name", false);
            lit(&mut block, &s, true);
            let want = oracle(&mut loona_hpack::Decoder::new(), &block);
            assert_eq!(want, vec![(b"x-name".to_vec(), s.clone())], "the oracle");
            assert_eq!(ours(&mut Decoder::new(4096), &block).unwrap(), want);
        }
    }

    #[test]
    fn the_dynamic_table_indexes_and_evicts_as_the_oracle_does() {
        let mut d = Decoder::new(4096);
        let mut o = loona_hpack::Decoder::new();
        let mut blocks = vec![];
        for i in 0..200u32 {
            let mut b = vec![];
            if i % 50 == 49 {
                b.push(0x20 | 20); // size update: evicts everything bigger than 20 bytes
                b.push(0x3f);
                b.push(0xe1);
                b.push(0x1f); // back to 4096
            }
            b.push(0x40); // literal with incremental indexing, new name
            lit(&mut b, format!("name-{i}").as_bytes(), i % 2 == 0);
            lit(&mut b, "v".repeat(i as usize).as_bytes(), i % 3 == 0);
            b.push(0x40 | 4); // literal with indexing, name ":path" from the static table
            lit(&mut b, format!("/p/{i}").as_bytes(), false);
            b.push(0x80 | 62); // the newest entry
            if i > 2 && i % 50 != 49 {
                b.push(0x80 | 64); // the third newest, unless the size update evicted it
            }
            b.push(0x10 | 1); // never indexed, name from the static table
            lit(&mut b, b"secret", true);
            blocks.push(b);
        }
        for b in &blocks {
            assert_eq!(ours(&mut d, b).unwrap(), oracle(&mut o, b));
        }
    }

    #[test]
    fn bad_blocks_are_errors_not_panics() {
        let bad: [&[u8]; 9] = [
            &[0x80],                               // index 0
            &[0x80 | 62],                          // empty dynamic table
            &[0xff, 0xff, 0xff, 0xff, 0x7f],       // index past everything
            &[0x40, 0x05, b'a'],                   // string past the end
            &[0x00, 0x81, 0xff],                   // Huffman: 8 bits of padding
            &[0x00, 0x84, 0xff, 0xff, 0xff, 0xff], // Huffman: EOS
            &[0x3f, 0xe2, 0x1f],                   // size update over 4096
            &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80], // integer too large
            &[0x82, 0x20],                         // size update after a field
        ];
        for block in bad {
            assert!(ours(&mut Decoder::new(4096), block).is_err(), "{block:x?}");
        }
    }

    mod fuzz {
        //! Property tests with a fixed budget in CI; for long runs, raise it:
        //! `PROPTEST_CASES=200000 cargo test -p http2 --release --lib hpack::decode::tests::fuzz`.
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            (
                prop_oneof![
                    Just(b":path".to_vec()),
                    Just(b"content-type".to_vec()),
                    Just(b"grpc-timeout".to_vec()),
                    proptest::collection::vec(b'a'..=b'z', 1..20),
                ],
                proptest::collection::vec(any::<u8>(), 0..64),
            )
        }

        proptest! {
            /// Blocks the oracle's encoder makes, over a connection's worth of header lists
            /// (its dynamic table carried from one to the next), decode to the same fields.
            #[test]
            fn what_the_oracle_encodes_we_decode(
                lists in proptest::collection::vec(proptest::collection::vec(field(), 0..12), 1..16)
            ) {
                let mut enc = loona_hpack::Encoder::new();
                let mut d = Decoder::new(4096);
                for list in lists {
                    let block = enc.encode(list.iter().map(|(n, v)| (&n[..], &v[..])));
                    prop_assert_eq!(ours(&mut d, &block).unwrap(), list);
                }
            }

            /// Arbitrary bytes: never a panic; when both decoders accept a block, the same
            /// fields (ours is stricter in places: a size update after a field).
            #[test]
            fn arbitrary_blocks_never_panic_and_agree_with_the_oracle(
                blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8)
            ) {
                let mut d = Decoder::new(4096);
                let mut o = loona_hpack::Decoder::new();
                for block in blocks {
                    let (a, b) = (ours(&mut d, &block), o.decode(&block));
                    match (a, b) {
                        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                        // Once the two disagree on a block their tables may differ: stop.
                        _ => break,
                    }
                }
            }
        }
    }
}
