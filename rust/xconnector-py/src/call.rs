//! The one way into the core: every binding entry point goes through [`detached`] (work that
//! hashes, copies or waits: the GIL is released) or [`guarded`] (quick work under the GIL). Both
//! catch panics, which pyo3 would otherwise raise as `PanicException`, a `BaseException` that
//! `except Exception` in a host worker does not catch.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use xconnector_core::CoreError;

use crate::errors::{core_to_py, panic_to_py};

pub fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, CoreError> + Send,
    T: Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(core_to_py(py, e)),
        Err(payload) => Err(panic_to_py(py, payload)),
    }
}

pub fn guarded<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> PyResult<T>,
{
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(panic_to_py(py, payload)))
}
