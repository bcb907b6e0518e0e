//! Per-tenant limits: admin defaults (`[limits]` in config.toml) overlaid by per-tenant
//! values set on the admin API (`<tenant>/limits.json`); overlays cannot touch them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit keys. Every key is optional; absent means no limit from this layer.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Slots of the daemon-wide pool the tenant may hold at once (more runs wait in its
    /// queue); unset, the admin's `exec.tenant_slots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Requests per second (token bucket, per tenant and per actor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_s: Option<f64>,
    /// Execs per second (token bucket, per tenant and per actor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_per_s: Option<f64>,
    /// Longest wall time of one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_ms: Option<u64>,
    /// Bytes kept of each output stream of one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// Tool calls per day (counted since the daemon started, until the usage store lands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_day: Option<u64>,
    /// CPU seconds per day, summed over the tenant's runs (checked before each run, and
    /// what is left becomes the run's RLIMIT_CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s_per_day: Option<u64>,
    /// Address space per sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Processes per sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Apparent size of everything in work/ (checked on each write and after each run;
    /// at or over it, writes and execs get `quota_exceeded` until usage drops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Destinations the tenant's sandboxes may reach through the egress proxy
    /// (`host:port`, `*.domain:port`, `address:port`); absent or empty: no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<String>>,
    /// Bytes through the egress proxy per UTC day, both directions; past it, tunnels are
    /// cut and new ones refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_bytes_per_day: Option<u64>,
    /// LLM spend per UTC day, USD (each call reserves its worst case first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget_usd: Option<f64>,
    /// LLM spend per UTC month, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_budget_usd: Option<f64>,
    /// LLM spend per UTC day of each actor (token) of the tenant, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_daily_budget_usd: Option<f64>,
    /// LLM spend per UTC month of each actor (token) of the tenant, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_monthly_budget_usd: Option<f64>,
    /// LLM calls per minute (per tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// LLM tokens per minute (per tenant): each call takes its worst case (request bytes
    /// plus `max_tokens`) up front and gives back what it did not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Public model names the tenant may call; absent: every configured model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<String>>,
}

fn bad(key: &str, why: &str) -> String {
    format!("limit {key}: {why}")
}

impl Limits {
    /// Rejects absurd values (zero, negative, not finite, beyond sane maxima).
    pub fn validate(&self) -> Result<(), String> {
        let rate = |k: &str, v: Option<f64>| match v {
            Some(r) if !r.is_finite() || r <= 0.0 || r > 1_000_000.0 => {
                Err(bad(k, "must be > 0 and at most 1000000"))
            }
            _ => Ok(()),
        };
        rate("requests_per_s", self.requests_per_s)?;
        for (k, v) in [
            ("daily_budget_usd", self.daily_budget_usd),
            ("monthly_budget_usd", self.monthly_budget_usd),
            ("actor_daily_budget_usd", self.actor_daily_budget_usd),
            ("actor_monthly_budget_usd", self.actor_monthly_budget_usd),
        ] {
            if let Some(usd) = v
                && (!usd.is_finite() || !(0.0..=1_000_000_000.0).contains(&usd))
            {
                return Err(bad(k, "must be 0..=1000000000 USD"));
            }
        }
        if let Some(models) = &self.allowed_models
            && (models.len() > 1000 || models.iter().any(|m| m.is_empty() || m.len() > 200))
        {
            return Err(bad("allowed_models", "at most 1000 names of 1..=200 bytes"));
        }
        rate("exec_per_s", self.exec_per_s)?;
        let range = |k: &str, v: Option<u64>, lo: u64, hi: u64| match v {
            Some(x) if x < lo || x > hi => Err(bad(k, &format!("must be in {lo}..={hi}"))),
            _ => Ok(()),
        };
        range(
            "max_concurrent",
            self.max_concurrent.map(u64::from),
            1,
            100_000,
        )?;
        range("max_wall_ms", self.max_wall_ms, 1, 86_400_000)?;
        range("max_output_bytes", self.max_output_bytes, 1, 1 << 30)?;
        range("steps_per_day", self.steps_per_day, 1, 1 << 40)?;
        range("cpu_s_per_day", self.cpu_s_per_day, 1, 1 << 40)?;
        range("memory_bytes", self.memory_bytes, 16 << 20, 1 << 44)?;
        range("pids", self.pids, 1, 65_536)?;
        range("disk_bytes", self.disk_bytes, 1, 1 << 50)?;
        range("rpm", self.rpm, 1, 100_000_000)?;
        range("tpm", self.tpm, 1, 1 << 40)?;
        range(
            "egress_bytes_per_day",
            self.egress_bytes_per_day,
            1,
            1 << 50,
        )?;
        if let Some(patterns) = &self.egress {
            crate::egress::Allowlist::parse(patterns).map_err(|e| bad("egress", &e))?;
        }
        Ok(())
    }

