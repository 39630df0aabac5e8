//! Whether a process patches its workers, and the startup check (`xconnector_core::startup_check`).

use std::collections::HashMap;

use pyo3::prelude::*;
use serde_json::Value;
use xconnector_core::config::Environment;
use xconnector_core::startup_check::{connector_config, worker_patches};

use crate::call::{detached, guarded};
use crate::config::{document, sdk_config};
use crate::convert::to_py;

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Whether this process patches its workers with the `config` discovery found (`section`: it
/// found one): enabled, in a listed service (or outside Dynamo), and the startup check passes
/// there. Why not: a debug line. With `strict`, a failed check is a `ConfigError`.
#[pyfunction]
#[pyo3(signature = (config, section, source, service, strict))]
pub fn config_worker_patches(
    py: Python<'_>,
    config: &Bound<'_, PyAny>,
    section: bool,
    source: &str,
    service: Option<&str>,
    strict: bool,
) -> PyResult<bool> {
    let cfg = guarded(py, || sdk_config(py, config, source))?;
    detached(py, || worker_patches(&cfg, section, source, service, &env_var, strict))
}

/// The normalized config a vLLM v1 connector runs with, from `kv_connector_extra_config`'s
/// `xconnector` (a section, a file's path, or None: discovery in `environ`/`argv`, else the
/// defaults), and the tokens of its engine blocks on a worker of `block_size`; None when
/// XConnector is off there (`xconnector_core::startup_check::connector_config`).
#[pyfunction]
pub fn config_for_vllm_connector<'py>(
    py: Python<'py>,
    section: &Bound<'py, PyAny>,
    strict: bool,
    environ: HashMap<String, String>,
    argv: Vec<String>,
    block_size: u64,
) -> PyResult<Option<(Bound<'py, PyAny>, u64)>> {
    let source = "kv_connector_extra_config.xconnector";
    let value = if section.is_none() { Value::Null } else { guarded(py, || document(py, section, source, ""))? };
    let env = Environment { vars: environ, argv };
    let found = detached(py, || connector_config(&value, &env, strict, block_size))?;
    guarded(py, || found.map(|(c, block)| Ok((to_py(py, &c.to_value())?, block))).transpose())
}
