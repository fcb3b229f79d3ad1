//! `validate` reads a request where it lies instead of decoding it into
//! owned structs. Whatever the input, its answer must be the one of the
//! owned-struct reference (`validate_owned`: prost decode, then
//! `validate_v1` / `validate_v2`): the same summary, or the same error with
//! the same message.
//!
//! Inputs: random requests of every shape (1.0 with exemplars, histograms
//! and metadata; 2.0 with symbols, references, histograms, exemplars,
//! metadata and created timestamps), valid or breaking a rule, turned into a
//! tree of protobuf fields and mutated the way a protobuf parser must cope
//! with (a field given twice, fields reordered, packed scalars unpacked or
//! split, unknown fields and groups, wrong wire types, over-long varints,
//! invalid UTF-8, deep groups), then sometimes damaged byte by byte
//! (flips, truncation, a range duplicated).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use prom_remote_write::decode::{
    decode_v2, validate, validate_owned, validate_without_fast_path, DecodeError, Limits,
};
use prom_remote_write::encode::{merge_v2, merge_v2_bytes, merge_v2_into};
use prom_remote_write::sink::Sink;
use prom_remote_write::translate::{count_v2, v2_to_v1, v2_to_v1_bytes, v2_to_v1_into, CheckedV2};
use prom_remote_write::{v1, v2, Protocol};

mod common;

// ---------------------------------------------------------------------------
// A protobuf message as a tree of fields.

#[derive(Clone, Debug)]
enum Node {
    Varint(u64),
    I64(u64),
    I32(u32),
    Bytes(Vec<u8>),
    Msg(Vec<Field>),
    Group(Vec<Field>),
}

#[derive(Clone, Debug)]
struct Field {
    tag: u32,
    node: Node,
    /// Extra (over-long) bytes in the key's and the length's varints.
    pad: u8,
}

/// The messages of both protocols, to know which length-delimited fields
/// are messages and which are packed scalars.
#[derive(Clone, Copy, Debug, PartialEq)]
enum M {
    Req1,
    Ts1,
    Label,
    Sample,
    Ex1,
    Hist,
    Span,
    Meta1,
    Req2,
    Ts2,
    Ex2,
    Meta2,
}

fn sub(m: M, tag: u32) -> Option<M> {
    use M::*;
    Some(match (m, tag) {
        (Req1, 1) => Ts1,
        (Req1, 3) => Meta1,
        (Ts1, 1) | (Ex1, 1) => Label,
        (Ts1, 2) | (Ts2, 2) => Sample,
        (Ts1, 3) => Ex1,
        (Ts1, 4) | (Ts2, 3) => Hist,
        (Hist, 8) | (Hist, 11) => Span,
        (Req2, 5) => Ts2,
        (Ts2, 4) => Ex2,
        (Ts2, 5) => Meta2,
        _ => return None,
    })
}

/// Packed repeated fields: Some(true) for varints, Some(false) for doubles.
fn packed(m: M, tag: u32) -> Option<bool> {
    match (m, tag) {
        (M::Ts2, 1) | (M::Ex2, 1) | (M::Hist, 9) | (M::Hist, 12) => Some(true),
        (M::Hist, 10) | (M::Hist, 13) | (M::Hist, 16) => Some(false),
        _ => None,
    }
}

fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for i in 0..10 {
        let x = b[*pos];
        *pos += 1;
        v |= u64::from(x & 0x7f) << (7 * i);
        if x < 0x80 {
            break;
        }
    }
    v
}

/// Parses what prost encoded (well-formed by construction).
fn parse(b: &[u8], m: M) -> Vec<Field> {
    let mut out = vec![];
    let mut pos = 0;
    while pos < b.len() {
        let key = read_varint(b, &mut pos);
        let (tag, wt) = ((key >> 3) as u32, key & 7);
        let node = match wt {
            0 => Node::Varint(read_varint(b, &mut pos)),
            1 => {
                let v = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap());
                pos += 8;
                Node::I64(v)
            }
            2 => {
                let len = read_varint(b, &mut pos) as usize;
                let body = &b[pos..pos + len];
                pos += len;
                match sub(m, tag) {
                    Some(s) => Node::Msg(parse(body, s)),
                    None => Node::Bytes(body.to_vec()),
                }
            }
            _ => unreachable!("prost wrote wire type {wt}"),
        };
        out.push(Field { tag, node, pad: 0 });
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64, pad: u8) {
    let start = out.len();
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    // Over-long: the same value with trailing zero groups.
    for _ in 0..pad.min(3) {
        let last = out.len() - 1;
        out[last] |= 0x80;
        out.push(0);
    }
    debug_assert!(out.len() > start);
}

