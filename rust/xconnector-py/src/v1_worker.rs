//! `xconnector._native.fail_open_call` and `V1Worker`: the fail-open call every worker-facing
//! cache operation goes through (v0 and v1 alike), and the worker side of the vLLM v1 connector,
//! which runs each step's loads and saves through the block mover (`PagedKv`, or the Python
//! adapter's staged mover for device tensors) and records them in `xconnector_core::v1_worker`.
//! Saves from host KV (`PagedKv`) run after the step on a save thread
//! (`xconnector_core::save_queue`); the ledger tells vLLM when a finished request's blocks may go.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use xconnector_core::save_queue::SaveQueue;
use xconnector_core::transfer_plan::BlockId;
use xconnector_core::v1_worker::WorkerLedger;
use xconnector_core::{CoreError, Engine as CoreEngine};

use crate::call::{detached, guarded};
use crate::engine::{extras, Engine};
use crate::errors::{core_reason, fallback_reason};
use crate::layer_loader::{LayerLoader, LayerRequest, LoadPlan};
use crate::paged::PagedKv;
use crate::router::Router;
use crate::sdk::SdkStats;

/// Saves waiting for the save thread at most; a step that would queue more waits for room.
const MAX_QUEUED_SAVES: usize = 1024;

/// `call()`, the cache operation `kind`, failing open: skipped while `router` backs its `cache`
/// target off; an `Exception` is counted in `stats` by reason, logged (a warning the first time
/// per reason, then debug), reported to the router (which backs off when it is the target's
/// fault) and returned as the reason. Anything else (`KeyboardInterrupt`) propagates.
pub(crate) fn fail_open<'py>(
    py: Python<'py>,
    router: &Router,
    stats: &SdkStats,
    kind: &str,
    call: impl FnOnce() -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Result<Bound<'py, PyAny>, &'static str>> {
    let Ok(target) = router.inner.route("cache") else {
        stats.inner.fallback("cache_backoff");
        return Ok(Err("cache_backoff"));
    };
    match call() {
        Ok(v) => {
            router.inner.settle(&target, None);
            Ok(Ok(v))
        }
        Err(e) if e.is_instance_of::<PyException>(py) => {
            let reason = fallback_reason(py, &e);
            let text = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
            fell_back(router, stats, &target, kind, reason, &text);
            Ok(Err(reason))
        }
        Err(e) => Err(e),
    }
}

/// A call to `target` failed for `reason`: counted, logged (a warning the first time per
/// reason), and reported to the router.
fn fell_back(router: &Router, stats: &SdkStats, target: &str, kind: &str, reason: &'static str, text: &str) {
    if stats.inner.fallback(reason) == 1 {
        tracing::warn!(target: "sdk", "XConnector {kind} fell back to the worker's path ({reason}): {text}");
    } else {
        tracing::debug!(target: "sdk", "XConnector {kind} fell back to the worker's path ({reason}): {text}");
    }
    router.inner.settle(target, Some(reason));
}

/// `fn(*args, **kwargs)` failing open (see `fail_open`): `(result, None)` or `(None, reason)`.
#[pyfunction]
#[pyo3(signature = (router, stats, kind, r#fn, /, *args, **kwargs))]
pub fn fail_open_call<'py>(
    py: Python<'py>,
    router: &Router,
    stats: &SdkStats,
    kind: &str,
    r#fn: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    kwargs: Option<Bound<'py, PyDict>>,
) -> PyResult<(Option<Bound<'py, PyAny>>, Option<&'static str>)> {
    Ok(match fail_open(py, router, stats, kind, || r#fn.call(args, kwargs.as_ref()))? {
        Ok(v) => (Some(v), None),
        Err(reason) => (None, Some(reason)),
    })
}

/// The block mover, engine, router and counters a bound worker transfers with.
struct Binding {
    io: Py<PyAny>,
    engine: Py<PyAny>,
    router: Py<Router>,
    stats: Py<SdkStats>,
    names: Option<Py<PyAny>>,
    /// Host KV: saves run on the save thread, straight from these tensors.
    saves: Option<(Py<PagedKv>, Arc<CoreEngine>, SaveQueue)>,
    /// Host KV with its layers named: loads run layer by layer beside the forward pass.
    loader: Option<LayerLoader>,
}

/// One transfer of a step, read from the connector's `Transfer`.
struct Transfer<'py> {
    req_id: String,
    tokens: Bound<'py, PyAny>,
    block_ids: Vec<BlockId>,
    extras: Bound<'py, PyDict>,
    names: Bound<'py, PyAny>,
}