    /// `self` with `over`'s keys on top.
    pub fn overlaid(&self, over: &Limits) -> Limits {
        Limits {
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
            requests_per_s: over.requests_per_s.or(self.requests_per_s),
            exec_per_s: over.exec_per_s.or(self.exec_per_s),
            max_wall_ms: over.max_wall_ms.or(self.max_wall_ms),
            max_output_bytes: over.max_output_bytes.or(self.max_output_bytes),
            steps_per_day: over.steps_per_day.or(self.steps_per_day),
            cpu_s_per_day: over.cpu_s_per_day.or(self.cpu_s_per_day),
            memory_bytes: over.memory_bytes.or(self.memory_bytes),
            pids: over.pids.or(self.pids),
            disk_bytes: over.disk_bytes.or(self.disk_bytes),
            egress: over.egress.clone().or_else(|| self.egress.clone()),
            egress_bytes_per_day: over.egress_bytes_per_day.or(self.egress_bytes_per_day),
            daily_budget_usd: over.daily_budget_usd.or(self.daily_budget_usd),
            monthly_budget_usd: over.monthly_budget_usd.or(self.monthly_budget_usd),
            actor_daily_budget_usd: over.actor_daily_budget_usd.or(self.actor_daily_budget_usd),
            actor_monthly_budget_usd: over
                .actor_monthly_budget_usd
                .or(self.actor_monthly_budget_usd),
            rpm: over.rpm.or(self.rpm),
            tpm: over.tpm.or(self.tpm),
            allowed_models: over
                .allowed_models
                .clone()
                .or_else(|| self.allowed_models.clone()),
        }
    }

    /// Applies a JSON object of changes: known keys only; `null` unsets a key.
    pub fn apply_patch(
        &self,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Limits, String> {
        let mut current = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let obj = current.as_object_mut().ok_or("limits are not an object")?;
        for (k, v) in patch {
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        let next: Limits =
            serde_json::from_value(current).map_err(|e| format!("invalid limits: {e}"))?;
        next.validate()?;
        Ok(next)
    }
}

/// A tenant's counters. They live in memory and are written to `<tenant>/usage.json`
/// within a second of changing and at shutdown, and read back at start, so a restart
/// does not reset a day's quota (a crash loses at most the last second).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Usage {
    /// Requests that passed authentication and scopes.
    pub requests: u64,
    /// Tool calls (exec, file writes and reads, config) in all.
    pub steps: u64,
    /// Tool calls on the current UTC day.
    pub steps_today: u64,
    /// The UTC day `steps_today` counts (days since the epoch).
    pub day: u64,
    /// Sandboxes run.
    pub execs: u64,
    /// Their wall time, in milliseconds.
    pub exec_wall_ms: u64,
    /// Their CPU time, all processes, in milliseconds.
    pub cpu_ms: u64,
    /// CPU time on the current UTC day, in milliseconds.
    pub cpu_ms_today: u64,
    /// Bytes through the egress proxy, both directions.
    pub egress_bytes: u64,
    /// The same on the current UTC day.
    pub egress_bytes_today: u64,
    /// LLM calls answered.
    pub llm_calls: u64,
    /// Their input tokens.
    pub llm_input_tokens: u64,
    /// Their output tokens.
    pub llm_output_tokens: u64,
    /// LLM spend on the current UTC day, micro-USD.
    pub spend_micro_today: u64,
    /// LLM spend in the current UTC month, micro-USD.
    pub spend_micro_month: u64,
    /// The month `spend_micro_month` counts (years × 12 + month - 1).
    pub month: u64,
    /// Requests for a document that exists in another workspace of the tenant, answered
    /// 404 like a missing one.
    pub blocked_cross_boundary: u64,
    /// LLM spend of each actor (token id) that spent this month, micro-USD.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub actors: BTreeMap<String, ActorSpend>,
}

/// One actor's LLM spend, counted over the same day and month as its tenant's.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorSpend {
    /// On the current UTC day, micro-USD.
    pub spend_micro_today: u64,
    /// In the current UTC month, micro-USD.
    pub spend_micro_month: u64,
}

