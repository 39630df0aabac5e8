//! `kv_namespace`, `lora_identity` and `key_tokens`: a worker's namespace, a LoRA adapter's
//! identity and a request's key tokens, derived by `xconnector_core::kv_namespace` from the plain values the Python adapter reads off
//! vLLM and torch.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::kv_layout::KvLayout;
use xconnector_core::kv_namespace::{derive, ModelConfig, WorkerKv};
use xconnector_core::mm_keys::{self, MmItem};

use crate::call::{detached, guarded};
use crate::errors::invalid_input;

/// The layout named `name`, or `InvalidInputError` listing the known ones.
pub fn parse_layout(py: Python<'_>, name: &str) -> PyResult<KvLayout> {
    KvLayout::parse(name).ok_or_else(|| {
        let known: Vec<&str> = KvLayout::ALL.iter().map(|l| l.name()).collect();
        invalid_input(py, format!("unknown KV layout {name:?}; known: {}", known.join(", ")))
    })
}

/// The namespace of a worker's KV blocks, as the keyword arguments of `Engine.from_config`
/// (without `kv_layout`, which comes from the block mover).
#[pyfunction]
#[pyo3(signature = (*, model, layer_shapes, block_size, tensor_dtype, model_id = None, revision = "",
    quantization = "", cache_dtype = None, layout = None, tp_world_size = 1, tp_rank = 0,
    pp_world_size = 1, pp_rank = 0, model_config = None, max_model_len = None))]
#[allow(clippy::too_many_arguments)]
pub fn kv_namespace<'py>(
    py: Python<'py>,
    model: String,
    layer_shapes: Vec<Vec<usize>>,
    block_size: usize,
    tensor_dtype: String,
    model_id: Option<String>,
    revision: &str,
    quantization: &str,
    cache_dtype: Option<String>,
    layout: Option<&str>,
    tp_world_size: u32,
    tp_rank: u32,
    pp_world_size: u32,
    pp_rank: u32,
    model_config: Option<Vec<(String, String)>>,
    max_model_len: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let layout = layout.map(|name| parse_layout(py, name)).transpose()?;
    let worker = WorkerKv {
        model,
        model_id,
        revision: revision.to_owned(),
        quantization: quantization.to_owned(),
        cache_dtype,
        tensor_dtype,
        layer_shapes,
        block_size,
        layout,
        tp_world_size,
        tp_rank,
        pp_world_size,
        pp_rank,
        model_config: model_config.map(|entries| ModelConfig { entries, max_model_len }),
    };
    let ns = detached(py, || derive(&worker))?;
    let out = PyDict::new(py);
    out.set_item("model", ns.model)?;
    out.set_item("revision", ns.revision)?;
    out.set_item("dtype", ns.dtype)?;
    out.set_item("quantization", ns.quantization)?;
    out.set_item("tp_world_size", ns.tp_world_size)?;
    out.set_item("tp_rank", ns.tp_rank)?;
    out.set_item("pp_world_size", ns.pp_world_size)?;
    out.set_item("pp_rank", ns.pp_rank)?;
    let extra = PyDict::new(py);
    for (k, v) in ns.extra {
        extra.set_item(k, v)?;
    }
    out.set_item("extra", extra)?;
    Ok(out)
}

/// A LoRA adapter's identity: the content of its files when `path` is a local directory, else
/// the path.
#[pyfunction]
pub fn lora_identity(py: Python<'_>, path: String) -> PyResult<String> {
    detached(py, || xconnector_core::kv_namespace::lora_identity(&path))
}

/// The token ids a request's blocks are keyed by: multimodal placeholder positions replaced by
/// ids of their item. `items` are `(identifier, offset, length)`.
#[pyfunction]
pub fn key_tokens(py: Python<'_>, tokens: &Bound<'_, PyAny>, items: Vec<(String, usize, usize)>) -> PyResult<Vec<u32>> {
    let toks = guarded(py, || crate::buffers::tokens(tokens))?;
    let items: Vec<MmItem> =
        items.into_iter().map(|(identifier, offset, length)| MmItem { identifier, offset, length }).collect();
    detached(py, || Ok(mm_keys::key_tokens(&toks, &items)))
}
