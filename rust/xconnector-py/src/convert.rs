//! Python values <-> `serde_json::Value`, for config documents handed over as dicts. Only what a
//! YAML/JSON document can hold converts; anything else is an error naming its key path.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PySequence, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Deeper than any real config; stops self-referential containers from recursing forever.
const MAX_DEPTH: usize = 64;

/// Why a Python value cannot be a config document: (key path, what is wrong).
pub type ConvertError = (String, String);

pub fn to_value(obj: &Bound<'_, PyAny>, path: &str) -> Result<Value, ConvertError> {
    convert(obj, path, 0)
}

fn convert(obj: &Bound<'_, PyAny>, path: &str, depth: usize) -> Result<Value, ConvertError> {
    if depth > MAX_DEPTH {
        return Err((
            path.to_owned(),
            format!("nested more than {MAX_DEPTH} levels deep (a container inside itself?)"),
        ));
    }
    let unsupported = || {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".to_owned());
        (
            path.to_owned(),
            format!("a value of type {ty:?} cannot be part of a config; use str, int, float, bool, None, list or dict"),
        )
    };
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: Python's bool is a subclass of int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err((path.to_owned(), "integer out of the 64-bit range".to_owned()));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let f = f.value();
        return Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| (path.to_owned(), format!("{f} is not a finite number")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s.to_str().map(|s| Value::String(s.to_owned())).map_err(|e| (path.to_owned(), e.to_string()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        return mapping(d.iter(), path, depth);
    }
    if obj.cast::<PyList>().is_ok() || obj.cast::<PyTuple>().is_ok() {
        let seq = obj.cast::<PySequence>().map_err(|_| unsupported())?;
        let mut out = Vec::new();
        for (i, item) in seq.try_iter().map_err(|_| unsupported())?.enumerate() {
            let item = item.map_err(|e| (path.to_owned(), e.to_string()))?;
            out.push(convert(&item, &format!("{path}[{i}]"), depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    if let Ok(m) = obj.cast::<PyMapping>() {
        let items = m.items().map_err(|e| (path.to_owned(), e.to_string()))?;
        let pairs: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)> =
            items.iter().filter_map(|kv| kv.extract().ok()).collect();
        return mapping(pairs.into_iter(), path, depth);
    }
    Err(unsupported())
}

fn mapping<'py>(
    items: impl Iterator<Item = (Bound<'py, PyAny>, Bound<'py, PyAny>)>,
    path: &str,
    depth: usize,
) -> Result<Value, ConvertError> {
    let mut out = Map::new();
    for (k, v) in items {
        let Some(key) = k.cast::<PyString>().ok().and_then(|s| s.to_str().ok().map(str::to_owned)) else {
            let shown = k.repr().map(|r| r.to_string()).unwrap_or_default();
            return Err((path.to_owned(), format!("key {shown} is not a string; config keys are strings")));
        };
        let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let value = convert(&v, &child, depth + 1)?;
        out.insert(key, value);
    }
    Ok(Value::Object(out))
}

pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(m) => {
            let dict = PyDict::new(py);
            for (k, item) in m {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}
