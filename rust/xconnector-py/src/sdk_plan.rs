//! `xconnector._native.sdk_adapters_to_load`: a thin wrapper of `xconnector_core::sdk_plan`.

use pyo3::prelude::*;
use xconnector_core::config::{self as core, Problem};
use xconnector_core::sdk_plan;

use crate::call::guarded;
use crate::convert::{to_py, to_value};
use crate::errors::core_to_py;

/// The adapters an SDK loads after those named in `loaded`, validated and normalized (see
/// `xconnector_core::sdk_plan::adapters_to_load`); a `ConfigError` naming `source` otherwise.
#[pyfunction]
#[pyo3(signature = (adapters, loaded, initial = false, source = "<dict>"))]
pub fn sdk_adapters_to_load<'py>(
    py: Python<'py>,
    adapters: Vec<Bound<'py, PyAny>>,
    loaded: Vec<String>,
    initial: bool,
    source: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    guarded(py, || {
        let mut configured = Vec::with_capacity(adapters.len());
        for (i, a) in adapters.iter().enumerate() {
            let path = format!("adapters[{i}]");
            let v = to_value(a, &path).map_err(|(path, message)| vec![Problem { path, message }]);
            let parsed = v.and_then(|v| core::parse_adapter(&v, &path));
            configured.push(parsed.map_err(|p| core_to_py(py, core::report(source, &p)))?);
        }
        let plan = sdk_plan::adapters_to_load(&configured, &loaded, initial).map_err(|e| core_to_py(py, e))?;
        plan.iter().map(|a| to_py(py, &a.to_value())).collect()
    })
}
