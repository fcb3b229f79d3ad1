//! A borrowing protobuf reader that accepts and refuses exactly what prost's
//! derived decoders do, for the remote-write messages, without building them.
//!
//! [`check`] walks a request the way `prost::Message::decode` does: the same
//! order, the same rules and the same error (down to its message: the
//! `Message.field` stack and the cause), but it keeps nothing of what it
//! reads. The relay validates a body with it, then applies the rules of
//! [`crate::decode`] in further passes over the same bytes with [`Fields`],
//! which may then assume every field is well formed.
//!
//! Rules of prost that matter here, all reproduced:
//!
//! * Nested messages are not decoded from a sub-slice: a field inside a
//!   message is read from the rest of the *whole* buffer, and only after the
//!   last field is the message's end compared with its declared length
//!   ("delimited length exceeded"). A string or a packed run declared longer
//!   than its message, but not than the buffer, is therefore read (and its
//!   UTF-8 checked) before that error.
//! * A known field with another wire type than its own is an error, except
//!   that a repeated scalar may come packed (length-delimited) or not. An
//!   unknown field is skipped, groups included, with a depth limit.
//! * Every occurrence of a string must be UTF-8, not only the last.
//! * The recursion limit is 100: entering a nested message or a group, and
//!   skipping any unknown field at the limit, fail with "recursion limit
//!   reached".
//!
//! `tests/streaming.rs` compares this with prost on mutated bodies.

use std::fmt;

/// Wire types.
pub(crate) const WT_VARINT: u8 = 0;
pub(crate) const WT_I64: u8 = 1;
pub(crate) const WT_LEN: u8 = 2;
pub(crate) const WT_SGROUP: u8 = 3;
pub(crate) const WT_EGROUP: u8 = 4;
pub(crate) const WT_I32: u8 = 5;

/// prost's `RECURSION_LIMIT`.
const RECURSION_LIMIT: u32 = 100;

/// The cause of a [`PbError`], worded as prost words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PbErrorKind {
    InvalidVarint,
    RecursionLimitReached,
    InvalidWireType(u64),
    InvalidKey(u64),
    InvalidTag,
    UnexpectedWireType { actual: u8, expected: u8 },
    BufferUnderflow,
    DelimitedLengthExceeded,
    UnexpectedEndGroupTag,
    InvalidString,
}

/// A decoding error whose `Display` is that of `prost::DecodeError` for the
/// same input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PbError {
    kind: PbErrorKind,
    /// (message, field) pairs, innermost first.
    stack: Vec<(&'static str, &'static str)>,
}

impl PbError {
    fn new(kind: PbErrorKind) -> Self {
        PbError {
            kind,
            stack: Vec::new(),
        }
    }

    fn push(mut self, message: &'static str, field: &'static str) -> Self {
        self.stack.push((message, field));
        self
    }
}

/// prost's `Debug` names of the wire types.
fn wire_type_name(wt: u8) -> &'static str {
    match wt {
        WT_VARINT => "Varint",
        WT_I64 => "SixtyFourBit",
        WT_LEN => "LengthDelimited",
        WT_SGROUP => "StartGroup",
        WT_EGROUP => "EndGroup",
        _ => "ThirtyTwoBit",
    }
}

impl fmt::Display for PbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("failed to decode Protobuf message: ")?;
        for (message, field) in &self.stack {
            write!(f, "{message}.{field}: ")?;
        }
        match self.kind {
            PbErrorKind::InvalidVarint => f.write_str("invalid varint"),
            PbErrorKind::RecursionLimitReached => f.write_str("recursion limit reached"),
            PbErrorKind::InvalidWireType(v) => write!(f, "invalid wire type value: {v}"),
            PbErrorKind::InvalidKey(k) => write!(f, "invalid key value: {k}"),
            PbErrorKind::InvalidTag => f.write_str("invalid tag value: 0"),
            PbErrorKind::UnexpectedWireType { actual, expected } => write!(
                f,
                "invalid wire type: {} (expected {})",
                wire_type_name(actual),
                wire_type_name(expected)
            ),
            PbErrorKind::BufferUnderflow => f.write_str("buffer underflow"),
            PbErrorKind::DelimitedLengthExceeded => f.write_str("delimited length exceeded"),
            PbErrorKind::UnexpectedEndGroupTag => f.write_str("unexpected end group tag"),
            PbErrorKind::InvalidString => {
                f.write_str("invalid string value: data is not UTF-8 encoded")
            }
        }
    }
}

