//! The cache adapter's engines: one per KV geometry (tokens and bytes of the worker's KV block)
//! and namespace, built on first use from the adapter's [`EngineSettings`].
//!
//! Invariants: a key maps to at most one engine between `start` and `stop` (two callers asking
//! for the same geometry and namespace share it, so a worker's blocks are stored once); a pool
//! not started, or stopped, holds no engine and builds none; peer events set with
//! [`EnginePool::set_events`] apply to engines built afterwards (the SDK sets them before its
//! first KV call).

use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::{EngineSettings, PeerEventsSettings};
use crate::engine::Engine;
use crate::error::{CoreError, Result};
use crate::namespace::Namespace;

/// What tells two engines apart: the worker's KV block (tokens, bytes) and the namespace.
type Key = (u64, u64, Namespace);

struct Inner {
    settings: EngineSettings,
    engines: Vec<(Key, Arc<Engine>)>,
    running: bool,
}

pub struct EnginePool {
    /// The adapter's name, for the error of a stopped pool.
    name: String,
    inner: Mutex<Inner>,
}

impl EnginePool {
    /// A pool of no engines, building none until `start`.
    pub fn new(name: &str, settings: EngineSettings) -> Self {
        let inner = Inner { settings, engines: Vec::new(), running: false };
        Self { name: name.to_owned(), inner: Mutex::new(inner) }
    }

    pub fn settings(&self) -> EngineSettings {
        self.inner.lock().settings.clone()
    }

    /// Where engines built from now on publish their stored and removed blocks.
    pub fn set_events(&self, events: Option<PeerEventsSettings>) {
        self.inner.lock().settings.events = events;
    }

    /// The engine of this geometry and namespace, built (under the pool's lock, so never twice)
    /// when there is none yet. The auth key's variable is read through `env`.
    pub fn engine_for(
        &self,
        kv_block_size: u64,
        kv_block_bytes: u64,
        mut namespace: Namespace,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Arc<Engine>> {
        // `extra` is a set of entries: the same entries in another order are the same namespace
        // (its id sorts them too), so they must find the same engine.
        namespace.extra.sort();
        let mut inner = self.inner.lock();
        if !inner.running {
            return Err(CoreError::config(format!("the {} adapter is stopped", self.name)));
        }
        let key = (kv_block_size, kv_block_bytes, namespace);
        if let Some((_, engine)) = inner.engines.iter().find(|(k, _)| *k == key) {
            return Ok(Arc::clone(engine));
        }
        let cfg = inner.settings.engine_config(kv_block_size, kv_block_bytes, key.2.clone(), env)?;
        let engine = Arc::new(Engine::new(cfg)?);
        inner.engines.push((key, Arc::clone(&engine)));
        Ok(engine)
    }

    /// The engines built so far, oldest first.
    pub fn engines(&self) -> Vec<Arc<Engine>> {
        self.inner.lock().engines.iter().map(|(_, e)| Arc::clone(e)).collect()
    }

    pub fn start(&self) {
        self.inner.lock().running = true;
    }

    /// Drops the pool's engines (each one flushes as its last holder drops it); builds no more
    /// until `start`.
    pub fn stop(&self) {
        let dropped = {
            let mut inner = self.inner.lock();
            inner.running = false;
            std::mem::take(&mut inner.engines)
        };
        drop(dropped); // outside the lock: an engine's drop may wait for its writers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_section, VllmSettings};

    fn started(name: &str, settings: EngineSettings) -> EnginePool {
        let pool = EnginePool::new(name, settings);
        pool.start();
        pool
    }

    fn settings(memory_bytes: u64, chunk_size: Option<u64>) -> EngineSettings {
        let vllm =
            VllmSettings { kv_layout: None, staging_buffer_bytes: 0, model_id: None, enable_prefix_caching: true };
        EngineSettings { memory_bytes, chunk_size, disk: None, redis: None, events: None, vllm }
    }

    fn ns(model: &str) -> Namespace {
        Namespace { model: model.into(), dtype: "float16".into(), ..Namespace::default() }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn one_engine_per_geometry_and_namespace() {
        let pool = started("lmcache", settings(1 << 20, None));
        let a = pool.engine_for(16, 256, ns("m"), &no_env).unwrap();
        let again = pool.engine_for(16, 256, ns("m"), &no_env).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let other_model = pool.engine_for(16, 256, ns("n"), &no_env).unwrap();
        let other_bytes = pool.engine_for(16, 512, ns("m"), &no_env).unwrap();
        assert!(!Arc::ptr_eq(&a, &other_model) && !Arc::ptr_eq(&a, &other_bytes));
        assert_eq!(pool.engines().len(), 3);
        assert!(Arc::ptr_eq(&pool.engines()[0], &a), "oldest first");
    }

    #[test]
    fn the_settings_decide_the_engine() {
        // A chunk of 32 tokens over KV blocks of 16: an engine block is two KV blocks.
        let pool = started("lmcache", settings(1 << 20, Some(32)));
        let e = pool.engine_for(16, 256, ns("m"), &no_env).unwrap();
        assert_eq!((e.config().block_size, e.config().block_bytes), (32, 512));
        assert_eq!(e.config().capacity_bytes, 1 << 20);
        // A budget that holds no block is the setting's error, and nothing is kept.
        let small = started("lmcache", settings(100, None));
        let err = small.engine_for(16, 256, ns("m"), &no_env).err().unwrap().to_string();
        assert!(err.contains("max_cache_size"), "{err}");
        assert!(small.engines().is_empty());
    }

    #[test]
    fn a_stopped_pool_holds_and_builds_nothing_until_started() {
        let pool = EnginePool::new("lmcache", settings(1 << 20, None));
        let err = pool.engine_for(16, 256, ns("m"), &no_env).err().unwrap();
        assert!(err.to_string().contains("the lmcache adapter is stopped"), "not started yet: {err}");
        pool.start();
        let first = pool.engine_for(16, 256, ns("m"), &no_env).unwrap();
        pool.stop();
        assert!(pool.engines().is_empty());
        let err = pool.engine_for(16, 256, ns("m"), &no_env).err().unwrap();
        assert!(matches!(err, CoreError::Config(_)) && err.to_string().contains("the lmcache adapter is stopped"));
        pool.start();
        let fresh = pool.engine_for(16, 256, ns("m"), &no_env).unwrap();
        assert!(!Arc::ptr_eq(&first, &fresh));
    }

    #[test]
    fn events_apply_to_engines_built_after_they_are_set() {
        let section = serde_json::json!({"enabled": true, "adapters": [{"name": "lmcache"}]});
        let pool = EnginePool::new("lmcache", EngineSettings::from_config(&parse_section(&section, "").unwrap()));
        assert!(pool.settings().events.is_none());
        let events =
            PeerEventsSettings { nats_url: "nats://h:4222".into(), subject: "s".into(), worker_id: "w".into() };
        pool.set_events(Some(events.clone()));
        assert_eq!(pool.settings().events, Some(events));
    }

    #[test]
    fn extra_entries_in_any_order_find_the_same_engine() {
        let pool = started("lmcache", settings(1 << 20, None));
        let ns = |extra: &[(&str, &str)]| Namespace {
            model: "m".into(),
            extra: extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Namespace::default()
        };
        let a = pool.engine_for(16, 256, ns(&[("a", "1"), ("b", "2")]), &no_env).unwrap();
        let b = pool.engine_for(16, 256, ns(&[("b", "2"), ("a", "1")]), &no_env).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(pool.engines().len(), 1);
    }
}
