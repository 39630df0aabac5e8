//! `v0_prefills` and `v0_skip`: the index arithmetic of a vLLM v0 batch, computed by
//! `xconnector_core::v0_batch` from the plain lists the Python adapter reads off `model_input`;
//! `v0_load` and `v0_store`: a batch's prefill requests served from and stored into an engine.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::kv_layout::block_ids_from_slots;
use xconnector_core::prefix::usable_prefix;
use xconnector_core::v0_batch::{self, Fields, Prefill, Skip};
use xconnector_core::HashExtras;

use crate::call::{detached, guarded};
use crate::engine::Engine;
use crate::errors::invalid_input;

/// One prefill request as the adapter found it (`PrefillRequest`): fresh ones only.
struct Request {
    index: usize,
    tokens: Vec<u32>,
    slots: Vec<i64>,
}

fn fresh(requests: &[Bound<'_, PyAny>]) -> PyResult<Vec<Request>> {
    let mut out = Vec::new();
    for r in requests {
        if r.getattr("fresh")?.extract()? {
            let (index, slots) = (r.getattr("index")?.extract()?, r.getattr("slots")?.extract()?);
            out.push(Request { index, tokens: crate::buffers::tokens(&r.getattr("tokens")?)?, slots });
        }
    }
    Ok(out)
}

/// Loads each fresh prefill request's usable cached prefix (never the block of its last token,
/// `xconnector_core::prefix`) into its KV slots through `io` (`load(engine, tokens, block_ids)`):
/// `{request index: tokens loaded}` for those that loaded any, and the fresh requests' tokens.
#[pyfunction]
pub fn v0_load(
    py: Python<'_>,
    io: &Bound<'_, PyAny>,
    engine: &Bound<'_, Engine>,
    requests: Vec<Bound<'_, PyAny>>,
) -> PyResult<(HashMap<usize, usize>, usize)> {
    let (core, kv_block) = (&engine.get().inner, io.getattr("block_size")?.extract()?);
    let requests = guarded(py, || fresh(&requests))?;
    let mut loaded = HashMap::new();
    for r in &requests {
        let hit = detached(py, || core.lookup(&r.tokens, HashExtras::default()))?;
        let usable = usable_prefix(hit, r.tokens.len(), core.config().block_size);
        if usable == 0 {
            continue;
        }
        let ids = detached(py, || block_ids_from_slots(&r.slots[..usable], kv_block))?;
        let n: usize = io.call_method1("load", (engine, &r.tokens[..usable], ids))?.extract()?;
        if n > 0 {
            loaded.insert(r.index, n);
        }
    }
    Ok((loaded, requests.iter().map(|r| r.tokens.len()).sum()))
}

/// Stores the full engine blocks of each fresh prefill request through `io` (`store(engine,
/// tokens, block_ids)`; blocks cached already are not copied again): `(blocks stored, requests
/// with a block to store)`.
#[pyfunction]
pub fn v0_store(
    py: Python<'_>,
    io: &Bound<'_, PyAny>,
    engine: &Bound<'_, Engine>,
    requests: Vec<Bound<'_, PyAny>>,
) -> PyResult<(usize, usize)> {
    let (ebs, kv_block) = (engine.get().inner.config().block_size, io.getattr("block_size")?.extract()?);
    let (mut stored, mut handled) = (0, 0);
    for r in guarded(py, || fresh(&requests))? {
        let full = r.tokens.len() / ebs * ebs; // a partial engine block is not stored
        if full > 0 {
            let ids = detached(py, || block_ids_from_slots(&r.slots[..full], kv_block))?;
            stored += io.call_method1("store", (engine, &r.tokens[..full], ids))?.extract::<usize>()?;
            handled += 1;
        }
    }
    Ok((stored, handled))
}

/// The batch's prefills as `(start, end, fresh)`, in order.
#[pyfunction]
#[pyo3(signature = (num_tokens, num_slots, seq_lens, *, num_prefills = None, query_start_loc = None,
    query_lens = None))]
