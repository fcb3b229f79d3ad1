//! Chains: runs of frames that share one zstd stream.
//!
//! Under a light load the writer frames one request per group commit, and a
//! frame compressed on its own stores again every label its sender repeats
//! from request to request (a real Prometheus: 19.5 bytes per sample so,
//! against 4.9 in a chain; `benches/README.md`). A chain keeps one zstd
//! stream open across frames and flushes it at the end of each, so each
//! frame's body ends exactly where its records do and is synced with them,
//! while zstd finds one request's labels in the requests before it.
//!
//! The format is SPEC.md's ("Compression", "Chains"): a chain's first frame
//! (compression 2) begins a zstd stream, each later one (3) continues it
//! and is the frame right after the one before it in the segment, and every
//! body ends at a flush. What a chain costs: a reader decodes a frame of it
//! only after the frames before it in the chain ([`ChainDecoder`]), and a
//! damaged frame takes the rest of its chain with it. So the writer
//! ([`ChainEncoder`]) starts a new chain after `cap` raw bytes, which bounds
//! that loss as the frame limit bounds it for a frame, and after anything
//! that may leave the disk without a frame the stream holds (a write that
//! failed, a restart, a new segment).

use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
use zstd::zstd_safe::{
    self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective,
};

use crate::error::{CorruptReason, EncodeError};
use crate::frame::{
    check_body_len, checked_raw_len, write_header, Compression, FrameHeader, FrameSummary,
    FRAME_HEADER_LEN,
};
use crate::record::{encode_entry, split_entries, Record, RecordRef};

/// The zstd window of a chain: 2 MiB (log 21). A stream's matches reach
/// this far back, and a reader keeps this much of its output; a reader
/// refuses a stream that declares more. Measured on a real sender's
/// requests, a window of 8 MiB saved nothing more with snappy bodies.
pub const CHAIN_WINDOW_LOG: u32 = 21;

fn zstd_error(code: zstd_safe::ErrorCode) -> std::io::Error {
    std::io::Error::other(zstd_safe::get_error_name(code))
}

/// Encodes frames as chains (see the module documentation).
pub struct ChainEncoder {
    level: i32,
    cap: usize,
    /// Created on the first frame: a writer that never chains costs nothing.
    cctx: Option<CCtx<'static>>,
    /// Raw bytes in the current chain; 0 when the next frame starts one.
    in_chain: usize,
    raw: Vec<u8>,
}

impl ChainEncoder {
    /// An encoder at zstd `level` whose chains end once they hold `cap` raw
    /// bytes (a frame larger than `cap` is a chain of its own).
    pub fn new(level: i32, cap: usize) -> Self {
        Self {
            level,
            cap,
            cctx: None,
            in_chain: 0,
            raw: Vec::new(),
        }
    }

    /// Makes the next frame start a new chain. Call it whenever a frame this
    /// encoder produced may not be in the segment, right before the next
    /// one: after a write that failed or was cut back, and before the first
    /// frame of a new segment.
    pub fn restart(&mut self) {
        self.in_chain = 0;
    }

    /// The zstd level of the chain being written.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses at `level` from the next frame on, which starts a new
    /// chain if the level changes (a stream has one level).
    pub fn set_level(&mut self, level: i32) {
        if level != self.level {
            self.level = level;
            self.in_chain = 0;
        }
    }

    /// Encodes one frame of `records` (sequence numbers from `first_seq`)
    /// for the segment whose first sequence is `salt` and appends it to
    /// `out`: the next frame of the current chain, or the first of a new
    /// one. The caller writes it right after the frame encoded before it,
    /// or calls [`Self::restart`].
    ///
    /// # Errors
    /// As [`crate::encode_frame`]. On any error `out` is left as it was and
    /// the next frame starts a new chain.
    pub fn encode_frame(
        &mut self,
        salt: u64,
        first_seq: u64,
        records: &[RecordRef<'_>],
        out: &mut Vec<u8>,
    ) -> Result<FrameSummary, EncodeError> {
        let raw_len = checked_raw_len(first_seq, records)?;
        self.raw.clear();
        self.raw.reserve(raw_len);
        records.iter().for_each(|r| encode_entry(r, &mut self.raw));
        let start = self.in_chain == 0 || self.in_chain.saturating_add(raw_len) > self.cap;
        let at = out.len();
        let body_start = at + FRAME_HEADER_LEN;
        out.resize(body_start, 0);
        if let Err(e) = self.compress(start, out) {
            out.truncate(at);
            self.in_chain = 0;
            return Err(EncodeError::Compress(e));
        }
        let compression = if start {
            self.in_chain = raw_len;
            Compression::ZstdChainStart
        } else {
            self.in_chain += raw_len;
            Compression::ZstdChained
        };
        Ok(write_header(
            salt,
            first_seq,
            records.len(),
            raw_len,
            compression,
            at,
            out,
        ))
    }

    /// Compresses `self.raw` into the stream (a new one if `start`) up to a
    /// flush, appending the bytes to `out`.
    fn compress(&mut self, start: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
        let cctx = match &mut self.cctx {
            Some(c) => c,
            None => {
                let mut c = CCtx::create();
                c.set_parameter(CParameter::WindowLog(CHAIN_WINDOW_LOG))
                    .map_err(zstd_error)?;
                self.cctx.insert(c)
            }
        };
        if start {
            cctx.reset(ResetDirective::SessionOnly)
                .map_err(zstd_error)?;
            // A level set on a stream that began applies from the next
            // one; the window set above sticks (zstd keeps parameters set
            // by hand when the level changes).
            cctx.set_parameter(CParameter::CompressionLevel(self.level))
                .map_err(zstd_error)?;
        }
        let mut input = InBuffer::around(&self.raw);
        loop {
            // Room for the worst case of what is left, and a block header.
            out.reserve(zstd_safe::compress_bound(self.raw.len() - input.pos()) + 64);
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            let left = cctx
                .compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_flush)
                .map_err(zstd_error)?;
            if left == 0 && input.pos() == self.raw.len() {
                return Ok(());
            }
        }
    }
}

