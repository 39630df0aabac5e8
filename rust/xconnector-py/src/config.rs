//! Config entry points: validation of dicts, loading files, and discovery. The schema, the
//! messages and the discovery order all live in `xconnector_core::config`.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;
use xconnector_core::config::{self as core, Environment, Problem, Resolved};

use crate::call::guarded;
use crate::convert::{to_py, to_value};
use crate::errors::core_to_py;

pub(crate) fn document(py: Python<'_>, obj: &Bound<'_, PyAny>, source: &str, path: &str) -> PyResult<Value> {
    to_value(obj, path).map_err(|(at, message)| {
        let at = if at.is_empty() { "(top level)".to_owned() } else { at };
        core_to_py(py, core::report(source, &[Problem { path: at, message }]))
    })
}

fn problems(py: Python<'_>, source: &str, problems: &[Problem]) -> PyErr {
    core_to_py(py, core::report(source, problems))
}

fn resolved<'py>(py: Python<'py>, r: &Resolved) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("source", &r.source)?;
    d.set_item("section", &r.section)?;
    d.set_item("config", to_py(py, &r.config.to_value())?)?;
    let origins = PyList::empty(py);
    for (path, value, origin) in &r.origins {
        origins.append((path, to_py(py, value)?, origin))?;
    }
    d.set_item("origins", origins)?;
    d.set_item("warnings", r.warnings.clone())?;
    Ok(d)
}

/// Validates an `xconnector` section given as a dict; returns its normalized form.
#[pyfunction]
#[pyo3(signature = (section, source = "<dict>", path = ""))]
pub fn config_normalize<'py>(
    py: Python<'py>,
    section: &Bound<'py, PyAny>,
    source: &str,
    path: &str,
) -> PyResult<Bound<'py, PyAny>> {
    normalize(py, section, source, path, |v, p| core::parse_section(v, p).map(|c| c.to_value()))
}

/// Validates one adapter entry given as a dict; returns its normalized form.
#[pyfunction]
#[pyo3(signature = (adapter, source = "<dict>", path = ""))]
pub fn config_normalize_adapter<'py>(
    py: Python<'py>,
    adapter: &Bound<'py, PyAny>,
    source: &str,
    path: &str,
) -> PyResult<Bound<'py, PyAny>> {
    normalize(py, adapter, source, path, |v, p| core::parse_adapter(v, p).map(|a| a.to_value()))
}

fn normalize<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    source: &str,
    path: &str,
    parse: fn(&Value, &str) -> Result<Value, Vec<Problem>>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(py, || {
        let v = document(py, obj, source, path)?;
        to_py(py, &parse(&v, path).map_err(|p| problems(py, source, &p))?)
    })
}

/// Reads the section out of a whole document given as a dict (a Dynamo config).
#[pyfunction]
#[pyo3(signature = (document_, source = "<dict>", service = None, bare = false))]
pub fn config_resolve_document<'py>(
    py: Python<'py>,
    document_: &Bound<'py, PyAny>,
    source: &str,
    service: Option<&str>,
    bare: bool,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(py, || {
        let v = document(py, document_, source, "")?;
        let r = core::resolve_document(&v, source, service, bare).map_err(|e| core_to_py(py, e))?;
        resolved(py, &r)
    })
}

/// Reads a YAML/JSON file: a Dynamo config, a file with an `xconnector:` key, or the section.
/// `argv`, the worker's command line, gives the block size the settings must fit when it has
/// `--block-size` (the file's `block-size` keys are read either way).
#[pyfunction]
#[pyo3(signature = (path, service = None, argv = None))]
pub fn config_load_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    service: Option<&str>,
    argv: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let source = path.display().to_string();
    // argv[0] is the program; a command given without one still has its flags read.
    let argv: Vec<String> = std::iter::once(String::new()).chain(argv.unwrap_or_default()).collect();
    let r = crate::call::detached(py, || {
        let text = core::read_config_file(&path, &source)?;
        core::resolve_text(&text, &source, service, true, &argv)
    })?;
    guarded(py, || resolved(py, &r))
}