impl<'py> Transfer<'py> {
    fn read(t: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(Self {
            req_id: t.getattr("req_id")?.extract()?,
            tokens: t.getattr("tokens")?,
            block_ids: t.getattr("block_ids")?.extract()?,
            extras: t.getattr("extras")?.cast_into::<PyDict>()?.copy()?,
            names: t.getattr("names")?,
        })
    }
}

/// The worker side of the v1 connector: each step's loads (`load`) and saves (`save`), what
/// vLLM must recompute (`load_errors`) and what the scheduler must hear (`report`). Unbound (no
/// KV caches registered, or XConnector off in this worker) every load fails, so vLLM recomputes
/// what the scheduler promised, and nothing is saved.
#[pyclass(module = "xconnector._native", frozen)]
pub struct V1Worker {
    block_size: usize,
    engine_block: usize,
    bound: Option<Binding>,
    ledger: Mutex<WorkerLedger>,
}

#[pymethods]
impl V1Worker {
    /// `block_size`: tokens per vLLM block; `engine_block`: tokens per engine block. `io` moves
    /// blocks (`load(engine, tokens, block_ids, first_block=, **extras)`, `store(engine, tokens,
    /// block_ids, **extras)`); `names`, a `VllmBlockNames` when KV events are reported. Saves
    /// from host KV (`PagedKv`) can run after the step (see `save`); with `layerwise` and the
    /// KV's `layers` named in order, its loads run layer by layer (see `wait_layer`).
    #[new]
    #[pyo3(signature = (block_size, engine_block, *, io = None, engine = None, router = None, stats = None, names = None, layers = None, layerwise = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        block_size: usize,
        engine_block: usize,
        io: Option<Py<PyAny>>,
        engine: Option<Py<PyAny>>,
        router: Option<Py<Router>>,
        stats: Option<Py<SdkStats>>,
        names: Option<Py<PyAny>>,
        layers: Option<Vec<String>>,
        layerwise: bool,
    ) -> PyResult<Self> {
        guarded(py, || {
            let bound = match (io, engine, router, stats) {
                (Some(io), Some(engine), Some(router), Some(stats)) => {
                    let host = io.bind(py).cast::<PagedKv>().ok().map(|kv| kv.clone().unbind());
                    let engine_ = engine.bind(py).cast::<Engine>().ok().map(|e| Arc::clone(&e.get().inner));
                    let to_py = |e| crate::errors::core_to_py(py, e);
                    let (saves, loader) = match (host, engine_) {
                        (Some(kv), Some(e)) => {
                            let loader = match layers.filter(|_| layerwise) {
                                Some(layers) => {
                                    let n = kv.get().core().num_layers();
                                    LayerLoader::new(kv.clone_ref(py), Arc::clone(&e), layers, n).map_err(to_py)?
                                }
                                None => None,
                            };
                            (Some((kv, e, SaveQueue::new(MAX_QUEUED_SAVES).map_err(to_py)?)), loader)
                        }
                        _ => (None, None),
                    };
                    Some(Binding { io, engine, router, stats, names, saves, loader })
                }
                _ => None,
            };
            Ok(Self { block_size, engine_block, bound, ledger: Mutex::new(WorkerLedger::new(block_size)) })
        })
    }

    /// Runs the loads of `step` (the connector's `Transfer`s): layer by layer on the load thread
    /// when layer-wise (they end by `settle`), else here. A load that fails or comes up short
    /// makes its missing blocks load errors; never raises for a failure of the cache.
    fn load(&self, py: Python<'_>, step: u64, loads: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        self.settle(py);
        let started = Instant::now();
        if let Some((b, loader)) = self.layerwise().filter(|(_, l)| l.layer_by_layer_now()) {
            return self.start_by_layer(py, b, loader, step, &loads, started);
        }
        for t in &loads {
            let first_block: usize = t.getattr("first_block")?.extract()?;
            let t = Transfer::read(t)?;
            let plan = LoadPlan::of(&t, first_block)?;
            let mut loaded = 0;
            if let Some(b) = &self.bound {
                self.learn_names(py, b, &t);
                let kwargs = t.extras.copy()?;
                kwargs.set_item("first_block", first_block)?;
                let args = (b.engine.bind(py), &t.tokens, t.block_ids.clone());
                let call = || b.io.bind(py).call_method("load", args, Some(&kwargs));
                if let Ok(v) = fail_open(py, b.router.get(), b.stats.get(), "load", call)? {
                    loaded = v.extract().unwrap_or(0);
                }
            }
            self.load_done(step, &plan, loaded);
        }
        self.step_wait("load", &loads, started);
        Ok(())
    }

    /// Waits until layer `layer_name`'s loads of this step are in place (vLLM calls it before
    /// that layer's attention); returns at once when loads are not layer-wise.
    fn wait_layer(&self, py: Python<'_>, layer_name: &str) -> PyResult<()> {
        guarded(py, || {
            if let Some(loader) = self.bound.as_ref().and_then(|b| b.loader.as_ref()) {
                loader.wait_layer(py, layer_name);
            }
            Ok(())
        })
    }

    /// Runs the saves of `step`; one planned `if_loads_ok` is skipped after a failed load of
    /// that step (its request reported failed). With `hold` (the scheduler holds finished
    /// requests' blocks for their saves) saves from host KV are queued for the save thread and
    /// the step waits only for room in the queue. Never raises for a failure of the cache.
    #[pyo3(signature = (step, saves, hold = false))]
    fn save(&self, py: Python<'_>, step: u64, saves: Vec<Bound<'_, PyAny>>, hold: bool) -> PyResult<()> {
        self.settle(py);
        let started = Instant::now();
        for t in &saves {
            let if_loads_ok: bool = t.getattr("if_loads_ok")?.extract()?;
            let t = Transfer::read(t)?;
            if self.ledger.lock().skip_save(step, &t.req_id, if_loads_ok, hold) {
                continue;
            }
            let Some(b) = &self.bound else { continue };
            self.learn_names(py, b, &t);
            if let Some(host) = b.saves.as_ref().filter(|_| hold) {
                self.queue_save(py, b, host, t)?;
                continue;
            }
            let args = (b.engine.bind(py), &t.tokens, t.block_ids.clone());
            let call = || b.io.bind(py).call_method("store", args, Some(&t.extras));
            if let Ok(v) = fail_open(py, b.router.get(), b.stats.get(), "save", call)? {
                b.stats.get().inner.count("saved_blocks", v.extract().unwrap_or(0));
            }
        }
        self.step_wait("save", &saves, started);
        Ok(())
    }

    /// Of the requests vLLM finished (now or before), those whose blocks it may free now: each
    /// request with a save planned, once, when none of its saves is in flight any more.
    fn finished(&self, py: Python<'_>, finished: Vec<String>) -> PyResult<Vec<String>> {
        self.settle(py);
        guarded(py, || {
            let queue = self.bound.as_ref().and_then(|b| b.saves.as_ref()).map(|(_, _, q)| q);
            let in_flight = |r: &str| queue.is_some_and(|q| q.in_flight(r));
            Ok(self.ledger.lock().finished(finished.iter().map(String::as_str), in_flight))
        })
    }

    /// What this worker did: loads, loaded tokens, load failures, saved blocks and the steps
    /// whose loads ran layer by layer; the steps that waited for loads and for saves, with the
    /// seconds they waited; fallbacks by reason.
    fn totals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.bound.as_ref().map(|b| &b.stats.get().inner);
        let out = PyDict::new(py);
        let counts = stats.map(|s| s.counters()).unwrap_or_default();
        for name in ["layerwise_steps", "load_failures", "loaded_tokens", "loads", "saved_blocks"] {
            out.set_item(name, counts.get(name).copied().unwrap_or(0))?;
        }
        for (op, waits) in stats.map(|s| s.step_waits()).unwrap_or_default() {
            out.set_item(format!("{op}_wait_steps"), waits.count)?;
            out.set_item(format!("{op}_wait_seconds"), waits.sum_seconds)?;
        }
        out.set_item("fallbacks", stats.map(|s| s.fallbacks()).unwrap_or_default())?;
        Ok(out)
    }

    /// Saves queued or running on the save thread.
    #[getter]
    fn saves_in_flight(&self, py: Python<'_>) -> PyResult<u64> {
        guarded(py, || Ok(self.queue().map_or(0, SaveQueue::pending)))
    }

    /// Waits (without the GIL) until every save queued so far has run: before blocks vLLM
    /// cannot hold back (a preempted request's) are reused, and for a settled cache.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py);
        detached(py, || {
            self.queue().inspect(|q| q.flush());
            Ok(())
        })
    }

    /// Runs every queued save, then refuses more (the worker shuts down; a layer-wise load
    /// still running ends uncounted).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(loader) = self.bound.as_ref().and_then(|b| b.loader.as_ref()) {
            loader.close(py);
        }
        detached(py, || {
            self.queue().inspect(|q| q.flush()).inspect(|q| q.close(false));
            Ok(())
        })
    }

    /// The blocks vLLM must recompute (failed or short loads since the last call), once each.
    fn load_errors(&self, py: Python<'_>) -> PyResult<Vec<BlockId>> {
        self.settle(py);
        guarded(py, || Ok(self.ledger.lock().take_load_errors()))
    }

    /// `(steps, failed requests)` for the scheduler, or None when no load ran since the last.
    fn report(&self, py: Python<'_>) -> PyResult<Option<(Vec<u64>, Vec<String>)>> {
        self.settle(py);
        guarded(py, || Ok(self.ledger.lock().take_report()))
    }
}

