//! `xconnector._native.TransferPlanner`: a thin wrapper of `xconnector_core::transfer_plan`, for
//! the scheduler side of `xconnector.integrations.vllm.connector`, which slices tokens and names
//! and builds vLLM's metadata from the plain tuples these return.

use parking_lot::Mutex;
use pyo3::prelude::*;
use xconnector_core::transfer_plan::{self as core, BlockId, Load, Planned, Save};

use crate::call::guarded;
use crate::errors::invalid_input;

/// `(req_id, tokens, block_ids, first_block)`.
type LoadTuple = (String, usize, Vec<BlockId>, usize);
/// `(req_id, tokens, block_ids, if_loads_ok)`.
type SaveTuple = (String, usize, Vec<BlockId>, bool);

fn load(l: Load) -> LoadTuple {
    (l.req_id, l.tokens, l.block_ids, l.first_block)
}

fn save(s: Save) -> SaveTuple {
    (s.req_id, s.tokens, s.block_ids, s.if_loads_ok)
}

fn planned(p: Planned) -> (Option<LoadTuple>, Option<SaveTuple>) {
    (p.load.map(load), p.save.map(save))
}

/// Which blocks of which request to load and save in each step (the rules are stated in
/// `xconnector_core::transfer_plan`).
#[pyclass(module = "xconnector._native", frozen)]
pub struct TransferPlanner {
    inner: Mutex<core::TransferPlanner>,
}

#[pymethods]
impl TransferPlanner {
    #[new]
    #[pyo3(signature = (block_size, engine_block, world, unconfirmed_steps))]
    fn new(
        py: Python<'_>,
        block_size: usize,
        engine_block: usize,
        world: usize,
        unconfirmed_steps: u64,
    ) -> PyResult<Self> {
        if block_size == 0 || engine_block == 0 {
            return Err(invalid_input(py, "block_size and engine_block must be positive numbers of tokens"));
        }
        guarded(py, || {
            Ok(Self {
                inner: Mutex::new(core::TransferPlanner::new(block_size, engine_block, world, unconfirmed_steps)),
            })
        })
    }

    /// The current step (0 before the first).
    #[getter]
    fn step(&self, py: Python<'_>) -> PyResult<u64> {
        guarded(py, || Ok(self.inner.lock().step()))
    }

    /// Whether loads are off: the workers never confirmed loads of too many steps ago.
    #[getter]
    fn loads_off(&self, py: Python<'_>) -> PyResult<bool> {
        guarded(py, || Ok(self.inner.lock().loads_off()))
    }

    /// A lookup answered for `req_id` relative to `local_hit` tokens vLLM holds already.
    fn note_lookup(&self, py: Python<'_>, req_id: &str, local_hit: usize) -> PyResult<()> {
        guarded(py, || {
            self.inner.lock().note_lookup(req_id, local_hit);
            Ok(())
        })
    }

    /// The load of `external_tokens` beyond the local hit into `block_ids`, handed over when
    /// the request is scheduled; 0 drops any load planned before.
    fn plan_load(&self, py: Python<'_>, req_id: &str, external_tokens: usize, block_ids: Vec<BlockId>) -> PyResult<()> {
        guarded(py, || {
            self.inner.lock().plan_load(req_id, external_tokens, &block_ids);
            Ok(())
        })
    }

    /// Starts the next step: `(step, age)`, `age` the steps since the oldest unconfirmed load
    /// when loads turn off in this step, else None.
    fn begin_step(&self, py: Python<'_>) -> PyResult<(u64, Option<u64>)> {
        guarded(py, || Ok(self.inner.lock().begin_step()))
    }

    /// A newly scheduled request: `(load, save)`, each None or a tuple.
    fn schedule_new(
        &self,
        py: Python<'_>,
        req_id: &str,
        num_tokens: usize,
        block_ids: Vec<BlockId>,
        computed: usize,
    ) -> PyResult<(Option<LoadTuple>, Option<SaveTuple>)> {
        guarded(py, || Ok(planned(self.inner.lock().schedule_new(req_id, num_tokens, block_ids, computed))))
    }

    /// A request scheduled before, with its new blocks (None: none; they replace its blocks
    /// when it `resumed`): `(load, save)`.
    fn schedule_cached(
        &self,
        py: Python<'_>,
        req_id: &str,
        new_block_ids: Option<Vec<BlockId>>,
        resumed: bool,
        computed: usize,
    ) -> PyResult<(Option<LoadTuple>, Option<SaveTuple>)> {
        guarded(py, || Ok(planned(self.inner.lock().schedule_cached(req_id, new_block_ids, resumed, computed))))
    }

    /// The workers confirmed `steps`; `failed` requests are saved again once recomputed.
    fn confirm(&self, py: Python<'_>, steps: Vec<u64>, failed: Vec<String>) -> PyResult<()> {
        guarded(py, || {
            self.inner.lock().confirm(steps, failed.iter().map(String::as_str));
            Ok(())
        })
    }

    /// The request is done: everything kept for it goes.
    fn finished(&self, py: Python<'_>, req_id: &str) -> PyResult<()> {
        guarded(py, || {
            self.inner.lock().finished(req_id);
            Ok(())
        })
    }
}