type PbResult<T> = Result<T, PbError>;

/// Why [`read_varint`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarintError {
    /// The buffer ends inside it.
    Truncated,
    /// More than 10 bytes, or a tenth byte over 1 (more than 64 bits).
    Invalid,
}

/// A varint at `*pos`, as prost reads it (at most 10 bytes, the tenth at
/// most 1); `*pos` ends after the bytes read, also on failure.
#[inline(always)]
pub(crate) fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    match buf.get(*pos) {
        Some(&b) if b < 0x80 => {
            *pos += 1;
            Ok(u64::from(b))
        }
        _ => read_varint_slow(buf, pos),
    }
}

#[inline(never)]
fn read_varint_slow(buf: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(VarintError::Truncated);
        };
        *pos += 1;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b >= 2 {
                return Err(VarintError::Invalid);
            }
            return Ok(value);
        }
    }
    Err(VarintError::Invalid)
}

fn err<T>(kind: PbErrorKind) -> PbResult<T> {
    Err(PbError::new(kind))
}

/// How prost decodes one field of a message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A nested message, repeated or optional (the same on the wire).
    Message(&'static Schema),
    /// A string, repeated or not.
    String,
    /// A varint scalar (any integer type or enum), singular.
    Varint,
    /// A repeated varint scalar: packed or not.
    RepeatedVarint,
    /// A singular `double`.
    Double,
    /// A repeated `double`: packed or not.
    RepeatedDouble,
}

/// One field of a [`Schema`].
#[derive(Debug)]
pub(crate) struct Field {
    pub tag: u32,
    /// The Rust field name prost reports in its errors (a oneof's name for
    /// its variants).
    pub name: &'static str,
    pub kind: Kind,
}

/// A [`Field`], for short schema tables.
pub(crate) const fn field(tag: u32, name: &'static str, kind: Kind) -> Field {
    Field { tag, name, kind }
}

/// A message as prost derives it: its Rust name and known fields.
#[derive(Debug)]
pub(crate) struct Schema {
    pub name: &'static str,
    pub fields: &'static [Field],
}

impl Schema {
    fn field(&self, tag: u32) -> Option<&Field> {
        self.fields.iter().find(|f| f.tag == tag)
    }
}

/// A position in the whole buffer, read with prost's primitives.
pub(crate) struct Cursor<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], pos: usize) -> Self {
        Cursor { buf, pos }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// `prost::encoding::decode_varint`.
    #[inline(always)]
    pub fn varint(&mut self) -> PbResult<u64> {
        read_varint(self.buf, &mut self.pos).or_else(|_| err(PbErrorKind::InvalidVarint))
    }

