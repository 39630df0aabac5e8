//! Constructor arguments read one by one, so a wrong one raises `ConfigError` naming the
//! argument and what to pass (pyo3's own extraction raises a bare `TypeError` or
//! `OverflowError`). Values are never echoed back: an argument may hold a credential.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString};

use crate::errors::config_error;

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// An integer in `min..=max`; `what` says what it is ("a number of bytes").
pub fn int(v: &Bound<'_, PyAny>, name: &str, min: u64, max: u64, what: &str) -> PyResult<u64> {
    let py = v.py();
    let range = if max == u64::MAX { format!(">= {min}") } else { format!("in {min}..={max}") };
    // Anything with __index__ (numpy integers included) is an integer; a bool is not meant as one.
    let n = if v.is_instance_of::<PyBool>() { None } else { v.call_method0("__index__").ok() };
    let Some(n) = n.filter(|n| n.is_instance_of::<PyInt>()) else {
        return Err(config_error(py, format!("{name} must be an integer {range} ({what}), got {}", type_name(v))));
    };
    match n.extract::<i128>() {
        Ok(n) if n >= i128::from(min) && n <= i128::from(max) => Ok(n as u64),
        Ok(n) => Err(config_error(py, format!("{name} must be {range} ({what}), got {n}"))),
        Err(_) => Err(config_error(py, format!("{name} must be {range} ({what}), got a number far out of range"))),
    }
}

pub fn boolean(v: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    match v.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => Err(config_error(v.py(), format!("{name} must be True or False, got {}", type_name(v)))),
    }
}

/// A number (int or float); its range is checked where it is used.
pub fn number(v: &Bound<'_, PyAny>, name: &str, what: &str) -> PyResult<f64> {
    let py = v.py();
    if v.is_instance_of::<PyBool>() {
        return Err(config_error(py, format!("{name} must be a number ({what}), got bool")));
    }
    v.extract::<f64>().map_err(|_| config_error(py, format!("{name} must be a number ({what}), got {}", type_name(v))))
}

pub fn text(v: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    match v.cast::<PyString>() {
        Ok(s) => Ok(s.to_str()?.to_owned()),
        Err(_) => Err(config_error(v.py(), format!("{name} must be a string, got {}", type_name(v)))),
    }
}

pub fn opt_text(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<String>> {
    if v.is_none() {
        return Ok(None);
    }
    text(v, name).map(Some)
}

/// A filesystem path (str or os.PathLike), not empty.
pub fn opt_path(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<PathBuf>> {
    if v.is_none() {
        return Ok(None);
    }
    let py = v.py();
    let p: PathBuf = v
        .extract()
        .map_err(|_| config_error(py, format!("{name} must be a path (str or os.PathLike), got {}", type_name(v))))?;
    if p.as_os_str().is_empty() {
        return Err(config_error(py, format!("{name} is empty: give a directory, or leave {name} out")));
    }
    Ok(Some(p))
}

/// `fn $f(v) -> PyResult<$t>` for `#[pyo3(from_py_with = $f)]`: an integer argument named
/// `$name` of at least `$min`.
macro_rules! int_arg {
    ($($f:ident: $t:ty = $name:literal >= $min:literal, $what:literal;)*) => {$(
        pub fn $f(v: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<$t> {
            // The bound is the type's: every value below it converts.
            Ok(crate::args::int(v, $name, $min, <$t>::MAX as u64, $what)? as $t)
        }
    )*};
}

pub(crate) use int_arg;
