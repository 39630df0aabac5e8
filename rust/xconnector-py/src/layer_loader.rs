//! A `V1Worker`'s layer-wise loads from host KV (`PagedKv`): `start` pins a step's cached
//! prefixes and copies them layer by layer on a load thread, while vLLM's forward pass runs;
//! `wait_layer` (vLLM's `wait_for_layer_load`, called before each attention layer) waits only for
//! that layer. `settle` waits for the whole batch and says what each load wrote.
//!
//! Which layers vLLM waits for is learned first: the first step with loads loads them whole and
//! notes the layers whose attention waited. Layers that did not (a drafter's, run after the
//! step's hooks; any attention vLLM does not wrap) are copied first, before `start` returns; the
//! rest overlap the forward pass. A learned layer that then goes unwaited may have been read
//! mid-copy: that batch's loads are reported failed (vLLM recomputes them and discards the
//! step's tokens for those requests) and the layer joins those copied first (once no waited
//! layer is left, loads run whole).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::prelude::*;
use xconnector_core::layer_loads::{load_by_layer, LayerLoad, LayerOrder, LayerProgress, LayerSink};
use xconnector_core::save_queue::SaveQueue;
use xconnector_core::transfer_plan::BlockId;
use xconnector_core::{CoreError, Engine as CoreEngine, Result};

use crate::engine::extras;
use crate::paged::PagedKv;

/// One request's load, as the load thread needs it (owned: it outlives the call).
pub(crate) struct LayerRequest {
    pub tokens: Vec<u32>,
    pub first_block: usize,
    pub ids: Vec<u32>,
    /// `lora_name`, `cache_salt`, `lora_id`.
    pub keys: (Option<String>, Option<String>, Option<String>),
}

/// What the worker's ledger needs of a load.
pub(crate) struct LoadPlan {
    pub req_id: String,
    /// Tokens the scheduler planned to load.
    pub planned: usize,
    pub block_ids: Vec<BlockId>,
    pub first_block: usize,
}

/// A batch's outcome: each request with the tokens its prefix holds, or why it loaded nothing.
pub(crate) struct Settled {
    pub step: u64,
    pub target: String,
    pub loads: Vec<(LoadPlan, Result<usize>)>,
    /// How long the step waited for its layers, `start` included.
    pub waited: Duration,
    /// A layer vLLM waited for before was not waited for: the batch's loads cannot be trusted.
    pub unwaited: bool,
}

struct Batch {
    step: u64,
    target: String,
    plans: Vec<LoadPlan>,
    results: Arc<Mutex<Option<Vec<Result<usize>>>>>,
    waited: Duration,
    seen: Vec<bool>,
}

