//! The one tokio runtime XConnector's background I/O (Redis, NATS) runs on: created on first use,
//! never at import, and created anew in a forked child, whose copy of the parent's runtime has no
//! threads behind it (tokenizers' rule: forking with live threads deadlocks if the child uses them).

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::runtime::Runtime;

use crate::error::{CoreError, Result};

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The runtime of this process.
pub fn runtime() -> Result<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock();
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(Arc::clone(rt));
        }
        // Inherited through fork: its threads do not exist here. Never drop it (dropping joins
        // them); leak it and start a new one.
        if let Some((_, inherited)) = slot.take() {
            std::mem::forget(inherited);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("xconnector-io")
        .enable_all()
        .build()
        .map_err(|e| CoreError::Io { context: "starting XConnector's I/O runtime".into(), source: e })?;
    let rt = Arc::new(rt);
    *slot = Some((pid, Arc::clone(&rt)));
    Ok(rt)
}
