//! `config_migrate`: the prototype's config files in the current schema (`xconnector_core::migrate`).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::call::{detached, guarded};

/// Migrates the prototype config at `source` (read from the file, or from `text` when given).
/// Returns `{"text": YAML, "section": where it was written, "notes": [(key path, what happened)]}`.
#[pyfunction]
#[pyo3(signature = (source, text = None))]
pub fn config_migrate<'py>(py: Python<'py>, source: &str, text: Option<String>) -> PyResult<Bound<'py, PyDict>> {
    let path = PathBuf::from(source);
    let m = detached(py, || match &text {
        Some(t) => xconnector_core::migrate::migrate(t, source),
        None => xconnector_core::migrate::migrate_file(&path, source),
    })?;
    guarded(py, || {
        let d = PyDict::new(py);
        d.set_item("text", &m.text)?;
        d.set_item("section", &m.section)?;
        let notes: Vec<(&str, &str)> = m.notes.iter().map(|n| (n.path.as_str(), n.message.as_str())).collect();
        d.set_item("notes", notes)?;
        Ok(d)
    })
}
