//! Appending with group commit: concurrent requests' lines are written together and made
//! durable with one fdatasync (of the write-ahead ring, see [`super::wal`]) before any of
//! them is acknowledged.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::wal::{Fit, LogId, Record, Wal, fit, last_line};
use super::{Event, GENESIS, Line, line_hash};

/// Audit failures. A request whose awaited audit line cannot be made durable fails; a
/// detached line that cannot is logged (see [`AuditLog::record_detached`]).
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
    /// The commit that carried this line was abandoned.
    #[error("audit commit abandoned")]
    Stopped,
    /// `audit.wal` holds committed lines that do not continue `audit.jsonl`.
    #[error(
        "{wal} holds committed audit lines that do not continue {log} (was the log moved, \
         replaced or cut while the daemon was down?); put the log back, or move {wal} aside \
         to give those lines up"
    )]
    ForeignWal {
        /// The ring.
        wal: String,
        /// The log.
        log: String,
    },
}

/// Who hears a line's outcome: its waiter, or nobody for a detached line.
type Ack = Option<tokio::sync::oneshot::Sender<Result<(), String>>>;

/// Handle to the audit log; cheap to clone.
///
/// Group commit without a writer thread: the first requester to find no commit in
/// progress becomes the leader, writes every line queued by then with one write and one
/// fdatasync, acknowledges them all, and repeats while lines keep arriving; the others
/// wait for their acknowledgement. Lines queued with [`AuditLog::begin`] are committed
/// on the blocking pool (`spawn_blocking`) while their caller works; detached lines
/// ([`AuditLog::record_detached`]) are carried by the next commit or a timer's, and
/// [`AuditLog::flush`] commits what is left at shutdown.
///
/// Where the commit runs: a leader that is a request's own task (see
/// [`AuditLog::serving`]) while nothing else is in flight (no other request, no open
/// stream; see [`AuditLog::in_flight`]) commits on its own worker thread, because
/// handing the worker over would put two thread wake-ups before its answer and nobody
/// else is waiting for that thread. Every other leader of [`AuditLog::record`]
/// (background tasks such as an egress connection's line, a request with others in flight,
/// any leader while the disk is slow: the last commit took more than
/// [`INLINE_SYNC_LIMIT_US`]) hands its worker to the runtime for the commit
/// (`block_in_place`), so other work goes on while the disk syncs. An inline commit can
/// still delay, by one sync, what is not counted: accepting connections, timers,
/// responses already handed to hyper, refusals made before a request's task starts and
/// egress relays (which live only while their tenant's exec is in flight, so a commit
/// next to them is not a lone one); a disk that turns slow does that once, and the next
/// commits hand over.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

struct Queue {
    pending: Vec<(Event, Ack)>,
    committing: bool,
    /// A timer will commit detached lines that no other commit has carried by then.
    sweep_due: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    state: Mutex<State>,
    in_flight: AtomicUsize,
    /// How long the last commit (write and fdatasync) took, in microseconds.
    last_sync_us: AtomicU64,
}

/// The longest a detached line waits for a commit to carry it before it gets its own.
pub const DETACHED_WITHIN: std::time::Duration = std::time::Duration::from_millis(10);

/// A commit slower than this (a busy or failing disk) makes the next ones hand their
/// worker over even for a lone request, until commits are fast again.
pub const INLINE_SYNC_LIMIT_US: u64 = 2_000;

tokio::task_local! {
    /// Set in a request's own task (see [`AuditLog::serving`]); holds its count.
    static OWN_REQUEST: InFlight;
}