fn write(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        let wt = match f.node {
            Node::Varint(_) => 0,
            Node::I64(_) => 1,
            Node::Bytes(_) | Node::Msg(_) => 2,
            Node::Group(_) => 3,
            Node::I32(_) => 5,
        };
        put_varint(out, (u64::from(f.tag) << 3) | wt, f.pad);
        match &f.node {
            Node::Varint(v) => put_varint(out, *v, 0),
            Node::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Node::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Node::Bytes(b) => {
                put_varint(out, b.len() as u64, f.pad);
                out.extend_from_slice(b);
            }
            Node::Msg(inner) => {
                let mut body = vec![];
                write(inner, &mut body);
                put_varint(out, body.len() as u64, f.pad);
                out.extend_from_slice(&body);
            }
            Node::Group(inner) => {
                write(inner, out);
                put_varint(out, (u64::from(f.tag) << 3) | 4, 0);
            }
        }
    }
}

fn bytes_of(fields: &[Field]) -> Vec<u8> {
    let mut out = vec![];
    write(fields, &mut out);
    out
}

// ---------------------------------------------------------------------------
// Mutations of the tree.

#[derive(Clone, Debug)]
enum Mutation {
    /// The field repeated, at another place in its message.
    Duplicate,
    Remove,
    Swap,
    /// An unknown field (or a known tag with another type).
    Insert(u32, Node),
    /// The value replaced by another of another wire type.
    Retype(Node),
    /// A packed run as one field per element, or split in two runs.
    Unpack,
    Split,
    /// Over-long varints for the key and length.
    Pad(u8),
    /// A varint set to this value.
    SetVarint(u64),
    /// A string or bytes field's content replaced.
    SetBytes(Vec<u8>),
    /// Groups nested this deep, added to the message.
    DeepGroup(u32),
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        // Defaults, written out: a singular field given as 0 after another
        // value, -0.0 (not a default to prost's encoder).
        Just(Node::Varint(0)),
        Just(Node::I64((-0.0f64).to_bits())),
        Just(Node::I64(0)),
        any::<u64>().prop_map(Node::Varint),
        (0u64..300).prop_map(Node::Varint),
        any::<u64>().prop_map(Node::I64),
        any::<u32>().prop_map(Node::I32),
        vec(any::<u8>(), 0..6).prop_map(Node::Bytes),
        Just(Node::Group(vec![Field {
            tag: 2,
            node: Node::Varint(1),
            pad: 0
        }])),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::Duplicate),
        1 => Just(Mutation::Remove),
        2 => Just(Mutation::Swap),
        2 => (prop_oneof![1u32..17, 17u32..40, Just(536_870_911u32)], node())
            .prop_map(|(t, n)| Mutation::Insert(t, n)),
        2 => node().prop_map(Mutation::Retype),
        2 => Just(Mutation::Unpack),
        1 => Just(Mutation::Split),
        1 => (1u8..4).prop_map(Mutation::Pad),
        2 => prop_oneof![
            0u64..8,
            Just(u64::from(u32::MAX) + 2),
            Just(u64::MAX),
            any::<u64>()
        ]
        .prop_map(Mutation::SetVarint),
        2 => prop_oneof![
            Just(vec![0xff]),
            Just(b"__name__".to_vec()),
            Just(vec![]),
            Just(vec![0xc3, 0xa9]),
            vec(any::<u8>(), 0..4)
        ]
        .prop_map(Mutation::SetBytes),
        1 => prop_oneof![90u32..102, 1u32..4].prop_map(Mutation::DeepGroup),
    ]
}

