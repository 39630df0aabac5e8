//! The configuration schema (DESIGN section 2), defined once (schema.rs). Parsing is strict and reports
//! every problem at once, each with its full key path and what would be accepted.

mod adapters;
mod discover;
mod document;
mod locate;
mod problem;
mod schema;
pub mod secrets;
mod size;
mod source;
mod validate;

pub use adapters::{check_settings, settings_of, size_bytes, Setting};
pub use discover::{discover, Environment, CONFIG_VARS};
pub use document::parse_document;
pub use locate::{dynamo_warnings, resolve_document, Resolved};
pub use problem::{join_path, report, Problem};
pub use schema::{AdapterConfig, AdapterType, IntegrationConfig, Mode, PerformanceConfig, SdkConfig, KNOWN_ADAPTERS};
pub use size::{mib_to_bytes, parse_size};
pub use source::{read_config_file, MAX_CONFIG_BYTES};
pub use validate::{parse_adapter, parse_section, parse_section_traced};