impl Transfer<'_> {
    /// `lora_name`, `cache_salt` and `lora_id`, owned (for a job that outlives the call).
    fn keys(&self) -> PyResult<(Option<String>, Option<String>, Option<String>)> {
        let text = |k: &str| -> PyResult<Option<String>> {
            Ok(match self.extras.get_item(k)? {
                Some(v) if !v.is_none() => Some(v.extract()?),
                _ => None,
            })
        };
        Ok((text("lora_name")?, text("cache_salt")?, text("lora_id")?))
    }
}

impl LoadPlan {
    fn of(t: &Transfer<'_>, first_block: usize) -> PyResult<Self> {
        let (req_id, block_ids) = (t.req_id.clone(), t.block_ids.clone());
        Ok(Self { req_id, planned: t.tokens.len()?, block_ids, first_block })
    }
}

impl V1Worker {
    fn queue(&self) -> Option<&SaveQueue> {
        self.bound.as_ref().and_then(|b| b.saves.as_ref()).map(|(_, _, q)| q)
    }

    /// Queues one save from host KV, failing open like a call: skipped while the cache backs
    /// off; the job counts what it stored, or falls back and reports to the router.
    fn queue_save(
        &self,
        py: Python<'_>,
        b: &Binding,
        (kv, engine, queue): &(Py<PagedKv>, Arc<CoreEngine>, SaveQueue),
        t: Transfer<'_>,
    ) -> PyResult<()> {
        let Ok(target) = b.router.get().inner.route("cache") else {
            b.stats.get().inner.fallback("cache_backoff");
            return Ok(());
        };
        let read = || -> PyResult<_> {
            Ok((crate::buffers::tokens(&t.tokens)?, kv.get().block_ids(py, t.block_ids.clone())?, t.keys()?))
        };
        let (toks, ids, (lora_name, cache_salt, lora_id)) = match read() {
            Ok(v) => v,
            Err(e) => {
                let text = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
                fell_back(b.router.get(), b.stats.get(), &target, "save", fallback_reason(py, &e), &text);
                return Ok(());
            }
        };
        let (kv, engine) = (kv.clone_ref(py), Arc::clone(engine));
        let (router, stats) = (b.router.clone_ref(py), b.stats.clone_ref(py));
        let job = move || {
            let keys = extras(&lora_name, &cache_salt, &lora_id);
            let out = catch_unwind(AssertUnwindSafe(|| kv.get().store_blocks(&engine, &toks, &ids, keys)))
                .unwrap_or_else(|_| Err(CoreError::Internal("a panic in a save".into())));
            match out {
                Ok(n) => {
                    router.get().inner.settle(&target, None);
                    stats.get().inner.count("saved_blocks", n as u64);
                }
                Err(e) => fell_back(router.get(), stats.get(), &target, "save", core_reason(&e), &e.to_string()),
            }
        };
        // Waiting for room (a full queue) is the step's wait: without the GIL. With room, the
        // GIL is kept (handing it back and forth costs more than the queueing).
        let req_id = t.req_id;
        if let Err(job) = queue.try_submit(&req_id, Box::new(job)) {
            py.detach(|| queue.submit(&req_id, job));
        }
        Ok(())
    }

