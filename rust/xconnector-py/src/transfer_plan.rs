//! `xconnector._native.TransferPlanner`: `xconnector_core::transfer_plan` for the scheduler side
//! of `xconnector.integrations.vllm.connector`. Besides the core's plan it keeps each request's
//! key (the connector's token list, extras and vLLM's block names, as Python objects) and reads
//! vLLM's `SchedulerOutput`, so a step's loads and saves come out as the connector's transfers.

use std::collections::HashMap;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
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
    block_size: usize,
    /// Builds a transfer: `transfer(req_id, tokens, block_ids, extras, names, first_block=` or
    /// `if_loads_ok=)`; None: `schedule` is not used.
    transfer: Option<Py<PyAny>>,
    /// What each tracked request's blocks are keyed by, fixed when it is first looked up.
    keys: Mutex<HashMap<String, Key>>,
}

/// A request's key: the token ids its blocks are keyed by, the extras (`lora_name`,
/// `cache_salt`, `lora_id`), and vLLM's names of its blocks (None when vLLM has none).
struct Key {
    tokens: Py<PyList>,
    extras: Py<PyDict>,
    names: Option<Py<PyList>>,
}

impl Key {
    fn clone_ref(&self, py: Python<'_>) -> Self {
        Self {
            tokens: self.tokens.clone_ref(py),
            extras: self.extras.clone_ref(py),
            names: self.names.as_ref().map(|n| n.clone_ref(py)),
        }
    }
}

