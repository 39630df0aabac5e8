//! `xconnector._native.EnginePool` (the cache adapter's engines, one per KV geometry and
//! namespace) and `merge_expositions`: thin wrappers of `xconnector_core::engine_pool` and
//! `xconnector_core::exposition`.

use std::collections::HashMap;

use pyo3::prelude::*;
use xconnector_core::config::{EngineSettings, PeerEventsSettings};
use xconnector_core::engine_pool::EnginePool as CoreEnginePool;

use crate::call::{detached, guarded};
use crate::convert::to_py;
use crate::engine::Engine;
use crate::errors::core_to_py;

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The engines of one cache adapter, built from its settings in a validated `section`.
#[pyclass(module = "xconnector._native", frozen)]
pub struct EnginePool {
    inner: CoreEnginePool,
}

#[pymethods]
impl EnginePool {
    /// Validates `section` (every rule; errors name `source`) and checks what the settings read
    /// from the environment (the auth key's variable) is there. Builds engines once started.
    #[new]
    #[pyo3(signature = (section, source = "<section>", name = "lmcache"))]
    fn new(py: Python<'_>, section: &Bound<'_, PyAny>, source: &str, name: &str) -> PyResult<Self> {
        let cfg = guarded(py, || crate::config::sdk_config(py, section, source))?;
        let settings = EngineSettings::from_config(&cfg);
        settings.check_env(&env_var).map_err(|e| core_to_py(py, e))?;
        Ok(Self { inner: CoreEnginePool::new(name, settings) })
    }

    /// The engines' settings as health output shows them (no secrets).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guarded(py, || to_py(py, &self.inner.settings().to_value()))
    }

    /// Engines built from now on publish their stored and removed blocks to `subject` at
    /// `nats_url` as `worker_id`.
    fn set_events(&self, py: Python<'_>, nats_url: String, subject: String, worker_id: String) -> PyResult<()> {
        guarded(py, || {
            self.inner.set_events(Some(PeerEventsSettings { nats_url, subject, worker_id }));
            Ok(())
        })
    }

    /// The engine for a worker's KV blocks of `kv_block_size` tokens and `kv_block_bytes` bytes in
    /// this namespace, built on first use; a `ConfigError` unless the pool is started.
    #[pyo3(signature = (*, kv_block_size, kv_block_bytes, model = "", dtype = "", kv_layout = "",
        tp_world_size = 1, tp_rank = 0, extra = None, revision = "", quantization = "", pp_world_size = 1,
        pp_rank = 0))]
    #[allow(clippy::too_many_arguments)]
    fn engine_for(
        &self,
        py: Python<'_>,
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
    ) -> PyResult<Engine> {
        let tp = (tp_world_size, tp_rank);
        let pp = (pp_world_size, pp_rank);
        let namespace = crate::engine::namespace(model, revision, dtype, quantization, kv_layout, tp, pp, extra);
        let inner = detached(py, || self.inner.engine_for(kv_block_size, kv_block_bytes, namespace, &env_var))?;
        Ok(Engine { inner })
    }

    /// The engines built so far, oldest first.
    fn engines(&self, py: Python<'_>) -> PyResult<Vec<Engine>> {
        guarded(py, || Ok(self.inner.engines().into_iter().map(|inner| Engine { inner }).collect()))
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        guarded(py, || {
            self.inner.start();
            Ok(())
        })
    }

    /// Drops the engines (each flushes once nothing else holds it); builds none until `start()`.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || {
            self.inner.stop();
            Ok(())
        })
    }
}

/// Prometheus text expositions merged into one: each family once, with every input's samples.
#[pyfunction]
pub fn merge_expositions(py: Python<'_>, texts: Vec<String>) -> PyResult<String> {
    detached(py, || Ok(xconnector_core::exposition::merge(&texts)))
}

mod args {
    crate::args::int_arg! {
        tp_world_size: u32 = "tp_world_size" >= 1, "tensor-parallel ranks";
        tp_rank: u32 = "tp_rank" >= 0, "this tensor-parallel rank";
        pp_world_size: u32 = "pp_world_size" >= 1, "pipeline-parallel ranks";
        pp_rank: u32 = "pp_rank" >= 0, "this pipeline-parallel rank";
    }
}
