//! The router (DESIGN section 6): which targets (storage tiers, adapters) an operation goes to, in
//! which order, and what happens when one fails. In-process only.
//!
//! Targets are ordered by priority (lower first, then the order they were added). A failing
//! target is skipped for a backoff period that doubles with each consecutive failure (capped);
//! when the period ends it is tried again, and one success makes it healthy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::error::{CoreError, Result};

/// How a store treats a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// Written before the store returns (the memory tier).
    WriteThrough,
    /// Written in the background after the store returns (disk, remote).
    WriteBehind,
    /// Never written by stores (a tier filled by others, or an adapter that only serves).
    ReadOnly,
}

impl WritePolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::WriteThrough => "write_through",
            Self::WriteBehind => "write_behind",
            Self::ReadOnly => "read_only",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::WriteThrough, Self::WriteBehind, Self::ReadOnly].into_iter().find(|p| p.name() == s)
    }
}

/// Where "now" comes from: the monotonic clock, or one that tests advance by hand (so backoff is
/// tested without sleeping or timing anything).
#[derive(Debug)]
pub enum Clock {
    Monotonic(Instant),
    Manual(AtomicU64),
}

impl Clock {
    pub fn monotonic() -> Self {
        Self::Monotonic(Instant::now())
    }

    pub fn manual() -> Self {
        Self::Manual(AtomicU64::new(0))
    }

    fn now(&self) -> Duration {
        match self {
            Self::Monotonic(start) => start.elapsed(),
            Self::Manual(ns) => Duration::from_nanos(ns.load(Ordering::Relaxed)),
        }
    }

    /// Moves a manual clock forward; an error on the monotonic one.
    pub fn advance(&self, by: Duration) -> Result<()> {
        match self {
            Self::Manual(ns) => {
                ns.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
                Ok(())
            }
            Self::Monotonic(_) => Err(CoreError::invalid("only a manual clock can be advanced")),
        }
    }
}

#[derive(Clone, Debug)]
struct Target {
    name: String,
    kind: String,
    priority: i64,
    policy: WritePolicy,
    seq: u64,
    consecutive_failures: u32,
    total_failures: u64,
    retry_at: Option<Duration>,
}

/// A target as the router sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetStatus {
    pub name: String,
    pub kind: String,
    pub priority: i64,
    pub policy: WritePolicy,
    /// False while it is backing off after a failure.
    pub available: bool,
    pub consecutive_failures: u32,
    pub total_failures: u64,
    /// Seconds until it is tried again (0 when available).
    pub retry_in: f64,
}

pub struct Router {
    targets: RwLock<HashMap<String, Target>>,
    seq: AtomicU64,
    clock: Clock,
    base_backoff: Duration,
    max_backoff: Duration,
}

