//! `xconnector._native.Engine` and `BlockView`: conversions and GIL handling only; the work is in
//! `xconnector_core::Engine`.

use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::block_journal::BlockChange;
use xconnector_core::config::EngineSettings;
use xconnector_core::redis_tier::{self, AuthKey};
use xconnector_core::{
    CoreError, DiskConfig, Engine as CoreEngine, EngineConfig, EventsConfig, HashExtras, Namespace, PinnedBlock,
    RedisConfig,
};

use crate::buffers::{self, ByteRegion};
use crate::call::{detached, guarded};
use crate::errors::internal;

/// A block change as Python sees it (see `Engine.take_block_events`).
type BlockEventTuple = (&'static str, &'static str, Option<u64>, Vec<u64>, Vec<u32>, Option<String>, Option<String>);

/// The native KV engine: block hashing, the memory tier and its eviction, for one namespace.
#[pyclass(module = "xconnector._native", frozen)]
pub struct Engine {
    pub(crate) inner: Arc<CoreEngine>,
}

pub(crate) fn extras<'a>(
    lora_name: &'a Option<String>,
    cache_salt: &'a Option<String>,
    lora_id: &'a Option<String>,
) -> HashExtras<'a> {
    HashExtras { lora_name: lora_name.as_deref(), cache_salt: cache_salt.as_deref(), lora_id: lora_id.as_deref() }
}

