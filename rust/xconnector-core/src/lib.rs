//! XConnector's KV-cache engine: Dynamo-compatible block hashing, a byte-budgeted memory tier with
//! leaf-first LRU eviction, and the engine that ties them to requests' token ids. No Python here:
//! everything is testable with `cargo test`; `xconnector-py` is the thin binding.

pub mod arena;
pub mod blake2b;
pub mod block_journal;
pub mod bulk_copy;
pub mod cli;
pub mod config;
pub mod disk_dir;
pub mod disk_files;
pub mod disk_tier;
pub mod engine;
pub mod engine_blocks;
pub mod engine_pool;
pub mod error;
pub mod exposition;
pub mod faults;
pub mod hashing;
pub mod histogram;
pub mod kv_layout;
pub mod kv_namespace;
pub mod layer_loads;
pub mod lookup_service;
pub mod memory_tier;
pub mod metrics;
pub mod migrate;
pub mod mm_keys;
pub mod namespace;
pub mod overlap;
pub mod peer_events;
pub mod peer_overlap;
pub mod prefix;
pub mod pyjson;
pub mod redis_tier;
pub mod replay;
pub mod router;
pub mod router_calls;
pub mod runtime;
pub mod save_queue;
pub mod sdk_plan;
pub mod sdk_stats;
pub mod startup_check;
pub mod stats;
pub mod transfer_plan;
pub mod v0_batch;
pub mod v1_worker;
pub mod vllm_events;
pub mod vllm_transfer;
pub mod workload;

pub use engine::{DiskConfig, Engine, EngineConfig, PinnedBlock, StoreOutcome};
pub use error::{CoreError, Result};
pub use hashing::HashExtras;
pub use namespace::Namespace;
pub use peer_events::EventsConfig;
pub use redis_tier::RedisConfig;
pub use stats::EngineStats;