    /// `prost::encoding::decode_key`.
    #[inline]
    pub fn key(&mut self) -> PbResult<(u32, u8)> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return err(PbErrorKind::InvalidKey(key));
        }
        let wt = key & 7;
        if wt > u64::from(WT_I32) {
            return err(PbErrorKind::InvalidWireType(wt));
        }
        let tag = (key as u32) >> 3;
        if tag == 0 {
            return err(PbErrorKind::InvalidTag);
        }
        Ok((tag, wt as u8))
    }

    fn advance(&mut self, n: u64) -> PbResult<()> {
        if n > self.remaining() as u64 {
            return err(PbErrorKind::BufferUnderflow);
        }
        self.pos += n as usize;
        Ok(())
    }

    /// A length prefix and the end position it declares (within the buffer).
    fn len_end(&mut self) -> PbResult<usize> {
        let len = self.varint()?;
        if len > self.remaining() as u64 {
            return err(PbErrorKind::BufferUnderflow);
        }
        Ok(self.pos + len as usize)
    }

    /// `prost::encoding::skip_field`.
    fn skip_field(&mut self, wt: u8, tag: u32, depth: u32) -> PbResult<()> {
        if depth == 0 {
            return err(PbErrorKind::RecursionLimitReached);
        }
        let len = match wt {
            WT_VARINT => self.varint().map(|_| 0)?,
            WT_I32 => 4,
            WT_I64 => 8,
            WT_LEN => self.varint()?,
            WT_SGROUP => loop {
                let (inner_tag, inner_wt) = self.key()?;
                if inner_wt == WT_EGROUP {
                    if inner_tag != tag {
                        return err(PbErrorKind::UnexpectedEndGroupTag);
                    }
                    break 0;
                }
                self.skip_field(inner_wt, inner_tag, depth - 1)?;
            },
            _ => return err(PbErrorKind::UnexpectedEndGroupTag),
        };
        self.advance(len)
    }

    /// The fields of a message ending at `end`, as prost's `merge_loop`.
    fn message(&mut self, schema: &Schema, end: usize, depth: u32) -> PbResult<()> {
        while self.pos < end {
            let (tag, wt) = self.key()?;
            match schema.field(tag) {
                Some(f) => self
                    .field(f.kind, wt, depth)
                    .map_err(|e| e.push(schema.name, f.name))?,
                None => self.skip_field(wt, tag, depth)?,
            }
        }
        if self.pos != end {
            return err(PbErrorKind::DelimitedLengthExceeded);
        }
        Ok(())
    }

    /// The value of a known field whose key was just read.
    fn field(&mut self, kind: Kind, wt: u8, depth: u32) -> PbResult<()> {
        match kind {
            Kind::Message(schema) => {
                expect(WT_LEN, wt)?;
                if depth == 0 {
                    return err(PbErrorKind::RecursionLimitReached);
                }
                let end = self.len_end()?;
                self.message(schema, end, depth - 1)
            }
            Kind::String => {
                expect(WT_LEN, wt)?;
                let end = self.len_end()?;
                let s = &self.buf[self.pos..end];
                self.pos = end;
                if utf8(s) {
                    Ok(())
                } else {
                    err(PbErrorKind::InvalidString)
                }
            }
            Kind::Varint => {
                expect(WT_VARINT, wt)?;
                self.varint().map(|_| ())
            }
            Kind::Double => {
                expect(WT_I64, wt)?;
                self.advance(8)
            }
            Kind::RepeatedVarint if wt == WT_LEN => {
                let end = self.len_end()?;
                while self.pos < end {
                    self.varint()?;
                }
                self.packed_end(end)
            }
            Kind::RepeatedDouble if wt == WT_LEN => {
                let end = self.len_end()?;
                while self.pos < end {
                    self.advance(8)?;
                }
                self.packed_end(end)
            }
            Kind::RepeatedVarint => self.field(Kind::Varint, wt, depth),
            Kind::RepeatedDouble => self.field(Kind::Double, wt, depth),
        }
    }

    fn packed_end(&self, end: usize) -> PbResult<()> {
        if self.pos != end {
            return err(PbErrorKind::DelimitedLengthExceeded);
        }
        Ok(())
    }
}

fn expect(expected: u8, actual: u8) -> PbResult<()> {
    if expected != actual {
        return err(PbErrorKind::UnexpectedWireType { actual, expected });
    }
    Ok(())
}

#[inline]
pub(crate) fn utf8(b: &[u8]) -> bool {
    b.is_ascii() || std::str::from_utf8(b).is_ok()
}

/// Walks `buf` as `prost::Message::decode` of the message `schema` would,
/// allocating nothing (but an error's stack). `on_string(tag, at)` is called
/// for every top-level string field once it is known good, with the position
/// of its length prefix (how the 2.0 symbol table is indexed).
pub(crate) fn check(buf: &[u8], schema: &Schema, mut on_string: impl FnMut(usize)) -> PbResult<()> {
    let mut c = Cursor::new(buf, 0);
    while c.pos < buf.len() {
        let (tag, wt) = c.key()?;
        match schema.field(tag) {
            Some(f) => {
                let at = c.pos;
                c.field(f.kind, wt, RECURSION_LIMIT)
                    .map_err(|e| e.push(schema.name, f.name))?;
                if matches!(f.kind, Kind::String) {
                    on_string(at);
                }
            }
            None => c.skip_field(wt, tag, RECURSION_LIMIT)?,
        }
    }
    Ok(())
}

/// A field value in bytes that [`check`] accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Varint(u64),
    I64(u64),
    Len(&'a [u8]),
    /// A 32-bit value or a group: no remote-write field is either.
    Other,
}

