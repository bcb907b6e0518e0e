//! The audit log's write-ahead ring, `<state>/audit.wal`.
//!
//! Appending to `audit.jsonl` and syncing it makes the filesystem commit its journal as
//! well (the file's size changed): two device flushes per commit. The ring is a file of
//! [`WAL_LEN`] bytes written full of zeros once, so overwriting it changes no metadata
//! and its `fdatasync` is one data write and one flush. A commit first writes its lines
//! into the ring as one record and syncs it; only then are they appended to
//! `audit.jsonl`, without a sync. Each record names the log file it belongs to and the
//! offset in it where its lines go, and the records of one turn of the ring follow each
//! other there without a gap, so that the log past the first record's offset is always a
//! prefix of the ring's lines (plus, after a crash, whatever the unsynced append left).
//! Each record starts on a page of its own and is padded to the page's end, so that
//! writing one never rewrites (and a torn write never damages) the sectors of the one
//! before it. When the ring is full, `audit.jsonl` is synced and the ring cleared before
//! it starts over, so a record is only ever overwritten once its lines are durable in the
//! log. On open, the ring's lines are written into the log again (see the writer's
//! `replay`).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::TryRng;
use sha2::{Digest, Sha256};

use super::{GENESIS, Line, line_hash};

/// The ring's size. A commit takes at least a page, so `audit.jsonl` itself is synced at
/// least every 1,024 commits.
pub(super) const WAL_LEN: u64 = 4 << 20;

/// Records start on page boundaries.
const PAGE: u64 = 4096;

const MAGIC: &[u8; 4] = b"BHW3";
/// Magic, then the fields the checksum covers: payload length (u32 LE); offset in the
/// log, turn, the log's inode and birth time (u64 LE each). Then the first 8 bytes of the
/// SHA-256 of those fields and the payload.
const HEADER: usize = 48;
const FIELDS: usize = 36;

/// Which file a record's lines belong to: its inode number and birth time (nanoseconds;
/// 0 where it cannot be read), so that a log moved away and another created in its
/// place, even on the same inode number, are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LogId(u64, u64);

impl LogId {
    /// Whether both name the same file: the same inode, and the same birth time where
    /// both were read.
    fn same_file(self, other: LogId) -> bool {
        self.0 == other.0 && (self.1 == other.1 || self.1 == 0 || other.1 == 0)
    }

    /// The identity of the open log `file`.
    pub(super) fn of(file: &File) -> std::io::Result<LogId> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(LogId(meta.ino(), born))
    }
}

/// One record: lines that go at `base` in the log `log`.
pub(super) struct Record {
    /// Where in the log the lines start.
    pub base: u64,
    /// The log they belong to.
    pub log: LogId,
    turn: u64,
    /// Whole lines, each ending in `\n`.
    pub lines: Vec<u8>,
}

/// The open ring and where the next record goes.
pub(super) struct Wal {
    file: File,
    path: PathBuf,
    off: u64,
    /// Random for each turn of the ring, so that a record left from an earlier turn is
    /// never taken for part of this one.
    turn: u64,
    log: LogId,
}

/// A record's header fields after the magic, as the checksum covers them.
fn fields(len: u32, base: u64, turn: u64, log: LogId) -> [u8; FIELDS] {
    let mut out = [0u8; FIELDS];
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..12].copy_from_slice(&base.to_le_bytes());
    out[12..20].copy_from_slice(&turn.to_le_bytes());
    out[20..28].copy_from_slice(&log.0.to_le_bytes());
    out[28..36].copy_from_slice(&log.1.to_le_bytes());
    out
}