/// Every message of the tree, each with its type: (path of field indices).
fn messages(fields: &[Field], m: M, path: &mut Vec<usize>, out: &mut Vec<(Vec<usize>, M)>) {
    out.push((path.clone(), m));
    for (i, f) in fields.iter().enumerate() {
        if let (Node::Msg(inner), Some(s)) = (&f.node, sub(m, f.tag)) {
            path.push(i);
            messages(inner, s, path, out);
            path.pop();
        }
    }
}

fn at_path<'a>(fields: &'a mut Vec<Field>, path: &[usize]) -> &'a mut Vec<Field> {
    match path.split_first() {
        None => fields,
        Some((&i, rest)) => match &mut fields[i].node {
            Node::Msg(inner) => at_path(inner, rest),
            _ => unreachable!(),
        },
    }
}

fn deep_group(tag: u32, depth: u32) -> Node {
    let mut inner = vec![];
    if depth > 1 {
        inner.push(Field {
            tag,
            node: deep_group(tag, depth - 1),
            pad: 0,
        });
    }
    Node::Group(inner)
}

fn apply(root: &mut Vec<Field>, top: M, which: (usize, usize, usize), m: &Mutation) {
    let mut all = vec![];
    messages(root, top, &mut vec![], &mut all);
    let (path, mtype) = all[which.0 % all.len()].clone();
    let fields = at_path(root, &path);
    if fields.is_empty() {
        if let Mutation::Insert(tag, n) = m {
            fields.push(Field {
                tag: *tag,
                node: n.clone(),
                pad: 0,
            });
        }
        return;
    }
    let i = which.1 % fields.len();
    let j = which.2 % (fields.len() + 1);
    match m {
        Mutation::Duplicate => {
            let f = fields[i].clone();
            fields.insert(j, f);
        }
        Mutation::Remove => {
            fields.remove(i);
        }
        Mutation::Swap => {
            let j = j % fields.len();
            fields.swap(i, j);
        }
        Mutation::Insert(tag, n) => fields.insert(
            j,
            Field {
                tag: *tag,
                node: n.clone(),
                pad: 0,
            },
        ),
        Mutation::Retype(n) => fields[i].node = n.clone(),
        Mutation::Unpack | Mutation::Split => {
            let tag = fields[i].tag;
            let (Some(is_varint), Node::Bytes(b)) = (packed(mtype, tag), &fields[i].node) else {
                return;
            };
            let b = b.clone();
            let new: Vec<Field> = if let Mutation::Split = m {
                let cut = if is_varint {
                    // After the first varint.
                    b.iter().position(|&x| x < 0x80).map_or(0, |p| p + 1)
                } else {
                    8.min(b.len())
                };
                [&b[..cut], &b[cut..]]
                    .iter()
                    .map(|part| Field {
                        tag,
                        node: Node::Bytes(part.to_vec()),
                        pad: 0,
                    })
                    .collect()
            } else if is_varint {
                // Not if an earlier mutation left a truncated varint.
                if b.last().is_some_and(|&x| x >= 0x80) {
                    return;
                }
                let mut pos = 0;
                let mut v = vec![];
                while pos < b.len() {
                    v.push(field(tag, Node::Varint(read_varint(&b, &mut pos))));
                }
                v
            } else {
                b.chunks(8)
                    .map(|c| {
                        let mut x = [0u8; 8];
                        x[..c.len()].copy_from_slice(c);
                        Field {
                            tag,
                            node: Node::I64(u64::from_le_bytes(x)),
                            pad: 0,
                        }
                    })
                    .collect()
            };
            fields.splice(i..=i, new);
        }
        Mutation::Pad(p) => fields[i].pad = *p,
        Mutation::SetVarint(v) => {
            if let Node::Varint(x) = &mut fields[i].node {
                *x = *v;
            }
        }
        Mutation::SetBytes(b) => {
            if let Node::Bytes(x) = &mut fields[i].node {
                *x = b.clone();
            }
        }
        Mutation::DeepGroup(depth) => fields.insert(
            j,
            Field {
                tag: 30,
                node: deep_group(30, *depth),
                pad: 0,
            },
        ),
    }
}