/// Decodes frames in segment order, chains included (see the module
/// documentation).
#[derive(Default)]
pub struct ChainDecoder {
    /// Created on the first chain frame.
    dctx: Option<DCtx<'static>>,
    /// The last frame given to [`Self::decode`] was a chain frame and
    /// decoded: a frame continuing its chain can be decoded next, and must
    /// begin at this sequence number (its end). The caller's order is
    /// checked so: a frame skipped in between would be decompressed
    /// against the wrong history, and every frame holds a record.
    live: Option<u64>,
}

impl ChainDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the chain: the next frame is not the one right after the
    /// last one decoded (the reader skipped frames, or found damage).
    pub fn break_chain(&mut self) {
        self.live = None;
    }

    /// Decodes a frame's records as [`crate::decode_records`] does, and a
    /// chain's frames too. The caller gives it the frames of a segment in
    /// order, and calls [`Self::break_chain`] before a frame that is not
    /// the one right after the last one it gave.
    ///
    /// # Errors
    /// As [`crate::decode_records`], and [`CorruptReason::ChainBroken`] for
    /// a frame continuing a chain this decoder did not decode up to it.
    pub fn decode(
        &mut self,
        header: &FrameHeader,
        body: &[u8],
    ) -> Result<Vec<Record>, CorruptReason> {
        let live = self.live.take();
        match header.compression {
            Compression::None | Compression::Zstd => crate::frame::decode_records(header, body),
            Compression::ZstdChained if live != Some(header.first_seq) => {
                Err(CorruptReason::ChainBroken)
            }
            Compression::ZstdChainStart | Compression::ZstdChained => {
                check_body_len(header, body)?;
                let raw = self.decompress(header, body)?;
                let records = split_entries(&raw.into(), header.first_seq, header.record_count)?;
                self.live = Some(header.end_seq());
                Ok(records)
            }
        }
    }

    /// The frame's body through the chain's stream: exactly `raw_len`
    /// bytes, into a buffer of that size (a verified, limit-checked length
    /// that zstd never grows).
    fn decompress(&mut self, header: &FrameHeader, body: &[u8]) -> Result<Vec<u8>, CorruptReason> {
        let failed = |code| CorruptReason::Decompress(zstd_safe::get_error_name(code).into());
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => {
                let mut d = DCtx::create();
                d.set_parameter(DParameter::WindowLogMax(CHAIN_WINDOW_LOG))
                    .map_err(failed)?;
                self.dctx.insert(d)
            }
        };
        if header.compression == Compression::ZstdChainStart {
            dctx.reset(ResetDirective::SessionOnly).map_err(failed)?;
        }
        let raw_len = header.raw_len as usize;
        let mut raw = vec![0u8; raw_len];
        let mut input = InBuffer::around(body);
        let produced = {
            let mut output = OutBuffer::around(&mut raw[..]);
            loop {
                let before = (input.pos(), output.pos());
                dctx.decompress_stream(&mut output, &mut input)
                    .map_err(failed)?;
                if output.pos() == raw_len || (input.pos(), output.pos()) == before {
                    break;
                }
            }
            output.pos()
        };
        if produced < raw_len {
            return Err(CorruptReason::RawLengthMismatch {
                expected: header.raw_len,
                actual: produced as u64,
            });
        }
        // The body must end at the stream's flush after exactly raw_len
        // bytes: nothing left unread, and nothing more to come out.
        let mut probe = [0u8; 1];
        let mut more = OutBuffer::around(&mut probe[..]);
        dctx.decompress_stream(&mut more, &mut input)
            .map_err(failed)?;
        if input.pos() < body.len() || more.pos() > 0 {
            return Err(CorruptReason::Decompress(format!(
                "the stream holds more than raw_len {raw_len} bytes"
            )));
        }
        Ok(raw)
    }
}

#[cfg(test)]
mod tests;
