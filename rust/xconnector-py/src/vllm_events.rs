//! `xconnector._native.VllmBlockNames` and `VllmRankAgreement`: thin wrappers of
//! `xconnector_core::vllm_events`, for `xconnector.integrations.vllm.kv_events`: plain tuples,
//! or vLLM's event objects made with the classes it passes in.

use parking_lot::Mutex;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use xconnector_core::block_journal::{BlockChange, Medium};
use xconnector_core::vllm_events::{self as core, Name, VllmEvent};

use crate::call::{detached, guarded};
use crate::errors::invalid_input;
use crate::{buffers, engine};

/// An engine change as `Engine.take_block_events` returns it.
type Change = (String, String, Option<u64>, Vec<u64>, Vec<u32>, Option<String>, Option<String>);

/// A block name from Python: an int of 64 bits or bytes.
fn name(obj: &Bound<'_, PyAny>) -> PyResult<Name> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Name::Bytes(b.as_bytes().into()));
    }
    obj.extract::<u64>().map(Name::Int).map_err(|_| {
        PyTypeError::new_err(format!(
            "a block name is an int of 64 bits or bytes, got {}",
            obj.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        ))
    })
}

fn names(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Name>> {
    obj.try_iter()?.map(|item| name(&item?)).collect()
}

fn name_to_py<'py>(py: Python<'py>, n: &Name) -> PyResult<Bound<'py, PyAny>> {
    Ok(match n {
        Name::Int(i) => i.into_pyobject(py)?.into_any(),
        Name::Bytes(b) => PyBytes::new(py, b).into_any(),
    })
}

fn names_to_py<'py>(py: Python<'py>, ns: &[Name]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, ns.iter().map(|n| name_to_py(py, n)).collect::<PyResult<Vec<_>>>()?)
}

fn medium(py: Python<'_>, s: &str) -> PyResult<Medium> {
    match s {
        "memory" => Ok(Medium::Memory),
        "disk" => Ok(Medium::Disk),
        _ => Err(invalid_input(py, format!("unknown medium {s:?}; use memory or disk"))),
    }
}

fn change(py: Python<'_>, c: Change) -> PyResult<BlockChange> {
    let (kind, m, parent, hashes, tokens, lora_name, cache_salt) = c;
    let medium = medium(py, &m)?;
    match kind.as_str() {
        "stored" => Ok(BlockChange::Stored { medium, parent, hashes, tokens, lora_name, cache_salt }),
        "removed" => Ok(BlockChange::Removed { medium, hashes }),
        _ => Err(invalid_input(py, format!("unknown block change {kind:?}; use stored or removed"))),
    }
}

/// `(kind, medium, names, parent, tokens, lora_name, extra_keys)`, with vLLM's medium; a removal
/// has no parent, tokens, LoRA name or extra keys.
fn event_to_py<'py>(py: Python<'py>, e: &VllmEvent) -> PyResult<Bound<'py, PyTuple>> {
    let none = || py.None().into_bound(py);
    let (kind, medium, names, rest) = match e {
        VllmEvent::Removed { names, medium } => {
            ("removed", medium, names, [none(), PyList::empty(py).into_any(), none(), none()])
        }
        VllmEvent::Stored { names, parent, tokens, medium, lora_name, extra_keys } => {
            let parent = parent.as_ref().map_or_else(|| Ok(none()), |p| name_to_py(py, p))?;
            let keys = match extra_keys {
                None => none(),
                Some(keys) => {
                    let keys = keys
                        .iter()
                        .map(|k| k.as_ref().map_or_else(|| Ok(none()), |k| PyTuple::new(py, k).map(Bound::into_any)))
                        .collect::<PyResult<Vec<_>>>()?;
                    PyList::new(py, keys)?.into_any()
                }
            };
            let tokens = PyList::new(py, tokens)?.into_any();
            ("stored", medium, names, [parent, tokens, lora_name.into_pyobject(py)?.into_any(), keys])
        }
    };
    let head =
        [kind.into_pyobject(py)?.into_any(), medium.into_pyobject(py)?.into_any(), names_to_py(py, names)?.into_any()];
    PyTuple::new(py, head.into_iter().chain(rest).collect::<Vec<_>>())
}

