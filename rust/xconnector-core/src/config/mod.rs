//! The configuration schema (DESIGN section 2), defined once (schema.rs). Parsing is strict and reports
//! every problem at once, each with its full key path and what would be accepted.

mod adapters;
mod argv;
mod discover;
mod document;
mod geometry;
mod locate;
mod preflight;
mod problem;
mod rules;
mod schema;
pub mod secrets;
mod settings;
mod size;
mod source;
mod validate;
mod worker;

pub use adapters::{check_settings, settings_of, size_bytes, Setting};
pub use discover::{discover, Environment, CONFIG_VARS, SERVICE_VAR};
pub use document::{parse_document, parse_document_lenient};
pub use geometry::{engine_block, EngineBlock};
pub use locate::{
    dynamo_warnings, is_strict, resolve_document, resolve_document_for, resolve_text, section_strict, Resolved,
};
pub use preflight::{runtime_problems, RuntimeProblem, REDIS_DEADLINE};
pub use problem::{join_path, report, Problem};
pub use rules::MIN_MEMORY_BYTES;
pub use schema::{AdapterConfig, AdapterType, IntegrationConfig, Mode, PerformanceConfig, SdkConfig, KNOWN_ADAPTERS};
pub use settings::{
    default_worker_id, AuthKeySource, DiskSettings, EngineSettings, PeerEventsSettings, RedisSettings, VllmSettings,
    DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, DEFAULT_REDIS_TIMEOUT_MS, DEFAULT_STAGING_BYTES,
};
pub use size::{mib_to_bytes, parse_size};
pub use source::{read_config_file, MAX_CONFIG_BYTES};
pub use validate::{parse_adapter, parse_section, parse_section_for, parse_section_traced};
pub use worker::{worker_block_sizes, WorkerBlockSize};
