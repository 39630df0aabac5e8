//! Rust `tracing` output, either into Python's `logging` (logger `xconnector`), or, when
//! `XCONNECTOR_LOG` is set (an `EnvFilter` string such as `debug` or `xconnector_core=trace`),
//! straight to stderr for debugging without touching the host's logging setup.

use parking_lot::Mutex;
use pyo3::prelude::*;

static RESET: Mutex<Option<pyo3_log::ResetHandle>> = Mutex::new(None);

pub fn init(py: Python<'_>) {
    if let Ok(filter) = std::env::var("XCONNECTOR_LOG") {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .finish();
        // Fails only if the process already set one; then that subscriber gets our events.
        let _ = tracing::subscriber::set_global_default(subscriber);
        return;
    }
    // With no tracing subscriber set, `tracing` emits `log` records; pyo3-log forwards them to
    // the `logging` logger named after the target, prefixed `xconnector.`. Levels are cached so a
    // disabled level costs no GIL; `reset_log_cache` picks up later level changes.
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels)
        .map(|l| l.set_prefix("xconnector").filter(tracing::log::LevelFilter::Debug));
    if let Ok(logger) = logger {
        if let Ok(handle) = logger.install() {
            *RESET.lock() = Some(handle);
        }
    }
}

/// Forget cached Python logger levels (call after changing a level of an `xconnector` logger).
#[pyfunction]
pub fn reset_log_cache() {
    if let Some(h) = RESET.lock().as_ref() {
        h.reset();
    }
}
