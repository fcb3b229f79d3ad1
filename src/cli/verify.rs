//! `walrelay wal verify`: reads every byte of every segment and reports
//! every damaged place with its file, byte offset and the sequence numbers it
//! costs; exit 1 when anything is damaged.
//!
//! Checked: segment headers; every frame's checksums (through the readers'
//! own decoder); that each record's payload decodes as the remote-write
//! message it claims to be and holds as many samples as its metadata says;
//! and that sequence numbers run on without a hole from frame to frame and
//! from segment to segment (a deleted or lost segment is a hole between one
//! segment's end and the next one's first record).
//!
//! Holes that `walrelay wal repair` left behind on purpose (it moved the
//! damaged bytes aside and wrote down the lost range in
//! `wal/damaged/repairs.jsonl`) are listed as known, and do not fail the run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use prom_remote_write::{decode, Limits, Protocol};
use serde::Serialize;
use wal_format::{decode_frame_header, PayloadKind, Record, FRAME_HEADER_LEN};

use super::common::SeqRange;
use super::common::{self, DataDir, Table};
use super::journal::Journal;
use super::scan::{self, Event, SegmentFile};

/// `walrelay wal verify`
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Check checksums and sequence numbers only, not that payloads decode.
    #[arg(long)]
    pub skip_payloads: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One damaged place.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    /// Byte offset in `file` where the damage starts.
    pub offset: u64,
    /// Damaged bytes, when the damage is a byte range.
    pub length: Option<u64>,
    /// `bad_segment_header`, `corrupt`, `torn_tail`, `bad_payload`,
    /// `missing_records` or `sequence_overlap`.
    pub kind: &'static str,
    pub reason: String,
    /// The sequence numbers it costs, when known.
    pub lost: Option<SeqRange>,
    /// The record, for `bad_payload`.
    pub seq: Option<u64>,
    /// Set when `wal repair` already moved this aside and recorded it.
    pub known: Option<String>,
}

/// A segment as a full scan saw it.
#[derive(Debug, Clone)]
pub struct SegmentReport {
    pub file: SegmentFile,
    pub header_problem: Option<String>,
    /// Intact frames: offset, length, first sequence, end sequence.
    pub frames: Vec<(u64, u64, u64, u64)>,
    /// Damaged byte ranges: offset, end, incomplete tail.
    pub damage: Vec<(u64, u64, bool)>,
}

/// What a full scan of the log found.
#[derive(Debug, Default)]
pub struct Analysis {
    pub segments: Vec<SegmentReport>,
    pub findings: Vec<Finding>,
    pub records: u64,
    pub samples: u64,
    pub bytes: u64,
    /// One past the last intact record.
    pub end_seq: Option<u64>,
}

impl Analysis {
    /// Damage not yet dealt with by `wal repair`.
    pub fn open_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.known.is_none())
    }
}

