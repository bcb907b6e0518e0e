//! The audit log's write-ahead ring, `<state>/audit.wal`.
//!
//! Appending to `audit.jsonl` and syncing it makes the filesystem commit its journal as
//! well (the file's size changed): two device flushes per commit. The ring is a file of
//! [`WAL_LEN`] bytes written full of zeros once, so overwriting it changes no metadata
//! and its `fdatasync` is one data write and one flush. A commit first writes its lines
//! into the ring as one record and syncs it; only then are they appended to
//! `audit.jsonl`, without a sync. Each record names the offset in `audit.jsonl` where its
//! lines go, and the records of one turn of the ring follow each other there without a
//! gap, so that the log past the first record's offset is always a prefix of the ring's
//! lines (plus, after a crash, whatever the unsynced append left). When the ring is
//! full, `audit.jsonl` is synced and the ring cleared before it starts over, so a record
//! is only ever overwritten once its lines are durable in the log. On open, the lines of
//! the ring that the log lost or garbled are written to it again.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::TryRng;
use sha2::{Digest, Sha256};

/// The ring's size: commits between two syncs of `audit.jsonl` itself hold at most this
/// many bytes of lines.
pub(super) const WAL_LEN: u64 = 1 << 20;

const MAGIC: &[u8; 4] = b"BHW2";
/// Magic, payload length (u32 LE), offset in the log (u64 LE), the turn (u64 LE), and
/// the first 8 bytes of the SHA-256 of length, offset, turn and payload.
const HEADER: usize = 32;

/// One record: lines that go at `base` in `audit.jsonl`.
pub(super) struct Record {
    /// Where in the log the lines start.
    pub base: u64,
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
}

fn check(len: u32, base: u64, turn: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    h.update(base.to_le_bytes());
    h.update(turn.to_le_bytes());
    h.update(payload);
    let digest = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Opens `path` for reading and writing without following a symlink there.
fn open_ring(path: &Path, create: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
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
/// (torn, zeros, changed), is from another turn of the ring, or does not continue where
/// the one before it ends in the log.
fn parse(file: &File) -> std::io::Result<Vec<Record>> {
    let mut data = Vec::new();
    file.take(WAL_LEN).read_to_end(&mut data)?;
    let mut out: Vec<Record> = Vec::new();
    let mut at = 0usize;
    while let Some(header) = data.get(at..at + HEADER) {
        if &header[..4] != MAGIC {
            break;
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[4..8]);
        let len = u32::from_le_bytes(len);
        let mut base = [0u8; 8];
        base.copy_from_slice(&header[8..16]);
        let base = u64::from_le_bytes(base);
        let mut turn = [0u8; 8];
        turn.copy_from_slice(&header[16..24]);
        let turn = u64::from_le_bytes(turn);
        let Some(payload) = data.get(at + HEADER..at + HEADER + len as usize) else {
            break;
        };
        if header[24..32] != check(len, base, turn, payload) || payload.last() != Some(&b'\n') {
            break;
        }
        if let Some(last) = out.last()
            && (last.turn != turn || last.base + last.lines.len() as u64 != base)
        {
            break;
        }
        out.push(Record {
            base,
            turn,
            lines: payload.to_vec(),
        });
        at += HEADER + len as usize;
    }
    Ok(out)
}

impl Wal {
    /// Opens `<state>/audit.wal`, creating it empty; [`Wal::prepare`] sizes and clears
    /// it once the records in it are durable in the log.
    pub(super) fn open(state_dir: &Path) -> std::io::Result<Wal> {
        let path = state_dir.join("audit.wal");
        let file = open_ring(&path, true)?;
        Ok(Wal {
            file,
            path,
            off: 0,
            turn: 0,
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
    pub(super) fn prepare(&mut self, state_dir: &Path) -> std::io::Result<()> {
        if self.file.metadata()?.len() != WAL_LEN {
            self.file.set_len(0)?;
            let zeros = vec![0u8; 64 << 10];
            let mut at = 0;
            while at < WAL_LEN {
                self.file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            self.file.sync_all()?;
            // The file's directory entry must survive a power loss as well as its data.
            File::open(state_dir)?.sync_all()?;
        }
        self.clear()
    }

    /// Whether a record of `len` bytes of lines fits before the end of the ring.
    pub(super) fn fits(&self, len: usize) -> bool {
        self.off + (HEADER + len) as u64 <= WAL_LEN
    }

    /// Writes `lines`, which go at `base` in the log, as the next record and makes it
    /// durable. The record is only kept (the next one goes after it) once
    /// [`Wal::advance`] is called.
    pub(super) fn append(&mut self, base: u64, lines: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(lines.len()).map_err(std::io::Error::other)?;
        let mut record = Vec::with_capacity(HEADER + lines.len());
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&base.to_le_bytes());
        record.extend_from_slice(&self.turn.to_le_bytes());
        record.extend_from_slice(&check(len, base, self.turn, lines));
        record.extend_from_slice(lines);
        self.file.write_all_at(&record, self.off)?;
        self.file.sync_data()
    }

    /// Keeps the record just appended, of `len` bytes of lines.
    pub(super) fn advance(&mut self, len: usize) {
        self.off += (HEADER + len) as u64;
    }

    /// Starts the ring over with no record in it: zeros over the first record's header,
    /// synced. Called only when every record in it is durable in the log.
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
