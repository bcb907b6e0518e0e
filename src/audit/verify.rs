//! `bulkhead audit verify`: recomputes the chain and reports the first bad line.

use std::path::Path;

use std::io::Read;

use super::wal::{Fit, LogId, fit};
use super::{GENESIS, Line, line_hash};

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines checked in the log.
    pub lines: u64,
    /// Committed lines that only `audit.wal` holds yet, where the log is cut or garbled
    /// (after a crash, until the daemon's next start writes them in; or a running
    /// daemon's next append), checked in their place.
    pub in_wal: u64,
    /// Hash of the last line (of the ring's, if it holds lines past the log's end).
    pub last_hash: String,
}

/// Why the log failed verification; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Read(String),
    /// A line that is not a valid audit record.
    #[error("line {line}: not a valid audit record ({why})")]
    Malformed {
        /// Line number.
        line: u64,
        /// Parser message.
        why: String,
    },
    /// A line whose `prev` is not the previous line's hash: edited, removed or reordered.
    #[error("line {line}: chain broken (prev does not match the hash of line {}: that line was altered, removed or moved)", line - 1)]
    ChainBroken {
        /// Line number.
        line: u64,
    },
    /// A gap or repeat in `seq`.
    #[error("line {line}: sequence number {found}, expected {expected}")]
    Sequence {
        /// Line number.
        line: u64,
        /// Found seq.
        found: u64,
        /// Expected seq.
        expected: u64,
    },
    /// The file ends without a newline (cut mid-line).
    #[error("line {line}: truncated (no final newline)")]
    TornTail {
        /// Line number.
        line: u64,
    },
    /// Fewer lines (in the log and `audit.wal` together) than `audit.head` says were
    /// committed.
    #[error("line {line}: log truncated: audit.head records {committed} committed lines")]
    Truncated {
        /// First missing line.
        line: u64,
        /// Lines the head records.
        committed: u64,
    },
    /// `audit.wal` holds lines that do not continue the log (or, starting it, belong to
    /// another file): the daemon would refuse to start.
    #[error("{0}: its committed lines do not continue the log; the daemon will not start on them")]
    ForeignWal(String),
    /// The last line's hash differs from what `audit.head` recorded for it.
    #[error("line {line}: does not match the hash recorded in audit.head")]
    HeadMismatch {
        /// Line number.
        line: u64,
    },
}

