//! `cli_main`: the `xconnector` command (`xconnector_core::cli`), run with the GIL released. Its
//! output goes through the Python streams it is given, so a swapped `sys.stdout` (pytest's
//! capsys, a caller's StringIO) sees it; the first Python exception (a closed pipe, a failing
//! plot) stops the command and is raised as it was.

use std::io;

use pyo3::prelude::*;
use xconnector_core::cli::{self, Host};
use xconnector_core::replay::Report;

use crate::call::detached;

struct PyHost {
    out: Py<PyAny>,
    err: Py<PyAny>,
    versions: Py<PyAny>,
    plot: Py<PyAny>,
    failed: Option<PyErr>,
}

impl PyHost {
    /// The result of a Python call; an exception is kept (the first one) and stops the command.
    fn keep<T>(&mut self, r: PyResult<T>) -> io::Result<T> {
        r.map_err(|e| {
            let message = e.to_string();
            self.failed.get_or_insert(e);
            io::Error::other(message)
        })
    }

    fn write(&mut self, stderr: bool, text: &str) -> io::Result<()> {
        let stream = if stderr { &self.err } else { &self.out };
        let r = Python::attach(|py| {
            stream.call_method1(py, "write", (text,))?;
            // Standard error carries the progress bar, whose lines end in '\r', not '\n'.
            if stderr {
                stream.call_method0(py, "flush")?;
            }
            // Ctrl-C during a long bench: raised here, between two progress reports.
            py.check_signals()
        });
        self.keep(r)
    }
}

impl Host for PyHost {
    fn out(&mut self, text: &str) -> io::Result<()> {
        self.write(false, text)
    }

    fn err(&mut self, text: &str) -> io::Result<()> {
        self.write(true, text)
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn versions(&mut self) -> io::Result<Vec<(String, Option<String>)>> {
        let r = Python::attach(|py| self.versions.call0(py)?.extract(py));
        self.keep(r)
    }

    fn plot(&mut self, path: &str, r: &Report) -> io::Result<()> {
        let rates: Vec<f64> = r.samples.iter().map(|s| s.hit_tokens as f64 / s.prompt_tokens.max(1) as f64).collect();
        let lookup_us: Vec<f64> = r.samples.iter().map(|s| s.lookup.as_secs_f64() * 1e6).collect();
        let p99 = r.lookup_p99.as_secs_f64() * 1e6;
        let r = Python::attach(|py| self.plot.call1(py, (path, rates, lookup_us, p99)).map(drop));
        self.keep(r)
    }
}

/// Runs `xconnector ARGV...` (without the program name), writing to the text streams `out` and
/// `err`; `versions()` gives `[(name, version or None)]` that only Python can read, and
/// `plot(path, hit_rates, lookup_us, lookup_p99_us)` draws `bench --plot`. Returns the exit code.
#[pyfunction]
pub fn cli_main(
    py: Python<'_>,
    argv: Vec<String>,
    out: Py<PyAny>,
    err: Py<PyAny>,
    versions: Py<PyAny>,
    plot: Py<PyAny>,
) -> PyResult<i32> {
    let mut host = PyHost { out, err, versions, plot, failed: None };
    let code = detached(py, || Ok(cli::run(&argv, &mut host)))?;
    match (code, host.failed) {
        (_, Some(e)) => Err(e),
        (Ok(code), None) => Ok(code),
        (Err(e), None) => Err(e.into()),
    }
}