/// Counts one piece of work as in flight while it lives (see [`AuditLog::in_flight`]).
pub struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct State {
    file: File,
    /// Where commits are made durable before they are appended to `file`.
    wal: Wal,
    head: File,
    path: PathBuf,
    /// The log's length: where the next line goes.
    len: u64,
    seq: u64,
    prev: String,
    /// Why the log takes no more lines: a write or sync failed, after which the log may
    /// lack lines that only the ring holds (see [`State::stop`]).
    stopped: Option<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the seq and hash of the last complete line of `data`, the log's bytes, and the
/// length up to its end; a torn final line (a write the daemon never acknowledged, cut
/// by a crash) is truncated away.
fn recover(file: &mut File, path: &Path, data: &[u8]) -> Result<(u64, String, u64), AuditError> {
    let complete = data
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    if complete < data.len() {
        file.set_len(complete as u64).map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
        tracing::warn!(path = %path.display(), bytes = data.len() - complete, "audit log ended in a torn line; truncated it");
    }
    let Some(last) = last_line(&data[..complete]) else {
        return Ok((0, GENESIS.to_string(), 0));
    };
    let line: Line = serde_json::from_slice(last)
        .map_err(|_| AuditError::Corrupt(path.display().to_string()))?;
    Ok((line.seq, line_hash(last), complete as u64))
}

/// Writes the ring's lines into the log at the ring's first offset and returns the log's
/// bytes; the caller syncs it before the ring is cleared.
///
/// They are rewritten even where the log seems to hold them already: the comparison reads
/// the page cache, which can hold bytes that a failed writeback never put on the disk
/// (the failure reported to the process that wrote them, not to this one); only what
/// this process writes and then syncs is known to be on the disk.
///
/// Bytes past the ring's first offset that are not its lines (what a crash can leave of
/// an unsynced append: zeros, garbage) are replaced, and copied aside first to
/// `audit.jsonl.replaced-<ns>`. A ring that does not fit the log (see [`fit`]) is
/// refused, and nothing is changed.
fn replay(
    file: &mut File,
    path: &Path,
    wal: &Path,
    log: LogId,
    mut data: Vec<u8>,
    records: &[Record],
) -> Result<Vec<u8>, AuditError> {
    if records.is_empty() {
        return Ok(data);
    }
    let Some(Fit { base, lines, same }) = fit(&data, log, records) else {
        return Err(AuditError::ForeignWal {
            wal: wal.display().to_string(),
            log: path.display().to_string(),
        });
    };
    let dropped = &data[base + same..];
    if !dropped.is_empty() {
        let aside = set_aside(path, dropped)?;
        tracing::warn!(
            path = %path.display(),
            bytes = dropped.len(),
            copy = %aside.display(),
            "audit log held bytes that are not the committed lines in audit.wal; replaced them"
        );
    }
    if same < lines.len() {
        tracing::warn!(
            path = %path.display(),
            bytes = lines.len() - same,
            "audit log had lost committed lines; restored them from audit.wal"
        );
    }
    file.set_len(base as u64).map_err(io(path))?;
    file.write_all(&lines).map_err(io(path))?;
    data.truncate(base);
    data.extend_from_slice(&lines);
    Ok(data)
}

/// Copies `bytes`, about to be replaced in the log at `path`, to a new file beside it.
fn set_aside(path: &Path, bytes: &[u8]) -> Result<PathBuf, AuditError> {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let aside = path.with_file_name(format!("audit.jsonl.replaced-{ns}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .map_err(io(&aside))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&aside))?;
    // Its directory entry must be durable before the log loses the bytes.
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(aside)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuditLog {
    /// Opens (creating) `<state>/audit.jsonl`.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = state_dir.join("audit.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(&path))?;
        let log = LogId::of(&file).map_err(io(&path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(&path))?;
        let mut wal = Wal::open(state_dir, log).map_err(io(&state_dir.join("audit.wal")))?;
        let records = wal.records().map_err(io(wal.path()))?;
        let data = replay(&mut file, &path, wal.path(), log, data, &records)?;
        let (seq, prev, len) = recover(&mut file, &path, &data)?;
        // What was replayed must be durable in the log before the ring is cleared.
        file.sync_data().map_err(io(&path))?;
        wal.prepare().map_err(io(wal.path()))?;
        let head_path = state_dir.join("audit.head");
        let head = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&head_path)
            .map_err(io(&head_path))?;
        // The directory entries of files just created must survive a power loss too.
        File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(state_dir))?;
        let mut state = State {
            file,
            wal,
            head,
            path,
            len,
            seq,
            prev,
            stopped: None,
        };
        state.write_head().map_err(io(&head_path))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue {
                    pending: Vec::new(),
                    committing: false,
                    sweep_due: false,
                }),
                state: Mutex::new(state),
                in_flight: AtomicUsize::new(0),
                last_sync_us: AtomicU64::new(0),
            }),
        })
    }

    /// Counts work that an inline commit would hold up (an open stream) as in flight
    /// until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.inner.clone())
    }

    /// Runs `handling`, one request's task, counted as in flight until it ends (which may
    /// be after its client has gone), and marked as a request's own, whose commits may run
    /// on its thread when nothing else is in flight.
    pub fn serving<F: std::future::Future>(
        &self,
        handling: F,
    ) -> impl std::future::Future<Output = F::Output> + use<F> {
        let counted = self.in_flight();
        OWN_REQUEST.scope(counted, handling)
    }

    /// Whether a leader may commit on its own worker thread (see [`AuditLog`]).
    fn inline_commit(&self) -> bool {
        OWN_REQUEST.try_with(|_| ()).is_ok()
            && self.inner.in_flight.load(Ordering::Relaxed) <= 1
            && self.inner.last_sync_us.load(Ordering::Relaxed) <= INLINE_SYNC_LIMIT_US
    }

    /// Queues `event`; returns whether the caller must lead the commit.
    fn enqueue(&self, event: Event, ack: Ack) -> bool {
        let mut q = lock(&self.inner.queue);
        q.pending.push((event, ack));
        !std::mem::replace(&mut q.committing, true)
    }

    /// Commits batches until the queue is empty (the leader's job).
    fn lead(&self, run_blocking: impl Fn(&mut dyn FnMut())) {
        loop {
            let batch = {
                let mut q = lock(&self.inner.queue);
                if q.pending.is_empty() {
                    q.committing = false;
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            let (events, acks): (Vec<Event>, Vec<Ack>) = batch.into_iter().unzip();
            let mut result = Err("not written".to_string());
            run_blocking(&mut || {
                let mut state = lock(&self.inner.state);
                let started = std::time::Instant::now();
                result = state.commit(&events);
                let took = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                self.inner.last_sync_us.store(took, Ordering::Relaxed);
            });
            for (event, ack) in events.iter().zip(acks) {
                match (ack, &result) {
                    // A requester that went away no longer needs the answer.
                    (Some(ack), _) => {
                        let _delivered = ack.send(result.clone());
                    }
                    (None, Err(e)) => tracing::error!(
                        action = %event.action,
                        tenant = event.tenant.as_deref().unwrap_or("-"),
                        trace_id = event.trace_id.as_deref().unwrap_or("-"),
                        error = %e,
                        "detached audit line not made durable"
                    ),
                    (None, Ok(())) => {}
                }
            }
        }
    }

    /// Appends `event` and returns once it is durable.
    pub async fn record(&self, event: Event) -> Result<(), AuditError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.enqueue(event, Some(ack)) {
            let multi = may_block_in_place();
            self.lead(|f: &mut dyn FnMut()| {
                if multi && !self.inline_commit() {
                    tokio::task::block_in_place(f)
                } else {
                    f()
                }
            });
        }
        acknowledged(done.await)
    }

    /// Queues `event` and starts its commit off the async workers, so that the caller
    /// can do other work (wait for an upstream) while the disk syncs; the caller awaits
    /// [`Durable::wait`] before answering.
    pub fn begin(&self, event: Event) -> Durable {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.enqueue(event, Some(ack)) {
            self.lead_in_background();
        }
        Durable(done)
    }

    /// Queues `event` for a commit that nobody waits for: a line whose durability the
    /// answer does not depend on (an LLM call's settlement, after its admission line).
    /// It rides with the next commit, or is committed at most [`DETACHED_WITHIN`] after
    /// it was queued if none came, so that it does not take a sync of its own (which the
    /// next waiting line would queue behind) on a busy log. A commit that fails logs each
    /// detached line it carried (action, tenant, trace id) as not made durable, and stops
    /// the log like any other (see [`State::stop`]).
    pub fn record_detached(&self, event: Event) {
        let runtime = tokio::runtime::Handle::try_current();
        let sweep = {
            let mut q = lock(&self.inner.queue);
            q.pending.push((event, None));
            runtime.is_err() || !std::mem::replace(&mut q.sweep_due, true)
        };
        match runtime {
            Ok(runtime) if sweep => {
                let log = self.clone();
                let _sweeper = runtime.spawn(async move {
                    tokio::time::sleep(DETACHED_WITHIN).await;
                    let lead = {
                        let mut q = lock(&log.inner.queue);
                        q.sweep_due = false;
                        !q.pending.is_empty() && !std::mem::replace(&mut q.committing, true)
                    };
                    if lead {
                        log.lead_in_background();
                    }
                });
            }
            Ok(_) => {}
            Err(_) => {
                if !std::mem::replace(&mut lock(&self.inner.queue).committing, true) {
                    self.lead(|f: &mut dyn FnMut()| f());
                }
            }
        }
    }

    /// At shutdown: waits until no counted work is in flight (a stream's relay queues its
    /// settlement as it ends), then commits every queued line, so that detached lines
    /// are not left to a timer that will not fire, and syncs the log and clears the ring
    /// (so that the log may be moved away before the next start). Gives up at
    /// `deadline`, logging what it leaves: a relay or commit that is stuck must not hold
    /// the daemon up.
    pub async fn flush(&self, deadline: std::time::Instant) {
        loop {
            let lead = {
                let mut q = lock(&self.inner.queue);
                let busy = self.inner.in_flight.load(Ordering::Relaxed) > 0;
                if q.pending.is_empty() && !q.committing && !busy {
                    drop(q);
                    let checkpoint = || {
                        if let Err(e) = lock(&self.inner.state).checkpoint() {
                            tracing::error!(error = %e, "audit log not synced at shutdown");
                        }
                    };
                    if may_block_in_place() {
                        tokio::task::block_in_place(checkpoint);
                    } else {
                        checkpoint();
                    }
                    return;
                }
                if std::time::Instant::now() >= deadline {
                    tracing::error!(
                        queued = q.pending.len(),
                        in_flight = self.inner.in_flight.load(Ordering::Relaxed),
                        "audit flush gave up at shutdown; queued lines were not written"
                    );
                    return;
                }
                !q.pending.is_empty() && !std::mem::replace(&mut q.committing, true)
            };
            if lead {
                if may_block_in_place() {
                    tokio::task::block_in_place(|| self.lead(|f: &mut dyn FnMut()| f()));
                } else {
                    self.lead(|f: &mut dyn FnMut()| f());
                }
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    fn lead_in_background(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let log = self.clone();
                // The handle is not needed: the commit's outcome reaches each line's
                // waiter through its acknowledgement.
                let _commit = runtime.spawn_blocking(move || log.lead(|f: &mut dyn FnMut()| f()));
            }
            Err(_) => self.lead(|f: &mut dyn FnMut()| f()),
        }
    }

    /// Appends `event` from synchronous code (tests, tools).
    pub fn record_blocking(&self, event: Event) -> Result<(), AuditError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.enqueue(event, Some(ack)) {
            self.lead(|f: &mut dyn FnMut()| f());
        }
        acknowledged(done.blocking_recv())
    }
}

