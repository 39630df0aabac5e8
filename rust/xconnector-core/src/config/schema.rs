//! The typed configuration (DESIGN section 2): what the validator builds and what its normalized
//! output serializes.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// All tiers in-process.
    Embedded,
    /// In-process tiers plus a shared remote tier.
    Hybrid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterType {
    Cache,
    Inference,
    Distributed,
}

/// Adapters this build provides, with the type each one is.
pub const KNOWN_ADAPTERS: &[(&str, AdapterType)] =
    &[("lmcache", AdapterType::Cache), ("vllm", AdapterType::Inference), ("dynamo", AdapterType::Distributed)];

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdapterConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: AdapterType,
    /// Adapter-specific settings, as given (each adapter validates its own keys).
    pub config: serde_json::Map<String, serde_json::Value>,
    pub enabled: bool,
    /// Lower runs first.
    pub priority: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IntegrationConfig {
    /// `module:Class` targets to patch.
    pub targets: Vec<String>,
    /// Service names (Dynamo components) in which the autopatch acts.
    pub services: Vec<String>,
    /// Raise at startup on a configuration error instead of leaving the worker unpatched.
    pub strict: bool,
}

impl Default for IntegrationConfig {
    fn default() -> Self {
        Self {
            targets: vec!["components.worker:VllmWorker".into(), "components.prefill_worker:PrefillWorker".into()],
            services: vec!["VllmWorker".into(), "PrefillWorker".into()],
            strict: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PerformanceConfig {
    pub block_size: u32,
    /// Background I/O threads; 0 picks a default from the machine.
    pub worker_threads: u32,
    /// Register host buffers as pinned memory on GPU machines.
    pub pin_memory: bool,
    /// Blocks per batched remote/disk operation.
    pub batch_size: u32,
    /// Serve Prometheus metrics on this port too (besides the worker's own `/metrics`).
    pub metrics_port: Option<u16>,
}

impl Default for PerformanceConfig {
    fn default() -> Self {
        Self { block_size: 16, worker_threads: 0, pin_memory: false, batch_size: 64, metrics_port: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SdkConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub enable_distributed: bool,
    pub enable_caching: bool,
    pub adapters: Vec<AdapterConfig>,
    pub integration: IntegrationConfig,
    pub performance: PerformanceConfig,
}

impl Default for SdkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            mode: Mode::Embedded,
            enable_distributed: true,
            enable_caching: true,
            adapters: Vec::new(),
            integration: IntegrationConfig::default(),
            performance: PerformanceConfig::default(),
        }
    }
}

impl SdkConfig {
    /// The normalized form: every key present, adapters as a list sorted by priority. Reading it
    /// back with [`parse_section`] gives the same config.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("every map key in the config is a string")
    }
}

impl AdapterConfig {
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("every map key in the config is a string")
    }
}

impl AdapterType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Inference => "inference",
            Self::Distributed => "distributed",
        }
    }
}
