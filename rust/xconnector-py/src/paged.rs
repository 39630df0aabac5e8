//! `xconnector._native.PagedKv`: a model's paged KV tensors (torch CPU tensors or numpy arrays,
//! one per layer) packed to and unpacked from per-block payloads, and stored into / loaded from
//! an `Engine` with a single copy. The copying is `xconnector_core::kv_layout`.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use xconnector_core::bulk_copy::BulkCopy;
use xconnector_core::engine_blocks::EngineBlocks as CoreEngineBlocks;
use xconnector_core::kv_layout::{self, KvLayout, PagedKv as CorePagedKv, StridedTensor};
use xconnector_core::{Engine as CoreEngine, HashExtras};

use crate::buffers::ByteRegion;
use crate::call::{detached, guarded};
use crate::engine::{extras, Engine};
use crate::errors::invalid_input;
use crate::kv_namespace::parse_layout;

/// One layer's address, shape and strides. Torch tensors must be on the CPU (CUDA caches are
/// staged through pinned memory by the Python adapter); numpy arrays must be writable.
fn describe(py: Python<'_>, obj: &Bound<'_, PyAny>, layer: usize) -> PyResult<StridedTensor> {
    if obj.hasattr("data_ptr")? && obj.hasattr("stride")? {
        let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" {
            return Err(invalid_input(
                py,
                format!(
                    "layer {layer}: the tensor is on {device}; the native copy reads host memory, \
                     so pass CPU tensors (the vllm adapter stages device tensors through pinned memory)"
                ),
            ));
        }
        let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
        let strides: Vec<isize> = obj.call_method0("stride")?.extract()?;
        return Ok(StridedTensor {
            addr: obj.call_method0("data_ptr")?.extract()?,
            shape,
            strides,
            elem_size: obj.call_method0("element_size")?.extract()?,
        });
    }
    let Ok(ai) = obj.getattr("__array_interface__") else {
        return Err(invalid_input(
            py,
            format!("layer {layer}: expected a torch tensor or a numpy array, got {}", obj.get_type().name()?),
        ));
    };
    let (addr, readonly): (usize, bool) = ai.get_item("data")?.extract()?;
    if readonly {
        return Err(invalid_input(py, format!("layer {layer}: the array is read-only; KV caches must be writable")));
    }
    let shape: Vec<usize> = ai.get_item("shape")?.extract()?;
    let typestr: String = ai.get_item("typestr")?.extract()?;
    let elem_size: usize = typestr.get(2..).and_then(|s| s.parse().ok()).unwrap_or(0);
    if elem_size == 0 {
        return Err(invalid_input(py, format!("layer {layer}: unsupported element type {typestr:?}")));
    }
    let strides: Vec<isize> = match ai.get_item("strides")?.extract::<Option<Vec<isize>>>()? {
        Some(bytes) => {
            if bytes.iter().any(|s| s % elem_size as isize != 0) {
                return Err(invalid_input(py, format!("layer {layer}: strides {bytes:?} are not whole elements")));
            }
            bytes.iter().map(|s| s / elem_size as isize).collect()
        }
        None => {
            let mut s = vec![1isize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                s[d] = s[d + 1] * shape[d + 1] as isize;
            }
            s
        }
    };
    Ok(StridedTensor { addr, shape, strides, elem_size })
}

fn block_ids(py: Python<'_>, ids: Vec<i64>) -> PyResult<Vec<u32>> {
    ids.iter()
        .map(|&b| u32::try_from(b).map_err(|_| invalid_input(py, format!("block id {b} is not a valid block index"))))
        .collect()
}

/// A model's paged KV caches, one tensor per layer, all in one layout.
#[pyclass(module = "xconnector._native", frozen)]
pub struct PagedKv {
    inner: CorePagedKv,
    /// Keeps the tensors (and so the memory `inner` points into) alive.
    tensors: Vec<Py<PyAny>>,
}

#[pymethods]
impl PagedKv {
    #[new]
    #[pyo3(signature = (tensors, block_size, *, layout = None, num_blocks = None))]
    fn new(
        py: Python<'_>,
        tensors: Vec<Bound<'_, PyAny>>,
        block_size: usize,
        layout: Option<&str>,
        num_blocks: Option<usize>,
    ) -> PyResult<Self> {
        let layout = layout.map(|name| parse_layout(py, name)).transpose()?;
        let descs: Vec<StridedTensor> =
            guarded(py, || tensors.iter().enumerate().map(|(i, t)| describe(py, t, i)).collect())?;
        // SAFETY: each description comes from a live tensor/array that `tensors` keeps alive for
        // as long as this object exists; torch and numpy guarantee the described elements lie in
        // their storage. Concurrent writers to the same blocks are the caller's to avoid, as
        // with any in-place tensor operation.
        let inner = detached(py, || unsafe { CorePagedKv::new(&descs, block_size, layout, num_blocks) })?;
        Ok(Self { inner, tensors: tensors.into_iter().map(Bound::unbind).collect() })
    }