/// The caps one LLM call is reserved against, micro-USD.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budgets {
    /// The tenant's day.
    pub daily: Option<u64>,
    /// The tenant's month.
    pub monthly: Option<u64>,
    /// The calling actor's day.
    pub actor_daily: Option<u64>,
    /// The calling actor's month.
    pub actor_monthly: Option<u64>,
}

impl Usage {
    /// Starts a new day's counters when `day` is not the one counted.
    fn roll(&mut self, day: u64) {
        if self.day != day {
            self.day = day;
            self.steps_today = 0;
            self.cpu_ms_today = 0;
            self.egress_bytes_today = 0;
            self.spend_micro_today = 0;
            for a in self.actors.values_mut() {
                a.spend_micro_today = 0;
            }
        }
        let month = month_of(day);
        if self.month != month {
            self.month = month;
            self.spend_micro_month = 0;
            self.actors.clear();
        }
    }
}

/// The month (years × 12 + month - 1) of a day since the epoch, in the proleptic
/// Gregorian calendar (Howard Hinnant's civil-from-days).
fn month_of(day: u64) -> u64 {
    let z = day + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    y * 12 + m - 1
}

/// Time until the next UTC midnight, when daily counters start again.
fn until_midnight() -> Duration {
    let into_day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() % 86_400)
        .unwrap_or(0);
    Duration::from_secs(86_400 - into_day)
}

/// A token bucket: `rate` tokens per second, bursts up to one second's worth (at least 1).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One tenant's work/ figure. A walk takes a while; writes reserved while one runs may
/// or may not be in what it finds, so they are added to its result (an overestimate
/// until the next walk, never an underestimate).
#[derive(Debug, Default)]
struct Disk {
    /// Bytes, once a walk has finished.
    used: Option<u64>,
    /// Walks in progress.
    walks: u32,
    /// Bytes reserved since the oldest walk in progress began.
    during_walks: u64,
}

/// Rate limiters and usage counters, keyed by tenant and actor.
#[derive(Debug, Default)]
pub struct Meters {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Bytes in each tenant's work/, once measured.
    disk: Mutex<HashMap<String, Disk>>,
    /// Tenants whose usage changed since it was last written.
    dirty: Mutex<std::collections::HashSet<String>>,
    usage: Mutex<HashMap<String, Usage>>,
    /// LLM spend reserved by calls in flight, micro-USD, per tenant and per
    /// `tenant/actor`.
    reserved: Mutex<HashMap<String, u64>>,
}

fn today() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

/// A write or run refused because work/ is at or over `disk_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    /// Bytes in use.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// Bytes the refused write would have added.
    pub adding: u64,
}

/// A refusal with the time after which a retry may succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    /// What was exceeded.
    pub limit: &'static str,
    /// Retry after this long.
    pub retry_after: Duration,
}

impl Meters {
    /// Counts one request, and one step when it is a tool call, refusing the step when it
    /// would exceed `steps_per_day` (check and count under one lock: no race).
    pub fn count(
        &self,
        tenant: &str,
        step: bool,
        steps_per_day: Option<u64>,
    ) -> Result<(), Throttled> {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        if step && steps_per_day.is_some_and(|max| u.steps_today >= max) {
            return Err(Throttled {
                limit: "steps_per_day",
                retry_after: until_midnight(),
            });
        }
        u.requests += 1;
        if step {
            u.steps += 1;
            u.steps_today += 1;
        }
        drop(all);
        self.mark(tenant);
        Ok(())
    }