#[pymethods]
impl TransferPlanner {
    #[new]
    #[pyo3(signature = (block_size, engine_block, world, unconfirmed_steps, *, transfer = None))]
    fn new(
        py: Python<'_>,
        block_size: usize,
        engine_block: usize,
        world: usize,
        unconfirmed_steps: u64,
        transfer: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        if block_size == 0 || engine_block == 0 {
            return Err(invalid_input(py, "block_size and engine_block must be positive numbers of tokens"));
        }
        guarded(py, || {
            Ok(Self {
                inner: Mutex::new(core::TransferPlanner::new(block_size, engine_block, world, unconfirmed_steps)),
                block_size,
                transfer,
                keys: Mutex::new(HashMap::new()),
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

    /// The request is done: everything kept for it goes. True when a save was planned for it
    /// (vLLM must hold its blocks until the workers report it finished).
    fn finished(&self, py: Python<'_>, req_id: &str) -> PyResult<bool> {
        guarded(py, || {
            self.keys.lock().remove(req_id);
            Ok(self.inner.lock().finished(req_id))
        })
    }

    /// Keeps `req_id`'s key until it is finished (the first key given wins); returns `(tokens,
    /// extras)` as kept.
    #[pyo3(signature = (req_id, tokens, extras, names = None))]
    fn track<'py>(
        &self,
        py: Python<'py>,
        req_id: String,
        tokens: Bound<'py, PyList>,
        extras: Bound<'py, PyDict>,
        names: Option<Bound<'py, PyList>>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
        let key = Key { tokens: tokens.unbind(), extras: extras.unbind(), names: names.map(Bound::unbind) };
        let kept = self.keys.lock().entry(req_id).or_insert(key).clone_ref(py);
        Ok((kept.tokens.into_bound(py), kept.extras.into_bound(py)))
    }

    /// `(tokens, extras)` of a tracked request, else None.
    fn key<'py>(&self, py: Python<'py>, req_id: &str) -> Option<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
        let key = self.keys.lock().get(req_id).map(|k| k.clone_ref(py))?;
        Some((key.tokens.into_bound(py), key.extras.into_bound(py)))
    }

    /// Plans the step vLLM scheduled (its `SchedulerOutput`) for the tracked requests, appending
    /// their transfers to `loads` and `saves`.
    fn schedule(
        &self,
        py: Python<'_>,
        output: &Bound<'_, PyAny>,
        loads: &Bound<'_, PyList>,
        saves: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        let scheduled = output.getattr("num_scheduled_tokens")?;
        let computed_after = |req_id: &str, computed: usize| -> PyResult<usize> {
            Ok(computed + scheduled.call_method1("get", (req_id, 0))?.extract::<usize>()?)
        };
        for new in output.getattr("scheduled_new_reqs")?.try_iter()? {
            let new = new?;
            let req_id: String = new.getattr("req_id")?.extract()?;
            let Some(key) = self.keys.lock().get(&req_id).map(|k| k.clone_ref(py)) else {
                continue; // never looked up, or not cacheable: its key is unknown, not saved
            };
            let computed = computed_after(&req_id, new.getattr("num_computed_tokens")?.extract()?)?;
            let ids = new.getattr("block_ids")?;
            let ids: Vec<BlockId> = if ids.is_truthy()? { ids.get_item(0)?.extract()? } else { Vec::new() };
            let num_tokens = key.tokens.bind(py).len();
            let planned = self.inner.lock().schedule_new(&req_id, num_tokens, ids, computed);
            self.add(py, &key, planned, loads, saves)?;
        }
        let cached = output.getattr("scheduled_cached_reqs")?;
        let req_ids: Vec<String> = cached.getattr("req_ids")?.extract()?;
        let new_block_ids = cached.getattr("new_block_ids")?;
        let computed: Vec<usize> = cached.getattr("num_computed_tokens")?.extract()?;
        let resumed = cached.getattr("resumed_req_ids")?;
        for (i, req_id) in req_ids.iter().enumerate() {
            let Some(key) = self.keys.lock().get(req_id).map(|k| k.clone_ref(py)) else {
                continue; // not tracked: nothing is planned for it
            };
            let new_ids = new_block_ids.get_item(i)?;
            let new_ids: Option<Vec<BlockId>> =
                if new_ids.is_truthy()? { Some(new_ids.get_item(0)?.extract()?) } else { None };
            // A resumed request's new blocks replace its old ones.
            let resumed = resumed.contains(req_id)?;
            let done = computed_after(req_id, computed.get(i).copied().unwrap_or(0))?;
            let planned = self.inner.lock().schedule_cached(req_id, new_ids, resumed, done);
            self.add(py, &key, planned, loads, saves)?;
        }
        Ok(())
    }
}

impl TransferPlanner {
    /// The planner's load and save of one request as transfers, with its key up to the planned
    /// end (and vLLM's names of the blocks they cover).
    fn add(
        &self,
        py: Python<'_>,
        key: &Key,
        planned: Planned,
        loads: &Bound<'_, PyList>,
        saves: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        if let Some(l) = planned.load {
            let named = l.tokens / self.block_size;
            let kwargs = PyDict::new(py);
            kwargs.set_item("first_block", l.first_block)?;
            loads.append(self.transfer(py, key, l.req_id, l.tokens, l.block_ids, named, kwargs)?)?;
        }
        if let Some(s) = planned.save {
            let named = s.block_ids.len();
            let kwargs = PyDict::new(py);
            kwargs.set_item("if_loads_ok", s.if_loads_ok)?;
            saves.append(self.transfer(py, key, s.req_id, s.tokens, s.block_ids, named, kwargs)?)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer<'py>(
        &self,
        py: Python<'py>,
        key: &Key,
        req_id: String,
        end: usize,
        ids: Vec<BlockId>,
        named: usize,
        kwargs: Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(transfer) = &self.transfer else {
            return Err(invalid_input(py, "TransferPlanner.schedule needs a planner built with transfer="));
        };
        let tokens = key.tokens.bind(py).get_slice(0, end);
        let names = match &key.names {
            Some(n) => n.bind(py).get_slice(0, named).into_any(),
            None => py.None().into_bound(py),
        };
        transfer.bind(py).call((req_id, tokens, ids, key.extras.bind(py), names), Some(&kwargs))
    }
}
