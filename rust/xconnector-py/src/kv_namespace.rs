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
    namespace_dict(py, &worker)
}

/// The namespace of a vLLM v1 worker's blocks (as `kv_namespace`), read off its `VllmConfig` and
/// KV `tensors`: the model, revision, quantization and effective configuration (after
/// `--hf-overrides`, each top-level entry as Python's sorted JSON text), the cache dtype, block
/// size and parallel layout, and the tensors' dtype and shapes.
#[pyfunction]
#[pyo3(signature = (vllm_config, tensors, *, tp_rank, pp_rank, model_id = None))]
pub fn vllm_kv_namespace<'py>(
    py: Python<'py>,
    vllm_config: &Bound<'py, PyAny>,
    tensors: Vec<Bound<'py, PyAny>>,
    tp_rank: u32,
    pp_rank: u32,
    model_id: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let (model, cache) = (vllm_config.getattr("model_config")?, vllm_config.getattr("cache_config")?);
    let parallel = vllm_config.getattr("parallel_config")?;
    // `getattr(obj, name, None) or ""`, as text.
    let text = |obj: &Bound<'py, PyAny>, name: &str| -> PyResult<String> {
        let v = obj.getattr(name).ok().filter(|v| v.is_truthy().unwrap_or(false));
        v.map_or(Ok(String::new()), |v| Ok(v.str()?.to_string()))
    };
    let (tensor_dtype, layer_shapes) = tensors_kv(py, &tensors)?;
    let hf = ["hf_text_config", "hf_config"]
        .iter()
        .filter_map(|name| model.getattr(*name).ok().filter(|v| v.is_truthy().unwrap_or(false)))
        .next()
        .filter(|hf| hf.hasattr("to_dict").unwrap_or(false));
    let model_config = match hf {
        None => None,
        Some(hf) => {
            let dumps = py.import("json")?.getattr("dumps")?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("sort_keys", true)?;
            kwargs.set_item("default", py.import("builtins")?.getattr("str")?)?;
            let mut entries = Vec::new();
            for (k, v) in hf.call_method0("to_dict")?.cast_into::<PyDict>()?.iter() {
                entries.push((k.str()?.to_string(), dumps.call((v,), Some(&kwargs))?.extract()?));
            }
            let max_model_len = model.getattr("max_model_len").ok().and_then(|v| v.extract().ok());
            Some(ModelConfig { entries, max_model_len })
        }
    };
    let worker = WorkerKv {
        model: model.getattr("model")?.str()?.to_string(),
        model_id,
        revision: text(&model, "revision")?,
        quantization: text(&model, "quantization")?,
        cache_dtype: cache.getattr("cache_dtype").ok().and_then(|v| v.extract().ok()),
        tensor_dtype,
        layer_shapes,
        block_size: cache.getattr("block_size")?.extract()?,
        layout: None,
        tp_world_size: parallel.getattr("tensor_parallel_size")?.extract()?,
        tp_rank,
        pp_world_size: parallel.getattr("pipeline_parallel_size")?.extract()?,
        pp_rank,
        model_config,
    };
    namespace_dict(py, &worker)
}

/// The namespace of a vLLM v0 worker's blocks (as `kv_namespace`): the model named by its
/// executable's config (`_name_or_path`, `name_or_path`, else the executable's class), the KV
/// `tensors`' dtype and shapes, and what the worker's block mover and process report.
#[pyfunction]
#[pyo3(signature = (model_executable, tensors, *, block_size, layout, model_id = None, tp_world_size = 1, tp_rank = 0))]
#[allow(clippy::too_many_arguments)]
pub fn v0_kv_namespace<'py>(
    py: Python<'py>,
    model_executable: &Bound<'py, PyAny>,
    tensors: Vec<Bound<'py, PyAny>>,
    block_size: usize,
    layout: &str,
    model_id: Option<String>,
    tp_world_size: u32,
    tp_rank: u32,
) -> PyResult<Bound<'py, PyDict>> {
    let config = model_executable.getattr("config").ok();
    let named = ["_name_or_path", "name_or_path"]
        .iter()
        .filter_map(|k| config.as_ref()?.getattr(*k).ok().filter(|v| v.is_truthy().unwrap_or(false)))
        .next();
    let model = match named {
        Some(name) => name.str()?.to_string(),
        None => model_executable.get_type().qualname()?.to_string(),
    };
    let (tensor_dtype, layer_shapes) = tensors_kv(py, &tensors)?;
    let worker = WorkerKv {
        model,
        model_id,
        revision: String::new(),
        quantization: String::new(),
        cache_dtype: None,
        tensor_dtype,
        layer_shapes,
        block_size,
        layout: Some(parse_layout(py, layout)?),
        tp_world_size,
        tp_rank,
        pp_world_size: 1,
        pp_rank: 0,
        model_config: None,
    };
    namespace_dict(py, &worker)
}

/// The KV tensors' dtype (`torch.` dropped) and shapes.
fn tensors_kv(py: Python<'_>, tensors: &[Bound<'_, PyAny>]) -> PyResult<(String, Vec<Vec<usize>>)> {
    let first = tensors.first().ok_or_else(|| invalid_input(py, "no KV tensors"))?;
    let dtype = match first.getattr("dtype") {
        Ok(d) => d.str()?.to_string(),
        Err(_) => first.get_type().name()?.to_string(),
    };
    let shapes = tensors.iter().map(|t| t.getattr("shape")?.extract()).collect::<PyResult<_>>()?;
    Ok((dtype.strip_prefix("torch.").unwrap_or(&dtype).to_owned(), shapes))
}

fn namespace_dict<'py>(py: Python<'py>, worker: &WorkerKv) -> PyResult<Bound<'py, PyDict>> {
    let ns = detached(py, || derive(worker))?;
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