/// A line queued by [`AuditLog::begin`], whose commit is under way.
#[must_use = "a begun line must be waited for before the request is answered"]
pub struct Durable(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Durable {
    /// Returns once the line is durable, or why it could not be made so.
    pub async fn wait(self) -> Result<(), AuditError> {
        acknowledged(self.0.await)
    }
}

/// Whether `block_in_place` may be called here: only on a multi-thread runtime (it
/// panics on a current-thread one).
fn may_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn acknowledged(
    ack: Result<Result<(), String>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), AuditError> {
    match ack {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AuditError::Io {
            path: "audit.jsonl".into(),
            source: std::io::Error::other(e),
        }),
        Err(_) => Err(AuditError::Stopped),
    }
}

impl State {
    /// After a failed write or sync: the ring and the log may now disagree, and a later
    /// sync of the log could report success for pages an earlier failure lost, so no
    /// further line is taken (and the ring is never cleared) in this process. Opening the
    /// log again writes into it what only the ring holds. Returns the error to report.
    fn stop(&mut self, why: String) -> String {
        tracing::error!(path = %self.path.display(), error = %why, "audit log stopped: it takes no more lines until the daemon restarts");
        let why = format!(
            "{why}; the audit log takes no more lines until the daemon restarts and restores it from audit.wal"
        );
        self.stopped = Some(why.clone());
        why
    }