/// Damage to the serialized bytes.
#[derive(Clone, Debug)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    /// A range of bytes written twice (often a field given twice).
    DuplicateRange(prop::sample::Index, prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Damage::DuplicateRange(a, b)),
    ]
}

fn damage_bytes(buf: &mut Vec<u8>, d: &Damage) {
    if buf.is_empty() {
        return;
    }
    match d {
        Damage::Flip(i, b) => {
            let i = i.index(buf.len());
            buf[i] = *b;
        }
        Damage::Truncate(i) => buf.truncate(i.index(buf.len())),
        Damage::DuplicateRange(a, b) => {
            let (a, b) = (a.index(buf.len()), b.index(buf.len()));
            let (a, b) = (a.min(b), a.max(b));
            let copy = buf[a..b].to_vec();
            buf.splice(b..b, copy);
        }
    }
}

// ---------------------------------------------------------------------------
// Requests.

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(-0.0),
        Just(0.0),
        Just(-1.0),
        Just(f64::INFINITY),
        any::<u64>().prop_map(f64::from_bits),
        -1e6..1e6f64,
    ]
}

/// Label names and values drawn from a small set, so that duplicates,
/// empty names, a missing or empty `__name__` and unsorted labels happen.
fn label_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("__name__".to_string()),
        1 => Just(String::new()),
        4 => "[a-cA_]{1,3}",
        1 => Just("é".to_string()),
    ]
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z]{1,4}", "\\PC{0,3}"]
}

/// Label sets: valid and sorted most of the time, else anything.
fn labels() -> impl Strategy<Value = Vec<(String, String)>> {
    prop_oneof![
        3 => ("[a-z]{1,3}", proptest::collection::btree_map("[a-z_]{1,3}", label_value(), 0..4))
            .prop_map(|(metric, rest)| {
                let mut v = vec![("__name__".to_string(), metric)];
                v.extend(rest.into_iter().filter(|(n, _)| n != "__name__"));
                v.sort();
                v
            }),
        2 => vec((label_name(), label_value()), 0..6),
    ]
}

fn spans(n: usize, cut: usize, offsets: (i32, i32)) -> Vec<(i32, u32)> {
    match n {
        0 => vec![],
        1 => vec![(offsets.0, 1)],
        _ => {
            let cut = 1 + cut % (n - 1);
            vec![(offsets.0, cut as u32), (offsets.1, (n - cut) as u32)]
        }
    }
}

fn deltas(counts: &[i64]) -> Vec<i64> {
    let mut prev = 0;
    counts
        .iter()
        .map(|&c| {
            let d = c - prev;
            prev = c;
            d
        })
        .collect()
}

/// A native histogram, as 1.0 (2.0 has the same fields): integer or float,
/// valid or with a wrong count, a negative bucket, spans that do not
/// match, a negative offset.
fn histogram() -> impl Strategy<Value = v1::Histogram> {
    (
        any::<bool>(),
        (0i64..50, vec(-2i64..50, 0..5), vec(0i64..50, 0..5)),
        (
            any::<usize>(),
            prop_oneof![Just((0, 1)), Just((-3, 2)), Just((1, -1))],
        ),
        prop_oneof![4 => Just(0i64), 1 => -3i64..3],
        any_f64(),
        prop_oneof![Just(0i64), any::<i64>()],
        any::<bool>(),
    )
        .prop_map(
            |(float, (zero, pos, neg), (cut, offs), count_error, sum, ts, extra_span)| {
                use v1::histogram::{Count, ZeroCount};
                let total: i64 = zero + pos.iter().sum::<i64>() + neg.iter().sum::<i64>();
                let span = |(offset, length): (i32, u32)| v1::BucketSpan { offset, length };
                let mut h = v1::Histogram {
                    sum,
                    schema: 3,
                    zero_threshold: 1e-128,
                    negative_spans: spans(neg.len(), cut, offs).into_iter().map(span).collect(),
                    positive_spans: spans(pos.len(), cut / 3, offs)
                        .into_iter()
                        .map(span)
                        .collect(),
                    timestamp: ts,
                    ..Default::default()
                };
                if extra_span {
                    h.positive_spans.push(span((0, 0)));
                }
                if float {
                    h.count = Some(Count::CountFloat(total as f64));
                    h.zero_count = Some(ZeroCount::ZeroCountFloat(zero as f64));
                    h.positive_counts = pos.iter().map(|&c| c as f64).collect();
                    h.negative_counts = neg.iter().map(|&c| c as f64).collect();
                } else {
                    h.count = Some(Count::CountInt((total + count_error).max(0) as u64));
                    h.zero_count = Some(ZeroCount::ZeroCountInt(zero as u64));
                    h.positive_deltas = deltas(&pos);
                    h.negative_deltas = deltas(&neg);
                }
                h
            },
        )
}