/// Scans the whole log in `wal_dir`.
///
/// # Errors
/// I/O errors (damage is a finding, not an error).
pub fn analyze(wal_dir: &Path, check_payloads: bool) -> Result<Analysis> {
    let segments = scan::list_segments(wal_dir)?;
    let mut a = Analysis::default();
    let mut expected: Option<u64> = None;
    // Damage whose lost range ends at the next intact record.
    let mut pending: Option<usize> = None;
    let count = segments.len();
    for (i, seg) in segments.into_iter().enumerate() {
        let is_last = i + 1 == count;
        a.bytes += seg.len;
        if let Some(e) = expected {
            boundary(&mut a, &mut pending, e, seg.first_seq, &seg.path, 0);
        }
        expected = Some(seg.first_seq);
        let header_problem = scan::header_problem(&seg)?;
        if let Some(reason) = &header_problem {
            a.findings.push(Finding {
                file: seg.path.clone(),
                offset: 0,
                length: Some(wal_format::SEGMENT_HEADER_LEN as u64),
                kind: "bad_segment_header",
                reason: format!("{reason} (intact frames after it are still read)"),
                lost: None,
                seq: None,
                known: None,
            });
        }
        let mut report = SegmentReport {
            file: seg.clone(),
            header_problem,
            frames: Vec::new(),
            damage: Vec::new(),
        };
        scan::scan_segment(&seg, seg.len, |ev| {
            match ev {
                Event::Frame {
                    offset,
                    len,
                    header,
                    records,
                } => {
                    let e = expected.unwrap_or(header.first_seq);
                    boundary(&mut a, &mut pending, e, header.first_seq, &seg.path, offset);
                    expected = Some(header.end_seq().max(e));
                    report
                        .frames
                        .push((offset, len, header.first_seq, header.end_seq()));
                    for r in records {
                        a.records += 1;
                        a.samples += u64::from(r.meta.samples);
                        if check_payloads {
                            if let Err(reason) = check_payload(r) {
                                a.findings.push(Finding {
                                    file: seg.path.clone(),
                                    offset,
                                    length: Some(len),
                                    kind: "bad_payload",
                                    reason: format!("record {}: {reason}", r.seq),
                                    lost: Some(SeqRange {
                                        from: r.seq,
                                        to: r.seq + 1,
                                    }),
                                    seq: Some(r.seq),
                                    known: None,
                                });
                            }
                        }
                    }
                }
                Event::Damage {
                    offset,
                    end,
                    reason,
                    code,
                    incomplete_tail,
                } => {
                    report.damage.push((offset, end, incomplete_tail));
                    // Nothing intact after it in the newest segment: what the
                    // relay's recovery cuts off at its next start.
                    let tail = is_last && end >= seg.len;
                    let (kind, lost, reason) = if tail {
                        let what = if incomplete_tail {
                            "torn tail of the newest segment (a write cut short, never \
                             acknowledged)"
                        } else {
                            "corrupt end of the newest segment (records here that were \
                             acknowledged are lost)"
                        };
                        (
                            if incomplete_tail {
                                "torn_tail"
                            } else {
                                "corrupt_tail"
                            },
                            torn_frame_range(&seg, offset)?,
                            format!(
                                "{reason} [{code}]: {what}; `walrelay wal repair` or the \
                                 relay's next start cuts it off"
                            ),
                        )
                    } else {
                        ("corrupt", None, format!("{reason} [{code}]"))
                    };
                    a.findings.push(Finding {
                        file: seg.path.clone(),
                        offset,
                        length: Some(end - offset),
                        kind,
                        reason,
                        lost,
                        seq: None,
                        known: None,
                    });
                    let torn = tail;
                    if !torn {
                        pending = Some(a.findings.len() - 1);
                    }
                }
            }
            Ok(())
        })?;
        a.segments.push(report);
    }
    if let (Some(p), Some(e)) = (pending, expected) {
        // Damage at the very end of the log with nothing intact after it.
        if let Some(f) = a.findings.get_mut(p) {
            f.reason
                .push_str(&format!("; nothing intact follows (records from {e} on)"));
        }
    }
    a.end_seq = expected;
    let journal = Journal::read(wal_dir)?;
    for f in &mut a.findings {
        if f.kind == "missing_records" {
            if let Some(lost) = f.lost {
                f.known = journal.covering(lost);
            }
        }
    }
    Ok(a)
}

/// Accounts for the step from `expected` to `next` (the first sequence of
/// the next frame or segment, at `file`:`offset`).
fn boundary(
    a: &mut Analysis,
    pending: &mut Option<usize>,
    expected: u64,
    next: u64,
    file: &Path,
    offset: u64,
) {
    let damage = pending.take();
    if next > expected {
        let lost = SeqRange {
            from: expected,
            to: next,
        };
        match damage.and_then(|p| a.findings.get_mut(p)) {
            Some(f) => f.lost = Some(lost),
            None => a.findings.push(Finding {
                file: file.to_path_buf(),
                offset,
                length: None,
                kind: "missing_records",
                reason: if offset == 0 {
                    format!(
                        "records {lost} are missing before this segment: no segment holds \
                         them (a deleted or lost segment file)"
                    )
                } else {
                    format!("records {lost} are missing before the frame at this offset")
                },
                lost: Some(lost),
                seq: None,
                known: None,
            }),
        }
    } else if next < expected {
        a.findings.push(Finding {
            file: file.to_path_buf(),
            offset,
            length: None,
            kind: "sequence_overlap",
            reason: format!(
                "starts at sequence {next} but the log already reached {expected}: \
                 records are numbered twice"
            ),
            lost: None,
            seq: Some(next),
            known: None,
        });
    }
}

