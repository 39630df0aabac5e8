//! Core errors and caught panics as Python exceptions from `xconnector.exceptions`.

use std::any::Any;
use std::io::ErrorKind;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use xconnector_core::CoreError;

const EXCEPTIONS: &str = "xconnector.exceptions";

static CONFIG_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INVALID_INPUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CACHE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INTERNAL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// An exception of the named class from the Python hierarchy; if that module cannot be imported
/// (the extension used on its own), a builtin of the closest meaning.
fn raise(py: Python<'_>, cell: &'static PyOnceLock<Py<PyType>>, name: &str, msg: String) -> PyErr {
    match cell.import(py, EXCEPTIONS, name) {
        Ok(ty) => PyErr::from_type(ty.clone(), msg),
        Err(_) if name == "InternalError" || name == "CacheError" => PyRuntimeError::new_err(msg),
        Err(_) => PyValueError::new_err(msg),
    }
}

pub fn invalid_input(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, &INVALID_INPUT_ERROR, "InvalidInputError", msg.into())
}

pub fn config_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, &CONFIG_ERROR, "ConfigError", msg.into())
}

pub fn internal(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, &INTERNAL_ERROR, "InternalError", msg.into())
}

/// Why a worker-facing call fell back, by the error's class (the first match counts); what the
/// router backs off on and what the fallback counters are named by.
pub fn fallback_reason(py: Python<'_>, err: &PyErr) -> &'static str {
    let classes: [(&'static PyOnceLock<Py<PyType>>, &str, &'static str); 4] = [
        (&INVALID_INPUT_ERROR, "InvalidInputError", "invalid_input"),
        (&INTERNAL_ERROR, "InternalError", "internal_error"),
        (&CACHE_ERROR, "CacheError", "cache_error"),
        (&CONFIG_ERROR, "ConfigError", "config_error"),
    ];
    for (cell, name, reason) in classes {
        if cell.import(py, EXCEPTIONS, name).is_ok_and(|ty| err.is_instance(py, ty)) {
            return reason;
        }
    }
    "unexpected_error"
}

/// `fallback_reason` of a core error, as the exception `core_to_py` makes of it would give.
pub fn core_reason(err: &CoreError) -> &'static str {
    match err {
        CoreError::InvalidInput(_) => "invalid_input",
        CoreError::Internal(_) => "internal_error",
        CoreError::Cache(_) => "cache_error",
        CoreError::Config(_) | CoreError::InvalidSection { .. } => "config_error",
        CoreError::Io { .. } => "unexpected_error",
    }
}

pub fn core_to_py(py: Python<'_>, err: CoreError) -> PyErr {
    let msg = err.to_string();
    match err {
        CoreError::InvalidInput(_) => invalid_input(py, msg),
        CoreError::Config(_) => config_error(py, msg),
        CoreError::InvalidSection { strict, .. } => {
            let e = config_error(py, msg);
            // The section asked for strict mode (read from it as written): the installer stops the
            // worker even though the section as a whole did not validate.
            if strict {
                let _ = e.value(py).setattr("strict", true);
            }
            e
        }
        CoreError::Cache(_) => raise(py, &CACHE_ERROR, "CacheError", msg),
        CoreError::Internal(_) => internal(py, msg),
        CoreError::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
    }
}

pub fn panic_to_py(py: Python<'_>, payload: Box<dyn Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    internal(py, format!("panic in the native core: {what} (this is a bug in XConnector; please report it)"))
}