impl<'a> Value<'a> {
    /// The bytes of a length-delimited field (empty for any other).
    pub fn bytes(self) -> &'a [u8] {
        match self {
            Value::Len(b) => b,
            _ => &[],
        }
    }

    /// A varint, or the bits of a 64-bit field, as prost reads a singular
    /// scalar of that wire type (0 for any other).
    pub fn u64(self) -> u64 {
        match self {
            Value::Varint(v) | Value::I64(v) => v,
            _ => 0,
        }
    }
}

/// The fields of a message (its bytes, without the length prefix) that
/// [`check`] accepted, in wire order, with the position of each value in
/// `buf`. Stops early on anything malformed, which [`check`] has ruled out.
pub(crate) struct Fields<'a> {
    c: Cursor<'a>,
    end: usize,
}

impl<'a> Fields<'a> {
    /// The fields of the whole of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Fields {
            c: Cursor::new(buf, 0),
            end: buf.len(),
        }
    }

    /// The position in the buffer where the next field's key starts.
    pub fn pos(&self) -> usize {
        self.c.pos
    }

    /// The fields of `buf` from `pos` (a key) to its end.
    pub fn from_pos(buf: &'a [u8], pos: usize) -> Self {
        Fields {
            c: Cursor::new(buf, pos),
            end: buf.len(),
        }
    }

    #[inline(always)]
    fn value(&mut self, tag: u32, wt: u8) -> Option<Value<'a>> {
        let c = &mut self.c;
        Some(match wt {
            WT_VARINT => Value::Varint(c.varint().ok()?),
            WT_I64 => {
                let b = c.buf.get(c.pos..c.pos + 8)?;
                c.pos += 8;
                Value::I64(u64::from_le_bytes(b.try_into().ok()?))
            }
            WT_LEN => {
                let len = c.varint().ok()? as usize;
                let b = c.buf.get(c.pos..c.pos.checked_add(len)?)?;
                c.pos += len;
                Value::Len(b)
            }
            _ => {
                if wt == WT_EGROUP || wt > WT_I32 {
                    return None;
                }
                c.skip_field(wt, tag, RECURSION_LIMIT).ok()?;
                Value::Other
            }
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u32, Value<'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.c.pos >= self.end {
            return None;
        }
        // The key's checks were made by `check`.
        let field = match self.c.varint() {
            Ok(key) => {
                let tag = (key >> 3) as u32;
                self.value(tag, (key & 7) as u8).map(|v| (tag, v))
            }
            Err(_) => None,
        };
        if field.is_none() {
            // Never again after malformed bytes.
            self.end = 0;
        }
        field
    }
}

/// The elements of a repeated varint field, packed or not, in order, from
/// its occurrences in `fields` with tag `tag`.
pub(crate) fn repeated_varints(fields: Fields<'_>, tag: u32) -> RepeatedVarints<'_> {
    RepeatedVarints {
        fields,
        tag,
        packed: Cursor::new(&[], 0),
    }
}

/// The varints of one packed run.
pub(crate) fn packed_varints(run: &[u8]) -> RepeatedVarints<'_> {
    RepeatedVarints {
        fields: Fields::new(&[]),
        tag: 0,
        packed: Cursor::new(run, 0),
    }
}

/// See [`repeated_varints`].
pub(crate) struct RepeatedVarints<'a> {
    fields: Fields<'a>,
    tag: u32,
    /// The rest of the packed run being read.
    packed: Cursor<'a>,
}

impl Iterator for RepeatedVarints<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        loop {
            if self.packed.pos < self.packed.buf.len() {
                return self.packed.varint().ok();
            }
            let (tag, v) = self.fields.next()?;
            if tag == self.tag {
                match v {
                    Value::Len(b) => self.packed = Cursor::new(b, 0),
                    other => return Some(other.u64()),
                }
            }
        }
    }
}

/// The elements of a repeated `double` field, packed or not, in order.
pub(crate) fn repeated_doubles<'a>(fields: Fields<'a>, tag: u32) -> impl Iterator<Item = f64> + 'a {
    fields.filter(move |&(t, _)| t == tag).flat_map(|(_, v)| {
        let (packed, single) = match v {
            Value::Len(b) => (b, None),
            other => (&[][..], Some(other.u64())),
        };
        single
            .into_iter()
            .chain(b8(packed).map(u64::from_le_bytes))
            .map(f64::from_bits)
    })
}