/// The namespace of an engine's KV; its block size is set from the engine's by the core.
#[allow(clippy::too_many_arguments)]
pub(crate) fn namespace(
    model: &str,
    revision: &str,
    dtype: &str,
    quantization: &str,
    kv_layout: &str,
    (tp_world_size, tp_rank): (u32, u32),
    (pp_world_size, pp_rank): (u32, u32),
    extra: Option<HashMap<String, String>>,
) -> Namespace {
    Namespace {
        model: model.to_owned(),
        revision: revision.to_owned(),
        dtype: dtype.to_owned(),
        quantization: quantization.to_owned(),
        kv_layout: kv_layout.to_owned(),
        block_size: 0,
        tp_world_size,
        tp_rank,
        pp_world_size,
        pp_rank,
        extra: extra.unwrap_or_default().into_iter().collect(),
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (*, block_bytes, capacity_bytes, block_size = 16, model = "",
        dtype = "", kv_layout = "", tp_world_size = 1, tp_rank = 0, extra = None,
        revision = "", quantization = "", pp_world_size = 1, pp_rank = 0,
        disk_path = None, disk_capacity_bytes = 0, disk_queue_blocks = 1024, disk_shared = false,
        redis_url = None, redis_key_prefix = "xconnector", redis_queue_blocks = 4096,
        redis_batch_blocks = 64, redis_timeout = 0.02, redis_ca_file = None, redis_auth_key = None, redis_ttl_s = None,
        events_url = None, events_subject = "xconnector.kv_events", worker_id = "", events_queue = 65536))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = args::block_bytes)] block_bytes: usize,
        #[pyo3(from_py_with = args::capacity_bytes)] capacity_bytes: u64,
        #[pyo3(from_py_with = args::block_size)] block_size: u32,
        model: &str,
        dtype: &str,
        kv_layout: &str,
        #[pyo3(from_py_with = args::tp_world_size)] tp_world_size: u32,
        #[pyo3(from_py_with = args::tp_rank)] tp_rank: u32,
        extra: Option<HashMap<String, String>>,
        revision: &str,
        quantization: &str,
        #[pyo3(from_py_with = args::pp_world_size)] pp_world_size: u32,
        #[pyo3(from_py_with = args::pp_rank)] pp_rank: u32,
        #[pyo3(from_py_with = args::disk_path)] disk_path: Option<PathBuf>,
        #[pyo3(from_py_with = args::disk_capacity_bytes)] disk_capacity_bytes: u64,
        #[pyo3(from_py_with = args::disk_queue_blocks)] disk_queue_blocks: usize,
        #[pyo3(from_py_with = args::disk_shared)] disk_shared: bool,
        #[pyo3(from_py_with = args::redis_url)] redis_url: Option<String>,
        redis_key_prefix: &str,
        #[pyo3(from_py_with = args::redis_queue_blocks)] redis_queue_blocks: usize,
        #[pyo3(from_py_with = args::redis_batch_blocks)] redis_batch_blocks: usize,
        #[pyo3(from_py_with = args::redis_timeout)] redis_timeout: f64,
        #[pyo3(from_py_with = args::redis_ca_file)] redis_ca_file: Option<PathBuf>,
        #[pyo3(from_py_with = args::redis_auth_key)] redis_auth_key: Option<String>,
        #[pyo3(from_py_with = args::redis_ttl_s)] redis_ttl_s: Option<u64>,
        #[pyo3(from_py_with = args::events_url)] events_url: Option<String>,
        events_subject: &str,
        worker_id: &str,
        #[pyo3(from_py_with = args::events_queue)] events_queue: usize,
    ) -> PyResult<Self> {
        let events = events_url.map(|url| EventsConfig {
            url,
            subject: events_subject.to_owned(),
            worker_id: if worker_id.is_empty() { format!("pid-{}", std::process::id()) } else { worker_id.to_owned() },
            queue_events: events_queue,
            batch_events: 256,
        });
        let timeout = detached(py, || redis_tier::timeout_from_secs(redis_timeout))?;
        // Only the key derived from the secret is kept; the secret is never formatted.
        if redis_auth_key.is_some() && redis_url.is_none() {
            return Err(crate::errors::config_error(
                py,
                "redis_auth_key is for the Redis tier: pass redis_url too, or leave redis_auth_key out",
            ));
        }
        let auth_key = match redis_auth_key {
            None => None,
            Some(secret) => Some(detached(py, || {
                AuthKey::from_secret(secret.as_bytes())
                    .map_err(|_| CoreError::config("redis_auth_key is empty; pass the shared secret, or None"))
            })?),
        };
        let redis = redis_url.map(|url| RedisConfig {
            url,
            key_prefix: redis_key_prefix.to_owned(),
            queue_blocks: redis_queue_blocks,
            batch_blocks: redis_batch_blocks,
            timeout,
            ttl: redis_ttl_s.map(std::time::Duration::from_secs),
            ca_file: redis_ca_file,
            auth_key,
        });
        let disk = disk_path.map(|dir| DiskConfig {
            dir,
            capacity_bytes: disk_capacity_bytes,
            queue_blocks: disk_queue_blocks,
            shared: disk_shared,
        });
        let namespace = namespace(
            model,
            revision,
            dtype,
            quantization,
            kv_layout,
            (tp_world_size, tp_rank),
            (pp_world_size, pp_rank),
            extra,
        );
        let cfg = EngineConfig {
            block_size: block_size as usize,
            block_bytes,
            capacity_bytes,
            namespace,
            disk,
            redis,
            events,
        };
        let inner = detached(py, || CoreEngine::new(cfg))?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The engine a worker's KV blocks (`kv_block_size` tokens, `kv_block_bytes` bytes each) get
    /// under a normalized `section`: its tiers, budgets and chunk size, decided by the core.
    #[staticmethod]
    #[pyo3(signature = (section, *, kv_block_size, kv_block_bytes, model = "", dtype = "", kv_layout = "",
        tp_world_size = 1, tp_rank = 0, extra = None, revision = "", quantization = "", pp_world_size = 1,
        pp_rank = 0))]
    #[allow(clippy::too_many_arguments)]
    fn from_config(
        py: Python<'_>,
        section: &Bound<'_, PyAny>,
        kv_block_size: u64,
        kv_block_bytes: u64,
        model: &str,
        dtype: &str,
        kv_layout: &str,
        #[pyo3(from_py_with = args::tp_world_size)] tp_world_size: u32,
        #[pyo3(from_py_with = args::tp_rank)] tp_rank: u32,
        extra: Option<HashMap<String, String>>,
        revision: &str,
        quantization: &str,
        #[pyo3(from_py_with = args::pp_world_size)] pp_world_size: u32,
        #[pyo3(from_py_with = args::pp_rank)] pp_rank: u32,
    ) -> PyResult<Self> {
        let settings = EngineSettings::from_config(&crate::config::sdk_config(py, section, "<section>")?);
        let namespace = namespace(
            model,
            revision,
            dtype,
            quantization,
            kv_layout,
            (tp_world_size, tp_rank),
            (pp_world_size, pp_rank),
            extra,
        );
        let env = |name: &str| std::env::var(name).ok();
        let inner = detached(py, || {
            CoreEngine::new(settings.engine_config(kv_block_size, kv_block_bytes, namespace, &env)?)
        })?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Number of leading tokens whose KV is cached (block-aligned). Does not touch the LRU order.
    #[pyo3(signature = (tokens, *, lora_name = None, cache_salt = None, lora_id = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || buffers::tokens(tokens))?;
        detached(py, || self.inner.lookup(&toks, extras(&lora_name, &cache_salt, &lora_id)))
    }

    /// Stores the KV of the full blocks of `tokens`; returns how many blocks were newly stored.
    /// With `first_block`, `payload` holds blocks `first_block..` only (a request moved in
    /// parts): the blocks before must be cached, else nothing of the part is stored.
    #[pyo3(signature = (tokens, payload, *, first_block = 0, lora_name = None, cache_salt = None, lora_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        payload: &Bound<'_, PyAny>,
        first_block: usize,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || buffers::tokens(tokens))?;
        let region = guarded(py, || ByteRegion::get(payload, "payload"))?;
        let bytes = region.as_slice();
        let keys = extras(&lora_name, &cache_salt, &lora_id);
        let out = detached(py, || self.inner.store_from(&toks, first_block, bytes, keys))?;
        Ok(out.stored + out.spilled)
    }

    /// Copies the longest cached prefix into `out` (blocks back to back, at most as many blocks
    /// as fit); returns the number of tokens loaded. With `first_block`, `out` gets blocks
    /// `first_block..` only (a request moved in parts); the count still starts at token 0.
    #[pyo3(signature = (tokens, out, *, first_block = 0, lora_name = None, cache_salt = None, lora_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        first_block: usize,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || buffers::tokens(tokens))?;
        let mut region = guarded(py, || ByteRegion::get(out, "out"))?;
        let dst = region.as_mut_slice(py, "out")?;
        if self.inner.overlaps_cache(dst.as_ptr() as usize, dst.len()) {
            return Err(crate::errors::invalid_input(
                py,
                "out overlaps the engine's cache (is it a view of a cached block?); loading into it would \
                 overwrite cached KV: pass a buffer of your own",
            ));
        }
        detached(py, || self.inner.load_from(&toks, first_block, dst, extras(&lora_name, &cache_salt, &lora_id)))
    }

    /// Zero-copy, read-only views of the longest cached prefix's blocks. Each view keeps its block
    /// from being evicted until it is released (or garbage-collected).
    #[pyo3(signature = (tokens, *, max_blocks = None, lora_name = None, cache_salt = None, lora_id = None))]
    fn views(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        max_blocks: Option<usize>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<Vec<BlockView>> {
        let toks = guarded(py, || buffers::tokens(tokens))?;
        let max = max_blocks.unwrap_or(usize::MAX);
        let pinned = detached(py, || self.inner.pin_prefix(&toks, extras(&lora_name, &cache_salt, &lora_id), max))?;
        Ok(pinned.into_iter().map(BlockView::new).collect())
    }

    /// Starts recording what host memory and the disk tier gain and lose, for the host's KV
    /// events (see `take_block_events`); at most `capacity` blocks wait between two takes (more
    /// are dropped, counted in `block_events_dropped`). Idempotent.
    #[pyo3(signature = (capacity = 65536))]
    fn enable_block_events(&self, py: Python<'_>, capacity: usize) -> PyResult<()> {
        if capacity == 0 {
            return Err(crate::errors::config_error(py, "enable_block_events: capacity must be at least 1 block"));
        }
        self.inner.enable_block_events(capacity);
        Ok(())
    }

    /// Block changes since the last call, in order: `("stored", medium, parent, hashes, tokens,
    /// lora_name, cache_salt)` or `("removed", medium, None, hashes, [], None, None)`; `medium`
    /// is "memory" or "disk", blocks are named by their sequence hash.
    fn take_block_events(&self, py: Python<'_>) -> PyResult<Vec<BlockEventTuple>> {
        let changes = detached(py, || Ok(self.inner.take_block_events()))?;
        Ok(changes
            .into_iter()
            .map(|c| match c {
                BlockChange::Stored { medium, parent, hashes, tokens, lora_name, cache_salt } => {
                    ("stored", medium.as_str(), parent, hashes, tokens, lora_name, cache_salt)
                }
                BlockChange::Removed { medium, hashes } => {
                    ("removed", medium.as_str(), None, hashes, Vec::new(), None, None)
                }
            })
            .collect())
    }

    /// Counters and occupancy: lookups, hit/miss tokens, stored/evicted blocks, bytes, and timing.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = detached(py, || Ok(self.inner.stats()))?;
        let d = PyDict::new(py);
        let ints: [(&str, u64); 26] = [
            ("lookups", s.lookups),
            ("hit_tokens", s.hit_tokens),
            ("miss_tokens", s.miss_tokens),
            ("stores", s.stores),
            ("stored_blocks", s.stored_blocks),
            ("store_existing_blocks", s.store_existing_blocks),
            ("store_rejected_blocks", s.store_rejected_blocks),
            ("store_spilled_blocks", s.store_spilled_blocks),
            ("stored_bytes", s.stored_bytes),
            ("loads", s.loads),
            ("loaded_blocks", s.loaded_blocks),
            ("loaded_bytes", s.loaded_bytes),
            ("evicted_blocks", s.tier.evicted_blocks),
            ("mismatched_blocks", s.tier.mismatched_blocks),
            ("spoiled_blocks", s.tier.spoiled_blocks),
            ("entries", s.tier.entries),
            ("pinned_blocks", s.tier.pinned),
            ("used_bytes", s.tier.used_bytes),
            ("capacity_bytes", s.tier.capacity_bytes),
            ("allocated_bytes", s.tier.allocated_bytes),
            ("lookup_ns", s.lookup_ns),
            ("store_ns", s.store_ns),
            ("load_ns", s.load_ns),
            ("promoted_blocks", s.promoted_blocks),
            ("write_behind_dropped", s.write_behind_dropped),
            ("disk_refused", s.disk_refused),
        ];
        for (k, v) in ints {
            d.set_item(k, v)?;
        }
        if let Some(ev) = s.events {
            d.set_item("events_published", ev.published)?;
            d.set_item("events_dropped", ev.dropped)?;
        }
        if let Some(j) = s.block_events {
            d.set_item("block_events_reported", j.reported_blocks)?;
            d.set_item("block_events_dropped", j.dropped_blocks)?;
        }
        if let Some(r) = s.redis {
            for (k, v) in [
                ("redis_reads", r.reads),
                ("redis_hit_blocks", r.hit_blocks),
                ("redis_foreign_values", r.foreign_values),
                ("redis_corrupt_values", r.corrupt_values),
                ("redis_mismatched_values", r.mismatched_values),
                ("redis_unauthenticated_values", r.unauthenticated_values),
                ("redis_timeouts", r.timeouts),
                ("redis_breaker_trips", r.breaker_trips),
                ("redis_skipped_calls", r.skipped_calls),
                ("redis_written_blocks", r.written_blocks),
                ("redis_dropped_blocks", r.dropped_blocks),
                ("redis_errors", r.errors),
            ] {
                d.set_item(k, v)?;
            }
            d.set_item("redis_connected", r.connected)?;
            d.set_item("redis_breaker_open", r.breaker_open)?;
        }
        if let Some(disk) = s.disk {
            for (k, v) in [
                ("disk_entries", disk.entries),
                ("disk_used_bytes", disk.used_bytes),
                ("disk_capacity_bytes", disk.capacity_bytes),
                ("disk_written_blocks", disk.written_blocks),
                ("disk_read_blocks", disk.read_blocks),
                ("disk_evicted_blocks", disk.evicted_blocks),
                ("disk_corrupt_blocks", disk.corrupt_blocks),
                ("disk_mismatched_blocks", disk.mismatched_blocks),
                ("disk_write_errors", disk.write_errors),
                ("disk_leftover_files", disk.leftover_files),
                ("disk_leftover_bytes", disk.leftover_bytes),
                ("disk_full_episodes", disk.full_episodes),
                ("disk_budget_bytes", disk.budget_bytes),
            ] {
                d.set_item(k, v)?;
            }
        }
        let asked = s.hit_tokens + s.miss_tokens;
        d.set_item("hit_rate", if asked == 0 { 0.0 } else { s.hit_tokens as f64 / asked as f64 })?;
        Ok(d)
    }

    /// Metrics in Prometheus' text format; `labels` go on every sample (the engine's namespace
    /// is always one of them).
    #[pyo3(signature = (labels = None))]
    fn prometheus(&self, py: Python<'_>, labels: Option<HashMap<String, String>>) -> PyResult<String> {
        let mut base: Vec<(String, String)> = labels.unwrap_or_default().into_iter().collect();
        base.sort();
        base.push(("namespace".to_owned(), format!("{:016x}", self.inner.namespace_id())));
        detached(py, || {
            let refs: Vec<(&str, String)> = base.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            Ok(self.inner.prometheus(&refs))
        })
    }

    /// The tiers in the router's order: name, write policy, priority, health.
    fn tiers<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .tiers()
            .into_iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("name", t.name)?;
                d.set_item("policy", t.policy.name())?;
                d.set_item("priority", t.priority)?;
                d.set_item("available", t.available)?;
                Ok(d)
            })
            .collect()
    }

    /// Waits up to `timeout` seconds until blocks queued for lower tiers are written; True when
    /// all are.
    #[pyo3(signature = (timeout = 10.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = std::time::Duration::try_from_secs_f64(timeout)
            .map_err(|_| crate::errors::invalid_input(py, "timeout must be seconds >= 0"))?;
        detached(py, || Ok(self.inner.flush(t)))
    }

    /// Raises `InternalError` if any structural invariant of the memory tier is broken (for tests).
    fn _check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        let r = detached(py, || Ok(self.inner.check_invariants()))?;
        r.map_err(|why| internal(py, format!("memory tier invariant broken: {why}")))
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.config().block_size
    }

    #[getter]
    fn block_bytes(&self) -> usize {
        self.inner.config().block_bytes
    }

    /// The budget actually usable: whole blocks only.
    #[getter]
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }

    /// The namespace id: a 64-bit hash of model, dtype, layout, block size, TP size/rank, extras.
    #[getter]
    fn namespace(&self) -> u64 {
        self.inner.namespace_id()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Engine(block_size={}, block_bytes={}, capacity_bytes={}, namespace={:#018x})",
            c.block_size,
            c.block_bytes,
            self.capacity_bytes(),
            self.inner.namespace_id()
        )
    }
}

