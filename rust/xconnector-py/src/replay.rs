//! `xconnector bench`'s native half (`xconnector_core::replay`) and the usable-prefix rule
//! (`xconnector_core::prefix`).

use std::ops::ControlFlow;
use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::replay::{self as core, Copies, ReplayConfig};

use crate::call::{detached, guarded};

/// Tokens of a `prompt_len`-token prompt a worker can load instead of computing when the first
/// `hit` are cached: never the block holding the last token (its logits are needed).
#[pyfunction]
pub fn usable_prefix(py: Python<'_>, hit: usize, prompt_len: usize, block_size: usize) -> PyResult<usize> {
    guarded(py, || Ok(xconnector_core::prefix::usable_prefix(hit, prompt_len, block_size)))
}

/// The CPU's last-level cache in bytes, read from a sysfs cache directory (this machine's cpu0
/// by default); 32 MiB where it cannot be read.
#[pyfunction]
#[pyo3(signature = (root = None))]
pub fn last_level_cache_bytes(py: Python<'_>, root: Option<String>) -> PyResult<usize> {
    let root = root.unwrap_or_else(|| "/sys/devices/system/cpu/cpu0/cache".to_owned());
    detached(py, || Ok(core::last_level_cache_bytes(Path::new(&root))))
}

/// Replays `requests` seeded requests through a fresh engine of `cache_bytes` with 16-token
/// blocks of `block_bytes`, calling `progress(done, total)` every 50 requests and after the last
/// (an exception from it stops the replay and propagates). Returns the figures (see
/// `xconnector_core::replay`): `store`, `store_filling`, `store_full` and `load` as `{bytes,
/// seconds, count}`, and the per-request series `hit_rates` and `lookup_us`.
#[pyfunction]
#[pyo3(signature = (requests, seed, cache_bytes, block_bytes, progress = None))]
pub fn replay<'py>(
    py: Python<'py>,
    requests: usize,
    seed: i64,
    cache_bytes: u64,
    block_bytes: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut failed: Option<PyErr> = None;
    let report = detached(py, || {
        let cfg = ReplayConfig::new(requests, seed as u64, cache_bytes, block_bytes);
        core::replay(&cfg, |p| match &progress {
            None => ControlFlow::Continue(()),
            Some(f) => match Python::attach(|py| f.call1(py, (p.done, p.total))) {
                Ok(_) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            },
        })
    })?;
    let Some(r) = report else {
        return Err(failed.unwrap_or_else(|| crate::errors::internal(py, "the replay stopped without a reason")));
    };
    guarded(py, || {
        let d = PyDict::new(py);
        let us = |t: std::time::Duration| t.as_secs_f64() * 1e6;
        d.set_item("requests", r.samples.len())?;
        d.set_item("seed", seed)?;
        d.set_item("prompt_tokens", r.prompt_tokens)?;
        d.set_item("hit_tokens", r.hit_tokens)?;
        d.set_item("saved_tokens", r.saved_tokens)?;
        d.set_item("lookup_p50_us", us(r.lookup_p50))?;
        d.set_item("lookup_p99_us", us(r.lookup_p99))?;
        let copies = |c: &Copies| -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            d.set_item("bytes", c.bytes)?;
            d.set_item("seconds", c.time.as_secs_f64())?;
            d.set_item("count", c.count)?;
            Ok(d)
        };
        d.set_item("store", copies(&r.store_filling.plus(r.store_full))?)?;
        d.set_item("store_filling", copies(&r.store_filling)?)?;
        d.set_item("store_full", copies(&r.store_full)?)?;
        d.set_item("load", copies(&r.load)?)?;
        d.set_item("evicted_blocks", r.evicted_blocks)?;
        d.set_item("llc_bytes", r.llc_bytes)?;
        let rates: Vec<f64> = r.samples.iter().map(|s| s.hit_tokens as f64 / s.prompt_tokens.max(1) as f64).collect();
        d.set_item("hit_rates", rates)?;
        d.set_item("lookup_us", r.samples.iter().map(|s| us(s.lookup)).collect::<Vec<f64>>())?;
        Ok(d)
    })
}