fn series_v1() -> impl Strategy<Value = v1::TimeSeries> {
    (
        labels(),
        vec((any_f64(), any::<i64>()), 0..3),
        vec((labels(), any_f64(), any::<i64>()), 0..2),
        vec(histogram(), 0..2),
    )
        .prop_map(|(labels, samples, exemplars, histograms)| {
            let label = |(name, value): (String, String)| v1::Label { name, value };
            v1::TimeSeries {
                labels: labels.into_iter().map(label).collect(),
                samples: samples
                    .into_iter()
                    .map(|(value, timestamp)| v1::Sample { value, timestamp })
                    .collect(),
                exemplars: exemplars
                    .into_iter()
                    .map(|(l, value, timestamp)| v1::Exemplar {
                        labels: l.into_iter().map(label).collect(),
                        value,
                        timestamp,
                    })
                    .collect(),
                histograms,
            }
        })
}

fn request_v1() -> impl Strategy<Value = v1::WriteRequest> {
    (
        vec(series_v1(), 0..5),
        vec((0i32..8, label_value(), label_value(), label_value()), 0..3),
    )
        .prop_map(|(timeseries, md)| v1::WriteRequest {
            timeseries,
            metadata: md
                .into_iter()
                .map(|(t, n, h, u)| v1::MetricMetadata {
                    r#type: t,
                    metric_family_name: n,
                    help: h,
                    unit: u,
                })
                .collect(),
        })
}

/// A 2.0 request from 1.0 series: strings interned (the same string twice
/// in the table sometimes), references sometimes out of range or odd,
/// metadata and created timestamps.
fn request_v2() -> impl Strategy<Value = v2::Request> {
    (
        vec(series_v1(), 0..5),
        vec(prop_oneof![Just(0i64), any::<i64>()], 0..5),
        vec(
            prop_oneof![
                Just(None),
                (0i32..8, label_value(), label_value()).prop_map(Some)
            ],
            0..5,
        ),
        prop_oneof![6 => Just(0u8), 1 => 1u8..6],
        any::<u64>(),
    )
        .prop_map(|(series, created, md, defect, seed)| {
            let mut symbols = vec![String::new()];
            let mut n = seed;
            let mut sym = |s: &str| -> u32 {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
                // Sometimes intern a string again rather than reuse it.
                match symbols.iter().position(|x| x == s) {
                    Some(i) if n % 7 != 0 => i as u32,
                    _ => {
                        symbols.push(s.to_string());
                        (symbols.len() - 1) as u32
                    }
                }
            };
            let timeseries = series
                .iter()
                .enumerate()
                .map(|(i, ts)| {
                    let md = md.get(i).cloned().flatten();
                    let md = md.as_ref().map(|(t, h, u)| (*t, h.as_str(), u.as_str()));
                    let created = created.get(i).copied().unwrap_or(0);
                    common::v2_series_from(ts, &mut sym, md, created)
                })
                .collect();
            let mut req = v2::Request {
                symbols,
                timeseries,
            };
            let k = (seed >> 32) as usize;
            match defect {
                1 => req.symbols[0] = "x".into(),
                2 => req.symbols.clear(),
                3 => {
                    if let Some(ts) = req.timeseries.get_mut(k % 5) {
                        ts.labels_refs.push(1);
                    }
                }
                4 => {
                    if let Some(ts) = req.timeseries.get_mut(k % 5) {
                        ts.metadata = Some(v2::Metadata {
                            r#type: 1,
                            help_ref: 0,
                            unit_ref: 1000,
                        });
                    }
                }
                5 => {
                    // No symbols, every reference 0.
                    req.symbols.clear();
                    for ts in &mut req.timeseries {
                        ts.labels_refs.iter_mut().for_each(|r| *r = 0);
                        for e in &mut ts.exemplars {
                            e.labels_refs.iter_mut().for_each(|r| *r = 0);
                        }
                        if let Some(m) = &mut ts.metadata {
                            (m.help_ref, m.unit_ref) = (0, 0);
                        }
                    }
                }
                _ => {}
            }
            req
        })
}