impl Router {
    /// `base_backoff` after the first failure, doubling per consecutive failure up to `max_backoff`.
    pub fn new(clock: Clock, base_backoff: Duration, max_backoff: Duration) -> Self {
        Self { targets: RwLock::new(HashMap::new()), seq: AtomicU64::new(0), clock, base_backoff, max_backoff }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn add(&self, name: &str, kind: &str, priority: i64, policy: WritePolicy) -> Result<()> {
        let mut targets = self.targets.write();
        if targets.contains_key(name) {
            return Err(CoreError::config(format!(
                "a target named {name:?} is already registered; names must be unique (remove it first)"
            )));
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        targets.insert(
            name.to_owned(),
            Target {
                name: name.to_owned(),
                kind: kind.to_owned(),
                priority,
                policy,
                seq,
                consecutive_failures: 0,
                total_failures: 0,
                retry_at: None,
            },
        );
        Ok(())
    }

    /// Removes a target; false if there was none by that name.
    pub fn remove(&self, name: &str) -> bool {
        self.targets.write().remove(name).is_some()
    }

    fn available(&self, t: &Target, now: Duration) -> bool {
        t.retry_at.is_none_or(|at| now >= at)
    }

    /// Targets of `kind` (all kinds when `None`) to consult, in order, skipping those backing off.
    pub fn order(&self, kind: Option<&str>) -> Vec<String> {
        let now = self.clock.now();
        let targets = self.targets.read();
        let mut list: Vec<&Target> =
            targets.values().filter(|t| kind.is_none_or(|k| t.kind == k) && self.available(t, now)).collect();
        list.sort_by_key(|t| (t.priority, t.seq));
        list.into_iter().map(|t| t.name.clone()).collect()
    }

    /// Targets a store writes to, in order, with their policy (read-only ones left out).
    pub fn write_plan(&self, kind: Option<&str>) -> Vec<(String, WritePolicy)> {
        let targets = self.targets.read();
        self.order(kind)
            .into_iter()
            .filter_map(|n| targets.get(&n).filter(|t| t.policy != WritePolicy::ReadOnly).map(|t| (n, t.policy)))
            .collect()
    }

    /// The target for `selector`: that name if registered, else the first available of that kind.
    pub fn route(&self, selector: &str) -> Result<String> {
        let now = self.clock.now();
        let targets = self.targets.read();
        if let Some(t) = targets.get(selector) {
            return if self.available(t, now) {
                Ok(t.name.clone())
            } else {
                Err(CoreError::Cache(format!(
                    "target {selector:?} is backing off after {} consecutive failure(s); retried in {:.1} s",
                    t.consecutive_failures,
                    retry_in(t, now)
                )))
            };
        }
        drop(targets);
        if let Some(first) = self.order(Some(selector)).into_iter().next() {
            return Ok(first);
        }
        let targets = self.targets.read();
        let of_kind: Vec<&Target> = targets.values().filter(|t| t.kind == selector).collect();
        if of_kind.is_empty() {
            let mut known: Vec<String> = targets.values().map(|t| format!("{} ({})", t.name, t.kind)).collect();
            known.sort();
            return Err(CoreError::config(format!(
                "nothing is registered as {selector:?}; known targets: {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        let soonest = of_kind.iter().map(|t| retry_in(t, now)).fold(f64::INFINITY, f64::min);
        Err(CoreError::Cache(format!(
            "every {selector:?} target is backing off after failures; the first is retried in {soonest:.1} s"
        )))
    }

    /// Records a success: the target is healthy again.
    pub fn report_success(&self, name: &str) {
        if let Some(t) = self.targets.write().get_mut(name) {
            t.consecutive_failures = 0;
            t.retry_at = None;
        }
    }

    /// Records a failure: the target is skipped for the next backoff period.
    pub fn report_failure(&self, name: &str) {
        let now = self.clock.now();
        let failed = self.targets.write().get_mut(name).map(|t| {
            t.consecutive_failures = t.consecutive_failures.saturating_add(1);
            t.total_failures += 1;
            let doublings = (t.consecutive_failures - 1).min(30);
            let backoff = self.base_backoff.saturating_mul(1 << doublings).min(self.max_backoff);
            t.retry_at = Some(now + backoff);
            (t.consecutive_failures, backoff)
        });
        // Logged with the lock released: a log record may wait for Python's GIL (pyo3-log), and
        // a thread holding the GIL may be waiting for this lock (a route on a worker's step).
        if let Some((failures, backoff)) = failed {
            tracing::debug!(target_name = name, failures, ?backoff, "router target failed");
        }
    }

    pub fn status(&self) -> Vec<TargetStatus> {
        let now = self.clock.now();
        let targets = self.targets.read();
        let mut list: Vec<&Target> = targets.values().collect();
        list.sort_by_key(|t| (t.priority, t.seq));
        list.into_iter()
            .map(|t| TargetStatus {
                name: t.name.clone(),
                kind: t.kind.clone(),
                priority: t.priority,
                policy: t.policy,
                available: self.available(t, now),
                consecutive_failures: t.consecutive_failures,
                total_failures: t.total_failures,
                retry_in: retry_in(t, now),
            })
            .collect()
    }
}

fn retry_in(t: &Target, now: Duration) -> f64 {
    t.retry_at.map_or(0.0, |at| at.saturating_sub(now).as_secs_f64())
}