/// A section as the core's typed config, validated (every rule); errors name `source`.
pub fn sdk_config(py: Python<'_>, section: &Bound<'_, PyAny>, source: &str) -> PyResult<core::SdkConfig> {
    let v = document(py, section, source, "")?;
    core::parse_section(&v, "").map_err(|p| problems(py, source, &p))
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What the engine would be built from, as health output shows it (no secrets), for a section
/// that passes every rule. A `ConfigError` (naming `source`) when it does not, or when what it
/// reads from the environment (the auth key's variable) is not there.
#[pyfunction]
#[pyo3(signature = (section, source = "<section>"))]
pub fn config_engine_settings<'py>(
    py: Python<'py>,
    section: &Bound<'py, PyAny>,
    source: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = guarded(py, || sdk_config(py, section, source))?;
    let settings = core::EngineSettings::from_config(&cfg);
    settings.check_env(&env_var).map_err(|e| core_to_py(py, e))?;
    to_py(py, &settings.to_value())
}

/// Finds the config the way a worker process does (DESIGN section 2), from the given environment
/// variables and argv.
#[pyfunction]
pub fn config_discover<'py>(
    py: Python<'py>,
    environ: HashMap<String, String>,
    argv: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let env = Environment { vars: environ, argv };
    let r = crate::call::detached(py, || core::discover(&env))?;
    guarded(py, || {
        let d = resolved(py, &r)?;
        d.set_item("service", env.service_name())?;
        Ok(d)
    })
}

/// Names of the environment variables discovery reads: the config channels in order, then the
/// service name's.
#[pyfunction]
pub fn config_env_vars() -> Vec<&'static str> {
    core::CONFIG_VARS.iter().copied().chain([core::SERVICE_VAR]).collect()
}

/// A whole YAML/JSON file as Python values (the checks of `config_load_file` apply), e.g. to
/// hand a Dynamo config to `DYNAMO_SERVICE_CONFIG` the way `dynamo serve` does.
#[pyfunction]
pub fn config_read_document<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyAny>> {
    let source = path.display().to_string();
    let doc = crate::call::detached(py, || core::parse_document(&core::read_config_file(&path, &source)?, &source))?;
    guarded(py, || to_py(py, &doc))
}

/// `value` as it may be shown: passwords in URLs and the values of secret settings (`key`, or
/// keys inside `value`) replaced by `***`.
#[pyfunction]
#[pyo3(signature = (value, key = ""))]
pub fn config_redact<'py>(py: Python<'py>, value: &Bound<'py, PyAny>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    let v = document(py, value, "<value>", key)?;
    to_py(py, &core::secrets::redact_at(key, &v))
}

/// The normalized section an SDK built in code runs with: `config` (a mapping, or None) with
/// `keys` set, `enabled` unless it says otherwise (a config *file* must say so; code that builds
/// an SDK means it on). A key given both ways with different values is an error unless `force`.
#[pyfunction]
#[pyo3(signature = (config, keys, force = false))]
pub fn config_coerce<'py>(
    py: Python<'py>,
    config: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyDict>,
    force: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let given = PyDict::new(py);
    if !config.is_none() {
        let Ok(mapping) = config.cast::<pyo3::types::PyMapping>() else {
            let kind = config.get_type().name()?;
            return Err(crate::errors::config_error(py, format!("config must be an SDKConfig or a dict, not {kind}")));
        };
        given.update(mapping)?;
    }
    let section = PyDict::new(py);
    section.set_item("enabled", true)?;
    section.update(given.as_mapping())?;
    for (key, value) in keys.iter() {
        if let Some(old) = given.get_item(&key)?.filter(|old| !force && !old.eq(&value).unwrap_or(false)) {
            return Err(crate::errors::config_error(
                py,
                format!("{key} is {} in the call but {} in config; give it once", value.repr()?, old.repr()?),
            ));
        }
        section.set_item(key, value)?;
    }
    normalize(py, &section, "XConnectorSDK(config=...)", "", |v, p| core::parse_section(v, p).map(|c| c.to_value()))
}
