//! Appending with group commit: concurrent requests hand their events to one writer
//! thread, which writes every pending line and makes them durable with one fdatasync
//! before acknowledging any of them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Event, GENESIS, Line, line_hash};

/// Audit failures. A request whose audit line cannot be made durable fails.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Opening, reading or writing the log.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The last line of the log does not parse.
    #[error("audit log {0}: last line is not a valid audit line; run `bulkhead audit verify`")]
    Corrupt(String),
    /// The writer thread is gone.
    #[error("audit writer stopped")]
    Stopped,
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Handle to the audit log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<(Event, Ack)>,
}

struct State {
    file: File,
    head: File,
    path: PathBuf,
    seq: u64,
    prev: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io { path: path.display().to_string(), source }
}

/// Reads the seq and hash of the last complete line; a torn final line (a write the
/// daemon never acknowledged, cut by a crash) is truncated away.
fn recover(file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
    let mut data = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(io(path))?;
    file.read_to_end(&mut data).map_err(io(path))?;
    let complete = data.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
    if complete < data.len() {
        file.set_len(complete as u64).map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
        tracing::warn!(path = %path.display(), bytes = data.len() - complete, "audit log ended in a torn line; truncated it");
    }
    let body = &data[..complete];
    let Some(last) = body.strip_suffix(b"\n").map(|b| b.rsplit(|c| *c == b'\n').next().unwrap_or(b)) else {
        return Ok((0, GENESIS.to_string()));
    };
    let line: Line = serde_json::from_slice(last).map_err(|_| AuditError::Corrupt(path.display().to_string()))?;
    Ok((line.seq, line_hash(last)))
}

impl AuditLog {
    /// Opens (creating) `<state>/audit.jsonl` and starts the writer thread.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = state_dir.join("audit.jsonl");
        let mut file = std::fs::OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(&path).map_err(io(&path))?;
        let (seq, prev) = recover(&mut file, &path)?;
        let head_path = state_dir.join("audit.head");
        let head = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&head_path).map_err(io(&head_path))?;
        let mut state = State { file, head, path, seq, prev };
        state.write_head().map_err(io(&head_path))?;
        let (tx, rx) = mpsc::channel::<(Event, Ack)>();
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || writer_loop(state, rx)).map_err(io(&head_path))?;
        Ok(AuditLog { tx })
    }

    /// Appends `event` and returns once it is durable.
    pub async fn record(&self, event: Event) -> Result<(), AuditError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx.send((event, ack)).map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Io { path: "audit.jsonl".into(), source: std::io::Error::other(e) }),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Appends `event` from synchronous code (CLI start-up, tests).
    pub fn record_blocking(&self, event: Event) -> Result<(), AuditError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx.send((event, ack)).map_err(|_| AuditError::Stopped)?;
        match done.blocking_recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Io { path: "audit.jsonl".into(), source: std::io::Error::other(e) }),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

impl State {
    fn write_head(&mut self) -> std::io::Result<()> {
        // Fixed width so an in-place rewrite never leaves stale bytes behind.
        let text = format!("{{\"seq\":{:>20},\"hash\":\"{}\"}}\n", self.seq, self.prev);
        self.head.write_all_at(text.as_bytes(), 0)
    }

    fn commit(&mut self, batch: &[Event]) -> Result<(), String> {
        let ts_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut buf = Vec::with_capacity(batch.len() * 256);
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        for event in batch {
            seq += 1;
            let line = Line { seq, ts_ms, event: event.clone(), prev: prev.clone() };
            let bytes = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
            prev = line_hash(&bytes);
            buf.extend_from_slice(&bytes);
            buf.push(b'\n');
        }
        self.file.write_all(&buf).map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.file.sync_data().map_err(|e| format!("{}: fdatasync: {e}", self.path.display()))?;
        self.seq = seq;
        self.prev = prev;
        // The head only ever trails the durable log; losing an update is harmless.
        if let Err(e) = self.write_head() {
            tracing::warn!(error = %e, "audit.head update failed");
        }
        Ok(())
    }
}

fn writer_loop(mut state: State, rx: mpsc::Receiver<(Event, Ack)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (events, acks): (Vec<Event>, Vec<Ack>) = batch.into_iter().unzip();
        let result = state.commit(&events);
        if result.is_err() {
            // A failed write may have left a partial tail; cut back to the last good line
            // so that later lines still chain.
            if let Ok(len) = state.file.metadata().map(|m| m.len()) {
                tracing::error!(len, "audit write failed");
            }
            if let Ok((seq, prev)) = recover(&mut state.file, &state.path.clone()) {
                state.seq = seq;
                state.prev = prev;
            }
        }
        for ack in acks {
            // A requester that went away no longer needs the answer.
            let _delivered = ack.send(result.clone());
        }
    }
}
