//! Fair sharing of the daemon's sandbox slots between tenants.
//!
//! There are `slots` sandboxes running at once, daemon-wide. A run that cannot start at
//! once waits in its tenant's FIFO queue; when a slot frees, it goes to the waiting tenant
//! holding the fewest slots (round robin among equals), skipping a tenant that already
//! holds its own `max_concurrent`. So a tenant with a thousand queued runs delays another
//! tenant's next run by at most one slot's turn (the next slot to free is the other
//! tenant's), and it can never hold more than its cap. A queue longer than its cap
//! refuses the run (`429 rate_limited`) instead of growing.
//!
//! All state sits behind one mutex, held only for queue bookkeeping (no I/O, no await);
//! a slot is handed to a waiter under that lock, so no check-then-act window exists.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::limits::Throttled;

#[derive(Debug, Default)]
struct TenantQueue {
    /// Slots this tenant holds.
    running: u32,
    /// Most slots it may hold (its `max_concurrent`, else the pool's default share; never
    /// more than the pool).
    cap: u32,
    /// Waiters in arrival order: (ticket, where to send the grant).
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

#[derive(Debug)]
struct State {
    slots: u32,
    free: u32,
    next_ticket: u64,
    tenants: HashMap<String, TenantQueue>,
    /// Tenants with waiters, in the order they are served next.
    turn: VecDeque<String>,
}

/// The daemon-wide slot pool with per-tenant queues.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
    queue_cap: usize,
    default_share: u32,
}

/// A tenant's place in the schedule, for `GET /admin/status` and usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantLoad {
    /// Slots held.
    pub running: u32,
    /// Runs waiting for a slot.
    pub queued: usize,
}

/// The whole pool, for `GET /admin/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolLoad {
    /// Slots daemon-wide.
    pub slots: u32,
    /// Slots in use.
    pub in_use: u32,
    /// Runs waiting, all tenants.
    pub queued: usize,
    /// Most runs one tenant may queue.
    pub queue_per_tenant: usize,
}

/// A held slot; it is handed on (fairly) when this drops.
#[derive(Debug)]
pub struct SlotPermit {
    sched: Arc<Scheduler>,
    tenant: String,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.sched.release(&self.tenant);
    }
}