// ---------------------------------------------------------------------------
// The comparison.

fn answers(p: Protocol, buf: &[u8], limits: &Limits) {
    let reference = validate_owned(p, buf, limits).map_err(|e| e.to_string());
    let streaming = validate_without_fast_path(p, buf, limits).map_err(|e| e.to_string());
    assert_eq!(streaming, reference, "{p:?} body {buf:02x?}");
    let full = validate(p, buf, limits).map_err(|e| e.to_string());
    assert_eq!(
        full, reference,
        "{p:?} (with the fast path) body {buf:02x?}"
    );
}

fn tight() -> Limits {
    Limits {
        max_series: 3,
        max_labels_per_series: 4,
        max_label_name_len: 2,
        max_label_value_len: 3,
        max_translated_bytes: 12,
        ..Limits::default()
    }
}

fn mutated(
    top: M,
    encoded: Vec<u8>,
    mutations: &[((usize, usize, usize), Mutation)],
    damage: &[Damage],
) -> Vec<u8> {
    let mut tree = parse(&encoded, top);
    for (which, m) in mutations {
        apply(&mut tree, top, *which, m);
    }
    let mut buf = bytes_of(&tree);
    for d in damage {
        damage_bytes(&mut buf, d);
    }
    buf
}

/// The shippers' re-encoding: translation to 1.0 and merging, on the bytes
/// and by decoding (the way it was done before), must give the same bytes,
/// or the same error and leave `out` as it was; and the same into a sink,
/// whatever size of nested message the encoder may buffer (0: every one is
/// measured, then written in parts; 20: series in parts, labels and samples
/// whole).
fn translations(buf: &[u8]) {
    let old = decode_v2(buf)
        .and_then(|req| v2_to_v1(&req))
        .map(|(req, dropped)| (req.encode_to_vec(), dropped))
        .map_err(|e| e.to_string());
    let mut out = vec![7u8];
    let new = CheckedV2::new(buf)
        .and_then(|req| v2_to_v1_bytes(&req, &mut out))
        .map(|dropped| (out[1..].to_vec(), dropped))
        .map_err(|e| e.to_string());
    assert_eq!(new, old, "body {buf:02x?}");
    if new.is_err() {
        assert_eq!(out, [7]);
    }
    for limit in LIMITS {
        let mut sink = Limited(vec![], limit);
        let streamed = CheckedV2::new(buf)
            .and_then(|req| v2_to_v1_into(&req, &mut sink))
            .map(|dropped| (sink.0.clone(), dropped))
            .map_err(|e| e.to_string());
        assert_eq!(streamed, old, "limit {limit}, body {buf:02x?}");
    }
}

fn merges(bufs: &[Vec<u8>]) {
    let old = bufs
        .iter()
        .map(|b| decode_v2(b))
        .collect::<Result<Vec<_>, DecodeError>>()
        .and_then(merge_v2)
        .map(|req| (req.encode_to_vec(), count_v2(&req)))
        .map_err(|e| e.to_string());
    let checked = || {
        bufs.iter()
            .map(|b| CheckedV2::new(b))
            .collect::<Result<Vec<_>, DecodeError>>()
    };
    let mut out = vec![7u8];
    let new = checked()
        .and_then(|parts| merge_v2_bytes(&parts, &mut out))
        .map(|summary| (out[1..].to_vec(), summary))
        .map_err(|e| e.to_string());
    assert_eq!(new, old, "bodies {bufs:02x?}");
    if new.is_err() {
        assert_eq!(out, [7]);
    }
    for limit in LIMITS {
        let mut sink = Limited(vec![], limit);
        let streamed = checked()
            .and_then(|parts| merge_v2_into(&parts, &mut sink))
            .map(|summary| (sink.0.clone(), summary))
            .map_err(|e| e.to_string());
        assert_eq!(streamed, old, "limit {limit}, bodies {bufs:02x?}");
    }
}