fn b8(b: &[u8]) -> impl Iterator<Item = [u8; 8]> + '_ {
    b.chunks_exact(8)
        .map(|c| <[u8; 8]>::try_from(c).unwrap_or([0; 8]))
}

/// The last value of the singular scalar field `tag` of `msg` (the last
/// occurrence wins), or 0.
pub(crate) fn last(msg: &[u8], tag: u32) -> u64 {
    Fields::new(msg)
        .filter(|&(t, _)| t == tag)
        .last()
        .map_or(0, |(_, v)| v.u64())
}

/// Number of elements of a repeated varint field in `fields` with `tag`.
pub(crate) fn count_varints(fields: Fields<'_>, tag: u32) -> usize {
    fields
        .filter(|&(t, _)| t == tag)
        .map(|(_, v)| varints_in(v))
        .sum()
}

/// Number of elements in one occurrence of a repeated varint field.
#[inline]
pub(crate) fn varints_in(v: Value<'_>) -> usize {
    match v {
        // Every byte without the continuation bit ends one varint.
        Value::Len(b) => b.iter().filter(|&&x| x < 0x80).count(),
        _ => 1,
    }
}

/// Number of elements of a repeated `double` field in `fields` with `tag`.
pub(crate) fn count_doubles(fields: Fields<'_>, tag: u32) -> usize {
    fields
        .filter(|&(t, _)| t == tag)
        .map(|(_, v)| match v {
            Value::Len(b) => b.len() / 8,
            _ => 1,
        })
        .sum()
}

/// `sint32` as prost decodes it from a varint.
pub(crate) fn zigzag32(v: u64) -> i32 {
    let v = v as u32;
    ((v >> 1) as i32) ^ (-((v & 1) as i32))
}

/// `sint64` as prost decodes it from a varint.
pub(crate) fn zigzag64(v: u64) -> i64 {
    ((v >> 1) as i64) ^ (-((v & 1) as i64))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    static INNER: Schema = Schema {
        name: "Inner",
        fields: &[Field {
            tag: 1,
            name: "s",
            kind: Kind::String,
        }],
    };
    static OUTER: Schema = Schema {
        name: "Outer",
        fields: &[
            Field {
                tag: 1,
                name: "inner",
                kind: Kind::Message(&INNER),
            },
            Field {
                tag: 2,
                name: "xs",
                kind: Kind::RepeatedVarint,
            },
        ],
    };

    fn msg(buf: &[u8]) -> String {
        check(buf, &OUTER, |_| ()).unwrap_err().to_string()
    }

    #[test]
    fn errors_are_worded_as_prost_words_them() {
        assert_eq!(
            msg(&[0x0a, 0x03, 0x0a, 0x01, 0xff]),
            "failed to decode Protobuf message: Inner.s: Outer.inner: invalid string value: data is not UTF-8 encoded"
        );
        assert_eq!(
            msg(&[0x10, 0x80]),
            "failed to decode Protobuf message: Outer.xs: invalid varint"
        );
        assert_eq!(
            msg(&[0x09]),
            "failed to decode Protobuf message: Outer.inner: invalid wire type: SixtyFourBit (expected LengthDelimited)"
        );
        assert_eq!(
            msg(&[0x0f]),
            "failed to decode Protobuf message: invalid wire type value: 7"
        );
    }

    #[test]
    fn a_field_may_run_past_its_message_into_the_rest_of_the_buffer() {
        // Inner declares 2 bytes, its string 3: read, then refused.
        assert_eq!(
            msg(&[0x0a, 0x02, 0x0a, 0x03, b'a', b'b', b'c']),
            "failed to decode Protobuf message: Outer.inner: delimited length exceeded"
        );
    }

    #[test]
    fn repeated_varints_come_packed_or_not_in_wire_order() {
        let buf = [0x10, 0x05, 0x12, 0x03, 0x01, 0x80, 0x01, 0x10, 0x07];
        check(&buf, &OUTER, |_| ()).unwrap();
        let got: Vec<u64> = repeated_varints(Fields::new(&buf), 2).collect();
        assert_eq!(got, [5, 1, 128, 7]);
        assert_eq!(count_varints(Fields::new(&buf), 2), 4);
    }
}
