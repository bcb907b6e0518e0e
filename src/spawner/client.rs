//! The daemon's side of the spawner channel (async).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::protocol::{Reply, Request, RunLimits};
use crate::sandbox::channel;

/// Why a run could not be started or finished.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpawnerError {
    /// The spawner died (or could not be reached); a new one is being started.
    #[error("the sandbox spawner died; the run was lost (a new spawner is starting)")]
    Died,
    /// The spawner could not be started.
    #[error("cannot start the sandbox spawner: {0}")]
    Start(String),
    /// The sandbox could not be built or the command not executed.
    #[error("{message}")]
    Failed {
        /// e.g. "execve (foo): ENOENT".
        message: String,
        /// Command not found / not executable.
        exec_failure: bool,
        /// The request was invalid.
        invalid: bool,
    },
    /// Sending to the spawner failed.
    #[error("spawner channel: {0}")]
    Channel(String),
}

/// tokio reports "not ready" as a bare WouldBlock without an OS code.
fn to_errno(e: std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code),
        None if e.kind() == std::io::ErrorKind::WouldBlock => Errno::EAGAIN,
        None => Errno::EIO,
    }
}

/// A reply and the descriptors that came with it.
type Delivered = (Reply, Vec<OwnedFd>);
type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Delivered>>>>;

/// The channel socket. tokio has no `SOCK_SEQPACKET` type; a `UnixStream` over the same
/// descriptor serves as the readiness handle, and every send/receive is our own
/// `sendmsg`/`recvmsg` through `try_io`.
struct Conn {
    sock: UnixStream,
    pending: Pending,
}

struct Inner {
    exe: PathBuf,
    conn: Mutex<Option<Arc<Conn>>>,
    /// Shared by all shards, so a run id names one run daemon-wide.
    next_id: Arc<AtomicU64>,
    restarts: AtomicU64,
}

/// One spawner process and its channel; cheap to clone.
#[derive(Clone)]
struct Shard {
    inner: Arc<Inner>,
}

/// Handle on the spawners; cheap to clone. A spawner is single-threaded and busy for
/// the whole setup of each run it starts, so the daemon runs several and gives each
/// tenant one of them, for good: a tenant's cell lives in its spawner, and its runs,
/// kills and cells are always asked of that one.
#[derive(Clone)]
pub struct SpawnerClient {
    shards: Arc<[Shard]>,
    /// Tenant work dir -> shard, assigned on first use to the shard with fewest tenants.
    assigned: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

impl std::fmt::Debug for SpawnerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SpawnerClient(spawners={}, restarts={})",
            self.shards.len(),
            self.restarts()
        )
    }
}

impl SpawnerClient {
    /// Wraps spawners started by [`start_process`]; must be called inside a tokio runtime.
    pub fn new(
        exe: PathBuf,
        spawners: Vec<(OwnedFd, std::process::Child)>,
    ) -> Result<SpawnerClient, SpawnerError> {
        if spawners.is_empty() {
            return Err(SpawnerError::Start("no spawner".into()));
        }
        let next_id = Arc::new(AtomicU64::new(1));
        let shards = spawners
            .into_iter()
            .map(|(sock, child)| Shard::new(exe.clone(), sock, child, next_id.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SpawnerClient {
            shards: shards.into(),
            assigned: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// How many spawners serve runs.
    pub fn spawners(&self) -> usize {
        self.shards.len()
    }

    /// How many times spawners have been restarted, in all.
    pub fn restarts(&self) -> u64 {
        self.shards.iter().map(Shard::restarts).sum()
    }

    fn shard_for(&self, work_dir: &Path) -> &Shard {
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        let i = match assigned.get(work_dir) {
            Some(i) => *i,
            None => {
                let mut count = vec![0usize; self.shards.len()];
                for i in assigned.values() {
                    if let Some(c) = count.get_mut(*i) {
                        *c += 1;
                    }
                }
                let least = (0..count.len()).min_by_key(|i| count[*i]).unwrap_or(0);
                assigned.insert(work_dir.to_path_buf(), least);
                least
            }
        };
        &self.shards[i % self.shards.len()]
    }

    /// Kills every run of every tenant.
    pub async fn kill_all(&self) {
        for shard in self.shards.iter() {
            shard.kill_all().await;
        }
    }

    /// Kills every run of the tenant whose work dir is `work_dir`, and its cell.
    pub async fn kill_tenant(&self, work_dir: &Path) {
        self.shard_for(work_dir).kill_tenant(work_dir).await;
    }

    /// Starts a run in the tenant's spawner. Returns once the command has been executed;
    /// the handle then yields its exit. The three descriptors are the sandbox's stdin,
    /// stdout and stderr.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        work_dir: &Path,
        host: (u32, u32),
        limits: RunLimits,
        stdio: [OwnedFd; 3],
    ) -> Result<RunHandle, SpawnerError> {
        self.shard_for(work_dir)
            .run(argv, env, cwd, work_dir, host, limits, stdio)
            .await
    }

    /// The cells all spawners hold (those that cannot be asked contribute none).
    pub async fn cells(&self) -> Vec<super::protocol::CellInfo> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(shard.cells().await);
        }
        all
    }
}

/// Starts `exe __spawner` with its end of a fresh channel. Called before tokio starts,
/// and on restarts (serialized by the caller); the child end is inheritable only for the
/// duration of this call.
pub fn start_process(exe: &Path) -> Result<(OwnedFd, std::process::Child), SpawnerError> {
    let (ours, theirs) =
        channel::seqpacket_pair().map_err(|e| SpawnerError::Start(format!("socketpair: {e}")))?;
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| SpawnerError::Start(format!("fcntl: {e}")))?;
    let child = std::process::Command::new(exe)
        .arg("__spawner")
        .arg("--fd")
        .arg(theirs.as_raw_fd().to_string())
        .arg("--parent")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| SpawnerError::Start(format!("{}: {e}", exe.display())))?;
    drop(theirs);
    Ok((ours, child))
}

