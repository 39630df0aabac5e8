//! `xconnector._native.EventSubscriber`: XConnector's peer event batches from NATS as Python
//! dicts (its own channel between XConnector workers, not Dynamo's event plane).

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xconnector_core::peer_events::{EventData, EventSubscriber as CoreSubscriber};

use crate::call::detached;
use crate::errors::invalid_input;

/// Receives the stored/removed block events other workers publish.
#[pyclass(module = "xconnector._native", frozen)]
pub struct EventSubscriber {
    inner: CoreSubscriber,
}

#[pymethods]
impl EventSubscriber {
    #[new]
    #[pyo3(signature = (url, subject = "xconnector.kv_events", timeout = 5.0))]
    fn new(py: Python<'_>, url: &str, subject: &str, timeout: f64) -> PyResult<Self> {
        let t = Duration::try_from_secs_f64(timeout).map_err(|_| invalid_input(py, "timeout must be seconds >= 0"))?;
        let inner = detached(py, || {
            let rt = xconnector_core::runtime::runtime()?;
            CoreSubscriber::start(url, subject, &rt, t)
        })?;
        Ok(Self { inner })
    }

    /// The next batch as `{"worker_id": str, "events": [...]}` (Dynamo's KvCacheEvent shapes),
    /// or None after `timeout` seconds.
    #[pyo3(signature = (timeout = 1.0))]
    fn next<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Option<Bound<'py, PyDict>>> {
        let t = Duration::try_from_secs_f64(timeout).map_err(|_| invalid_input(py, "timeout must be seconds >= 0"))?;
        let Some(batch) = py.detach(|| self.inner.next(t)) else { return Ok(None) };
        let out = PyDict::new(py);
        out.set_item("worker_id", batch.worker_id)?;
        let events = pyo3::types::PyList::empty(py);
        for e in batch.events {
            let d = PyDict::new(py);
            d.set_item("event_id", e.event_id)?;
            match e.data {
                EventData::Stored { parent_hash, blocks } => {
                    d.set_item("kind", "stored")?;
                    d.set_item("parent_hash", parent_hash)?;
                    d.set_item("block_hashes", blocks.iter().map(|b| b.block_hash).collect::<Vec<_>>())?;
                    d.set_item("tokens_hashes", blocks.iter().map(|b| b.tokens_hash).collect::<Vec<_>>())?;
                }
                EventData::Removed { block_hashes } => {
                    d.set_item("kind", "removed")?;
                    d.set_item("block_hashes", block_hashes)?;
                }
            }
            events.append(d)?;
        }
        out.set_item("events", events)?;
        Ok(Some(out))
    }
}
