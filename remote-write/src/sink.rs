//! Where a shipper's request goes as it is built, and its snappy
//! compression as it comes.
//!
//! A request built whole and then compressed takes its uncompressed size
//! plus its snappy copy (about 1.2 times it) at once: for the 1.0
//! translation of a 2.0 record of tiny series, 7.4 bytes of memory per byte
//! of the record. The re-encoding ([`crate::translate::v2_to_v1_into`],
//! [`crate::encode::merge_v2_into`], [`crate::encode::concat_v1`]) writes
//! into a [`Sink`] instead, and [`SnappyWriter`] compresses what it is given
//! 64 KiB at a time: the request then takes at most twice its compressed
//! size plus a constant (about 170 KiB).

use bytes::Bytes;

use crate::varint;

/// Where encoded bytes go, in order.
pub trait Sink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);

    /// Appends the bytes that `body`, a snappy (raw format) body known to
    /// decompress (a request body that ingest decompressed), decompresses
    /// to.
    ///
    /// # Errors
    /// `body`'s length header is not valid (here: any of it is not valid
    /// snappy; a compressing sink does not decode the elements again).
    fn put_snappy(&mut self, body: &[u8]) -> Result<(), snap::Error> {
        let raw = snap::raw::Decoder::new().decompress_vec(body)?;
        self.put(&raw);
        Ok(())
    }

    /// The most an encoder writing into this sink buffers before handing
    /// bytes over. It needs a nested message's length before its bytes: a
    /// message larger than this is measured first, then written in parts.
    /// Tests lower it to have the parts written.
    fn nested_buffer_limit(&self) -> usize {
        64 << 10
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Input size of a snappy block: see [`SnappyWriter`].
pub const SNAPPY_BLOCK: usize = 1 << 16;

/// Compresses a body as it is written, into the bytes that
/// [`crate::encode::snappy_compress`] gives for the whole body.
///
/// # Why the output is the same
///
/// The raw (block) format of snappy is the varint of the uncompressed
/// length followed by elements (literals, and copies of bytes already
/// decompressed). The `snap` encoder (1.1, `src/compress.rs`,
/// `Encoder::compress`) writes that varint, then cuts its input into
/// blocks of `MAX_BLOCK_SIZE` = 64 KiB (`src/lib.rs`) and compresses each
/// one on its own: `Block::new` sees only that block's slice, the hash
/// table is zeroed for every block (`block_table`), copies never reach
/// before the block's start (offsets are positions in the block), and a
/// block shorter than 17 bytes is one literal whatever precedes it. The
/// elements of a block therefore depend on that block's bytes alone, and
/// compressing the body's 64 KiB fragments one at a time (each one a whole
/// input of at most one block) gives the same elements, once the length
/// varint that each call writes in front of them is taken off. The total
/// length's varint goes in front at the end.
///
/// # Memory
///
/// Each block's elements are kept in a buffer of their exact size until
/// [`Self::finish`] copies them after the length into one buffer of the
/// body's exact size, handed over: a build takes twice the compressed body
/// at most (never the uncompressed one), plus a 64 KiB window of input not
/// yet compressed, the worst-case output of one block (75 KiB) and the
/// encoder's table (32 KiB). Only the last three are kept for the next
/// body. Growing one buffer instead would hold up to twice the body in
/// slack, and more while it is moved.
pub struct SnappyWriter {
    encoder: snap::raw::Encoder,
    /// Input of the block being filled, shorter than [`SNAPPY_BLOCK`].
    window: Vec<u8>,
    /// One compressed block, its length varint in front.
    block: Vec<u8>,
    /// The elements of each block so far.
    blocks: Vec<Box<[u8]>>,
    /// Their bytes.
    compressed: usize,
    /// Uncompressed bytes given so far.
    total: u64,
    /// The first failure of a block (none can fail: inputs are at most one
    /// block, outputs are sized for it), reported by [`Self::finish`].
    failed: Option<snap::Error>,
}

impl Default for SnappyWriter {
    fn default() -> Self {
        SnappyWriter {
            encoder: snap::raw::Encoder::new(),
            window: Vec::new(),
            block: Vec::new(),
            blocks: Vec::new(),
            compressed: 0,
            total: 0,
            failed: None,
        }
    }
}

impl SnappyWriter {
    /// Starts a new body, dropping what was given for the last one if it
    /// was not finished.
    pub fn begin(&mut self) {
        self.window.clear();
        self.blocks = Vec::new();
        self.compressed = 0;
        self.total = 0;
        self.failed = None;
    }

    /// Uncompressed bytes given since [`Self::begin`].
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was given since [`Self::begin`].
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Heap bytes of the buffers it holds (besides the encoder's 32 KiB
    /// table).
    pub fn buffered_bytes(&self) -> usize {
        self.window.capacity()
            + self.block.capacity()
            + self.compressed
            + self.blocks.capacity() * std::mem::size_of::<Box<[u8]>>()
    }

    /// Ends the body and hands it over, in a buffer of its exact size;
    /// nothing of it stays here.
    ///
    /// # Errors
    /// The body is too large for snappy (about 3.6 GiB, as
    /// [`snap::raw::max_compress_len`] says).
    pub fn finish(&mut self) -> Result<Bytes, snap::Error> {
        self.flush_window();
        let blocks = std::mem::take(&mut self.blocks);
        let compressed = std::mem::take(&mut self.compressed);
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if snap::raw::max_compress_len(usize::try_from(self.total).unwrap_or(usize::MAX)) == 0 {
            return Err(snap::Error::TooBig {
                given: self.total,
                max: u64::from(u32::MAX),
            });
        }
        let (len, n) = varint::encode(self.total);
        let mut body = Vec::with_capacity(n + compressed);
        body.extend_from_slice(&len[..n]);
        for block in blocks {
            body.extend_from_slice(&block);
        }
        Ok(Bytes::from(body))
    }

    /// Compresses what the window holds now, as a block of its own.
    fn flush_window(&mut self) {
        if !self.window.is_empty() {
            let window = std::mem::take(&mut self.window);
            self.compress(&window);
            self.window = window;
            self.window.clear();
        }
    }

    /// Keeps the elements of `input` (at most one block).
    fn compress(&mut self, input: &[u8]) {
        debug_assert!(input.len() <= SNAPPY_BLOCK);
        if self.block.is_empty() {
            self.block = vec![0; snap::raw::max_compress_len(SNAPPY_BLOCK)];
        }
        match self.encoder.compress(input, &mut self.block) {
            Ok(n) => {
                let (_, header) = varint::encode(input.len() as u64);
                self.compressed += n - header;
                self.blocks.push(self.block[header..n].into());
            }
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }
}

impl Sink for SnappyWriter {
    /// Takes the elements of an already compressed body as they are,
    /// without compressing them again: a copy's offset counts back from
    /// where it is decompressed, and the copies of a body that decompresses
    /// reach no further back than its own start (the decoder checks that,
    /// and that the elements make up exactly the declared length), so its
    /// elements decompress to the same bytes after anything. What was given
    /// before is compressed first, as a block of its own.
    fn put_snappy(&mut self, body: &[u8]) -> Result<(), snap::Error> {
        let len = snap::raw::decompress_len(body)?;
        // Its header: the varint of that length, however many bytes long.
        let header = body
            .iter()
            .position(|b| b & 0x80 == 0)
            .map_or(body.len(), |i| i + 1);
        let elements = &body[header..];
        self.flush_window();
        self.total += len as u64;
        self.compressed += elements.len();
        self.blocks.push(elements.into());
        Ok(())
    }

    fn put(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.window.capacity() < SNAPPY_BLOCK {
            // Once, exactly: growing by doubling could take twice that.
            self.window.reserve_exact(SNAPPY_BLOCK - self.window.len());
        }
        if self.window.len() + bytes.len() < SNAPPY_BLOCK {
            self.window.extend_from_slice(bytes);
            return;
        }
        if !self.window.is_empty() {
            let (head, rest) = bytes.split_at(SNAPPY_BLOCK - self.window.len());
            let mut window = std::mem::take(&mut self.window);
            window.extend_from_slice(head);
            self.compress(&window);
            window.clear();
            self.window = window;
            bytes = rest;
        }
        // Whole blocks straight from the input, without the copy.
        let mut blocks = bytes.chunks_exact(SNAPPY_BLOCK);
        for block in &mut blocks {
            self.compress(block);
        }
        self.window.extend_from_slice(blocks.remainder());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::encode::snappy_compress;
    use proptest::prelude::*;

    /// `data` given in pieces of the lengths `cuts` (cycled), with `w`.
    fn streamed(w: &mut SnappyWriter, data: &[u8], cuts: &[usize]) -> Bytes {
        w.begin();
        let mut rest = data;
        for &cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(cut.min(rest.len()));
            w.put(piece);
            rest = tail;
        }
        assert_eq!(w.len(), data.len() as u64);
        w.finish().unwrap()
    }

    /// Bytes that compress in places and not in others: runs of a repeated
    /// byte, a repeated phrase, and noise.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            (any::<u8>(), 1usize..70_000).prop_map(|(b, n)| vec![b; n]),
            (1usize..40, 1usize..5_000).prop_map(|(k, n)| {
                (0..k * n)
                    .map(|i| b"remote write "[i % 13] ^ (i / k) as u8)
                    .collect()
            }),
            proptest::collection::vec(any::<u8>(), 0..20_000),
        ];
        proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Compressed bodies taken as they are, between bytes compressed
        /// here, decompress to everything in order.
        #[test]
        fn compressed_bodies_spliced_in_decompress_to_what_they_hold(
            parts in proptest::collection::vec((body(), any::<bool>()), 0..6),
        ) {
            let mut w = SnappyWriter::default();
            w.begin();
            let mut want = Vec::new();
            for (data, compressed) in &parts {
                if *compressed {
                    w.put_snappy(&snappy_compress(data)).unwrap();
                } else {
                    w.put(data);
                }
                want.extend_from_slice(data);
            }
            prop_assert_eq!(w.len(), want.len() as u64);
            let body = w.finish().unwrap();
            let got = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn a_body_compressed_as_it_comes_is_the_body_compressed_at_once(
            data in body(),
            cuts in proptest::collection::vec(prop_oneof![1usize..20, 1usize..200_000], 1..6),
        ) {
            let mut w = SnappyWriter::default();
            let got = streamed(&mut w, &data, &cuts);
            prop_assert_eq!(&got[..], &snappy_compress(&data)[..]);
            // The writer's kept buffers change nothing for the next body.
            let again = streamed(&mut w, &data[data.len() / 3..], &cuts);
            prop_assert_eq!(&again[..], &snappy_compress(&data[data.len() / 3..])[..]);
        }
    }

    #[test]
    fn bodies_at_block_boundaries_and_empty_ones_compress_as_at_once() {
        let mut w = SnappyWriter::default();
        let noise: Vec<u8> = (0..5 * SNAPPY_BLOCK as u32 + 40)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sizes = [
            0,
            1,
            16,
            17,
            SNAPPY_BLOCK - 1,
            SNAPPY_BLOCK,
            SNAPPY_BLOCK + 1,
            2 * SNAPPY_BLOCK,
            3 * SNAPPY_BLOCK + 16,
            5 * SNAPPY_BLOCK,
        ];
        for size in sizes {
            for cuts in [
                &[SNAPPY_BLOCK][..],
                &[1],
                &[7, SNAPPY_BLOCK + 3],
                &[1 << 30],
            ] {
                for data in [&noise[..size], &vec![b'a'; size][..]] {
                    let got = streamed(&mut w, data, cuts);
                    assert_eq!(got, snappy_compress(data), "size {size}, cuts {cuts:?}");
                }
            }
        }
        w.begin();
        assert_eq!(w.finish().unwrap(), Bytes::from_static(&[0]));
    }

    #[test]
    fn nothing_of_a_body_handed_over_is_kept() {
        let mut w = SnappyWriter::default();
        w.begin();
        let noise: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        w.put(&noise);
        let body = w.finish().unwrap();
        assert_eq!(body, snappy_compress(&noise));
        assert!(w.buffered_bytes() < 160 << 10, "{}", w.buffered_bytes());
        // Nor of one abandoned.
        w.put(&noise);
        w.begin();
        assert!(w.buffered_bytes() < 160 << 10, "{}", w.buffered_bytes());
    }
}