    /// Remembers vLLM's names for the blocks a transfer may add to a tier, for the KV events
    /// that report them. Bookkeeping for events only: a failure is counted, never the transfer's.
    fn learn_names(&self, py: Python<'_>, b: &Binding, t: &Transfer<'_>) {
        let Some(names) = &b.names else { return };
        if t.names.is_none() {
            return;
        }
        let learn = || -> PyResult<()> {
            let kwargs = PyDict::new(py);
            kwargs.set_item("lora_name", t.extras.get_item("lora_name")?)?;
            kwargs.set_item("cache_salt", t.extras.get_item("cache_salt")?)?;
            let args = (self.engine_block, self.block_size, &t.tokens, &t.names);
            names.bind(py).call_method("learn", args, Some(&kwargs)).map(drop)
        };
        if let Err(e) = learn() {
            if b.stats.get().inner.fallback("v1_kv_events") == 1 {
                tracing::warn!(target: "vllm", "XConnector kv_events failed, vLLM goes on without it: {e}");
            }
        }
    }

    /// The binding and its layer loader while loads go layer by layer.
    fn layerwise(&self) -> Option<(&Binding, &LayerLoader)> {
        let b = self.bound.as_ref()?;
        b.loader.as_ref().filter(|l| l.on()).map(|l| (b, l))
    }