/// Nested message sizes an encoder writing into a sink may buffer.
const LIMITS: [usize; 3] = [0, 20, 64 << 10];

/// A sink that has nested messages above `.1` bytes written in parts.
struct Limited(Vec<u8>, usize);

impl Sink for Limited {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn nested_buffer_limit(&self) -> usize {
        self.1
    }
}

fn which() -> impl Strategy<Value = (usize, usize, usize)> {
    (any::<usize>(), any::<usize>(), any::<usize>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn agrees_with_the_reference_on_1_0_requests(req in request_v1()) {
        let buf = req.encode_to_vec();
        answers(Protocol::V1, &buf, &Limits::default());
        answers(Protocol::V1, &buf, &tight());
        // The other protocol's message, read as this one.
        answers(Protocol::V2, &buf, &Limits::default());
    }

    #[test]
    fn agrees_with_the_reference_on_2_0_requests(req in request_v2()) {
        let buf = req.encode_to_vec();
        answers(Protocol::V2, &buf, &Limits::default());
        answers(Protocol::V2, &buf, &tight());
        answers(Protocol::V1, &buf, &Limits::default());
    }

    #[test]
    fn agrees_with_the_reference_on_mutated_1_0_requests(
        req in request_v1(),
        mutations in vec((which(), mutation()), 1..4),
        damage in vec(damage(), 0..2),
    ) {
        let buf = mutated(M::Req1, req.encode_to_vec(), &mutations, &damage);
        answers(Protocol::V1, &buf, &Limits::default());
        answers(Protocol::V1, &buf, &tight());
    }

    #[test]
    fn agrees_with_the_reference_on_mutated_2_0_requests(
        req in request_v2(),
        mutations in vec((which(), mutation()), 1..4),
        damage in vec(damage(), 0..2),
    ) {
        let buf = mutated(M::Req2, req.encode_to_vec(), &mutations, &damage);
        answers(Protocol::V2, &buf, &Limits::default());
        answers(Protocol::V2, &buf, &tight());
    }

    #[test]
    fn translation_and_merging_agree_with_the_decoding_way(
        reqs in vec((request_v2(), vec((which(), mutation()), 0..3), vec(damage(), 0..2)), 1..4),
    ) {
        let bufs: Vec<Vec<u8>> = reqs
            .into_iter()
            .map(|(req, mutations, damage)| mutated(M::Req2, req.encode_to_vec(), &mutations, &damage))
            .collect();
        for b in &bufs {
            translations(b);
        }
        merges(&bufs);
        // The summary of one request alone, as the shipper sends it.
        if let (Ok(c), Ok(req)) = (CheckedV2::new(&bufs[0]), decode_v2(&bufs[0])) {
            prop_assert_eq!(c.summary(), count_v2(&req));
        }
    }

    #[test]
    fn agrees_with_the_reference_on_garbage(bytes in vec(any::<u8>(), 0..256), v2 in any::<bool>()) {
        let p = if v2 { Protocol::V2 } else { Protocol::V1 };
        answers(p, &bytes, &Limits::default());
    }
}

// ---------------------------------------------------------------------------
// Cases worth naming.

fn field(tag: u32, node: Node) -> Field {
    Field { tag, node, pad: 0 }
}

fn series_bytes(fields: Vec<Field>) -> Vec<u8> {
    bytes_of(&[field(1, Node::Msg(fields))])
}

fn label(name: &[u8], value: &[u8]) -> Field {
    field(
        1,
        Node::Msg(vec![
            field(1, Node::Bytes(name.to_vec())),
            field(2, Node::Bytes(value.to_vec())),
        ]),
    )
}

#[test]
fn a_protobuf_error_after_a_rule_error_is_the_answer_as_prost_decodes_first() {
    // Series 0 has no __name__; series 1 has invalid UTF-8.
    let mut buf = series_bytes(vec![label(b"a", b"b")]);
    buf.extend(series_bytes(vec![label(b"__name__", &[0xff])]));
    answers(Protocol::V1, &buf, &Limits::default());
    let e = validate(Protocol::V1, &buf, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

#[test]
fn unsorted_labels_report_the_smallest_name_given_twice() {
    let buf = series_bytes(vec![
        label(b"__name__", b"m"),
        label(b"z", b"1"),
        label(b"b", b"1"),
        label(b"z", b"2"),
        label(b"b", b"2"),
    ]);
    answers(Protocol::V1, &buf, &Limits::default());
    let e = validate(Protocol::V1, &buf, &Limits::default()).unwrap_err();
    assert_eq!(e.to_string(), "series 0: duplicate label name \"b\"");

    // 2.0: the same name by one reference twice ("z") and by two
    // references to equal strings ("b").
    let req = v2::Request {
        symbols: ["", "__name__", "m", "z", "1", "b", "b"]
            .map(String::from)
            .to_vec(),
        timeseries: vec![v2::TimeSeries {
            labels_refs: vec![1, 2, 3, 4, 5, 4, 3, 4, 6, 4],
            ..Default::default()
        }],
    };
    let buf = req.encode_to_vec();
    answers(Protocol::V2, &buf, &Limits::default());
    let e = validate(Protocol::V2, &buf, &Limits::default()).unwrap_err();
    assert_eq!(e.to_string(), "series 0: duplicate label name \"b\"");
}

#[test]
fn groups_nested_up_to_and_past_the_recursion_limit_inside_a_label() {
    for depth in 95..102 {
        let mut l = label(b"__name__", b"m");
        if let Node::Msg(f) = &mut l.node {
            f.push(field(9, deep_group(9, depth)));
        }
        let buf = series_bytes(vec![l]);
        answers(Protocol::V1, &buf, &Limits::default());
    }
}

#[test]
fn metadata_field_names_are_those_prost_reports() {
    // MetricMetadata.type with a 64-bit value instead of a varint.
    let buf = bytes_of(&[field(3, Node::Msg(vec![field(1, Node::I64(1))]))]);
    answers(Protocol::V1, &buf, &Limits::default());
}

#[test]
fn a_created_timestamp_given_twice_counts_by_its_last_value() {
    // Series { labels_refs [1, 2]; created_timestamp 5; created_timestamp 0 }:
    // prost keeps 0, nothing is dropped in translation.
    let req = v2::Request {
        symbols: ["", "__name__", "m"].map(String::from).to_vec(),
        timeseries: vec![],
    };
    let mut tree = parse(&req.encode_to_vec(), M::Req2);
    let series = vec![
        field(1, Node::Bytes(vec![1, 2])),
        field(6, Node::Varint(5)),
        field(6, Node::Varint(0)),
    ];
    tree.push(field(5, Node::Msg(series)));
    let buf = bytes_of(&tree);
    translations(&buf);
    merges(&[buf.clone(), buf.clone()]);
    let mut out = vec![];
    let dropped = v2_to_v1_bytes(&CheckedV2::new(&buf).unwrap(), &mut out).unwrap();
    assert_eq!(dropped.created_timestamps, 0);
}

#[test]
fn every_reference_is_checked_before_the_label_rules() {
    // Pair 0 has an empty name; pair 2 refers past the table: the reference
    // is the answer, as `check_refs` runs before `check_labels`.
    let req = v2::Request {
        symbols: ["", "__name__", "m"].map(String::from).to_vec(),
        timeseries: vec![v2::TimeSeries {
            labels_refs: vec![0, 2, 1, 2, 9, 2],
            ..Default::default()
        }],
    };
    let buf = req.encode_to_vec();
    answers(Protocol::V2, &buf, &Limits::default());
    let e = validate(Protocol::V2, &buf, &Limits::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "series 0: labels_refs reference 9 out of range (3 symbols)"
    );
}