/// Finishes the progress when dropped: the job ran, panicked, or was dropped unrun (a closed
/// queue), and no waiter may hang on a batch nobody copies.
struct FinishOnDrop(Arc<LayerProgress>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

enum Mode {
    /// Not learned yet; `Some` while a learning step runs (the layers waited for so far).
    Learning(Option<Vec<bool>>),
    Learned(LayerOrder),
    /// Loads run whole.
    Off,
}

pub(crate) struct LayerLoader {
    kv: Py<PagedKv>,
    engine: Arc<CoreEngine>,
    queue: SaveQueue,
    progress: Arc<LayerProgress>,
    /// Layer name -> its index in the KV payload (the order the tensors were registered in).
    index: HashMap<String, usize>,
    mode: Mutex<Mode>,
    batch: Mutex<Option<Batch>>,
}

impl LayerLoader {
    /// Layer-wise loads into `kv`, whose layers are named `layers` in order; None when the names
    /// do not match the layers (loads then run whole, in the step).
    pub fn new(
        kv: Py<PagedKv>,
        engine: Arc<CoreEngine>,
        layers: Vec<String>,
        num_layers: usize,
    ) -> Result<Option<Self>> {
        let index: HashMap<String, usize> = layers.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        if layers.len() != num_layers || index.len() != num_layers || num_layers == 0 {
            tracing::info!(
                target: "vllm",
                "XConnector loads whole steps: {} distinct layer name(s) for {num_layers} KV layer(s)",
                index.len()
            );
            return Ok(None);
        }
        let queue = SaveQueue::named(1, "load")?;
        let (mode, batch) = (Mutex::new(Mode::Learning(None)), Mutex::new(None));
        Ok(Some(Self { kv, engine, queue, progress: Arc::new(LayerProgress::new()), index, mode, batch }))
    }

    /// Whether loads may go layer by layer (learning included).
    pub fn on(&self) -> bool {
        !matches!(*self.mode.lock(), Mode::Off)
    }

    /// Whether this step's loads go layer by layer: true once which layers vLLM waits for is
    /// known; false the first time, and this step's loads (run whole by the caller) learn it.
    pub fn layer_by_layer_now(&self) -> bool {
        let mut mode = self.mode.lock();
        match &mut *mode {
            Mode::Learning(seen) => {
                *seen = Some(vec![false; self.index.len()]);
                false
            }
            _ => true,
        }
    }

    /// Starts copying `loads` of `step` (routed to `target`) on the load thread, and returns once
    /// the layers vLLM does not wait for are in place. The previous batch must have been settled.
    /// `started`: when the step began waiting for its loads.
    pub fn start(
        &self,
        py: Python<'_>,
        step: u64,
        target: String,
        loads: Vec<(LoadPlan, LayerRequest)>,
        started: Instant,
    ) {
        let (order, unwaited): (Vec<usize>, usize) = match &*self.mode.lock() {
            Mode::Learned(o) => (o.layers().to_vec(), o.unwaited()),
            _ => ((0..self.index.len()).collect(), 0),
        };
        let (plans, reqs): (Vec<_>, Vec<_>) = loads.into_iter().unzip();
        let results = Arc::new(Mutex::new(None));
        self.progress.start();
        let finish = FinishOnDrop(Arc::clone(&self.progress));
        let (kv, engine, out) = (self.kv.clone_ref(py), Arc::clone(&self.engine), Arc::clone(&results));
        let job = move || {
            let loads: Vec<LayerLoad<'_>> = reqs
                .iter()
                .map(|r| LayerLoad {
                    tokens: &r.tokens,
                    ids: &r.ids,
                    first_block: r.first_block,
                    extras: extras(&r.keys.0, &r.keys.1, &r.keys.2),
                })
                .collect();
            let loaded = load_by_layer(&engine, kv.get().core(), &loads, &order, &*finish.0);
            *out.lock() = Some(loaded);
            drop(finish);
        };
        let seen = vec![false; self.index.len()];
        let batch = Batch { step, target, plans, results, waited: Duration::ZERO, seen };
        *self.batch.lock() = Some(batch);
        // One batch at a time (settled before the next), so the queue always has room; a closed
        // queue drops the job, whose guard finishes the progress: settle finds no results.
        let _ = self.queue.try_submit("load", Box::new(job));
        if unwaited > 0 && !self.progress.is_ready(unwaited - 1) {
            py.detach(|| self.progress.wait_ready(unwaited - 1));
        }
        if let Some(batch) = self.batch.lock().as_mut() {
            batch.waited = started.elapsed();
        }
    }

    /// `ids` as block indices of the KV loaded into (an error names any out of range).
    pub fn block_ids(&self, py: Python<'_>, ids: Vec<BlockId>) -> PyResult<Vec<u32>> {
        self.kv.get().block_ids(py, ids)
    }

    /// Waits until layer `name` is in place (every layer, for a name not registered); while
    /// learning, notes that vLLM waits for it.
    pub fn wait_layer(&self, py: Python<'_>, name: &str) {
        let layer = self.index.get(name).copied();
        let position = match &mut *self.mode.lock() {
            Mode::Learning(Some(seen)) => {
                layer.inspect(|&i| seen[i] = true);
                return;
            }
            Mode::Learned(order) => layer.map_or(self.index.len() - 1, |i| order.position(i)),
            _ => self.index.len() - 1,
        };
        {
            let mut batch = self.batch.lock();
            let Some(batch) = batch.as_mut() else { return };
            layer.inspect(|&i| batch.seen[i] = true);
        }
        if self.progress.is_ready(position) {
            return;
        }
        let started = Instant::now();
        py.detach(|| self.progress.wait_ready(position));
        if let Some(batch) = self.batch.lock().as_mut() {
            batch.waited += started.elapsed();
        }
    }

    /// Ends a learning step (its loads ran whole), and waits (without the GIL) for the running
    /// batch and takes its outcome; None when no batch runs.
    pub fn settle(&self, py: Python<'_>) -> Option<Settled> {
        self.end_learning();
        let batch = self.batch.lock().take()?;
        py.detach(|| self.queue.flush());
        let mut mode = self.mode.lock();
        let narrowed = match &*mode {
            Mode::Learned(o) if o.missed(&batch.seen) => Some(o.narrowed(&batch.seen)),
            _ => None,
        };
        let unwaited = narrowed.is_some();
        if let Some(order) = narrowed {
            let whole = order.is_none();
            *mode = order.map_or(Mode::Off, Mode::Learned);
            drop(mode);
            tracing::warn!(
                target: "vllm",
                "XConnector: vLLM did not wait for a layer's load in step {} as it did before, so that step's loads \
                 are recomputed; {}",
                batch.step,
                if whole { "loads run whole steps from now on" } else { "that layer is loaded first from now on" }
            );
        }
        let mut results = batch.results.lock().take().map(Vec::into_iter);
        let loads = batch
            .plans
            .into_iter()
            .map(|r| {
                let out = results.as_mut().and_then(Iterator::next);
                (r, out.unwrap_or_else(|| Err(CoreError::Internal("the layer-wise load did not run".into()))))
            })
            .collect();
        Some(Settled { step: batch.step, target: batch.target, loads, waited: batch.waited, unwaited })
    }

    /// The copy order from a learning step's waits: layers never waited for first.
    fn end_learning(&self) {
        let mut mode = self.mode.lock();
        let Mode::Learning(Some(seen)) = &*mode else { return };
        match LayerOrder::learn(seen) {
            Some(order) => *mode = Mode::Learned(order),
            None => {
                *mode = Mode::Off;
                drop(mode);
                tracing::info!(target: "vllm", "XConnector: vLLM waits for no layer's load; loads run whole steps");
            }
        }
    }

    /// Lets the running batch end and drops it uncounted (the worker shuts down mid-step), then
    /// refuses more.
    pub fn close(&self, py: Python<'_>) {
        let batch = self.batch.lock().take();
        py.detach(|| {
            self.queue.flush();
            self.queue.close(false);
        });
        drop(batch);
    }
}