    /// Makes the log itself durable and starts the ring over, empty.
    fn checkpoint(&mut self) -> Result<(), String> {
        if let Some(why) = &self.stopped {
            return Err(why.clone());
        }
        if let Err(e) = self.file.sync_data() {
            return Err(self.stop(format!("{}: fdatasync: {e}", self.path.display())));
        }
        if let Err(e) = self.wal.clear() {
            return Err(self.stop(format!("{}: {e}", self.wal.path().display())));
        }
        Ok(())
    }

    fn write_head(&mut self) -> std::io::Result<()> {
        // Fixed width so an in-place rewrite never leaves stale bytes behind.
        let text = format!("{{\"seq\":{:>20},\"hash\":\"{}\"}}\n", self.seq, self.prev);
        self.head.write_all_at(text.as_bytes(), 0)
    }

    fn commit(&mut self, batch: &[Event]) -> Result<(), String> {
        if let Some(why) = &self.stopped {
            return Err(why.clone());
        }
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut buf = Vec::with_capacity(batch.len() * 256);
        // Where each line ends in `buf`, and its hash.
        let mut ends = Vec::with_capacity(batch.len());
        let mut prev = self.prev.clone();
        for (n, event) in (1..).zip(batch) {
            let line = Line {
                seq: self.seq.checked_add(n).ok_or("audit seq overflow")?,
                ts_ms,
                event: event.clone(),
                prev: prev.clone(),
            };
            let bytes = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
            if bytes.len() >= Wal::CAPACITY {
                return Err(format!(
                    "an audit line of {} bytes is bigger than audit.wal",
                    bytes.len()
                ));
            }
            prev = line_hash(&bytes);
            buf.extend_from_slice(&bytes);
            buf.push(b'\n');
            ends.push((buf.len(), prev.clone()));
        }
        // As few records as the ring allows: one, unless the batch is bigger than it. The
        // chain moves on with each, so it always ends at the last line in the log.
        let mut start = 0;
        let mut taken = 0;
        for (i, (end, _)) in ends.iter().enumerate() {
            if end - start > Wal::CAPACITY {
                self.write_durably(&buf[start..ends[i - 1].0], i - taken, &ends[i - 1].1)?;
                start = ends[i - 1].0;
                taken = i;
            }
        }
        if let Some((_, hash)) = ends.last() {
            self.write_durably(&buf[start..], ends.len() - taken, hash)?;
        }
        // The head only ever trails the durable lines (the log's and the ring's); losing
        // an update is harmless.
        if let Err(e) = self.write_head() {
            tracing::warn!(error = %e, "audit.head update failed");
        }
        Ok(())
    }