    fn mark(&self, tenant: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.contains(tenant) {
            dirty.insert(tenant.to_string());
        }
    }

    /// Seeds a tenant's counters (from its stored usage, at start).
    pub fn load(&self, tenant: &str, usage: Usage) {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), usage);
    }

    /// The counters changed since the last call, to be written out.
    pub fn take_dirty(&self) -> Vec<(String, Usage)> {
        let names: Vec<String> = self
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        names
            .into_iter()
            .filter_map(|n| all.get(&n).cloned().map(|u| (n, u)))
            .collect()
    }

    /// Counts a request refused because what it named lies outside its boundary.
    pub fn record_blocked(&self, tenant: &str) {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(tenant.to_string())
            .or_default()
            .blocked_cross_boundary += 1;
        drop(all);
        self.mark(tenant);
    }

    /// Records a finished sandbox run.
    pub fn record_exec(&self, tenant: &str, wall_ms: u64, cpu_us: u64) {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        u.execs += 1;
        u.exec_wall_ms += wall_ms;
        let cpu_ms = cpu_us.div_ceil(1000);
        u.cpu_ms += cpu_ms;
        u.cpu_ms_today += cpu_ms;
        drop(all);
        self.mark(tenant);
    }

    /// Grants up to `want` egress bytes under `per_day` (all of them without a limit) and
    /// counts what it grants, under one lock so parallel tunnels cannot overshoot.
    pub fn take_egress(&self, tenant: &str, want: u64, per_day: Option<u64>) -> u64 {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        let granted = match per_day {
            Some(max) => want.min(max.saturating_sub(u.egress_bytes_today)),
            None => want,
        };
        u.egress_bytes += granted;
        u.egress_bytes_today += granted;
        drop(all);
        if granted > 0 {
            self.mark(tenant);
        }
        granted
    }

    /// Reserves `micro` (a call's worst case) against the tenant's and the actor's daily
    /// and monthly budgets (micro-USD) under one lock with everything already spent or
    /// reserved, so parallel calls cannot pass a cap together; `Err` names the budget
    /// that would be passed, and nothing is reserved then.
    pub fn reserve_spend(
        &self,
        tenant: &str,
        actor: &str,
        micro: u64,
        caps: Budgets,
    ) -> Result<(), &'static str> {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let need = reserved
            .get(tenant)
            .copied()
            .unwrap_or(0)
            .saturating_add(micro);
        if caps
            .daily
            .is_some_and(|cap| u.spend_micro_today.saturating_add(need) > cap)
        {
            return Err("daily_budget_usd");
        }
        if caps
            .monthly
            .is_some_and(|cap| u.spend_micro_month.saturating_add(need) > cap)
        {
            return Err("monthly_budget_usd");
        }
        // Tenant names hold no '/', so this key is the actor's alone.
        let actor_key = format!("{tenant}/{actor}");
        let actor_need = reserved
            .get(&actor_key)
            .copied()
            .unwrap_or(0)
            .saturating_add(micro);
        let spent = u.actors.get(actor).cloned().unwrap_or_default();
        if caps
            .actor_daily
            .is_some_and(|cap| spent.spend_micro_today.saturating_add(actor_need) > cap)
        {
            return Err("actor_daily_budget_usd");
        }
        if caps
            .actor_monthly
            .is_some_and(|cap| spent.spend_micro_month.saturating_add(actor_need) > cap)
        {
            return Err("actor_monthly_budget_usd");
        }
        reserved.insert(tenant.to_string(), need);
        reserved.insert(actor_key, actor_need);
        Ok(())
    }

    /// Replaces a reservation with what the call cost (0 when it failed) and counts it,
    /// for the tenant and the actor.
    pub fn settle_spend(
        &self,
        tenant: &str,
        actor: &str,
        reserved: u64,
        spent: u64,
        tokens: (u64, u64),
    ) {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        {
            let mut held = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            for key in [tenant.to_string(), format!("{tenant}/{actor}")] {
                if let Some(h) = held.get_mut(&key) {
                    *h = h.saturating_sub(reserved);
                    if *h == 0 {
                        held.remove(&key);
                    }
                }
            }
        }
        u.spend_micro_today = u.spend_micro_today.saturating_add(spent);
        u.spend_micro_month = u.spend_micro_month.saturating_add(spent);
        if spent > 0 {
            let a = u.actors.entry(actor.to_string()).or_default();
            a.spend_micro_today = a.spend_micro_today.saturating_add(spent);
            a.spend_micro_month = a.spend_micro_month.saturating_add(spent);
        }
        if spent > 0 || tokens != (0, 0) {
            u.llm_calls += 1;
            u.llm_input_tokens += tokens.0;
            u.llm_output_tokens += tokens.1;
        }
        drop(all);
        self.mark(tenant);
    }

    /// Whether egress bytes are left today under `per_day`.
    pub fn egress_left(&self, tenant: &str, per_day: Option<u64>) -> bool {
        let Some(max) = per_day else {
            return true;
        };
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        u.egress_bytes_today < max
    }

    /// The whole CPU seconds left today under `cpu_s_per_day` (at least 1), or a refusal
    /// when the day's CPU is used up. `None`: no limit.
    pub fn cpu_left(
        &self,
        tenant: &str,
        cpu_s_per_day: Option<u64>,
    ) -> Result<Option<u64>, Throttled> {
        let Some(max) = cpu_s_per_day else {
            return Ok(None);
        };
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.to_string()).or_default();
        u.roll(today());
        let left_ms = max.saturating_mul(1000).saturating_sub(u.cpu_ms_today);
        if left_ms == 0 {
            return Err(Throttled {
                limit: "cpu_s_per_day",
                retry_after: until_midnight(),
            });
        }
        Ok(Some(left_ms.div_ceil(1000)))
    }

    /// The tenant's counters.
    pub fn usage(&self, tenant: &str) -> Usage {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
            .unwrap_or_default()
    }

    /// The last measured size of `tenant`'s work/ with the writes since.
    pub fn disk_used(&self, tenant: &str) -> Option<u64> {
        self.disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .and_then(|d| d.used)
    }

    /// Announces a walk of `tenant`'s work/; `end_walk` must follow.
    pub fn begin_walk(&self, tenant: &str) {
        let mut all = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(tenant.to_string()).or_default().walks += 1;
    }

    /// Ends a walk: its result plus what was reserved meanwhile becomes the figure. A
    /// failed walk (`None`) leaves none, so the next check walks again and fails the same
    /// way until work/ can be measured.
    pub fn end_walk(&self, tenant: &str, measured: Option<u64>) {
        let mut all = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = all.get_mut(tenant) else {
            return;
        };
        d.used = measured.map(|m| m.saturating_add(d.during_walks));
        d.walks = d.walks.saturating_sub(1);
        if d.walks == 0 {
            d.during_walks = 0;
        }
    }

    /// Drops the figure (no `disk_bytes` limit any more: a later one measures afresh).
    pub fn forget_disk(&self, tenant: &str) {
        let mut all = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        if all.get(tenant).is_some_and(|d| d.walks == 0) {
            all.remove(tenant);
        }
    }

    /// Reserves `adding` bytes for a write under `limit` (check and add under one lock,
    /// so parallel writes cannot pass the check together). Unmeasured tenants are not
    /// counted (callers measure first when a limit is set).
    pub fn reserve_disk(
        &self,
        tenant: &str,
        limit: Option<u64>,
        adding: u64,
    ) -> Result<(), OverQuota> {
        let mut all = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = all.get_mut(tenant) else {
            return Ok(());
        };
        if d.walks > 0 {
            d.during_walks = d.during_walks.saturating_add(adding);
        }
        let Some(used) = d.used.as_mut() else {
            return Ok(());
        };
        if let Some(limit) = limit
            && used.saturating_add(adding) > limit
        {
            return Err(OverQuota {
                used: *used,
                limit,
                adding,
            });
        }
        *used = used.saturating_add(adding);
        Ok(())
    }

    /// Takes `freed` bytes off a measured tenant (a replaced or deleted file, or a
    /// reservation given back).
    pub fn release_disk(&self, tenant: &str, freed: u64) {
        if let Some(used) = self
            .disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(tenant)
            .and_then(|d| d.used.as_mut())
        {
            *used = used.saturating_sub(freed);
        }
    }

    /// Replaces a reservation with what a write really changed: `reserved` comes off,
    /// `added` goes on and `freed` (the file it replaced) comes off, under one lock.
    pub fn settle_disk(&self, tenant: &str, reserved: u64, added: u64, freed: u64) {
        if let Some(used) = self
            .disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(tenant)
            .and_then(|d| d.used.as_mut())
        {
            *used = used
                .saturating_sub(reserved)
                .saturating_add(added)
                .saturating_sub(freed);
        }
    }

    /// Forgets a deleted tenant.
    pub fn forget(&self, tenant: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        self.disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }

    /// Takes one token from the bucket `key` at `rate` per second, or says how long to wait.
    pub fn take(&self, key: &str, rate: f64, limit: &'static str) -> Result<(), Throttled> {
        self.take_n(key, rate, rate.max(1.0), 1.0, limit)
    }

    /// `n` from a bucket of `per_minute` that refills over a minute (`rpm`, `tpm`).
    pub fn take_per_minute(
        &self,
        key: &str,
        per_minute: u64,
        n: u64,
        limit: &'static str,
    ) -> Result<(), Throttled> {
        let cap = per_minute as f64;
        self.take_n(key, cap / 60.0, cap, n as f64, limit)
    }

    /// Gives back `n` taken from a per-minute bucket (a call used fewer tokens than it
    /// was charged up front).
    pub fn give_back_per_minute(&self, key: &str, per_minute: u64, n: u64) {
        if let Some(b) = self
            .buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)
        {
            b.tokens = (b.tokens + n as f64).min(per_minute as f64);
        }
    }

    fn take_n(
        &self,
        key: &str,
        rate: f64,
        burst: f64,
        n: f64,
        limit: &'static str,
    ) -> Result<(), Throttled> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= n {
            b.tokens -= n;
            Ok(())
        } else {
            // More than the bucket holds can never pass: say so with the longest wait.
            let wait = if n > burst {
                60.0
            } else {
                (n - b.tokens) / rate
            };
            Err(Throttled {
                limit,
                retry_after: Duration::from_secs_f64(wait.max(0.001)),
            })
        }
    }
}