pub fn v0_prefills(
    py: Python<'_>,
    num_tokens: usize,
    num_slots: usize,
    seq_lens: Vec<i64>,
    num_prefills: Option<usize>,
    query_start_loc: Option<Vec<i64>>,
    query_lens: Option<Vec<i64>>,
) -> PyResult<Vec<(usize, usize, bool)>> {
    detached(py, || {
        let qsl = query_start_loc.as_deref();
        let found = v0_batch::prefills(num_tokens, num_slots, &seq_lens, num_prefills, qsl, query_lens.as_deref())?;
        Ok(found.into_iter().map(|p| (p.start, p.end, p.fresh)).collect())
    })
}

/// The names of a v0 batch's index fields, as vLLM spells them.
const FIELDS: [&str; 9] = [
    "input_tokens",
    "input_positions",
    "slot_mapping",
    "query_start_loc",
    "selected_token_indices",
    "context_lens_tensor",
    "query_lens",
    "num_prefill_tokens",
    "max_query_len",
];

/// The batch's index `fields` (`{name: ints or int}`, those the batch has; `input_tokens`
/// always) without the first `skip` query tokens of each prefill `(start, end, skip)`, under
/// the same names; None when nothing is skipped.
#[pyfunction]
#[pyo3(signature = (prefills, *, num_seqs, fields))]
pub fn v0_skip<'py>(
    py: Python<'py>,
    prefills: Vec<(usize, usize, usize)>,
    num_seqs: usize,
    fields: &Bound<'py, PyDict>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let given = guarded(py, || {
        let known = |k: &Bound<'py, PyAny>| k.extract::<&str>().is_ok_and(|k| FIELDS.contains(&k));
        if let Some(key) = fields.keys().iter().find(|k| !known(k)) {
            return Err(invalid_input(py, format!("unknown v0 batch field {key}; known: {}", FIELDS.join(", "))));
        }
        let list =
            |name: &str| -> PyResult<Option<Vec<i64>>> { fields.get_item(name)?.map(|v| v.extract()).transpose() };
        let int = |name: &str| -> PyResult<Option<i64>> { fields.get_item(name)?.map(|v| v.extract()).transpose() };
        Ok(Fields {
            input_tokens: list("input_tokens")?,
            input_positions: list("input_positions")?,
            slot_mapping: list("slot_mapping")?,
            query_start_loc: list("query_start_loc")?,
            selected_token_indices: list("selected_token_indices")?,
            context_lens: list("context_lens_tensor")?,
            query_lens: list("query_lens")?,
            num_prefill_tokens: int("num_prefill_tokens")?,
            max_query_len: int("max_query_len")?,
        })
    })?;
    let Some(num_tokens) = given.input_tokens.as_ref().map(Vec::len) else {
        return Err(invalid_input(py, "the batch's fields lack input_tokens"));
    };
    let new = detached(py, || {
        let ranges: Vec<Prefill> =
            prefills.iter().map(|&(start, end, _)| Prefill { start, end, fresh: true }).collect();
        let counts: Vec<usize> = prefills.iter().map(|p| p.2).collect();
        let skip = Skip::new(num_tokens, &ranges, &counts)?;
        (skip.removed() > 0).then(|| skip.apply(given, num_seqs)).transpose()
    })?;
    let Some(new) = new else { return Ok(None) };
    let out = PyDict::new(py);
    let lists = [
        ("input_tokens", new.input_tokens),
        ("input_positions", new.input_positions),
        ("slot_mapping", new.slot_mapping),
        ("query_start_loc", new.query_start_loc),
        ("selected_token_indices", new.selected_token_indices),
        ("context_lens_tensor", new.context_lens),
        ("query_lens", new.query_lens),
    ];
    for (name, value) in lists {
        if let Some(value) = value {
            out.set_item(name, value)?;
        }
    }
    for (name, value) in [("num_prefill_tokens", new.num_prefill_tokens), ("max_query_len", new.max_query_len)] {
        if let Some(value) = value {
            out.set_item(name, value)?;
        }
    }
    Ok(Some(out))
}
