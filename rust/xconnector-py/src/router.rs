//! `xconnector._native.Router` and `OverlapIndex`: thin wrappers of `xconnector_core::router`
//! and `xconnector_core::overlap`.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::overlap::OverlapIndex as CoreOverlap;
use xconnector_core::router::{Clock, Router as CoreRouter, WritePolicy};

use crate::call::{detached, guarded};
use crate::errors::{core_to_py, invalid_input};

fn seconds(py: Python<'_>, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| invalid_input(py, format!("{what} must be a number of seconds >= 0, got {s}")))
}

/// Routes operations to targets (tiers, adapters) by name, kind and priority, skipping targets
/// that failed for a backoff period that doubles per consecutive failure.
#[pyclass(module = "xconnector._native", frozen)]
pub struct Router {
    pub(crate) inner: CoreRouter,
}

#[pymethods]
impl Router {
    #[new]
    #[pyo3(signature = (*, base_backoff = 0.1, max_backoff = 30.0, manual_clock = false))]
    fn new(py: Python<'_>, base_backoff: f64, max_backoff: f64, manual_clock: bool) -> PyResult<Self> {
        let base = seconds(py, "base_backoff", base_backoff)?;
        let max = seconds(py, "max_backoff", max_backoff)?;
        guarded(py, || {
            let clock = if manual_clock { Clock::manual() } else { Clock::monotonic() };
            Ok(Self { inner: CoreRouter::new(clock, base, max) })
        })
    }

    /// Registers a target. `policy`: write_through, write_behind or read_only.
    #[pyo3(signature = (name, kind, priority = 0, policy = "write_through"))]
    fn add(&self, py: Python<'_>, name: &str, kind: &str, priority: i64, policy: &str) -> PyResult<()> {
        let policy = WritePolicy::parse(policy).ok_or_else(|| {
            invalid_input(py, format!("unknown write policy {policy:?}; use write_through, write_behind or read_only"))
        })?;
        guarded(py, || self.inner.add(name, kind, priority, policy).map_err(|e| core_to_py(py, e)))
    }

    /// Registers an adapter with its type's write policy (the cache takes stores; the others
    /// only serve); `ConfigError` for an unknown type or a name already registered.
    #[pyo3(signature = (name, kind, priority = 0))]
    fn add_adapter(&self, py: Python<'_>, name: &str, kind: &str, priority: i64) -> PyResult<()> {
        guarded(py, || self.inner.add_adapter(name, kind, priority).map_err(|e| core_to_py(py, e)))
    }

    fn remove(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        guarded(py, || Ok(self.inner.remove(name)))
    }

    /// Available targets of `kind` (all when None), in the order to consult them.
    #[pyo3(signature = (kind = None))]
    fn order(&self, py: Python<'_>, kind: Option<&str>) -> PyResult<Vec<String>> {
        guarded(py, || Ok(self.inner.order(kind)))
    }

    /// Available targets a store writes to, with their policy.
    #[pyo3(signature = (kind = None))]
    fn write_plan(&self, py: Python<'_>, kind: Option<&str>) -> PyResult<Vec<(String, &'static str)>> {
        guarded(py, || Ok(self.inner.write_plan(kind).into_iter().map(|(n, p)| (n, p.name())).collect()))
    }

    /// The target for a name or a kind; `CacheError` while it (or every target of the kind)
    /// backs off, `ConfigError` when nothing matches.
    fn route(&self, py: Python<'_>, selector: &str) -> PyResult<String> {
        guarded(py, || self.inner.route(selector).map_err(|e| core_to_py(py, e)))
    }

    /// Targets to try for a name (alone) or a kind (available ones, in order); the errors of
    /// `route` when there is none now.
    fn candidates(&self, py: Python<'_>, selector: &str) -> PyResult<Vec<String>> {
        guarded(py, || self.inner.candidates(selector).map_err(|e| core_to_py(py, e)))
    }

    /// Records a call's outcome: `None` a success, else its fallback reason, which backs the
    /// target off when it is the target's fault. True when the target now backs off.
    #[pyo3(signature = (name, failure = None))]
    fn settle(&self, py: Python<'_>, name: &str, failure: Option<&str>) -> PyResult<bool> {
        guarded(py, || Ok(self.inner.settle(name, failure)))
    }

    fn report_success(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        guarded(py, || {
            self.inner.report_success(name);
            Ok(())
        })
    }

    fn report_failure(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        guarded(py, || {
            self.inner.report_failure(name);
            Ok(())
        })
    }

    /// Every target, in order, with its health.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let targets = guarded(py, || Ok(self.inner.status()))?;
        targets
            .into_iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("name", t.name)?;
                d.set_item("kind", t.kind)?;
                d.set_item("priority", t.priority)?;
                d.set_item("policy", t.policy.name())?;
                d.set_item("available", t.available)?;
                d.set_item("consecutive_failures", t.consecutive_failures)?;
                d.set_item("total_failures", t.total_failures)?;
                d.set_item("retry_in", t.retry_in)?;
                Ok(d)
            })
            .collect()
    }

    /// Moves a manual clock forward (`manual_clock=True`); for tests of backoff without sleeping.
    fn advance(&self, py: Python<'_>, seconds_: f64) -> PyResult<()> {
        let by = seconds(py, "seconds", seconds_)?;
        guarded(py, || self.inner.clock().advance(by).map_err(|e| core_to_py(py, e)))
    }
}

/// Which workers hold how many leading blocks of a request, from stored/removed block events.
#[pyclass(module = "xconnector._native", frozen)]
pub struct OverlapIndex {
    inner: CoreOverlap,
}

#[pymethods]
impl OverlapIndex {
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        guarded(py, || Ok(Self { inner: CoreOverlap::new() }))
    }

    fn stored(&self, py: Python<'_>, worker: &str, hashes: Vec<u64>) -> PyResult<()> {
        guarded(py, || {
            self.inner.stored(worker, &hashes);
            Ok(())
        })
    }

    fn removed(&self, py: Python<'_>, worker: &str, hashes: Vec<u64>) -> PyResult<()> {
        guarded(py, || {
            self.inner.removed(worker, &hashes);
            Ok(())
        })
    }

    fn clear_worker(&self, py: Python<'_>, worker: &str) -> PyResult<()> {
        guarded(py, || {
            self.inner.clear_worker(worker);
            Ok(())
        })
    }

    /// `[(worker, leading blocks held)]`, best first.
    fn score(&self, py: Python<'_>, hashes: Vec<u64>) -> PyResult<Vec<(String, usize)>> {
        detached(py, || Ok(self.inner.score(&hashes)))
    }

    /// `[(worker, blocks held)]` for every worker seen.
    fn workers(&self, py: Python<'_>) -> PyResult<Vec<(String, u64)>> {
        guarded(py, || Ok(self.inner.workers()))
    }
}
