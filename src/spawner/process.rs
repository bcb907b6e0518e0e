//! The spawner process: single-threaded, one poll loop over the control socket and the
//! pidfds of its sandboxes.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::autogroup::{self, Lowered};
use super::cgroup::RunCgroup;
use super::protocol::{CellInfo, Reply, Request};
use crate::sandbox::{
    self, Cell, HostIds, OutputMode, Running, SandboxError, SandboxSpec, StdinSource, channel,
};

/// A tenant's cell, held between runs.
struct Held {
    cell: std::sync::Arc<Cell>,
    created: Instant,
    last_used: Instant,
    runs: u64,
    idle: Duration,
    /// Its egress proxy's listener has gone to the daemon.
    listener_sent: bool,
}

/// Cells by the work dir of their tenant.
type Cells = HashMap<String, Held>;

/// The tenant's cell: the held one if its holder lives, maps the same ids and has the
/// egress proxy port asked for, else a new one.
fn cell_for(
    cells: &mut Cells,
    work_dir: &str,
    ids: HostIds,
    idle: Duration,
    proxy_port: Option<u16>,
) -> Result<std::sync::Arc<Cell>, SandboxError> {
    let now = Instant::now();
    if let Some(h) = cells.get_mut(work_dir)
        && h.cell.is_alive()
        && h.cell.host_ids() == ids
        && h.cell.proxy_port() == proxy_port
    {
        h.last_used = now;
        h.runs += 1;
        h.idle = idle;
        return Ok(h.cell.clone());
    }
    // A dead or stale cell goes first (dropping it reaps its holder).
    cells.remove(work_dir);
    let host = nix::unistd::geteuid().is_root().then_some(ids);
    let cell = std::sync::Arc::new(Cell::create(host, proxy_port)?);
    cells.insert(
        work_dir.to_string(),
        Held {
            cell: cell.clone(),
            created: now,
            last_used: now,
            runs: 1,
            idle,
            listener_sent: false,
        },
    );
    Ok(cell)
}