/// A read-only view of one cached block, exported through the buffer protocol
/// (`memoryview(v)`, `numpy.frombuffer(v, ...)`, `torch.frombuffer(v, ...)`).
///
/// The block stays pinned (never evicted, never rewritten) until this object is freed, that is
/// until nothing references it any more: `numpy.frombuffer` and `torch.frombuffer` give the
/// buffer back at once and keep only a reference to this object, so no count of live buffers
/// can tell when the memory is unreachable, and only the object's own lifetime can.
/// `release()` stops new exports; the pin goes with the last reference.
#[pyclass(module = "xconnector._native", frozen)]
pub struct BlockView {
    block: PinnedBlock,
    released: AtomicBool,
    len: usize,
}

impl BlockView {
    fn new(block: PinnedBlock) -> Self {
        let len = block.len();
        Self { block, released: AtomicBool::new(false), len }
    }
}

#[pymethods]
impl BlockView {
    fn __len__(&self) -> usize {
        self.len
    }

    /// No new buffers from this view. The block is unpinned once this view and everything made
    /// from it (memoryviews, arrays, tensors) are gone.
    fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    #[getter]
    fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, _exc_type: Py<PyAny>, _exc: Py<PyAny>, _tb: Py<PyAny>) -> bool {
        self.release();
        false
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null view"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("cached blocks are read-only; copy them to modify"));
        }
        let this = slf.get();
        if this.released() {
            return Err(PyBufferError::new_err("this block view was released"));
        }
        let ptr = this.block.as_ptr();
        let len = this.len as isize;
        // SAFETY: `view` is valid per CPython's contract; `view.obj` is a new reference to this
        // view, whose pin lasts as long as the object does.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape =
                if flags & ffi::PyBUF_ND == ffi::PyBUF_ND { &mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("BlockView(len={}, released={})", self.len, self.released())
    }
}

