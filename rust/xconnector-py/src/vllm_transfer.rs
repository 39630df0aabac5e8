//! `vllm_transfer_config`: vLLM v1's `kv_transfer_config` with XConnector in it; the rules are
//! in `xconnector_core::vllm_transfer`.

use pyo3::prelude::*;
use serde_json::Value;
use xconnector_core::vllm_transfer;

use crate::call::guarded;
use crate::convert::{to_py, to_value};
use crate::errors::invalid_input;

fn read(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    to_value(obj, "").map_err(|(at, message)| invalid_input(py, format!("{what}{at}: {message}")))
}

/// Warns (through logging) when vLLM's `kv_transfer_config` fails requests whose loads fail
/// (`kv_load_failure_policy: fail`). Never raises: a config it cannot read is not warned about.
#[pyfunction]
pub fn warn_on_failing_loads(py: Python<'_>, kv_transfer_config: &Bound<'_, PyAny>) -> PyResult<()> {
    guarded(py, || {
        let policy = kv_transfer_config.getattr("kv_load_failure_policy").ok();
        let policy = policy.and_then(|p| p.extract::<String>().ok());
        if let Some(warning) = vllm_transfer::failure_policy_warning(policy.as_deref()) {
            tracing::warn!(target: "vllm", "{warning}");
        }
        Ok(())
    })
}

/// `(config, auth_key)`: the `kv_transfer_config` an engine whose own is `existing` (a mapping, or
/// None) should run with for `section` (None: XConnector is in it already), and an inline Redis
/// auth key to put in the environment instead of the config.
#[pyfunction]
pub fn vllm_transfer_config<'py>(
    py: Python<'py>,
    existing: &Bound<'py, PyAny>,
    section: &Bound<'py, PyAny>,
) -> PyResult<(Option<Bound<'py, PyAny>>, Option<String>)> {
    guarded(py, || {
        let existing = read(py, existing, "kv_transfer_config")?;
        let section = read(py, section, "xconnector section")?;
        let t = vllm_transfer::transfer_config(&existing, &section);
        let config = t.config.map(|c| to_py(py, &c)).transpose()?;
        Ok((config, t.auth_key))
    })
}