/// A run waiting in its tenant's queue. Dropping it (the client went away) leaves the
/// queue, or gives back the slot if one was granted in the meantime.
#[derive(Debug)]
pub struct Waiting {
    sched: Arc<Scheduler>,
    tenant: String,
    ticket: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Waiting {
    /// Waits for the slot.
    pub async fn granted(mut self) -> SlotPermit {
        // The sender lives in the queue until it grants, so an error here cannot come
        // from the scheduler dropping us; treat it as a grant to keep slots balanced.
        let _granted = (&mut self.rx).await;
        self.done = true;
        SlotPermit {
            sched: self.sched.clone(),
            tenant: std::mem::take(&mut self.tenant),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let left_queue = {
            let mut st = self.sched.lock();
            let tq = st.tenants.get_mut(&self.tenant);
            match tq.and_then(|q| q.waiting.iter().position(|(t, _)| *t == self.ticket)) {
                Some(at) => {
                    if let Some(q) = st.tenants.get_mut(&self.tenant) {
                        q.waiting.remove(at);
                    }
                    true
                }
                None => false,
            }
        };
        // Not in the queue any more: the grant was sent under the lock before we looked,
        // so the slot is ours to give back.
        if !left_queue {
            self.sched.release(&self.tenant);
        }
    }
}

/// The outcome of asking for a slot.
#[derive(Debug)]
pub enum Admission {
    /// A slot was free.
    Now(SlotPermit),
    /// Queued; await [`Waiting::granted`].
    Queued(Waiting),
}

impl Scheduler {
    /// A pool of `slots` (at least 1) with per-tenant queues of at most `queue_cap`; a
    /// tenant without its own `max_concurrent` holds at most `default_share` slots.
    pub fn new(slots: u32, queue_cap: usize, default_share: u32) -> Arc<Scheduler> {
        let slots = slots.max(1);
        Arc::new(Scheduler {
            state: Mutex::new(State {
                slots,
                free: slots,
                next_ticket: 0,
                tenants: HashMap::new(),
                turn: VecDeque::new(),
            }),
            queue_cap,
            default_share: default_share.clamp(1, slots),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a slot for `tenant`, which may hold at most `max_concurrent` (`None`: the
    /// default share).
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        max_concurrent: Option<u32>,
    ) -> Result<Admission, Throttled> {
        let mut st = self.lock();
        let cap = max_concurrent
            .unwrap_or(self.default_share)
            .clamp(1, st.slots);
        let free = st.free;
        let q = st.tenants.entry(tenant.to_string()).or_default();
        q.cap = cap;
        if free > 0 && q.running < cap && q.waiting.is_empty() {
            q.running += 1;
            st.free -= 1;
            return Ok(Admission::Now(SlotPermit {
                sched: self.clone(),
                tenant: tenant.to_string(),
            }));
        }
        if q.waiting.len() >= self.queue_cap {
            return Err(Throttled {
                limit: "exec_queue",
                retry_after: Duration::from_secs(1),
            });
        }
        let (tx, rx) = oneshot::channel();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let had_waiters = match st.tenants.get_mut(tenant) {
            Some(q) => {
                let had = !q.waiting.is_empty();
                q.waiting.push_back((ticket, tx));
                had
            }
            None => true,
        };
        if !had_waiters && !st.turn.iter().any(|t| t == tenant) {
            st.turn.push_back(tenant.to_string());
        }
        // A raised `max_concurrent` may let waiting runs (this one among them) start now.
        Self::hand_out(&mut st);
        Ok(Admission::Queued(Waiting {
            sched: self.clone(),
            tenant: tenant.to_string(),
            ticket,
            rx,
            done: false,
        }))
    }

    /// Gives `tenant`'s slot back and hands free slots to waiters, one tenant at a time.
    fn release(&self, tenant: &str) {
        let mut st = self.lock();
        if let Some(q) = st.tenants.get_mut(tenant) {
            q.running = q.running.saturating_sub(1);
        }
        st.free = (st.free + 1).min(st.slots);
        Self::hand_out(&mut st);
        if st
            .tenants
            .get(tenant)
            .is_some_and(|q| q.running == 0 && q.waiting.is_empty())
        {
            st.tenants.remove(tenant);
        }
    }

    /// Hands free slots out one at a time: to the waiting tenant holding the fewest slots
    /// (below its cap), the earliest in turn order among equals; a tenant served goes to
    /// the back of the turn. So a newcomer is served before a tenant that already runs.
    fn hand_out(st: &mut State) {
        st.turn
            .retain(|t| st.tenants.get(t).is_some_and(|q| !q.waiting.is_empty()));
        while st.free > 0 {
            let mut best: Option<(usize, u32)> = None;
            for (i, name) in st.turn.iter().enumerate() {
                if let Some(q) = st.tenants.get(name)
                    && q.running < q.cap
                    && !q.waiting.is_empty()
                    && best.is_none_or(|(_, r)| q.running < r)
                {
                    best = Some((i, q.running));
                }
            }
            let Some((at, _)) = best else {
                break;
            };
            let Some(name) = st.turn.remove(at) else {
                break;
            };
            let Some(q) = st.tenants.get_mut(&name) else {
                continue;
            };
            // Each waiter leaves the queue itself when dropped, under this lock, so a
            // send only fails if that invariant broke; then the next waiter is tried.
            while let Some((_, tx)) = q.waiting.pop_front() {
                if tx.send(()).is_ok() {
                    q.running += 1;
                    st.free -= 1;
                    break;
                }
            }
            if !q.waiting.is_empty() {
                st.turn.push_back(name);
            }
        }
    }

    /// One tenant's load.
    pub fn tenant_load(&self, tenant: &str) -> TenantLoad {
        self.lock()
            .tenants
            .get(tenant)
            .map(|q| TenantLoad {
                running: q.running,
                queued: q.waiting.len(),
            })
            .unwrap_or_default()
    }

    /// The pool's load.
    pub fn load(&self) -> PoolLoad {
        let st = self.lock();
        PoolLoad {
            slots: st.slots,
            in_use: st.slots - st.free,
            queued: st.tenants.values().map(|q| q.waiting.len()).sum(),
            queue_per_tenant: self.queue_cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(a: Admission) -> SlotPermit {
        match a {
            Admission::Now(p) => p,
            Admission::Queued(_) => panic!("queued"),
        }
    }

    fn queued(a: Admission) -> Waiting {
        match a {
            Admission::Queued(w) => w,
            Admission::Now(_) => panic!("ran at once"),
        }
    }

    fn ready(w: &mut Waiting) -> bool {
        !matches!(w.rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    #[test]
    fn a_flooding_tenant_waits_its_turn() {
        let s = Scheduler::new(2, 1000, 1);
        let a1 = now(s.admit("a", Some(2)).unwrap());
        let a2 = now(s.admit("a", Some(2)).unwrap());
        let mut a_waits: Vec<Waiting> = (0..500)
            .map(|_| queued(s.admit("a", Some(2)).unwrap()))
            .collect();
        let mut b = queued(s.admit("b", Some(2)).unwrap());
        drop(a1);
        // One of A's runs ended: the slot goes to B, not to A's 500 waiters.
        assert!(ready(&mut b));
        assert!(!a_waits.iter_mut().any(ready));
        drop(a2);
        assert!(ready(&mut a_waits[0]));
        assert!(!a_waits[1..].iter_mut().any(ready));
        assert_eq!(s.load().in_use, 2);
    }

    #[test]
    fn max_concurrent_and_queue_cap_hold() {
        let s = Scheduler::new(8, 3, 4);
        let a1 = now(s.admit("a", Some(1)).unwrap());
        let w: Vec<Waiting> = (0..3)
            .map(|_| queued(s.admit("a", Some(1)).unwrap()))
            .collect();
        let e = s.admit("a", Some(1)).unwrap_err();
        assert_eq!(e.limit, "exec_queue");
        // Other tenants are untouched by A's cap and full queue.
        let b = now(s.admit("b", Some(1)).unwrap());
        assert_eq!(
            s.tenant_load("a"),
            TenantLoad {
                running: 1,
                queued: 3
            }
        );
        drop((a1, b, w));
        assert_eq!(s.load().in_use, 0);
        assert_eq!(s.load().queued, 0);
    }

    #[test]
    fn a_dropped_waiter_gives_back_a_granted_slot() {
        let s = Scheduler::new(1, 10, 1);
        let p = now(s.admit("a", None).unwrap());
        let mut w = queued(s.admit("b", None).unwrap());
        // Without max_concurrent a tenant holds at most the default share (here 1).
        assert!(matches!(s.admit("a", None), Ok(Admission::Queued(_))));
        drop(p);
        assert!(ready(&mut w));
        // Granted but never taken (client gone): the slot must come back.
        drop(w);
        assert_eq!(s.load().in_use, 0);
        drop(now(s.admit("c", None).unwrap()));
        assert_eq!(s.load().queued, 0);
    }

    #[test]
    fn many_threads_never_exceed_slots_or_caps() {
        let s = Scheduler::new(4, 10_000, 2);
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let live = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..400)
                .map(|i| {
                    let (s, peak, live) = (s.clone(), peak.clone(), live.clone());
                    tokio::spawn(async move {
                        let tenant = if i % 2 == 0 { "a" } else { "b" };
                        let permit = match s.admit(tenant, Some(3)).unwrap() {
                            Admission::Now(p) => p,
                            Admission::Queued(w) => w.granted().await,
                        };
                        let n = live.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        drop(permit);
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 4);
        assert_eq!(s.load().in_use, 0);
    }
}
