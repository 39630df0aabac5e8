//! `xconnector._native.SdkStats` and `PeerOverlap`: thin wrappers of `xconnector_core::sdk_stats`
//! and `xconnector_core::peer_overlap`, the SDK's counters and its distributed handler's ranking.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::prelude::*;
use xconnector_core::peer_events::EventSubscriber;
use xconnector_core::peer_overlap::{Follower, PeerOverlap as CorePeerOverlap};
use xconnector_core::sdk_stats::SdkStats as CoreSdkStats;

use crate::call::{detached, guarded};

/// Named counters and fallbacks by reason; each bump returns the total after it (1: the first).
#[pyclass(module = "xconnector._native", frozen)]
pub struct SdkStats {
    pub(crate) inner: CoreSdkStats,
}

#[pymethods]
impl SdkStats {
    #[new]
    fn new() -> Self {
        Self { inner: CoreSdkStats::new() }
    }

    #[pyo3(signature = (name, n = 1))]
    fn count(&self, py: Python<'_>, name: &str, n: u64) -> PyResult<u64> {
        guarded(py, || Ok(self.inner.count(name, n)))
    }

    fn fallback(&self, py: Python<'_>, reason: &str) -> PyResult<u64> {
        guarded(py, || Ok(self.inner.fallback(reason)))
    }

    fn counters(&self, py: Python<'_>) -> PyResult<BTreeMap<String, u64>> {
        guarded(py, || Ok(self.inner.counters()))
    }

    fn fallbacks(&self, py: Python<'_>) -> PyResult<BTreeMap<String, u64>> {
        guarded(py, || Ok(self.inner.fallbacks()))
    }

    fn hit_rate(&self, py: Python<'_>) -> PyResult<f64> {
        guarded(py, || Ok(self.inner.hit_rate()))
    }

    /// A step of the forward pass waited `seconds` inside XConnector for `op` (`load`, `save`).
    fn step_wait(&self, py: Python<'_>, op: &str, seconds: f64) -> PyResult<()> {
        guarded(py, || {
            self.inner.step_wait(op, Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default());
            Ok(())
        })
    }

    /// `{op: (count, sum of seconds)}` of the step waits.
    fn step_waits(&self, py: Python<'_>) -> PyResult<BTreeMap<String, (u64, f64)>> {
        guarded(py, || {
            Ok(self.inner.step_waits().into_iter().map(|(op, h)| (op.to_owned(), (h.count, h.sum_seconds))).collect())
        })
    }

    /// The SDK's own families in Prometheus' text format.
    fn prometheus(&self, py: Python<'_>) -> PyResult<String> {
        guarded(py, || Ok(self.inner.prometheus()))
    }
}

/// Peers' announced blocks plus this worker's own overlap, ranked in tokens; fed by hand or by
/// following other workers' peer events on NATS in a native thread.
#[pyclass(module = "xconnector._native", frozen)]
pub struct PeerOverlap {
    inner: Arc<CorePeerOverlap>,
    follower: Mutex<Option<Follower>>,
}

#[pymethods]
impl PeerOverlap {
    #[new]
    fn new(me: &str) -> Self {
        Self { inner: Arc::new(CorePeerOverlap::new(me)), follower: Mutex::new(None) }
    }

    #[getter]
    fn me(&self, py: Python<'_>) -> PyResult<String> {
        guarded(py, || Ok(self.inner.me().to_owned()))
    }

    /// Peer events applied by the follower (this worker's own are not counted).
    #[getter]
    fn events_applied(&self, py: Python<'_>) -> PyResult<u64> {
        guarded(py, || Ok(self.inner.events_applied()))
    }

    /// Applies other workers' events from `subject` at `url` until `stop_following()`; an
    /// error when NATS cannot be reached within `timeout` seconds. Following already: no-op.
    #[pyo3(signature = (url, subject, timeout = 5.0))]
    fn follow(&self, py: Python<'_>, url: &str, subject: &str, timeout: f64) -> PyResult<()> {
        let t = Duration::try_from_secs_f64(timeout)
            .map_err(|_| crate::errors::invalid_input(py, "timeout must be seconds >= 0"))?;
        if self.follower.lock().is_some() {
            return Ok(());
        }
        // Not under the lock: re-taking the GIL after `detached` while another thread holds the
        // GIL and waits for the lock would deadlock. A racing second follower is dropped.
        let me = Arc::clone(&self.inner);
        let started = detached(py, || {
            let rt = xconnector_core::runtime::runtime()?;
            me.follow(EventSubscriber::start(url, subject, &rt, t)?)
        })?;
        self.follower.lock().get_or_insert(started);
        Ok(())
    }

    /// Stops the follower (its thread ends within one poll).
    fn stop_following(&self, py: Python<'_>) -> PyResult<()> {
        guarded(py, || {
            self.follower.lock().take();
            Ok(())
        })
    }

    /// False (ignored) when `worker` is this worker.
    fn stored(&self, py: Python<'_>, worker: &str, hashes: Vec<u64>) -> PyResult<bool> {
        guarded(py, || Ok(self.inner.stored(worker, &hashes)))
    }

    fn removed(&self, py: Python<'_>, worker: &str, hashes: Vec<u64>) -> PyResult<bool> {
        guarded(py, || Ok(self.inner.removed(worker, &hashes)))
    }

    fn forget(&self, py: Python<'_>, worker: &str) -> PyResult<()> {
        guarded(py, || {
            self.inner.forget(worker);
            Ok(())
        })
    }

    fn peers(&self, py: Python<'_>) -> PyResult<Vec<(String, u64)>> {
        guarded(py, || Ok(self.inner.peers()))
    }

    /// `[(worker, leading tokens held)]`, best first, ties by name.
    #[pyo3(signature = (hashes, block_size, local_tokens = 0))]
    fn score(
        &self,
        py: Python<'_>,
        hashes: Vec<u64>,
        block_size: usize,
        local_tokens: usize,
    ) -> PyResult<Vec<(String, usize)>> {
        detached(py, || Ok(self.inner.score(&hashes, block_size, local_tokens)))
    }

    #[pyo3(signature = (hashes, block_size, local_tokens = 0, candidates = None))]
    fn best(
        &self,
        py: Python<'_>,
        hashes: Vec<u64>,
        block_size: usize,
        local_tokens: usize,
        candidates: Option<Vec<String>>,
    ) -> PyResult<Option<String>> {
        detached(py, || Ok(self.inner.best(&hashes, block_size, local_tokens, candidates.as_deref())))
    }
}