/// vLLM's names for XConnector's blocks: learnt from the transfers that store or load them, kept
/// for a reported block until its removal (`xconnector_core::vllm_events::BlockNames`).
#[pyclass(module = "xconnector._native", frozen)]
pub struct VllmBlockNames {
    inner: Mutex<core::BlockNames>,
}

#[pymethods]
impl VllmBlockNames {
    #[new]
    /// At most `capacity` blocks' learnt names are kept (None: `vllm_events::MAX_NAMES`).
    #[pyo3(signature = (capacity = None))]
    fn new(py: Python<'_>, capacity: Option<usize>) -> PyResult<Self> {
        guarded(py, || Ok(Self { inner: Mutex::new(core::BlockNames::new(capacity.unwrap_or(core::MAX_NAMES))) }))
    }

    /// Learns vLLM's `names` for the blocks of `engine_block` tokens of `tokens`.
    #[pyo3(signature = (engine_block, block_size, tokens, names, *, lora_name = None, cache_salt = None))]
    #[allow(clippy::too_many_arguments)]
    fn learn(
        &self,
        py: Python<'_>,
        engine_block: usize,
        block_size: usize,
        tokens: &Bound<'_, PyAny>,
        names: &Bound<'_, PyAny>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
    ) -> PyResult<()> {
        let (toks, names) = guarded(py, || Ok((buffers::tokens(tokens)?, self::names(names)?)))?;
        detached(py, || {
            let extras = engine::extras(&lora_name, &cache_salt, &None);
            self.inner.lock().learn(engine_block, block_size, &toks, &names, extras)
        })
    }

    /// The names block `h` of `k` vLLM blocks goes by (in `medium`, if reported stored there).
    #[pyo3(signature = (h, k, medium = None))]
    fn of<'py>(&self, py: Python<'py>, h: u64, k: usize, medium: Option<&str>) -> PyResult<Bound<'py, PyList>> {
        guarded(py, || {
            let m = medium.map(|m| self::medium(py, m)).transpose()?;
            let ns = self.inner.lock().of(h, k, m);
            names_to_py(py, &ns)
        })
    }

    /// vLLM's events for the engine's changes, as `(kind, medium, names, parent, tokens,
    /// lora_name, extra_keys)`; `block_size` is vLLM's, `engine_block` XConnector's.
    fn events<'py>(
        &self,
        py: Python<'py>,
        changes: Vec<Change>,
        block_size: usize,
        engine_block: usize,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let changes = guarded(py, || changes.into_iter().map(|c| change(py, c)).collect::<PyResult<Vec<_>>>())?;
        let events = detached(py, || self.inner.lock().events(&changes, block_size, engine_block))?;
        guarded(py, || events.iter().map(|e| event_to_py(py, e)).collect())
    }

    /// `events` as vLLM's objects, made by its classes `stored` (`BlockStored`) and `removed`
    /// (`BlockRemoved`).
    fn vllm_events<'py>(
        &self,
        py: Python<'py>,
        changes: Vec<Change>,
        block_size: usize,
        engine_block: usize,
        stored: &Bound<'py, PyAny>,
        removed: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let events = self.events(py, changes, block_size, engine_block)?;
        events
            .iter()
            .map(|e| {
                let (kind, medium, names): (String, Bound<'py, PyAny>, Bound<'py, PyAny>) =
                    (e.get_item(0)?.extract()?, e.get_item(1)?, e.get_item(2)?);
                let kwargs = PyDict::new(py);
                kwargs.set_item("block_hashes", names)?;
                kwargs.set_item("medium", medium)?;
                if kind == "removed" {
                    return removed.call((), Some(&kwargs));
                }
                kwargs.set_item("parent_block_hash", e.get_item(3)?)?;
                kwargs.set_item("token_ids", e.get_item(4)?)?;
                kwargs.set_item("block_size", block_size)?;
                kwargs.set_item("lora_id", py.None())?;
                kwargs.set_item("lora_name", e.get_item(5)?)?;
                kwargs.set_item("extra_keys", e.get_item(6)?)?;
                stored.call((), Some(&kwargs))
            })
            .collect()
    }
}

/// What the router should be told given every rank's events: a block is announced once all
/// `world` ranks hold it, removed once the first drops it
/// (`xconnector_core::vllm_events::RankAgreement`).
#[pyclass(module = "xconnector._native", frozen)]
pub struct VllmRankAgreement {
    inner: Mutex<core::RankAgreement>,
}