#[cfg(test)]
mod month_tests {
    use super::month_of;

    #[test]
    fn months() {
        // 1970-01-01, 2024-02-29, 2024-03-01, 2026-12-06.
        assert_eq!(month_of(0), 1970 * 12);
        assert_eq!(month_of(19_782), 2024 * 12 + 1);
        assert_eq!(month_of(19_783), 2024 * 12 + 2);
        assert_eq!(month_of(20_793), 2026 * 12 + 11);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_patches() {
        assert!(
            Limits {
                pids: Some(0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Limits {
                requests_per_s: Some(f64::NAN),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Limits {
                requests_per_s: Some(-1.0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        let base = Limits {
            pids: Some(10),
            ..Default::default()
        };
        let patch: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"pids": null, "max_concurrent": 2}"#).unwrap();
        let next = base.apply_patch(&patch).unwrap();
        assert_eq!((next.pids, next.max_concurrent), (None, Some(2)));
        for bad in [
            r#"{"bogus": 1}"#,
            r#"{"pids": -1}"#,
            r#"{"pids": 1e30}"#,
            r#"{"max_concurrent": "many"}"#,
            r#"{"memory_bytes": 5}"#,
        ] {
            let patch: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(bad).unwrap();
            assert!(base.apply_patch(&patch).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_refill_at_their_rate() {
        let m = Meters::default();
        assert!(m.take("k", 2.0, "x").is_ok());
        assert!(m.take("k", 2.0, "x").is_ok());
        let e = m.take("k", 2.0, "x").unwrap_err();
        assert!(e.retry_after <= Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(520));
        assert!(m.take("k", 2.0, "x").is_ok());
    }
}