/// The constructor's checked arguments (see `crate::args`).
mod args {
    use std::path::PathBuf;

    use pyo3::prelude::*;

    crate::args::int_arg! {
        block_bytes: usize = "block_bytes" >= 1, "bytes of one block's KV for all layers";
        capacity_bytes: u64 = "capacity_bytes" >= 1, "the memory tier's byte budget";
        block_size: u32 = "block_size" >= 1, "tokens per block";
        tp_world_size: u32 = "tp_world_size" >= 1, "tensor-parallel ranks";
        tp_rank: u32 = "tp_rank" >= 0, "this tensor-parallel rank";
        pp_world_size: u32 = "pp_world_size" >= 1, "pipeline-parallel ranks";
        pp_rank: u32 = "pp_rank" >= 0, "this pipeline-parallel rank";
        disk_capacity_bytes: u64 = "disk_capacity_bytes" >= 0, "the disk tier's byte budget";
        disk_queue_blocks: usize = "disk_queue_blocks" >= 1, "blocks waiting to be written to disk";
        redis_queue_blocks: usize = "redis_queue_blocks" >= 1, "blocks waiting to be written to Redis";
        redis_batch_blocks: usize = "redis_batch_blocks" >= 1, "blocks per pipelined Redis write";
        events_queue: usize = "events_queue" >= 1, "KV events waiting to be sent";
    }
    pub fn disk_shared(v: &Bound<'_, PyAny>) -> PyResult<bool> {
        crate::args::boolean(v, "disk_shared")
    }
    pub fn redis_timeout(v: &Bound<'_, PyAny>) -> PyResult<f64> {
        crate::args::number(v, "redis_timeout", "seconds a request may wait on Redis")
    }
    pub fn disk_path(v: &Bound<'_, PyAny>) -> PyResult<Option<PathBuf>> {
        crate::args::opt_path(v, "disk_path")
    }
    pub fn redis_ca_file(v: &Bound<'_, PyAny>) -> PyResult<Option<PathBuf>> {
        crate::args::opt_path(v, "redis_ca_file")
    }
    pub fn redis_url(v: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        crate::args::opt_text(v, "redis_url")
    }
    pub fn events_url(v: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        crate::args::opt_text(v, "events_url")
    }
    pub fn redis_auth_key(v: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        crate::args::opt_text(v, "redis_auth_key")
    }
    pub fn redis_ttl_s(v: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        if v.is_none() {
            return Ok(None);
        }
        let max = xconnector_core::redis_tier::MAX_TTL_SECS;
        crate::args::int(v, "redis_ttl_s", 1, max, "seconds each value lives in Redis, at most a year").map(Some)
    }
}
