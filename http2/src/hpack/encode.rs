//! HPACK encoding (RFC 7541) of the header blocks we send. Nothing is Huffman coded. The user
//! names the few fields that recur on every message of a connection (say a content type, or a
//! status that is almost always the same): each goes into the peer's dynamic table the first
//! time and is one byte after that. Every other field is a literal the peer does not index,
//! so the table never holds more than those fields and nothing is ever evicted from it.
//! One encoder per connection, on that connection's thread.

use crate::frame;

/// Bytes an entry takes in the peer's table (RFC 7541, 4.1): name, value and 32.
fn entry_size(field: &(&[u8], &[u8])) -> usize {
    field.0.len() + field.1.len() + 32
}

pub struct Encoder {
    /// The fields worth a place in the peer's table.
    recurring: &'static [(&'static [u8], &'static [u8])],
    /// Which of them the peer's table holds, by index in `recurring`, oldest first.
    added: Vec<usize>,
    /// Bytes `recurring` take in the peer's table, all of them.
    recurring_size: usize,
    /// False once the peer's table is too small to hold them all.
    indexing: bool,
    /// The table size we last told the peer's decoder (4096, the default, until a change).
    max: usize,
    /// A size update owed at the start of the next header block.
    size_update: Option<usize>,
}

impl Encoder {
    /// An encoder that indexes `recurring` (and nothing else) in the peer's table.
    pub fn new(recurring: &'static [(&'static [u8], &'static [u8])]) -> Self {
        let recurring_size = recurring.iter().map(entry_size).sum();
        Self {
            recurring,
            added: Vec::with_capacity(recurring.len()),
            recurring_size,
            indexing: recurring_size <= 4096,
            max: 4096,
            size_update: None,
        }
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE. A smaller table than ours is announced at the
    /// start of the next block; one too small for the recurring fields ends their indexing.
    pub fn table_size(&mut self, size: usize) {
        if size >= self.max {
            return;
        }
        self.max = size;
        self.size_update = Some(size);
        if size < self.recurring_size {
            self.added.clear();
            self.indexing = false;
        }
    }

    /// Starts a header block: the size update owed, if any.
    pub fn begin(&mut self, buf: &mut Vec<u8>) {
        if let Some(size) = self.size_update.take() {
            put_int(buf, 5, 0x20, size);
        }
    }

    /// One field, indexed when it is one of the recurring ones.
    pub fn field(&mut self, buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        let known = self
            .recurring
            .iter()
            .position(|e| e.0 == name && e.1 == value);
        if let Some(known) = known {
            if let Some(pos) = self.added.iter().position(|&e| e == known) {
                // Index 62 is the newest dynamic entry.
                put_int(buf, 7, 0x80, 62 + self.added.len() - 1 - pos);
                return;
            }
            if self.indexing {
                buf.push(0x40); // literal with incremental indexing, new name
                put_str(buf, name);
                put_str(buf, value);
                self.added.push(known);
                return;
            }
        }
        buf.push(0x00); // literal without indexing, new name
        put_str(buf, name);
        put_str(buf, value);
    }

    /// A field whose name is entry `index` of the static table (a pseudo-header, say), not
    /// indexed.
    pub fn static_name(&mut self, buf: &mut Vec<u8>, index: usize, value: &[u8]) {
        put_int(buf, 4, 0x00, index);
        put_str(buf, value);
    }

    /// Entry `index` of the static table, name and value (`:method: POST` is 3).
    pub fn indexed(&mut self, buf: &mut Vec<u8>, index: usize) {
        put_int(buf, 7, 0x80, index);
    }

    /// Starts a HEADERS frame, and its block, whose length [`Encoder::close`] fills in.
    pub fn open(&mut self, buf: &mut Vec<u8>) -> usize {
        let at = buf.len();
        buf.extend_from_slice(&[0; frame::HEADER_LEN]);
        self.begin(buf);
        at
    }

    /// Ends the HEADERS frame opened at `at`, for stream `id`, with END_HEADERS and `flags`.
    /// Blocks over `max_frame` go on in CONTINUATION frames.
    pub fn close(buf: &mut Vec<u8>, at: usize, id: u32, flags: u8, max_frame: usize) {
        let len = buf.len() - at - frame::HEADER_LEN;
        if len <= max_frame {
            buf[at..at + frame::HEADER_LEN].copy_from_slice(&frame::header(
                len,
                frame::HEADERS,
                flags | frame::END_HEADERS,
                id,
            ));
            return;
        }
        // Rare (a block over 16 KiB): cut it after the fact.
        let block = buf.split_off(at + frame::HEADER_LEN);
        buf.truncate(at);
        let mut chunks = block.chunks(max_frame).peekable();
        let mut kind = frame::HEADERS;
        let mut first_flags = flags;
        while let Some(chunk) = chunks.next() {
            let end = if chunks.peek().is_none() {
                frame::END_HEADERS
            } else {
                0
            };
            frame::put_header(buf, chunk.len(), kind, first_flags | end, id);
            buf.extend_from_slice(chunk);
            kind = frame::CONTINUATION;
            first_flags = 0;
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
pub fn put_int(buf: &mut Vec<u8>, n: u8, flags: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        buf.push(flags | value as u8);
        return;
    }
    buf.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        buf.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    buf.push(rest as u8);
}

/// An HPACK string literal, not Huffman coded.
pub fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    put_int(buf, 7, 0x00, s.len());
    buf.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpack::Decoder;

    static RECURRING: [(&[u8], &[u8]); 2] = [(b"content-type", b"text/x"), (b"x-ok", b"1")];

    fn decode(dec: &mut Decoder, block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        dec.decode(block, |n, v| out.push((n.to_vec(), v.to_vec())))
            .unwrap();
        out
    }

    #[test]
    fn recurring_fields_cost_one_byte_after_the_first_block_and_others_stay_literal() {
        let mut enc = Encoder::new(&RECURRING);
        let mut dec = Decoder::new(4096);
        let mut oracle = loona_hpack::Decoder::new();
        for round in 0..3 {
            let mut block = Vec::new();
            enc.begin(&mut block);
            enc.indexed(&mut block, 3); // :method: POST
            enc.static_name(&mut block, 4, b"/a/b"); // :path
            enc.field(&mut block, b"x-ok", b"1");
            enc.field(&mut block, b"content-type", b"text/x");
            enc.field(&mut block, b"other", b"v");
            let want: Vec<(Vec<u8>, Vec<u8>)> = [
                (":method", "POST"),
                (":path", "/a/b"),
                ("x-ok", "1"),
                ("content-type", "text/x"),
                ("other", "v"),
            ]
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
            assert_eq!(decode(&mut dec, &block), want, "round {round}");
            assert_eq!(
                oracle.decode(&block).unwrap(),
                want,
                "oracle, round {round}"
            );
            if round > 0 {
                // :method 1, :path 1 + 1 + 4, x-ok 1, content-type 1, other 1 + 1 + 5 + 1 + 1.
                assert_eq!(block.len(), 18);
            }
        }
    }

    #[test]
    fn a_smaller_peer_table_is_announced_and_stops_indexing() {
        let mut enc = Encoder::new(&RECURRING);
        let mut dec = Decoder::new(4096);
        enc.table_size(40);
        let mut block = Vec::new();
        enc.begin(&mut block);
        enc.field(&mut block, b"x-ok", b"1");
        enc.field(&mut block, b"x-ok", b"1");
        assert_eq!(block[0], 0x20 | 31, "size update first");
        assert_eq!(decode(&mut dec, &block).len(), 2);
        let mut again = Vec::new();
        enc.begin(&mut again);
        enc.field(&mut again, b"x-ok", b"1");
        assert_eq!(again[0], 0x00, "a literal, not an index");
    }

    #[test]
    fn a_long_block_goes_on_in_continuation_frames() {
        let mut enc = Encoder::new(&[]);
        let mut buf = vec![9];
        let at = enc.open(&mut buf);
        let long = vec![b'a'; 40_000];
        enc.field(&mut buf, b"x-long", &long);
        Encoder::close(&mut buf, at, 3, frame::END_STREAM, 16_384);
        let mut pos = 1;
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while pos < buf.len() {
            let h = frame::Header::parse(&buf[pos..]).unwrap();
            kinds.push((h.kind, h.flags));
            block.extend_from_slice(&buf[pos + 9..pos + 9 + h.len]);
            pos += 9 + h.len;
        }
        assert_eq!(
            kinds,
            vec![
                (frame::HEADERS, frame::END_STREAM),
                (frame::CONTINUATION, 0),
                (frame::CONTINUATION, frame::END_HEADERS)
            ]
        );
        let fields = decode(&mut Decoder::new(4096), &block);
        assert_eq!(fields[0].1.len(), 40_000);
    }
}