/// (RSS, PSS, USS) of `pid` in KiB from `/proc/<pid>/smaps_rollup`; zeros if unreadable.
fn memory_kib(pid: i32) -> (u64, u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return (0, 0, 0);
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (
        field("Rss:"),
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

struct Live {
    running: Running,
    cgroup: Option<RunCgroup>,
    work_dir: String,
    deadline: Instant,
    timed_out: bool,
    killed: bool,
    started: Instant,
    in_cell: bool,
    /// The nice value its autogroup is still to get (0: nothing left to do).
    nice: u8,
}

fn send(sock: &OwnedFd, reply: &Reply) -> Result<(), String> {
    send_with(sock, reply, &[])
}

fn send_with(sock: &OwnedFd, reply: &Reply, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let bytes = serde_json::to_vec(reply).map_err(|e| e.to_string())?;
    loop {
        match channel::send(sock.as_fd(), &bytes, fds) {
            Ok(()) => return Ok(()),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                let _ready = poll(&mut fds, PollTimeout::from(1000u16));
            }
            Err(e) => return Err(format!("send: {e}")),
        }
    }
}

/// Starts a run. The first run started in a cell with an egress proxy also returns the
/// cell, whose listening socket goes to the daemon with the `Started` reply.
fn start(
    req: Request,
    fds: Vec<OwnedFd>,
    live: &mut HashMap<u64, Live>,
    cells: &mut Cells,
) -> (Reply, Option<std::sync::Arc<Cell>>) {
    let work_dir = match &req {
        Request::Run { work_dir, .. } => Some(work_dir.clone()),
        _ => None,
    };
    let reply = start_run(req, fds, live, cells);
    let unsent = match (&reply, work_dir) {
        (Reply::Started { .. }, Some(wd)) => cells
            .get_mut(&wd)
            .filter(|h| !h.listener_sent && h.cell.proxy_port().is_some())
            .map(|h| {
                h.listener_sent = true;
                h.cell.clone()
            }),
        _ => None,
    };
    (reply, unsent)
}

fn start_run(
    req: Request,
    fds: Vec<OwnedFd>,
    live: &mut HashMap<u64, Live>,
    cells: &mut Cells,
) -> Reply {
    let Request::Run {
        id,
        argv,
        env,
        cwd,
        work_dir,
        host_uid,
        host_gid,
        limits,
    } = req
    else {
        return Reply::Failed {
            id: 0,
            message: "not a run request".into(),
            exec_failure: false,
            invalid: true,
        };
    };
    let [stdin, stdout, stderr]: [OwnedFd; 3] = match fds.try_into() {
        Ok(a) => a,
        Err(_) => {
            return Reply::Failed {
                id,
                message: "run request without its three descriptors".into(),
                exec_failure: false,
                invalid: true,
            };
        }
    };
    if live.contains_key(&id) {
        return Reply::Failed {
            id,
            message: "duplicate run id".into(),
            exec_failure: false,
            invalid: true,
        };
    }
    let mut spec = SandboxSpec::new(work_dir.clone(), argv);
    spec.env = env;
    spec.cwd = cwd;
    spec.stdin = StdinSource::Fd(stdin);
    spec.stdout = OutputMode::Fd(stdout);
    spec.stderr = OutputMode::Fd(stderr);
    spec.host_ids = nix::unistd::geteuid().is_root().then_some(HostIds {
        uid: host_uid,
        gid: host_gid,
    });
    spec.limits.nproc = limits.pids;
    spec.limits.address_space_bytes = limits.memory_bytes;
    spec.limits.cpu_seconds = limits.cpu_s;
    spec.limits.nice = limits.nice;
    let failed = |message: String| Reply::Failed {
        id,
        message,
        exec_failure: false,
        invalid: false,
    };
    if let Some(idle_ms) = limits.cell_idle_ms {
        let ids = HostIds {
            uid: host_uid,
            gid: host_gid,
        };
        let ids = if nix::unistd::geteuid().is_root() {
            ids
        } else {
            HostIds {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }
        };
        match cell_for(
            cells,
            &work_dir,
            ids,
            Duration::from_millis(idle_ms),
            limits.egress_proxy_port,
        ) {
            Ok(cell) => spec.cell = Some(cell),
            Err(e) => return failed(format!("cell: {e}")),
        }
    }
    let cgroup = match &limits.cgroup {
        Some(at) => {
            let placed = RunCgroup::create(at, id, limits.memory_bytes, limits.pids)
                .and_then(|cg| cg.enter().map(|()| cg));
            match placed {
                // memory.max limits what the sandbox really uses; an address-space limit
                // would only break runtimes that reserve large ranges.
                Ok(cg) => {
                    spec.limits.address_space_bytes = libc::RLIM_INFINITY;
                    Some(cg)
                }
                Err(m) => {
                    if let Err(e) = RunCgroup::leave(at) {
                        eprintln!("bulkhead spawner: {e}");
                    }
                    return failed(m);
                }
            }
        }
        None => None,
    };
    let in_cell = spec.cell.is_some();
    let spawned = sandbox::spawn(spec);
    if let Some(at) = &limits.cgroup
        && let Err(e) = RunCgroup::leave(at)
    {
        eprintln!("bulkhead spawner: {e}");
    }
    match spawned {
        Ok(running) => {
            let deadline = Instant::now() + Duration::from_millis(limits.timeout_ms);
            live.insert(
                id,
                Live {
                    running,
                    cgroup,
                    work_dir,
                    deadline,
                    timed_out: false,
                    killed: false,
                    started: Instant::now(),
                    in_cell,
                    nice: limits.nice,
                },
            );
            Reply::Started { id }
        }
        Err(e) => Reply::Failed {
            id,
            exec_failure: e.is_exec_failure(),
            invalid: matches!(
                e,
                SandboxError::InvalidSpec(_)
                    | SandboxError::WorkDir { .. }
                    | SandboxError::Setup {
                        step: sandbox::Step::ChdirCwd,
                        ..
                    }
            ),
            message: e.to_string(),
        },
    }
}

/// Runs the spawner on `sock` until the daemon closes it. Returns the process exit code.
pub fn run_spawner(sock: OwnedFd, parent: Option<i32>) -> i32 {
    // Die with the daemon; if it is already gone, stop now.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        eprintln!("bulkhead spawner: prctl(PR_SET_PDEATHSIG): {e}");
        return 1;
    }
    if parent.is_some_and(|p| nix::unistd::getppid().as_raw() != p) {
        return 1;
    }
    // Termination is the daemon's to decide: a SIGTERM sent to the whole process tree must
    // not kill the runs the daemon is still finishing. The spawner dies with the daemon
    // (parent-death signal) or by SIGKILL; sandboxes start with an empty signal mask.
    let mut term = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
        nix::sys::signal::SIGQUIT,
    ] {
        term.add(s);
    }
    if let Err(e) = term.thread_block() {
        eprintln!("bulkhead spawner: sigprocmask: {e}");
        return 1;
    }
    // Its own session: a Ctrl-C meant for a foreground daemon must not reach the spawner
    // (the daemon decides when runs end; the spawner dies with it regardless).
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("bulkhead spawner: setsid: {e}");
    }
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut cells: Cells = HashMap::new();
    let mut buf = vec![0u8; channel::MAX_MESSAGE];
    let mut next_lowering = Instant::now();
    loop {
        let now = Instant::now();
        // Idle cells (no run in them for their idle time) and dead ones go.
        cells.retain(|wd, h| {
            h.cell.is_alive()
                && (live.values().any(|l| &l.work_dir == wd)
                    || now.duration_since(h.last_used) < h.idle)
        });
        let next = live
            .values()
            .filter(|l| !l.timed_out && !l.killed)
            .map(|l| l.deadline)
            .chain(cells.values().map(|h| h.last_used + h.idle))
            .chain(
                live.values()
                    .filter(|l| l.nice > 0)
                    .map(|l| (l.started + autogroup::GRACE).max(next_lowering)),
            )
            .min();
        let timeout = match next {
            Some(d) if d <= now => PollTimeout::ZERO,
            Some(d) => PollTimeout::try_from((d - now).as_millis().min(60_000) as u32 + 1)
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let ids: Vec<u64> = live.keys().copied().collect();
        let mut fds = Vec::with_capacity(ids.len() + 1);
        fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
        for id in &ids {
            if let Some(l) = live.get(id) {
                fds.push(PollFd::new(l.running.pidfd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("bulkhead spawner: poll: {e}");
                return 1;
            }
        }
        let control_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let exited: Vec<u64> = ids
            .iter()
            .zip(&fds[1..])
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(id, _)| *id)
            .collect();
        drop(fds);
        for id in exited {
            let Some(l) = live.get_mut(&id) else { continue };
            match l.running.try_wait() {
                Ok(Some(exit)) => {
                    let Some(l) = live.remove(&id) else { continue };
                    if let Some(h) = cells.get_mut(&l.work_dir) {
                        h.last_used = Instant::now();
                    }
                    let (timed_out, killed, duration_ms) = (
                        l.timed_out,
                        l.killed,
                        l.running.elapsed().as_millis() as u64,
                    );
                    // The cgroup counted every process of the run; rusage is the fallback.
                    let cpu_us = l
                        .cgroup
                        .as_ref()
                        .and_then(RunCgroup::cpu_us)
                        .unwrap_or(exit.cpu_us);
                    // Every process of the run is gone: reply first, then let the kernel
                    // unmount its tree and remove its cgroup.
                    let finished = l;
                    if send(
                        &sock,
                        &Reply::Exited {
                            id,
                            exit_code: exit.code,
                            signal: exit.signal,
                            timed_out,
                            killed,
                            duration_ms,
                            cpu_us,
                        },
                    )
                    .is_err()
                    {
                        return 1;
                    }
                    if let Some(cg) = finished.cgroup {
                        cg.remove();
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("bulkhead spawner: run {id}: {e}"),
            }
        }
        let now = Instant::now();
        if now >= next_lowering {
            let mut due: Vec<&mut Live> = live
                .values_mut()
                .filter(|l| l.nice > 0 && now >= l.started + autogroup::GRACE)
                .collect();
            due.sort_by_key(|l| l.started);
            for l in due {
                let lowered = match autogroup::session_pid(l.running.pid(), l.in_cell) {
                    Some(pid) => autogroup::lower(pid, l.nice),
                    None => Lowered::Done,
                };
                if lowered == Lowered::Later {
                    next_lowering = now + autogroup::SPACING;
                    break;
                }
                l.nice = 0;
            }
        }
        for l in live.values_mut() {
            if !l.timed_out && !l.killed && l.deadline <= now {
                l.timed_out = true;
                if let Err(e) = l.running.kill() {
                    eprintln!("bulkhead spawner: kill at deadline: {e}");
                }
            }
        }
        if control_ready {
            loop {
                match channel::recv(sock.as_fd(), &mut buf, false) {
                    Ok(None) => return 0,
                    Ok(Some((n, fds))) => {
                        let reply = match serde_json::from_slice::<Request>(&buf[..n]) {
                            Ok(Request::Kill { id }) => {
                                if let Some(l) = live.get_mut(&id) {
                                    l.killed = true;
                                    if let Err(e) = l.running.kill() {
                                        eprintln!("bulkhead spawner: kill: {e}");
                                    }
                                }
                                None
                            }
                            Ok(Request::KillAll) => {
                                cells.clear();
                                for l in live.values_mut() {
                                    l.killed = true;
                                    if let Err(e) = l.running.kill() {
                                        eprintln!("bulkhead spawner: kill: {e}");
                                    }
                                }
                                None
                            }
                            Ok(Request::KillTenant { work_dir }) => {
                                cells.remove(&work_dir);
                                for l in live.values_mut().filter(|l| l.work_dir == work_dir) {
                                    l.killed = true;
                                    if let Err(e) = l.running.kill() {
                                        eprintln!("bulkhead spawner: kill: {e}");
                                    }
                                }
                                None
                            }
                            Ok(Request::Cells { id }) => {
                                let now = Instant::now();
                                let list = cells
                                    .iter()
                                    .map(|(wd, h)| (wd, h, memory_kib(h.cell.pid())))
                                    .map(|(wd, h, (rss_kib, pss_kib, uss_kib))| CellInfo {
                                        work_dir: wd.clone(),
                                        holder_pid: h.cell.pid(),
                                        age_ms: now.duration_since(h.created).as_millis() as u64,
                                        idle_ms: now.duration_since(h.last_used).as_millis() as u64,
                                        runs: h.runs,
                                        running: live
                                            .values()
                                            .filter(|l| &l.work_dir == wd)
                                            .count(),
                                        rss_kib,
                                        pss_kib,
                                        uss_kib,
                                    })
                                    .collect();
                                Some(Reply::Cells { id, cells: list })
                            }
                            Ok(req) => {
                                let (reply, cell) = start(req, fds, &mut live, &mut cells);
                                let listener = cell.as_ref().and_then(|c| c.proxy_listener());
                                if send_with(&sock, &reply, listener.as_slice()).is_err() {
                                    return 1;
                                }
                                None
                            }
                            Err(e) => Some(Reply::Failed {
                                id: 0,
                                message: format!("bad request: {e}"),
                                exec_failure: false,
                                invalid: true,
                            }),
                        };
                        if reply.is_some_and(|r| send(&sock, &r).is_err()) {
                            return 1;
                        }
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        eprintln!("bulkhead spawner: recv: {e}");
                        return 1;
                    }
                }
            }
        }
    }
}