    #[getter]
    fn layout(&self) -> &'static str {
        self.inner.layout().name()
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    /// Bytes of one block's payload: all layers.
    #[getter]
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// The payloads of blocks `block_ids`, back to back: into `out` (a writable buffer), or as
    /// new `bytes`.
    #[pyo3(signature = (block_ids, out = None))]
    fn pack<'py>(
        &self,
        py: Python<'py>,
        block_ids: Vec<i64>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let ids = block_ids_checked(py, &self.inner, block_ids)?;
        match out {
            Some(out) => {
                let mut region = guarded(py, || ByteRegion::get(out, "out"))?;
                let dst = region.as_mut_slice(py, "out")?;
                detached(py, || self.inner.pack(&ids, dst))?;
                Ok(None)
            }
            None => {
                let mut buf = vec![0u8; ids.len() * self.inner.block_bytes()];
                detached(py, || self.inner.pack(&ids, &mut buf))?;
                Ok(Some(PyBytes::new(py, &buf)))
            }
        }
    }

    /// Writes back-to-back payloads (as made by `pack`) into blocks `block_ids`.
    fn unpack(&self, py: Python<'_>, block_ids: Vec<i64>, payload: &Bound<'_, PyAny>) -> PyResult<()> {
        let ids = block_ids_checked(py, &self.inner, block_ids)?;
        let region = guarded(py, || ByteRegion::get(payload, "payload"))?;
        let src = region.as_slice();
        detached(py, || self.inner.unpack(&ids, src))
    }

    /// Stores the request's full blocks straight from the KV tensors: the i-th KV block of
    /// `tokens` is cache block `block_ids[i]`. An engine block may span several KV blocks (LMCache's
    /// `chunk_size`). Only blocks not cached yet are copied. Returns engine blocks stored.
    #[pyo3(signature = (engine, tokens, block_ids, *, lora_name = None, cache_salt = None, lora_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        py: Python<'_>,
        engine: &Engine,
        tokens: &Bound<'_, PyAny>,
        block_ids: Vec<i64>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || crate::buffers::tokens(tokens))?;
        let ids = self.block_ids(py, block_ids)?;
        detached(py, || self.store_blocks(&engine.inner, &toks, &ids, extras(&lora_name, &cache_salt, &lora_id)))
    }

    /// Loads the longest cached prefix of `tokens` (as many engine blocks as `block_ids` covers)
    /// straight into cache blocks `block_ids`. KV blocks before `first_block` are not written
    /// (the engine already holds them on the device). Returns the number of tokens loaded.
    #[pyo3(signature = (engine, tokens, block_ids, *, first_block = 0, lora_name = None, cache_salt = None, lora_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        engine: &Engine,
        tokens: &Bound<'_, PyAny>,
        block_ids: Vec<i64>,
        first_block: usize,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || crate::buffers::tokens(tokens))?;
        let ids = block_ids_checked(py, &self.inner, block_ids)?;
        let kv = &self.inner;
        detached(py, || {
            let geometry = self.engine_blocks(&engine.inner)?;
            let n = geometry.load_engine_blocks(ids.len());
            let copy = BulkCopy::for_transfer(ids.len() * kv.block_bytes());
            engine.inner.load_with(&toks, extras(&lora_name, &cache_salt, &lora_id), n, |i, bytes| {
                for (pos, range) in geometry.parts(i, first_block) {
                    kv.unpack_block(ids[pos], &bytes[range], copy);
                }
            })
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "PagedKv(layout={:?}, layers={}, num_blocks={}, block_size={}, block_bytes={})",
            self.inner.layout().name(),
            self.inner.num_layers(),
            self.inner.num_blocks(),
            self.inner.block_size(),
            self.inner.block_bytes()
        )
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for t in &self.tensors {
            visit.call(t)?;
        }
        Ok(())
    }
}

impl PagedKv {
    /// The core's view of the tensors (valid while this object lives).
    pub(crate) fn core(&self) -> &CorePagedKv {
        &self.inner
    }

    fn engine_blocks(&self, engine: &CoreEngine) -> xconnector_core::Result<CoreEngineBlocks> {
        let cfg = engine.config();
        CoreEngineBlocks::new(self.inner.block_size(), self.inner.block_bytes(), cfg.block_size, cfg.block_bytes)
    }

    /// `block_ids` as this cache's block indices (an error names any out of range).
    pub(crate) fn block_ids(&self, py: Python<'_>, block_ids: Vec<i64>) -> PyResult<Vec<u32>> {
        block_ids_checked(py, &self.inner, block_ids)
    }