    /// Makes `lines` (`count` lines, the last with hash `last`) durable in the ring and
    /// appends them to the log.
    fn write_durably(&mut self, lines: &[u8], count: usize, last: &str) -> Result<(), String> {
        if !self.wal.fits(lines.len()) {
            self.checkpoint()?;
        }
        if let Err(e) = self.wal.append(self.len, lines) {
            return Err(self.stop(format!("{}: {e}", self.wal.path().display())));
        }
        if let Err(e) = self.file.write_all(lines) {
            return Err(self.stop(format!("{}: {e}", self.path.display())));
        }
        self.wal.advance(lines.len());
        self.len += lines.len() as u64;
        self.seq += count as u64;
        self.prev = last.to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log in a new temp dir, and a runtime shaped like the daemon's on two cores (one
    /// worker).
    fn fresh_log() -> (PathBuf, AuditLog, tokio::runtime::Runtime) {
        let dir = std::env::temp_dir().join(format!("bulkhead-audit-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::open(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        (dir, log, rt)
    }

    /// A log in a new temp dir holding `n` lines (`test.0`, …), closed as by a crash (its
    /// ring not cleared), and its runtime.
    fn log_of(n: usize) -> (PathBuf, tokio::runtime::Runtime) {
        let (dir, log, rt) = fresh_log();
        for i in 0..n {
            log.record_blocking(event(i)).unwrap();
        }
        (dir, rt)
    }

    fn event(i: usize) -> Event {
        Event {
            actor: "ak_test".into(),
            action: format!("test.{i}"),
            outcome: "ok".into(),
            ..Default::default()
        }
    }

    /// Both commit paths, on a runtime shaped like the daemon's on two cores (one worker):
    /// a lone request's own task commits on its thread; a slow disk, an open stream, a
    /// background task or other requests in flight make the leader hand the worker over.
    /// Either way every acknowledged line is in the file, in one unbroken chain.
    #[test]
    fn lone_and_concurrent_commits_are_all_written_and_chained() {
        let (dir, log, rt) = fresh_log();
        let fast = |log: &AuditLog| log.inner.last_sync_us.store(0, Ordering::Relaxed);
        let lone = log.clone();
        let task = rt.spawn(log.serving(async move {
            let log = lone;
            fast(&log);
            assert!(log.inline_commit(), "a lone request on a fast disk");
            log.record(event(0)).await.unwrap();
            log.inner
                .last_sync_us
                .store(INLINE_SYNC_LIMIT_US + 1, Ordering::Relaxed);
            assert!(!log.inline_commit(), "a slow disk hands the worker over");
            log.record(event(1)).await.unwrap();
            fast(&log);
            let stream = log.in_flight();
            assert!(!log.inline_commit(), "an open stream would wait");
            drop(stream);
            assert!(log.inline_commit());
        }));
        rt.block_on(task).unwrap();
        let background = log.clone();
        let task = rt.spawn(async move {
            fast(&background);
            assert!(!background.inline_commit(), "not a request's own task");
            background.record(event(2)).await.unwrap();
        });
        rt.block_on(task).unwrap();
        assert_eq!(log.inner.in_flight.load(Ordering::Relaxed), 0);
        rt.block_on(async {
            let tasks: Vec<_> = (3..43)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(log.clone().serving(async move {
                        tokio::task::yield_now().await;
                        log.record(event(i)).await
                    }))
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        assert_eq!(log.inner.in_flight.load(Ordering::Relaxed), 0);
        let report = super::super::verify::verify_file(&dir.join("audit.jsonl")).unwrap();
        assert_eq!(report.lines, 43);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn actions(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Line>(l).unwrap().event.action)
            .collect()
    }

    /// A begun line is in the file once `wait` returns; a detached line rides with the
    /// next commit, is committed by a timer when none comes, and by `flush` at once.
    #[test]
    fn begun_and_detached_lines_are_committed_in_order() {
        let (dir, log, rt) = fresh_log();
        rt.block_on(async {
            let begun = log.begin(event(0));
            begun.wait().await.unwrap();
            assert_eq!(actions(&dir), ["test.0"]);

            log.record_detached(event(1));
            log.record(event(2)).await.unwrap();
            assert_eq!(actions(&dir), ["test.0", "test.1", "test.2"]);

            log.record_detached(event(3));
            let queued = std::time::Instant::now();
            while actions(&dir).len() < 4 {
                assert!(
                    queued.elapsed() < std::time::Duration::from_secs(5),
                    "a detached line with no commit after it was never written"
                );
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }

            log.record_detached(event(4));
            log.flush(std::time::Instant::now() + std::time::Duration::from_secs(5))
                .await;
            assert_eq!(
                actions(&dir),
                ["test.0", "test.1", "test.2", "test.3", "test.4"]
            );
        });
        let report = super::super::verify::verify_file(&dir.join("audit.jsonl")).unwrap();
        assert_eq!(report.lines, 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `wait` returns only after its line's commit: while the log cannot be written (its
    /// state held, as by a commit stuck in the kernel) it does not; once it can, the line
    /// is written, in order, before the next one is acknowledged.
    #[test]
    fn a_begun_line_is_not_acknowledged_before_its_commit() {
        let (dir, log, rt) = fresh_log();
        let held = lock(&log.inner.state);
        rt.block_on(async {
            let begun = log.begin(event(0));
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(200), begun.wait()).await;
            assert!(
                early.is_err(),
                "acknowledged while its commit could not write"
            );
        });
        assert!(actions(&dir).is_empty());
        drop(held);
        rt.block_on(async { log.begin(event(1)).wait().await.unwrap() });
        assert_eq!(actions(&dir), ["test.0", "test.1"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Cuts the log back to its first `keep` lines, as a power loss does to appends that
    /// had not reached the disk.
    fn lose_tail(dir: &Path, keep: usize) {
        let path = dir.join("audit.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: usize = text.split_inclusive('\n').take(keep).map(str::len).sum();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(kept as u64).unwrap();
    }

    fn verified(dir: &Path) -> u64 {
        let report = super::super::verify::verify_file(&dir.join("audit.jsonl")).unwrap();
        assert_eq!(report.in_wal, 0, "lines left only in the ring");
        report.lines
    }

    /// Acknowledged lines that the log lost are written back from the ring when the log
    /// is opened, in order and chained, once only; a record torn or changed in the ring
    /// (its checksum fails) ends the replay there.
    #[test]
    fn acknowledged_lines_lost_from_the_log_come_back_from_the_ring() {
        let (dir, _rt) = log_of(6);
        let whole = std::fs::read(dir.join("audit.jsonl")).unwrap();
        lose_tail(&dir, 3);
        assert_eq!(actions(&dir).len(), 3);
        let log = AuditLog::open(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("audit.jsonl")).unwrap(), whole);
        log.record_blocking(event(6)).unwrap();
        drop(log);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir).len(), 7, "replayed twice");
        assert_eq!(verified(&dir), 7);
        std::fs::remove_dir_all(&dir).unwrap();

        // Records 0..6 in the ring in order, one line each: change a byte of the fifth's
        // line (test.4), then lose the log's last three lines.
        let (dir, _rt) = log_of(6);
        let ring = dir.join("audit.wal");
        let mut bytes = std::fs::read(&ring).unwrap();
        let at = bytes.windows(6).position(|w| w == b"test.4").unwrap();
        bytes[at + 5] = b'9';
        std::fs::write(&ring, &bytes).unwrap();
        lose_tail(&dir, 3);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir), ["test.0", "test.1", "test.2", "test.3"]);
        assert_eq!(verified(&dir), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A power loss can leave an unsynced append garbled rather than cut: zeros where
    /// lines were, or other bytes after them. From the first byte that differs from the
    /// ring, the ring's lines replace the log's.
    #[test]
    fn a_garbled_tail_is_replaced_by_the_rings_lines() {
        let garbles: [fn(&mut Vec<u8>, usize); 2] = [
            |log, cut| log[cut..].fill(0),
            |log, cut| {
                log.truncate(cut);
                log.extend_from_slice(&b"longer than what it replaced, and not a line\n".repeat(9));
            },
        ];
        for garble in garbles {
            let (dir, _rt) = log_of(6);
            let path = dir.join("audit.jsonl");
            let whole = std::fs::read(&path).unwrap();
            let mut garbled = whole.clone();
            garble(&mut garbled, whole.len() - 150);
            std::fs::write(&path, &garbled).unwrap();
            drop(AuditLog::open(&dir).unwrap());
            assert_eq!(std::fs::read(&path).unwrap(), whole);
            assert_eq!(verified(&dir), 6);
            // What was replaced is kept beside the log.
            let aside: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("audit.jsonl.replaced-")
                })
                .collect();
            assert_eq!(aside.len(), 1);
            let kept = std::fs::read(aside[0].path()).unwrap();
            assert!(!kept.is_empty() && garbled.ends_with(&kept) && !whole.ends_with(&kept));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Past the end of the ring the log itself is synced and the ring starts over; lines
    /// written after that come back from it, the records left from the earlier turn
    /// after them ending the replay.
    #[test]
    fn the_ring_starts_over_when_full_and_still_restores_what_came_after() {
        let (dir, log, _rt) = fresh_log();
        // About 4 KiB a line, so two pages a record: 600 lines are more than one turn of
        // the 4 MiB ring.
        let n = 600;
        assert!((n * 8192) as u64 > super::super::wal::WAL_LEN);
        for i in 0..n {
            log.record_blocking(Event {
                target: Some("t".repeat(4000)),
                ..event(i)
            })
            .unwrap();
        }
        drop(log);
        assert_eq!(
            std::fs::metadata(dir.join("audit.wal")).unwrap().len(),
            super::super::wal::WAL_LEN
        );
        lose_tail(&dir, n - 20);
        drop(AuditLog::open(&dir).unwrap());
        let all: Vec<String> = (0..n).map(|i| format!("test.{i}")).collect();
        assert_eq!(actions(&dir), all);
        assert_eq!(verified(&dir), n as u64);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A batch bigger than the ring is made durable in as many records as it needs, the
    /// ring starting over between them, and comes back whole after a lost tail.
    #[test]
    fn a_batch_bigger_than_the_ring_is_split_across_its_turns() {
        let (dir, log, _rt) = fresh_log();
        let n = 1100;
        assert!(n * 4000 > Wal::CAPACITY);
        for i in 0..n {
            let big = Event {
                target: Some("t".repeat(4000)),
                ..event(i)
            };
            assert!(!log.enqueue(big, None) || i == 0);
        }
        log.lead(|f: &mut dyn FnMut()| f());
        drop(log);
        assert_eq!(actions(&dir).len(), n);
        lose_tail(&dir, n - 30);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir).len(), n);
        assert_eq!(verified(&dir), n as u64);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A ring whose lines do not continue the log (the log moved away or replaced while
    /// the daemon was down after a crash) is refused, changing neither file (beyond
    /// creating an empty log where there was none). A clean shutdown (`flush`) leaves the
    /// ring empty, so the log may be moved away then.
    #[test]
    fn a_ring_that_does_not_continue_the_log_is_refused() {
        let (dir, rt) = log_of(3);
        let (other, log, _rt2) = fresh_log();
        log.record_blocking(event(9)).unwrap();
        drop(log);
        std::fs::copy(dir.join("audit.wal"), other.join("audit.wal")).unwrap();
        let files = |d: &Path| {
            (
                std::fs::read(d.join("audit.jsonl")).unwrap(),
                std::fs::read(d.join("audit.wal")).unwrap(),
            )
        };
        let before = files(&other);
        match AuditLog::open(&other) {
            Err(AuditError::ForeignWal { .. }) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a ring from another log was accepted"),
        }
        assert_eq!(files(&other), before);

        // A new log (its ring starts at offset 0, where every chain starts alike) moved
        // away after a crash: the empty log made in its place is another file.
        let (fresh, log, _rt3) = fresh_log();
        log.record_blocking(event(0)).unwrap();
        drop(log);
        std::fs::rename(fresh.join("audit.jsonl"), fresh.join("archived.jsonl")).unwrap();
        assert!(matches!(
            AuditLog::open(&fresh),
            Err(AuditError::ForeignWal { .. })
        ));
        assert_eq!(std::fs::read(fresh.join("audit.jsonl")).unwrap(), b"");
        std::fs::remove_dir_all(fresh).unwrap();

        // A log reopened (the ring now starts past its beginning), then a crash.
        let log = AuditLog::open(&dir).unwrap();
        log.record_blocking(event(3)).unwrap();
        log.record_blocking(event(4)).unwrap();
        drop(log);
        let orig = files(&dir);
        let text = String::from_utf8(orig.0.clone()).unwrap();
        let refused = |changed: String| {
            std::fs::write(dir.join("audit.jsonl"), &changed).unwrap();
            let before = files(&dir);
            assert!(matches!(
                AuditLog::open(&dir),
                Err(AuditError::ForeignWal { .. })
            ));
            assert_eq!(files(&dir), before);
            // verify names the log's first broken line.
            assert!(matches!(
                super::super::verify::verify_file(&dir.join("audit.jsonl")),
                Err(super::super::verify::VerifyError::ChainBroken { .. })
            ));
        };
        // The line before the ring's offset is another: the ring does not continue it.
        refused(text.replace("test.2", "test.X"));
        // A whole audit line where the ring's first goes, but another one.
        refused(text.replace("test.3", "test.Z"));
        // Moved away: the empty log made in its place is too short for the ring.
        std::fs::write(dir.join("audit.jsonl"), &orig.0).unwrap();
        std::fs::rename(dir.join("audit.jsonl"), dir.join("archived.jsonl")).unwrap();
        assert!(matches!(
            AuditLog::open(&dir),
            Err(AuditError::ForeignWal { .. })
        ));
        assert!(super::super::verify::verify_file(&dir.join("audit.jsonl")).is_err());
        std::fs::rename(dir.join("archived.jsonl"), dir.join("audit.jsonl")).unwrap();
        assert_eq!(files(&dir), orig);

        // After a clean shutdown it may be.
        let log = AuditLog::open(&dir).unwrap();
        rt.block_on(log.flush(std::time::Instant::now() + std::time::Duration::from_secs(5)));
        drop(log);
        std::fs::rename(dir.join("audit.jsonl"), dir.join("archived.jsonl")).unwrap();
        let log = AuditLog::open(&dir).unwrap();
        log.record_blocking(event(0)).unwrap();
        assert_eq!(actions(&dir), ["test.0"]);
        assert_eq!(verified(&dir), 1);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(other).unwrap();
    }

    fn write_only(path: &str) -> File {
        std::fs::OpenOptions::new().write(true).open(path).unwrap()
    }

    /// A failed write (of the ring, or of the log) or sync (of the log) stops the log: that commit and every later one fail, and
    /// the ring is not cleared. Reopened, the log has every line that was acknowledged
    /// (and a line whose ring record was durable although its commit then failed).
    #[test]
    fn a_failed_write_or_sync_stops_the_log_until_it_is_reopened() {
        // The ring cannot be written.
        let (dir, log, _rt) = fresh_log();
        log.record_blocking(event(0)).unwrap();
        let ring = File::open(dir.join("audit.wal")).unwrap();
        lock(&log.inner.state).wal.replace_file(ring);
        let err = log.record_blocking(event(1)).unwrap_err().to_string();
        assert!(err.contains("audit.wal: Bad file descriptor"), "{err}");
        let err = log.record_blocking(event(2)).unwrap_err().to_string();
        assert!(err.contains("takes no more lines"), "{err}");
        drop(log);
        lose_tail(&dir, 0);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir), ["test.0"]);
        assert_eq!(verified(&dir), 1);
        std::fs::remove_dir_all(dir).unwrap();

        // The log's append fails (a full disk) after the ring took the line.
        let (dir, log, _rt) = fresh_log();
        log.record_blocking(event(0)).unwrap();
        lock(&log.inner.state).file = write_only("/dev/full");
        let err = log.record_blocking(event(1)).unwrap_err().to_string();
        assert!(err.contains("No space left on device"), "{err}");
        assert!(log.record_blocking(event(2)).is_err());
        drop(log);
        assert_eq!(actions(&dir), ["test.0"]);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir), ["test.0", "test.1"]);
        assert_eq!(verified(&dir), 2);
        std::fs::remove_dir_all(dir).unwrap();

        // The ring is full and the log's own sync fails: the ring keeps its records.
        let (dir, log, _rt) = fresh_log();
        let big = |i| Event {
            target: Some("t".repeat(4000)),
            ..event(i)
        };
        let mut n = 0;
        while lock(&log.inner.state).wal.fits(4200) {
            log.record_blocking(big(n)).unwrap();
            n += 1;
        }
        lock(&log.inner.state).file = write_only("/dev/full");
        let err = log.record_blocking(big(n)).unwrap_err().to_string();
        assert!(err.contains("fdatasync: Invalid argument"), "{err}");
        assert!(log.record_blocking(event(n + 1)).is_err());
        drop(log);
        lose_tail(&dir, 0);
        drop(AuditLog::open(&dir).unwrap());
        assert_eq!(actions(&dir).len(), n);
        assert_eq!(verified(&dir), n as u64);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