impl Shard {
    fn new(
        exe: PathBuf,
        sock: OwnedFd,
        child: std::process::Child,
        next_id: Arc<AtomicU64>,
    ) -> Result<Shard, SpawnerError> {
        let inner = Arc::new(Inner {
            exe,
            conn: Mutex::new(None),
            next_id,
            restarts: AtomicU64::new(0),
        });
        let client = Shard { inner };
        client.attach(sock, child)?;
        Ok(client)
    }

    fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    fn attach(&self, sock: OwnedFd, child: std::process::Child) -> Result<(), SpawnerError> {
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| SpawnerError::Start(e.to_string()))?;
        let sock = UnixStream::from_std(std::os::unix::net::UnixStream::from(sock))
            .map_err(|e| SpawnerError::Start(e.to_string()))?;
        let conn = Arc::new(Conn {
            sock,
            pending: Arc::new(Mutex::new(HashMap::new())),
        });
        *self.inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        let me = self.clone();
        tokio::spawn(async move {
            me.read_loop(conn.clone()).await;
            // The spawner is gone: fail everything in flight (dropping the senders), reap
            // it, and start a new one.
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            let mut child = child;
            let status = tokio::task::spawn_blocking(move || child.wait()).await;
            tracing::error!(?status, "sandbox spawner exited; starting a new one");
            me.restart();
        });
        Ok(())
    }

    fn restart(&self) {
        let mut attempt = 0u32;
        loop {
            match start_process(&self.inner.exe).and_then(|(sock, child)| self.attach(sock, child))
            {
                Ok(()) => {
                    self.inner.restarts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "restarting the sandbox spawner failed");
                    if attempt >= 5 {
                        *self.inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)));
                }
            }
        }
    }

    async fn read_loop(&self, conn: Arc<Conn>) {
        let mut buf = vec![0u8; channel::MAX_MESSAGE];
        loop {
            if conn.sock.readable().await.is_err() {
                return;
            }
            let got = conn.sock.try_io(Interest::READABLE, || {
                channel::recv(conn.sock.as_fd(), &mut buf, false).map_err(std::io::Error::from)
            });
            match got.map_err(to_errno) {
                Ok(None) => return,
                Ok(Some((n, fds))) => match serde_json::from_slice::<Reply>(&buf[..n]) {
                    Ok(reply) => {
                        let id = reply.id();
                        let done = matches!(
                            reply,
                            Reply::Exited { .. } | Reply::Failed { .. } | Reply::Cells { .. }
                        );
                        let mut pending = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(tx) = pending.get(&id) {
                            let _delivered = tx.send((reply, fds));
                        }
                        if done {
                            pending.remove(&id);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "unreadable message from the spawner"),
                },
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "spawner channel failed");
                    return;
                }
            }
        }
    }

    fn conn(&self) -> Result<Arc<Conn>, SpawnerError> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(SpawnerError::Died)
    }

    async fn send(
        &self,
        conn: &Conn,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), SpawnerError> {
        let bytes = serde_json::to_vec(req).map_err(|e| SpawnerError::Channel(e.to_string()))?;
        loop {
            conn.sock.writable().await.map_err(|_| SpawnerError::Died)?;
            let sent = conn.sock.try_io(Interest::WRITABLE, || {
                channel::send(conn.sock.as_fd(), &bytes, fds).map_err(std::io::Error::from)
            });
            match sent.map_err(to_errno) {
                Ok(()) => return Ok(()),
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(SpawnerError::Died),
                Err(e) => return Err(SpawnerError::Channel(e.to_string())),
            }
        }
    }

    async fn kill_all(&self) {
        let Ok(conn) = self.conn() else { return };
        if let Err(e) = self.send(&conn, &Request::KillAll, &[]).await {
            tracing::warn!(error = %e, "kill-all request not delivered");
        }
    }

    async fn kill_tenant(&self, work_dir: &Path) {
        let Ok(conn) = self.conn() else { return };
        if let Err(e) = self
            .send(
                &conn,
                &Request::KillTenant {
                    work_dir: work_dir.display().to_string(),
                },
                &[],
            )
            .await
        {
            tracing::warn!(error = %e, "kill-tenant request not delivered");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        work_dir: &Path,
        host: (u32, u32),
        limits: RunLimits,
        stdio: [OwnedFd; 3],
    ) -> Result<RunHandle, SpawnerError> {
        let conn = self.conn()?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let req = Request::Run {
            id,
            argv,
            env,
            cwd,
            work_dir: work_dir.display().to_string(),
            host_uid: host.0,
            host_gid: host.1,
            limits,
        };
        if serde_json::to_vec(&req)
            .map(|b| b.len() > channel::MAX_MESSAGE)
            .unwrap_or(true)
        {
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(SpawnerError::Failed {
                message: "argv and env are too large once encoded".into(),
                exec_failure: false,
                invalid: true,
            });
        }
        let fds = [stdio[0].as_fd(), stdio[1].as_fd(), stdio[2].as_fd()];
        if let Err(e) = self.send(&conn, &req, &fds).await {
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(e);
        }
        drop(stdio);
        match rx.recv().await {
            Some((Reply::Started { .. }, fds)) => Ok(RunHandle {
                id,
                rx,
                client: self.clone(),
                conn,
                proxy_listener: fds.into_iter().next(),
            }),
            Some((
                Reply::Failed {
                    message,
                    exec_failure,
                    invalid,
                    ..
                },
                _,
            )) => Err(SpawnerError::Failed {
                message,
                exec_failure,
                invalid,
            }),
            Some((Reply::Exited { .. } | Reply::Cells { .. }, _)) | None => Err(SpawnerError::Died),
        }
    }

    /// The cells this spawner holds (empty if it cannot be asked).
    async fn cells(&self) -> Vec<super::protocol::CellInfo> {
        let Ok(conn) = self.conn() else {
            return Vec::new();
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let answer = match self.send(&conn, &Request::Cells { id }, &[]).await {
            Ok(()) => match rx.recv().await {
                Some((Reply::Cells { cells, .. }, _)) => cells,
                _ => Vec::new(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cells request not delivered");
                Vec::new()
            }
        };
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        answer
    }
}

/// A run in progress.
pub struct RunHandle {
    id: u64,
    rx: mpsc::UnboundedReceiver<Delivered>,
    client: Shard,
    conn: Arc<Conn>,
    proxy_listener: Option<OwnedFd>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExit {
    /// Exit status.
    pub exit_code: Option<i32>,
    /// Signal.
    pub signal: Option<i32>,
    /// Killed at its deadline.
    pub timed_out: bool,
    /// Killed on request.
    pub killed: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// CPU time of all the sandbox's processes, in microseconds.
    pub cpu_us: u64,
}

impl RunHandle {
    /// The run's id (for [`RunHandle::killer`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Something that can kill this run from elsewhere.
    pub fn killer(&self) -> Killer {
        Killer {
            id: self.id,
            client: self.client.clone(),
            conn: self.conn.clone(),
        }
    }

    /// The listening socket of the egress proxy in the tenant's cell, when this run is the
    /// first in a new cell that has one: the daemon serves it from then on.
    pub fn take_proxy_listener(&mut self) -> Option<OwnedFd> {
        self.proxy_listener.take()
    }

    /// Waits for the run to end.
    pub async fn wait(mut self) -> Result<RunExit, SpawnerError> {
        loop {
            match self.rx.recv().await.map(|(r, _)| r) {
                Some(Reply::Exited {
                    exit_code,
                    signal,
                    timed_out,
                    killed,
                    duration_ms,
                    cpu_us,
                    ..
                }) => {
                    return Ok(RunExit {
                        exit_code,
                        signal,
                        timed_out,
                        killed,
                        duration_ms,
                        cpu_us,
                    });
                }
                Some(_) => continue,
                None => return Err(SpawnerError::Died),
            }
        }
    }
}

/// Kills one run.
#[derive(Clone)]
pub struct Killer {
    id: u64,
    client: Shard,
    conn: Arc<Conn>,
}

impl Killer {
    /// Asks the spawner to kill the run now (a run already gone is not an error).
    pub async fn kill(&self) {
        if let Err(e) = self
            .client
            .send(&self.conn, &Request::Kill { id: self.id }, &[])
            .await
        {
            tracing::warn!(error = %e, id = self.id, "kill request not delivered");
        }
    }
}