/// The records of the frame at `offset` when its header is intact.
fn torn_frame_range(seg: &SegmentFile, offset: u64) -> Result<Option<SeqRange>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&seg.path)?;
    let mut buf = [0u8; FRAME_HEADER_LEN];
    let n = file.read_at(&mut buf, offset).unwrap_or(0);
    Ok(decode_frame_header(seg.first_seq, &buf[..n])
        .ok()
        .map(|h| SeqRange {
            from: h.first_seq,
            to: h.end_seq(),
        }))
}

/// Decodes and validates a record's payload as ingest did.
///
/// # Errors
/// Why it does not decode, or disagrees with its metadata.
pub fn check_payload(r: &Record) -> Result<(), String> {
    let limits = Limits {
        max_decoded_bytes: usize::MAX,
        ..Limits::default()
    };
    let bytes = crate::ship::payload::protobuf(r).map_err(|e| e.to_string())?;
    let protocol = match r.meta.kind {
        PayloadKind::RemoteWriteV1 => Protocol::V1,
        PayloadKind::RemoteWriteV2 => Protocol::V2,
    };
    let summary = decode::validate(protocol, &bytes, &limits).map_err(|e| e.to_string())?;
    let samples = u32::try_from(summary.samples + summary.histograms).unwrap_or(u32::MAX);
    if samples != r.meta.samples {
        return Err(format!(
            "metadata says {} samples but the payload holds {samples}",
            r.meta.samples
        ));
    }
    Ok(())
}

/// Runs `walrelay wal verify`.
///
/// # Errors
/// The data dir is missing or unreadable.
pub fn run(args: &VerifyArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&args.data_dir)?;
    let running = dir.relay_pid()?;
    let a = analyze(&dir.wal, !args.skip_payloads)?;
    let clean = a.open_findings().next().is_none();
    let mut out = common::stdout();
    if args.json {
        #[derive(Serialize)]
        struct Json<'a> {
            clean: bool,
            segments: usize,
            records: u64,
            samples: u64,
            bytes: u64,
            end_seq: Option<u64>,
            relay_running_pid: Option<&'a str>,
            damage: &'a [Finding],
        }
        common::write_json_pretty(
            &mut out,
            &Json {
                clean,
                segments: a.segments.len(),
                records: a.records,
                samples: a.samples,
                bytes: a.bytes,
                end_seq: a.end_seq,
                relay_running_pid: running.as_deref(),
                damage: &a.findings,
            },
        )?;
    } else {
        if let Some(pid) = &running {
            writeln!(
                out,
                "note: a walrelay (pid {pid}) is writing this log; damage at the very end of the \
                 newest segment may be a write in progress"
            )?;
        }
        writeln!(
            out,
            "verified {} segments, {} records, {} samples, {}",
            a.segments.len(),
            a.records,
            a.samples,
            common::fmt_bytes(a.bytes)
        )?;
        write_findings(&mut out, &a.findings)?;
        if clean {
            writeln!(out, "clean: no damage found")?;
        } else {
            writeln!(
                out,
                "DAMAGED: {} damaged place(s); `walrelay wal repair` moves them aside",
                a.open_findings().count()
            )?;
        }
    }
    out.flush()?;
    Ok(common::exit_code(clean))
}

/// The findings as a table (nothing when there are none).
///
/// # Errors
/// Write errors.
pub fn write_findings(out: &mut impl Write, findings: &[Finding]) -> Result<()> {
    if findings.is_empty() {
        return Ok(());
    }
    let mut t = Table::new(&["FILE", "OFFSET", "BYTES", "KIND", "LOST", "REASON"]);
    for f in findings {
        let reason = match &f.known {
            Some(k) => format!("known, {k}: {}", f.reason),
            None => f.reason.clone(),
        };
        t.row(vec![
            f.file.display().to_string(),
            f.offset.to_string(),
            f.length.map_or_else(|| "-".into(), |l| l.to_string()),
            f.kind.to_owned(),
            f.lost
                .map_or_else(|| "-".into(), |l| format!("{}..{}", l.from, l.to)),
            reason,
        ]);
    }
    t.write(out)?;
    Ok(())
}
