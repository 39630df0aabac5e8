//! `LookupServer`, `LookupClient` and `lookup_socket_path`: the cross-process lookup service of
//! `xconnector_core::lookup_service`. The server answers with the core engine on its own threads
//! (no GIL); the client releases the GIL while it waits on the ranks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::lookup_service::{self as service, ClientConfig, LookupFn, ServerConfig};

use crate::buffers;
use crate::call::{detached, guarded};
use crate::engine::{extras, Engine};
use crate::errors::invalid_input;

fn seconds(py: Python<'_>, name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| invalid_input(py, format!("{name} must be a positive number of seconds (got {value})")))
}

fn counts<'py>(py: Python<'py>, items: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in items {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// Where rank `rank` of engine `engine_id` serves lookups: a file in this user's private socket
/// directory (`XCONNECTOR_SOCKET_DIR`, else `$XDG_RUNTIME_DIR/xconnector`, else
/// `<tmp>/xconnector-<uid>`). Creates and checks nothing.
#[pyfunction]
pub fn lookup_socket_path(engine_id: &str, rank: u32) -> String {
    service::socket_path(&service::socket_dir(), engine_id, rank).to_string_lossy().into_owned()
}

/// Answers lookups for one rank with `engine`, on a Unix socket at `path`, from native threads.
#[pyclass(module = "xconnector._native", frozen)]
pub struct LookupServer {
    inner: Mutex<Option<service::LookupServer>>,
    path: String,
}

#[pymethods]
impl LookupServer {
    #[new]
    #[pyo3(signature = (engine, path, *, max_connections = 32, io_timeout = 2.0, idle_timeout = 300.0))]
    fn new(
        py: Python<'_>,
        engine: &Bound<'_, Engine>,
        path: PathBuf,
        max_connections: usize,
        io_timeout: f64,
        idle_timeout: f64,
    ) -> PyResult<Self> {
        if max_connections == 0 {
            return Err(invalid_input(py, "max_connections must be at least 1"));
        }
        let cfg = ServerConfig {
            max_connections,
            io_timeout: seconds(py, "io_timeout", io_timeout)?,
            idle_timeout: seconds(py, "idle_timeout", idle_timeout)?,
        };
        let core = Arc::clone(&engine.get().inner);
        let lookup: LookupFn = Arc::new(move |tokens, x| core.lookup(tokens, x));
        let server = detached(py, || service::LookupServer::bind(&path, lookup, cfg))?;
        Ok(Self { inner: Mutex::new(Some(server)), path: path.to_string_lossy().into_owned() })
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Connections and requests served, and those dropped by kind.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.lock().as_ref().map(|s| s.stats()).unwrap_or_default();
        counts(
            py,
            &[
                ("connections", s.connections),
                ("active", s.active),
                ("refused_busy", s.refused_busy),
                ("foreign_clients", s.foreign_clients),
                ("requests", s.requests),
                ("bad_requests", s.bad_requests),
                ("timeouts", s.timeouts),
                ("lookup_errors", s.lookup_errors),
            ],
        )
    }

    /// Stops serving and removes the socket. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.inner.lock().take();
        detached(py, || {
            drop(server);
            Ok(())
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

/// Asks every rank's server at once; the answer is the smallest hit, or 0 unless all answered
/// within `timeout` seconds.
#[pyclass(module = "xconnector._native", frozen)]
pub struct LookupClient {
    inner: service::LookupClient,
}

#[pymethods]
impl LookupClient {
    #[new]
    #[pyo3(signature = (paths, *, timeout = 0.1, retry_after = 1.0))]
    fn new(py: Python<'_>, paths: Vec<PathBuf>, timeout: f64, retry_after: f64) -> PyResult<Self> {
        let cfg = ClientConfig {
            timeout: seconds(py, "timeout", timeout)?,
            retry_after: seconds(py, "retry_after", retry_after)?,
        };
        Ok(Self { inner: service::LookupClient::new(paths, cfg) })
    }

    #[getter]
    fn paths(&self) -> Vec<String> {
        self.inner.paths().iter().map(|p| p.to_string_lossy().into_owned()).collect()
    }

    /// Tokens every rank can load (block-aligned); 0 if any rank does not answer in time.
    #[pyo3(signature = (tokens, *, lora_name = None, cache_salt = None, lora_id = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        lora_id: Option<String>,
    ) -> PyResult<usize> {
        let toks = guarded(py, || buffers::tokens(tokens))?;
        detached(py, || self.inner.lookup(&toks, extras(&lora_name, &cache_salt, &lora_id)))
    }

    /// Lookups answered and missed, and the ranks that did not answer, by why.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        counts(
            py,
            &[
                ("lookups", s.lookups),
                ("answered", s.answered),
                ("missed", s.missed),
                ("unreachable", s.unreachable),
                ("timeouts", s.timeouts),
                ("foreign_servers", s.foreign_servers),
                ("unsafe_dirs", s.unsafe_dirs),
                ("mismatches", s.mismatches),
                ("errors", s.errors),
                ("backing_off", s.backing_off),
            ],
        )
    }

    /// Closes the connections (the next lookup makes them again).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || {
            self.inner.close();
            Ok(())
        })
    }
}