#[derive(serde::Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// Verifies what the log will hold once the daemon has opened it: `path`, with the lines
/// of the ring `audit.wal` next to it written in where they go (a crash may have cut or
/// garbled the log's tail, which the next start repairs from the ring), and all of it
/// against `audit.head` when present. A ring that the daemon would refuse fails the
/// check. Read in the order the daemon writes them backwards (head, log, ring), so that
/// a live daemon's commits never look like a truncation; a live daemon that starts its
/// ring over between the reads is read again.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let wal = dir.join("audit.wal");
    let mut looks = 0;
    loop {
        let head: Option<Head> = std::fs::read(dir.join("audit.head"))
            .ok()
            .and_then(|b| serde_json::from_slice(b.trim_ascii()).ok());
        let mut file = std::fs::File::open(path).map_err(read_err(path))?;
        let log = LogId::of(&file).map_err(read_err(path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(read_err(path))?;
        let records = super::wal::read(&wal).map_err(read_err(&wal))?;
        if records.is_empty() {
            return check(&data, 0, head);
        }
        match fit(&data, log, &records) {
            Some(Fit { base, lines, same }) => {
                let in_log = lines[..same].iter().filter(|b| **b == b'\n').count();
                let in_wal = lines.iter().filter(|b| **b == b'\n').count() - in_log;
                data.truncate(base);
                data.extend_from_slice(&lines);
                return check(&data, in_wal as u64, head);
            }
            None if looks < 5 => {
                looks += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            None => {
                // An edited log is the likelier story: name its first bad line if it has one.
                check(&data, 0, head)?;
                return Err(VerifyError::ForeignWal(format!(
                    "{} does not fit {}",
                    wal.display(),
                    path.display()
                )));
            }
        }
    }
}

fn read_err(p: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |e| VerifyError::Read(format!("{}: {e}", p.display()))
}

/// Checks the chain of `data`, whose last `in_wal` lines are only in the ring.
fn check(data: &[u8], in_wal: u64, head: Option<Head>) -> Result<VerifyReport, VerifyError> {
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    let mut hashes_at_head = None;
    let mut rest: &[u8] = data;
    while !rest.is_empty() {
        n += 1;
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            return Err(VerifyError::TornTail { line: n });
        };
        let raw = &rest[..end];
        rest = &rest[end + 1..];
        let line: Line = serde_json::from_slice(raw).map_err(|e| VerifyError::Malformed {
            line: n,
            why: e.to_string(),
        })?;
        if line.prev != prev {
            return Err(VerifyError::ChainBroken { line: n });
        }
        if line.seq != n {
            return Err(VerifyError::Sequence {
                line: n,
                found: line.seq,
                expected: n,
            });
        }
        prev = line_hash(raw);
        if head.as_ref().is_some_and(|h| h.seq == n) {
            hashes_at_head = Some(prev.clone());
        }
    }
    if let Some(h) = head {
        if h.seq > n {
            return Err(VerifyError::Truncated {
                line: n + 1,
                committed: h.seq,
            });
        }
        if h.seq > 0 && hashes_at_head.as_deref() != Some(h.hash.as_str()) {
            return Err(VerifyError::HeadMismatch { line: h.seq });
        }
    }
    Ok(VerifyReport {
        lines: n - in_wal,
        in_wal,
        last_hash: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{AuditLog, Event};
    use super::*;

    fn log_with(n: usize) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-audit-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::open(&dir).unwrap();
        for i in 0..n {
            log.record_blocking(Event {
                actor: "ak_test".into(),
                action: format!("test.{i}"),
                outcome: "ok".into(),
                ..Default::default()
            })
            .unwrap();
        }
        dir
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(dir: &Path, lines: &[String]) {
        std::fs::write(
            dir.join("audit.jsonl"),
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn intact_log_verifies_and_reopens_on_the_chain() {
        let dir = log_with(5);
        assert_eq!(verify_file(&dir.join("audit.jsonl")).unwrap().lines, 5);
        let log = AuditLog::open(&dir).unwrap();
        log.record_blocking(Event {
            actor: "x".into(),
            action: "again".into(),
            outcome: "ok".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(verify_file(&dir.join("audit.jsonl")).unwrap().lines, 6);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn edits_deletions_reorderings_and_truncations_are_caught() {
        let dir = log_with(6);
        let orig = lines(&dir);
        let file = dir.join("audit.jsonl");

        let mut edited = orig.clone();
        edited[2] = edited[2].replace("test.2", "test.X");
        write(&dir, &edited);
        assert_eq!(
            verify_file(&file),
            Err(VerifyError::ChainBroken { line: 4 })
        );

        let mut deleted = orig.clone();
        deleted.remove(3);
        write(&dir, &deleted);
        assert_eq!(
            verify_file(&file),
            Err(VerifyError::ChainBroken { line: 4 })
        );

        let mut reordered = orig.clone();
        reordered.swap(1, 2);
        write(&dir, &reordered);
        assert_eq!(
            verify_file(&file),
            Err(VerifyError::ChainBroken { line: 2 })
        );

        // Lines cut off the end that audit.wal still holds are reported as held there
        // (the daemon writes them back at its next start); with the ring gone too, the
        // cut is a truncation.
        write(&dir, &orig[..4]);
        let report = verify_file(&file).unwrap();
        assert_eq!((report.lines, report.in_wal), (4, 2));
        let ring = std::fs::read(dir.join("audit.wal")).unwrap();
        std::fs::remove_file(dir.join("audit.wal")).unwrap();
        assert_eq!(
            verify_file(&file),
            Err(VerifyError::Truncated {
                line: 5,
                committed: 6
            })
        );
        std::fs::write(dir.join("audit.wal"), ring).unwrap();

        // Cut mid-line: the ring holds the rest (the next start writes it in); without the
        // ring, the log alone is torn.
        let mut torn = orig.iter().map(|l| format!("{l}\n")).collect::<String>();
        torn.truncate(torn.len() - 10);
        std::fs::write(&file, torn).unwrap();
        let report = verify_file(&file).unwrap();
        assert_eq!((report.lines, report.in_wal), (5, 1));
        let ring = std::fs::read(dir.join("audit.wal")).unwrap();
        std::fs::remove_file(dir.join("audit.wal")).unwrap();
        assert_eq!(verify_file(&file), Err(VerifyError::TornTail { line: 6 }));
        std::fs::write(dir.join("audit.wal"), ring).unwrap();

        // The last line edited: its own hash no longer matches the head.
        let mut last = orig.clone();
        last[5] = last[5].replace("test.5", "test.Y");
        write(&dir, &last);
        assert_eq!(
            verify_file(&file),
            Err(VerifyError::HeadMismatch { line: 6 })
        );

        write(&dir, &orig);
        assert!(verify_file(&file).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
