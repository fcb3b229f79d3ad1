//! The symbol table of a 2.0 request as an index into its bytes.
//!
//! prost would hold the table as a `Vec<String>`: 24 bytes of `String` plus
//! an allocation per symbol, against as little as 2 bytes on the wire (the
//! key and the length of an empty symbol), more than 12 bytes of memory per
//! byte of the request. The index keeps, for every `stride`-th symbol, the
//! position of its length prefix in the request (a `u32`), and finds symbol
//! `r` by walking the top-level fields from the nearest indexed one. The
//! stride starts at 1 (direct access) and doubles whenever the index would
//! outgrow 1/16 of the request's size, so the index never costs more than
//! that, and a lookup walks at most 31 fields (the stride is at most 32:
//! symbols are at least 2 bytes, so a request of `n` bytes holds at most
//! `n / 2` of them, which stride 32 indexes in `n / 16` bytes).

use crate::pb::{Cursor, Fields};

/// Tag of `Request.symbols`.
const SYMBOLS_TAG: u32 = 4;

/// An index of the symbols of a request that [`crate::pb::check`] accepted.
#[derive(Debug)]
pub(crate) struct Symbols<'a> {
    buf: &'a [u8],
    /// Position of the length prefix of symbols 0, stride, 2 * stride...
    index: Vec<u32>,
    /// log2 of the stride.
    shift: u32,
    /// Number of symbols.
    len: usize,
    /// Most entries the index may hold.
    max_entries: usize,
}

impl<'a> Symbols<'a> {
    /// An empty index over `buf`, which must be shorter than 4 GiB.
    pub fn new(buf: &'a [u8]) -> Self {
        Symbols {
            buf,
            index: Vec::new(),
            shift: 0,
            len: 0,
            max_entries: (buf.len() / 64).max(16),
        }
    }

    /// Adds the next symbol, whose length prefix is at `at`.
    pub fn push(&mut self, at: usize) {
        if self.len & ((1 << self.shift) - 1) == 0 {
            if self.index.len() == self.max_entries {
                // Keep every other entry: symbols 0, 2 * stride, ...
                let mut i = 0;
                self.index.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.shift += 1;
            }
            if self.len & ((1 << self.shift) - 1) == 0 {
                if self.index.len() == self.index.capacity() {
                    let want = (self.index.capacity() * 2).clamp(8, self.max_entries);
                    self.index.reserve_exact(want - self.index.len());
                }
                self.index.push(at as u32);
            }
        }
        self.len += 1;
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Symbol `r`, or `None` when out of range.
    #[inline]
    pub fn get(&self, r: u32) -> Option<&'a [u8]> {
        if r as usize >= self.len {
            return None;
        }
        let at = *self.index.get((r >> self.shift) as usize)? as usize;
        let mut k = r & ((1 << self.shift) - 1);
        let mut c = Cursor::new(self.buf, at);
        let len = c.varint().ok()? as usize;
        let end = c.pos.checked_add(len)?;
        let first = self.buf.get(c.pos..end)?;
        if k == 0 {
            return Some(first);
        }
        for (tag, v) in Fields::from_pos(self.buf, end) {
            if tag == SYMBOLS_TAG {
                k -= 1;
                if k == 0 {
                    return Some(v.bytes());
                }
            }
        }
        None
    }

    /// Bytes the index holds on the heap.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.index.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    fn build(buf: &[u8]) -> Symbols<'_> {
        let mut s = Symbols::new(buf);
        crate::pb::check(buf, &crate::v2::schema::REQUEST, |at| s.push(at)).unwrap();
        s
    }

    #[test]
    fn finds_every_symbol_whatever_the_stride() {
        for n in [0usize, 1, 2, 15, 16, 17, 100, 5000] {
            let req = crate::v2::Request {
                symbols: (0..n).map(|i| format!("{}", i % 7)).collect(),
                timeseries: vec![crate::v2::TimeSeries::default(); 3],
            };
            let buf = req.encode_to_vec();
            let s = build(&buf);
            assert_eq!(s.len(), n);
            for (i, want) in req.symbols.iter().enumerate() {
                assert_eq!(
                    s.get(i as u32).unwrap(),
                    want.as_bytes(),
                    "{n} symbols, {i}"
                );
            }
            assert_eq!(s.get(n as u32), None);
            assert!(s.heap_bytes() <= (buf.len() / 16).max(64), "{n}");
        }
    }
}
