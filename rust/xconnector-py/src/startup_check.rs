//! Whether a process patches its workers, and the startup check (`xconnector_core::startup_check`).

use pyo3::prelude::*;
use xconnector_core::startup_check::{check_machine, worker_patches};

use crate::call::{detached, guarded};
use crate::config::sdk_config;

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Whether XConnector can run with `section` on this machine, checked once per process and
/// config; each problem logged once on the `xconnector` loggers. With `strict`, any problem is a
/// `ConfigError`.
#[pyfunction]
pub fn config_check_machine(py: Python<'_>, section: &Bound<'_, PyAny>, strict: bool) -> PyResult<bool> {
    let cfg = guarded(py, || sdk_config(py, section, "<section>"))?;
    detached(py, || check_machine(&cfg, &env_var, strict))
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