    /// `store`'s work, without the GIL: the full engine blocks of `toks` from KV blocks `ids`.
    pub(crate) fn store_blocks(
        &self,
        engine: &CoreEngine,
        toks: &[u32],
        ids: &[u32],
        extras: HashExtras<'_>,
    ) -> xconnector_core::Result<usize> {
        let geometry = self.engine_blocks(engine)?;
        geometry.store_kv_blocks(toks.len(), ids.len())?;
        let full = geometry.full_engine_blocks(toks.len()) * geometry.engine_block_size();
        let copy = BulkCopy::for_transfer(ids.len() * self.inner.block_bytes());
        let out = engine.store_with(&toks[..full], extras, |i, slot| {
            for (pos, bytes) in geometry.parts(i, 0) {
                self.inner.pack_block(ids[pos], &mut slot[bytes], copy);
            }
        })?;
        Ok(out.stored + out.spilled)
    }
}

fn block_ids_checked(py: Python<'_>, kv: &CorePagedKv, ids: Vec<i64>) -> PyResult<Vec<u32>> {
    let ids = block_ids(py, ids)?;
    kv.check_blocks(&ids).map_err(|e| crate::errors::core_to_py(py, e))?;
    Ok(ids)
}

/// Block ids of a request's full blocks from its per-token slot mapping (vLLM v0).
#[pyfunction]
pub fn block_ids_from_slots(py: Python<'_>, slots: Vec<i64>, block_size: usize) -> PyResult<Vec<u32>> {
    if block_size == 0 {
        return Err(invalid_input(py, "block_size must be positive"));
    }
    detached(py, || kv_layout::block_ids_from_slots(&slots, block_size))
}

/// The KV layout (`flash_attn`, `flashinfer`, `standard`, `mla`) a tensor of this shape has.
#[pyfunction]
#[pyo3(signature = (shape, block_size, num_blocks = None))]
pub fn detect_kv_layout(
    py: Python<'_>,
    shape: Vec<usize>,
    block_size: usize,
    num_blocks: Option<usize>,
) -> PyResult<&'static str> {
    KvLayout::detect(&shape, block_size, num_blocks).map(KvLayout::name).map_err(|e| crate::errors::core_to_py(py, e))
}

/// Which dimension of a `layout` KV tensor indexes blocks.
#[pyfunction]
pub fn kv_block_dim(py: Python<'_>, layout: &str) -> PyResult<usize> {
    parse_layout(py, layout).map(KvLayout::block_dim)
}

/// How KV blocks of `kv_block_size` tokens / `kv_block_bytes` bytes compose an engine's blocks
/// (`xconnector_core::engine_blocks`), for the adapter's device-staged store and load.
#[pyclass(module = "xconnector._native", frozen)]
pub struct EngineBlocks {
    inner: CoreEngineBlocks,
}

#[pymethods]
impl EngineBlocks {
    #[new]
    fn new(
        py: Python<'_>,
        kv_block_size: usize,
        kv_block_bytes: usize,
        engine_block_size: usize,
        engine_block_bytes: usize,
    ) -> PyResult<Self> {
        let inner = detached(py, || {
            CoreEngineBlocks::new(kv_block_size, kv_block_bytes, engine_block_size, engine_block_bytes)
        })?;
        Ok(Self { inner })
    }

    /// KV blocks per engine block.
    #[getter]
    fn per(&self, py: Python<'_>) -> PyResult<usize> {
        guarded(py, || Ok(self.inner.per()))
    }

    /// Full engine blocks in `n_tokens` tokens.
    fn full_engine_blocks(&self, py: Python<'_>, n_tokens: usize) -> PyResult<usize> {
        guarded(py, || Ok(self.inner.full_engine_blocks(n_tokens)))
    }

    /// KV block ids a store of `n_tokens` tokens reads out of `n_ids` given.
    fn store_kv_blocks(&self, py: Python<'_>, n_tokens: usize, n_ids: usize) -> PyResult<usize> {
        detached(py, || self.inner.store_kv_blocks(n_tokens, n_ids))
    }

    /// Engine blocks a load into `n_ids` KV blocks may fill.
    fn load_engine_blocks(&self, py: Python<'_>, n_ids: usize) -> PyResult<usize> {
        guarded(py, || Ok(self.inner.load_engine_blocks(n_ids)))
    }

    /// `(start, stop)`: positions in the block ids a load of `loaded_tokens` tokens writes.
    fn loaded_kv_blocks(&self, py: Python<'_>, loaded_tokens: usize, first_block: usize) -> PyResult<(usize, usize)> {
        guarded(py, || {
            let r = self.inner.loaded_kv_blocks(loaded_tokens, first_block);
            Ok((r.start, r.end))
        })
    }
}