fn check(fields: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(fields);
    h.update(payload);
    let digest = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The room a record of `len` bytes of lines takes: whole pages.
fn footprint(len: usize) -> u64 {
    ((HEADER + len) as u64).div_ceil(PAGE) * PAGE
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Opens `path` for reading and writing without following a symlink there.
fn open_ring(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The last line of `body`, which ends in a newline, without it.
pub(super) fn last_line(body: &[u8]) -> Option<&[u8]> {
    body.strip_suffix(b"\n")
        .map(|b| b.rsplit(|c| *c == b'\n').next().unwrap_or(b))
}

/// Whether `lines` (whole lines) continue the chain of `before`, each the next seq with
/// `prev` the hash of the line before it.
fn continues(before: &[u8], lines: &[u8]) -> bool {
    let (mut seq, mut prev) = match last_line(before) {
        None if before.is_empty() => (0, GENESIS.to_string()),
        None => return false,
        Some(last) => match serde_json::from_slice::<Line>(last) {
            Ok(l) => (l.seq, line_hash(last)),
            Err(_) => return false,
        },
    };
    let Some(lines) = lines.strip_suffix(b"\n") else {
        return false;
    };
    for raw in lines.split(|b| *b == b'\n') {
        match serde_json::from_slice::<Line>(raw) {
            Ok(line) if seq.checked_add(1) == Some(line.seq) && line.prev == prev => {
                seq = line.seq;
                prev = line_hash(raw);
            }
            _ => return false,
        }
    }
    true
}

/// How a non-empty ring fits the log.
pub(super) struct Fit {
    /// Where in the log the ring's lines start.
    pub base: usize,
    /// The ring's lines, in order.
    pub lines: Vec<u8>,
    /// How many bytes from `base` on the log has in common with them.
    pub same: usize,
}

/// How the ring's `records` fit `data`, the log's bytes, if they belong to it.
///
/// Past the ring's first offset the log can only be a prefix of the ring's lines, up to
/// what a crash leaves of an unsynced append: bytes cut off, zeros, garbage. A crash
/// does not write another audit line, nor move a log. So the ring belongs to another
/// log if its lines do not continue the log's chain at that offset, if at offset 0
/// (where every log's chain starts alike) the log is not the same file `log`, or if the
/// log holds a whole audit line there that the ring lacks.
pub(super) fn fit(data: &[u8], log: LogId, records: &[Record]) -> Option<Fit> {
    let first = records.first()?;
    let lines: Vec<u8> = records
        .iter()
        .flat_map(|r| r.lines.iter().copied())
        .collect();
    let base = usize::try_from(first.base).ok().filter(|b| {
        *b <= data.len() && (*b > 0 || first.log.same_file(log)) && continues(&data[..*b], &lines)
    })?;
    let have = &data[base..];
    let same = have.iter().zip(&lines).take_while(|(a, b)| a == b).count();
    if same < have.len() {
        let differing = have[..same]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let theirs = have[differing..]
            .iter()
            .position(|b| *b == b'\n')
            .map(|end| &have[differing..differing + end]);
        if theirs.is_some_and(|l| serde_json::from_slice::<Line>(l).is_ok()) {
            return None;
        }
    }
    Some(Fit { base, lines, same })
}

/// The records of the ring at `path` (none if there is no ring), see [`Wal::records`].
pub(super) fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => parse(&file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The records from the start of the ring, in order, up to the first that is not whole
/// (torn, zeros, changed), is from another turn of the ring or another log, or does not
/// continue where the one before it ends in the log.
fn parse(file: &File) -> std::io::Result<Vec<Record>> {
    let mut data = Vec::new();
    let mut reader = file;
    reader.seek(std::io::SeekFrom::Start(0))?;
    reader.take(WAL_LEN).read_to_end(&mut data)?;
    if data.starts_with(b"BHW") && !data.starts_with(MAGIC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "written in a format this version does not read; start the version that wrote it, or move the file aside to give up its lines",
        ));
    }
    let mut out: Vec<Record> = Vec::new();
    let mut at = 0usize;
    while let Some(header) = data.get(at..at + HEADER) {
        if &header[..4] != MAGIC {
            break;
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[4..8]);
        let len = u32::from_le_bytes(len);
        let (base, turn) = (u64_at(header, 8), u64_at(header, 16));
        let log = LogId(u64_at(header, 24), u64_at(header, 32));
        let Some(payload) = data.get(at + HEADER..at + HEADER + len as usize) else {
            break;
        };
        let follows = out.last().is_none_or(|last| {
            last.turn == turn
                && last.log == log
                && last.base.checked_add(last.lines.len() as u64) == Some(base)
        });
        if !follows {
            break;
        }
        if header[40..48] != check(&header[4..40], payload) || payload.last() != Some(&b'\n') {
            if !out.is_empty() {
                // The next record of this turn, where it belongs, but not whole: a torn
                // write (of a commit that was then not acknowledged), or damage.
                tracing::warn!(
                    offset = at,
                    "audit.wal: a record of this turn is not whole; the ring's lines end before it"
                );
            }
            break;
        }
        out.push(Record {
            base,
            log,
            turn,
            lines: payload.to_vec(),
        });
        at += footprint(len as usize) as usize;
    }
    Ok(out)
}

impl Wal {
    /// The most bytes of lines one record can hold (in an empty ring).
    pub(super) const CAPACITY: usize = WAL_LEN as usize - HEADER;

    /// Opens `<state>/audit.wal`, creating it empty, for the log `log`; [`Wal::prepare`]
    /// sizes and clears it once the records in it are durable in the log.
    pub(super) fn open(state_dir: &Path, log: LogId) -> std::io::Result<Wal> {
        let path = state_dir.join("audit.wal");
        let file = open_ring(&path)?;
        Ok(Wal {
            file,
            path,
            off: 0,
            turn: 0,
            log,
        })
    }

    /// The ring's path, for errors.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The ring's records (see [`parse`]).
    pub(super) fn records(&self) -> std::io::Result<Vec<Record>> {
        parse(&self.file)
    }

    /// Makes the ring [`WAL_LEN`] bytes of written zeros if it is not that size (blocks
    /// allocated and written, so that overwriting them needs no journal commit), then
    /// clears it. Called once its records are durable in the log.
    pub(super) fn prepare(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() != WAL_LEN {
            self.file.set_len(0)?;
            let zeros = vec![0u8; 64 << 10];
            let mut at = 0;
            while at < WAL_LEN {
                self.file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            self.file.sync_all()?;
        }
        self.clear()
    }

    /// Whether a record of `len` bytes of lines fits before the end of the ring.
    pub(super) fn fits(&self, len: usize) -> bool {
        self.off + footprint(len) <= WAL_LEN
    }

    /// Writes `lines`, which go at `base` in the log, as the next record and makes it
    /// durable. The record is only kept (the next one goes after it) once
    /// [`Wal::advance`] is called.
    pub(super) fn append(&mut self, base: u64, lines: &[u8]) -> std::io::Result<()> {
        if !self.fits(lines.len()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "record bigger than the room left in the ring",
            ));
        }
        let len = u32::try_from(lines.len()).map_err(std::io::Error::other)?;
        let fields = fields(len, base, self.turn, self.log);
        let size = footprint(lines.len()) as usize;
        let mut record = Vec::with_capacity(size);
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&fields);
        record.extend_from_slice(&check(&fields, lines));
        record.extend_from_slice(lines);
        record.resize(size, 0);
        self.file.write_all_at(&record, self.off)?;
        self.file.sync_data()
    }

    /// Keeps the record just appended, of `len` bytes of lines.
    pub(super) fn advance(&mut self, len: usize) {
        self.off += footprint(len);
    }

    /// Starts the ring over with no record in it, in a new turn: zeros over the first
    /// record's header, synced. Called only when every record in it is durable in the log.
    pub(super) fn clear(&mut self) -> std::io::Result<()> {
        let mut turn = [0u8; 8];
        rand::rngs::SysRng
            .try_fill_bytes(&mut turn)
            .map_err(std::io::Error::other)?;
        self.file.write_all_at(&[0u8; HEADER], 0)?;
        self.file.sync_data()?;
        self.off = 0;
        self.turn = u64::from_le_bytes(turn);
        Ok(())
    }

    /// For tests: the ring's file, to make its writes fail.
    #[cfg(test)]
    pub(super) fn replace_file(&mut self, file: File) {
        self.file = file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record left from an earlier turn of the ring, at exactly the offset (in the ring
    /// and in the log) where the next record of this turn would be, is not taken for it.
    #[test]
    fn records_of_an_earlier_turn_are_not_taken_for_this_ones() {
        let dir = std::env::temp_dir().join(format!("bulkhead-wal-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut wal = Wal::open(&dir, LogId(7, 7)).unwrap();
        wal.prepare().unwrap();
        for (base, lines) in [(0, b"a1\n"), (3, b"a2\n")] {
            wal.append(base, lines).unwrap();
            wal.advance(lines.len());
        }
        assert_eq!(wal.records().unwrap().len(), 2);
        wal.clear().unwrap();
        assert!(wal.records().unwrap().is_empty());
        wal.append(0, b"b1\n").unwrap();
        wal.advance(3);
        let records = wal.records().unwrap();
        assert_eq!(records.len(), 1, "a2 of the earlier turn was taken");
        assert_eq!(records[0].lines, b"b1\n");
        assert_eq!(read(&dir.join("audit.wal")).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A ring in a format this version does not read (an older one's) is refused, not
    /// taken for empty and wiped with the lines it may hold.
    #[test]
    fn a_ring_in_another_format_is_refused_not_wiped() {
        let dir = std::env::temp_dir().join(format!("bulkhead-wal-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut old = b"BHW2".to_vec();
        old.extend_from_slice(&[1u8; 100]);
        std::fs::write(dir.join("audit.wal"), &old).unwrap();
        let wal = Wal::open(&dir, LogId(1, 1)).unwrap();
        let err = wal.records().err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(crate::audit::AuditLog::open(&dir).is_err());
        assert_eq!(std::fs::read(dir.join("audit.wal")).unwrap(), old);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