#[pymethods]
impl VllmRankAgreement {
    #[new]
    fn new(py: Python<'_>, world: usize) -> PyResult<Self> {
        guarded(py, || Ok(Self { inner: Mutex::new(core::RankAgreement::new(world)) }))
    }

    #[getter]
    fn world(&self, py: Python<'_>) -> PyResult<usize> {
        guarded(py, || Ok(self.inner.lock().world()))
    }

    /// `rank` stored `names` in `medium`: the `(start, end)` runs of `names` to announce.
    fn stored(
        &self,
        py: Python<'_>,
        rank: usize,
        medium: Option<&str>,
        names: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<(usize, usize)>> {
        guarded(py, || {
            let ns = self::names(names)?;
            Ok(self.inner.lock().stored(rank, medium, &ns).into_iter().map(|r| (r.start, r.end)).collect())
        })
    }

    /// `rank` removed `names` from `medium`: those of them to announce removed.
    fn removed<'py>(
        &self,
        py: Python<'py>,
        rank: usize,
        medium: Option<&str>,
        names: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        guarded(py, || {
            let items = names.try_iter()?.collect::<PyResult<Vec<_>>>()?;
            let ns = items.iter().map(name).collect::<PyResult<Vec<_>>>()?;
            let gone = self.inner.lock().removed(rank, medium, &ns);
            Ok(gone.into_iter().map(|i| items[i].clone()).collect())
        })
    }

    /// What the router should be told of every rank's events (`batches[rank]`: vLLM's
    /// `BlockStored` and `BlockRemoved`, its classes `stored` and `removed`): each stored run
    /// announced by the last rank to hold it, linked to the block before it; each removal by
    /// the first rank to drop it; once each.
    fn merge<'py>(
        &self,
        py: Python<'py>,
        batches: Vec<Vec<Bound<'py, PyAny>>>,
        stored: &Bound<'py, PyAny>,
        removed: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let mut out = Vec::new();
        for (rank, batch) in batches.iter().enumerate() {
            for e in batch {
                let medium: Option<String> = e.getattr("medium")?.extract()?;
                let names = e.getattr("block_hashes")?;
                if e.is_instance(stored)? {
                    for (a, b) in self.stored(py, rank, medium.as_deref(), &names)? {
                        out.push(stored_part(e, a, b, stored)?);
                    }
                } else if e.is_instance(removed)? {
                    let gone = self.removed(py, rank, medium.as_deref(), &names)?;
                    if !gone.is_empty() {
                        let kwargs = PyDict::new(py);
                        kwargs.set_item("block_hashes", gone)?;
                        kwargs.set_item("medium", medium)?;
                        out.push(removed.call((), Some(&kwargs))?);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Blocks `a..b` of the `BlockStored` `e`, linked to the block before them.
fn stored_part<'py>(
    e: &Bound<'py, PyAny>,
    a: usize,
    b: usize,
    stored: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = e.py();
    let bs: usize = e.getattr("block_size")?.extract()?;
    let names = e.getattr("block_hashes")?;
    let keys = e.getattr("extra_keys")?;
    let parent = if a == 0 { e.getattr("parent_block_hash")? } else { names.get_item(a - 1)? };
    let slice = |obj: &Bound<'py, PyAny>, from: usize, to: usize| {
        obj.get_item(pyo3::types::PySlice::new(py, from as isize, to as isize, 1))
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("block_hashes", slice(&names, a, b)?)?;
    kwargs.set_item("parent_block_hash", parent)?;
    kwargs.set_item("token_ids", slice(&e.getattr("token_ids")?, a * bs, b * bs)?)?;
    kwargs.set_item("block_size", bs)?;
    kwargs.set_item("lora_id", e.getattr("lora_id")?)?;
    kwargs.set_item("medium", e.getattr("medium")?)?;
    kwargs.set_item("lora_name", e.getattr("lora_name")?)?;
    // vLLM's extra keys: None (or empty) stays as it is, a list is cut like the blocks.
    kwargs.set_item("extra_keys", if keys.is_truthy()? { slice(&keys, a, b)? } else { keys })?;
    stored.call((), Some(&kwargs))
}