    /// A load of `step` wrote `loaded` tokens of the prefix (0: failed): the ledger and counters.
    fn load_done(&self, step: u64, plan: &LoadPlan, loaded: usize) {
        let (req, ids) = (&plan.req_id, &plan.block_ids);
        let out = self.ledger.lock().load_done(step, req, plan.planned, ids, plan.first_block, loaded);
        if let Some(b) = &self.bound {
            let stats = &b.stats.get().inner;
            stats.count("loads", 1);
            stats.count("loaded_tokens", out.written_tokens as u64);
            stats.count("load_failures", u64::from(out.failed));
        }
    }

    /// `load`, layer-wise: reads each transfer here (under the GIL) and starts the batch on the
    /// load thread. Failing open as `fail_open` does: nothing loads while the cache backs off,
    /// and a transfer that cannot be read loads nothing.
    fn start_by_layer(
        &self,
        py: Python<'_>,
        b: &Binding,
        loader: &LayerLoader,
        step: u64,
        loads: &[Bound<'_, PyAny>],
        started: Instant,
    ) -> PyResult<()> {
        let target = b.router.get().inner.route("cache").ok();
        let mut batch = Vec::new();
        for t in loads {
            let first_block: usize = t.getattr("first_block")?.extract()?;
            let t = Transfer::read(t)?;
            self.learn_names(py, b, &t);
            let plan = LoadPlan::of(&t, first_block)?;
            let Some(target) = &target else {
                b.stats.get().inner.fallback("cache_backoff");
                self.load_done(step, &plan, 0);
                continue;
            };
            let read = || -> PyResult<_> {
                let (tokens, keys) = (crate::buffers::tokens(&t.tokens)?, t.keys()?);
                let ids = loader.block_ids(py, t.block_ids.clone())?;
                Ok(LayerRequest { tokens, first_block, ids, keys })
            };
            match read() {
                Ok(request) => batch.push((plan, request)),
                Err(e) => {
                    let text = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
                    fell_back(b.router.get(), b.stats.get(), target, "load", fallback_reason(py, &e), &text);
                    self.load_done(step, &plan, 0);
                }
            }
        }
        match target.filter(|_| !batch.is_empty()) {
            Some(target) => {
                b.stats.get().inner.count("layerwise_steps", 1);
                loader.start(py, step, target, batch, started);
            }
            None => self.step_wait("load", loads, started),
        }
        Ok(())
    }

    /// Ends the running layer-wise batch, if any: waits for it (without the GIL), then records
    /// each load as `load` does. Called before anything that reads what the loads did.
    fn settle(&self, py: Python<'_>) {
        let Some(b) = &self.bound else { return };
        let Some(settled) = b.loader.as_ref().and_then(|l| l.settle(py)) else { return };
        let (router, stats) = (b.router.get(), b.stats.get());
        if settled.unwaited {
            stats.inner.fallback("load_layers_unwaited");
        }
        let mut ok = true;
        for (plan, out) in &settled.loads {
            let loaded = match out {
                Ok(tokens) if !settled.unwaited => *tokens,
                Ok(_) => 0,
                Err(e) => {
                    ok = false;
                    fell_back(router, stats, &settled.target, "load", core_reason(e), &e.to_string());
                    0
                }
            };
            self.load_done(settled.step, plan, loaded);
        }
        if ok {
            router.inner.settle(&settled.target, None);
        }
        stats.inner.step_wait("load", settled.waited);
    }

    /// A step with transfers waited since `started` for them: the step-time histogram.
    fn step_wait(&self, op: &str, transfers: &[Bound<'_, PyAny>], started: Instant) {
        if let (Some(b), false) = (&self.bound, transfers.is_empty()) {
            b.stats.get().inner.step_wait(op, started.elapsed());
        }
    }
}
