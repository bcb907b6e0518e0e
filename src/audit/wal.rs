//! The audit log's write-ahead ring, `<state>/audit.wal`.
//!
//! Appending to `audit.jsonl` and syncing it makes ext4 commit its journal (the file's
//! size changed), two device flushes per commit. The ring is a fixed-size file written
//! full of zeros once, so overwriting it changes no metadata and its `fdatasync` is one
//! data write and one flush. Each commit appends its lines to `audit.jsonl` without a
//! sync and writes them, as one record, into the ring, whose sync makes them durable.
//! Before the ring starts over, `audit.jsonl` itself is synced, so a record is only ever
//! overwritten once its lines are durable in the log. On open, the lines of the ring
//! that the log lost (acknowledged, but its append had not reached the disk when the
//! machine went down) are appended to it again.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The ring's size: a commit that would run past it starts it over (one sync of the log
/// per this many bytes of lines).
pub(super) const WAL_LEN: u64 = 1 << 20;

const MAGIC: &[u8; 4] = b"BHWL";
/// Magic, payload length (u32 LE), the first 8 bytes of the payload's SHA-256.
const HEADER: usize = 16;

/// The open ring and where the next record goes.
pub(super) struct Wal {
    file: File,
    path: PathBuf,
    off: u64,
}

fn check(payload: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

impl Wal {
    /// Opens `<state>/audit.wal`, creating it empty; [`Wal::prepare`] sizes it once the
    /// records in it have been replayed.
    pub(super) fn open(state_dir: &Path) -> std::io::Result<Wal> {
        let path = state_dir.join("audit.wal");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        Ok(Wal { file, path, off: 0 })
    }

    /// The ring's path, for errors.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The payloads of the whole records from the start of the ring, in order, up to the
    /// first that is not whole (a torn write, or zeros). Records past the newest may be
    /// older ones from before the ring last started over: their lines are already in
    /// the log, which the caller recognizes by their sequence numbers.
    pub(super) fn records(&mut self) -> std::io::Result<Vec<Vec<u8>>> {
        let mut data = Vec::new();
        (&self.file).read_to_end(&mut data)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while let Some(header) = data.get(at..at + HEADER) {
            if &header[..4] != MAGIC {
                break;
            }
            let mut len = [0u8; 4];
            len.copy_from_slice(&header[4..8]);
            let len = u32::from_le_bytes(len) as usize;
            let Some(payload) = data.get(at + HEADER..at + HEADER + len) else {
                break;
            };
            if header[8..16] != check(payload) {
                break;
            }
            out.push(payload.to_vec());
            at += HEADER + len;
        }
        Ok(out)
    }

    /// Makes the ring [`WAL_LEN`] bytes of written zeros (blocks allocated and written,
    /// so that overwriting them needs no journal commit) and starts it over. Called once
    /// its records are durable in the log.
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
        self.off = 0;
        Ok(())
    }

    /// Whether a record of `len` payload bytes fits before the end of the ring.
    pub(super) fn fits(&self, len: usize) -> bool {
        self.off + (HEADER + len) as u64 <= WAL_LEN
    }

    /// Writes `payload` as the next record and makes it durable.
    pub(super) fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&check(payload));
        record.extend_from_slice(payload);
        self.file.write_all_at(&record, self.off)?;
        self.file.sync_data()?;
        self.off += record.len() as u64;
        Ok(())
    }

    /// Starts the ring over, once everything in it is durable in the log.
    pub(super) fn restart(&mut self) {
        self.off = 0;
    }
}
