//! What the engine is built from, derived from a validated config in one place: the cache
//! adapter's memory, disk and Redis settings with their defaults, the peer events from the
//! distributed adapter, and the inference adapter's settings. The binding builds engines from
//! this ([`EngineSettings::engine_config`]) and shows it (redacted) in health output.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::adapters::{size_bytes, Setting};
use super::geometry::engine_block;
use super::schema::{AdapterConfig, SdkConfig};
use super::secrets::{redact_url, HIDDEN};
use crate::engine::{DiskConfig, EngineConfig};
use crate::error::{CoreError, Result};
use crate::namespace::Namespace;
use crate::peer_events::EventsConfig;
use crate::redis_tier::{AuthKey, RedisConfig};

/// The memory tier's budget when neither `max_cache_size` nor `max_local_cpu_size` is set.
pub const DEFAULT_MEMORY_BYTES: u64 = 2 << 30;
/// The disk tier's budget when `max_local_disk_size` is not set.
pub const DEFAULT_DISK_BYTES: u64 = 20 << 30;
/// The most a request waits on Redis when `remote_timeout_ms` is not set.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 20;
/// The pinned staging buffer of device KV copies when `staging_buffer_size` is not set.
pub const DEFAULT_STAGING_BYTES: u64 = 256 << 20;
/// Queues and batches of the lower tiers and events (as `Engine(...)` defaults them).
pub const DISK_QUEUE_BLOCKS: usize = 1024;
pub const REDIS_KEY_PREFIX: &str = "xconnector";
pub const REDIS_QUEUE_BLOCKS: usize = 4096;
pub const REDIS_BATCH_BLOCKS: usize = 64;
pub const EVENTS_QUEUE: usize = 65536;
pub const EVENTS_BATCH: usize = 256;

/// Where the Redis values' shared secret comes from. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthKeySource {
    /// `remote_auth_key`: the secret itself.
    Inline(String),
    /// `remote_auth_key_env`: the environment variable holding it, read by the worker.
    Env(String),
}

impl std::fmt::Debug for AuthKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => write!(f, "Inline({HIDDEN})"),
            Self::Env(name) => write!(f, "Env({name:?})"),
        }
    }
}

impl AuthKeySource {
    /// The secret, reading the variable through `env`; the error names the setting and the fix.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> std::result::Result<String, String> {
        match self {
            Self::Inline(key) => Ok(key.clone()),
            Self::Env(name) => match env(name) {
                None => Err(format!(
                    "{LMCACHE}.remote_auth_key_env: the environment variable {name} is not set; set it to the \
                     shared secret in every worker's environment"
                )),
                Some(v) if v.is_empty() => Err(format!(
                    "{LMCACHE}.remote_auth_key_env: the environment variable {name} is empty; set it to the shared \
                     secret (a long random string)"
                )),
                Some(v) => Ok(v),
            },
        }
    }
}

/// Key path of the cache adapter's settings in messages (adapters are unique by name).
pub const LMCACHE: &str = "adapters.lmcache.config";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSettings {
    /// The directory (`file://` removed, as LMCache writes it).
    pub path: PathBuf,
    pub capacity_bytes: u64,
    /// Several users' workers share it on purpose (group-writable).
    pub shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSettings {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub timeout_ms: u64,
    /// Seconds each value lives (`remote_ttl_s`); None: until Redis evicts it.
    pub ttl_s: Option<u64>,
    pub auth_key: Option<AuthKeySource>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEventsSettings {
    pub nats_url: String,
    pub subject: String,
    pub worker_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VllmSettings {
    /// None: detect the layout from the KV tensors (`auto`).
    pub kv_layout: Option<String>,
    pub staging_buffer_bytes: u64,
    pub model_id: Option<String>,
    pub enable_prefix_caching: bool,
}

/// The engine's configuration, as the adapters' settings give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    pub memory_bytes: u64,
    /// Tokens per engine block; None: one KV block of the worker.
    pub chunk_size: Option<u64>,
    pub disk: Option<DiskSettings>,
    pub redis: Option<RedisSettings>,
    pub events: Option<PeerEventsSettings>,
    pub vllm: VllmSettings,
}

/// The enabled adapter called `name` (the SDK runs its defaults when there is none).
fn enabled<'c>(cfg: &'c SdkConfig, name: &str) -> Option<&'c AdapterConfig> {
    cfg.adapters.iter().find(|a| a.name == name && a.enabled)
}

fn text(s: &Map<String, Value>, key: &str) -> Option<String> {
    s.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned)
}

fn bytes(s: &Map<String, Value>, key: &str, unit: Setting) -> Option<u64> {
    s.get(key).and_then(|v| size_bytes(v, unit).ok())
}

/// `{hostname}-{pid}`, as the distributed adapter defaults a worker's id.
pub fn default_worker_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".to_owned()
    };
    format!("{host}-{}", std::process::id())
}

impl EngineSettings {
    /// The settings of a validated config (anything it lacks takes its default).
    pub fn from_config(cfg: &SdkConfig) -> Self {
        let empty = Map::new();
        let s = enabled(cfg, "lmcache").map_or(&empty, |a| &a.config);
        let memory_bytes = bytes(s, "max_cache_size", Setting::SizeMib)
            .or_else(|| bytes(s, "max_local_cpu_size", Setting::SizeGb))
            .unwrap_or(DEFAULT_MEMORY_BYTES);
        let disk = text(s, "local_disk").map(|dir| DiskSettings {
            path: PathBuf::from(dir.strip_prefix("file://").unwrap_or(&dir)),
            capacity_bytes: bytes(s, "max_local_disk_size", Setting::SizeGb).unwrap_or(DEFAULT_DISK_BYTES),
            shared: s.get("local_disk_shared") == Some(&Value::Bool(true)),
        });
        let auth_key = match (text(s, "remote_auth_key"), text(s, "remote_auth_key_env")) {
            (Some(k), _) => Some(AuthKeySource::Inline(k)),
            (None, Some(name)) => Some(AuthKeySource::Env(name)),
            (None, None) => None,
        };
        let redis = text(s, "remote_url").map(|url| RedisSettings {
            url,
            ca_file: text(s, "remote_ca_file").map(PathBuf::from),
            timeout_ms: s.get("remote_timeout_ms").and_then(Value::as_u64).unwrap_or(DEFAULT_REDIS_TIMEOUT_MS),
            ttl_s: s.get("remote_ttl_s").and_then(Value::as_u64),
            auth_key,
        });
        let events = enabled(cfg, "dynamo").filter(|_| cfg.enable_distributed).and_then(|a| {
            let d = &a.config;
            let namespace = text(d, "namespace").unwrap_or_else(|| "dynamo".to_owned());
            Some(PeerEventsSettings {
                nats_url: text(d, "nats_url")?,
                subject: text(d, "kv_events_subject").unwrap_or_else(|| format!("{namespace}.xconnector.kv_events")),
                worker_id: text(d, "worker_id").unwrap_or_else(default_worker_id),
            })
        });
        let v = enabled(cfg, "vllm").map_or(&empty, |a| &a.config);
        let vllm = VllmSettings {
            kv_layout: text(v, "kv_layout").filter(|l| l != "auto"),
            staging_buffer_bytes: bytes(v, "staging_buffer_size", Setting::SizeMib).unwrap_or(DEFAULT_STAGING_BYTES),
            model_id: text(v, "model_id"),
            enable_prefix_caching: v.get("enable_prefix_caching").and_then(Value::as_bool).unwrap_or(true),
        };
        let chunk_size = s.get("chunk_size").and_then(Value::as_u64);
        Self { memory_bytes, chunk_size, disk, redis, events, vllm }
    }

    /// The settings as shown in health and status output: URLs without passwords, the auth key
    /// as `***` (or the name of its variable).
    pub fn to_value(&self) -> Value {
        json!({
            "memory_bytes": self.memory_bytes,
            "chunk_size": self.chunk_size,
            "disk": self.disk.as_ref().map(|d| json!({
                "path": d.path.display().to_string(), "capacity_bytes": d.capacity_bytes, "shared": d.shared})),
            "redis": self.redis.as_ref().map(|r| json!({
                "url": redact_url(&r.url),
                "ca_file": r.ca_file.as_ref().map(|p| p.display().to_string()),
                "timeout_ms": r.timeout_ms,
                "ttl_s": r.ttl_s,
                "auth_key": match &r.auth_key { Some(AuthKeySource::Inline(_)) => Some(HIDDEN), _ => None },
                "auth_key_env": match &r.auth_key { Some(AuthKeySource::Env(n)) => Some(n.as_str()), _ => None },
            })),
            "events": self.events.as_ref().map(|e| json!({
                "nats_url": redact_url(&e.nats_url), "subject": e.subject, "worker_id": e.worker_id})),
            "vllm": {
                "kv_layout": self.vllm.kv_layout,
                "staging_buffer_bytes": self.vllm.staging_buffer_bytes,
                "model_id": self.vllm.model_id,
                "enable_prefix_caching": self.vllm.enable_prefix_caching,
            },
        })
    }

    /// Whatever the settings read from the environment is there (the auth key's variable), so a
    /// missing one is found when the cache adapter starts rather than at the first KV call.
    pub fn check_env(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        match self.redis.as_ref().and_then(|r| r.auth_key.as_ref()) {
            Some(key) => key.resolve(env).map(drop).map_err(CoreError::config),
            None => Ok(()),
        }
    }

    /// The engine for a worker's KV blocks of `kv_block_size` tokens and `kv_block_bytes` bytes,
    /// in `namespace`. The auth key variable is read through `env`. Errors name the setting.
    pub fn engine_config(
        &self,
        kv_block_size: u64,
        kv_block_bytes: u64,
        namespace: Namespace,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EngineConfig> {
        let block = engine_block(self.chunk_size, kv_block_size).map_err(|e| match self.chunk_size {
            Some(_) => CoreError::config(format!("{LMCACHE}.chunk_size: {e}")),
            None => CoreError::config(format!("kv_block_size: {e}")),
        })?;
        let block_bytes =
            block.bytes(kv_block_bytes).filter(|&b| b > 0 && usize::try_from(b).is_ok()).ok_or_else(|| {
                CoreError::config(format!("kv_block_bytes must be from 1 to a few GiB, got {kv_block_bytes}"))
            })?;
        if self.memory_bytes < block_bytes {
            return Err(CoreError::config(format!(
                "{LMCACHE}.max_cache_size: the memory budget of {} bytes holds no engine block of {block_bytes} bytes \
                 ({} tokens); raise it",
                self.memory_bytes, block.tokens
            )));
        }
        let redis = match &self.redis {
            None => None,
            Some(r) => {
                let auth_key = match &r.auth_key {
                    None => None,
                    Some(src) => {
                        let secret = src.resolve(env).map_err(CoreError::config)?;
                        Some(AuthKey::from_secret(secret.as_bytes()).map_err(|_| {
                            CoreError::config(format!(
                                "{LMCACHE}.remote_auth_key: the secret is empty; give the shared secret"
                            ))
                        })?)
                    }
                };
                Some(RedisConfig {
                    url: r.url.clone(),
                    key_prefix: REDIS_KEY_PREFIX.to_owned(),
                    queue_blocks: REDIS_QUEUE_BLOCKS,
                    batch_blocks: REDIS_BATCH_BLOCKS,
                    timeout: Duration::from_millis(r.timeout_ms),
                    ttl: r.ttl_s.map(Duration::from_secs),
                    ca_file: r.ca_file.clone(),
                    auth_key,
                })
            }
        };
        Ok(EngineConfig {
            block_size: block.tokens as usize,
            block_bytes: block_bytes as usize,
            capacity_bytes: self.memory_bytes,
            namespace,
            disk: self.disk.as_ref().map(|d| DiskConfig {
                dir: d.path.clone(),
                capacity_bytes: d.capacity_bytes,
                queue_blocks: DISK_QUEUE_BLOCKS,
                shared: d.shared,
            }),
            redis,
            events: self.events.as_ref().map(|e| EventsConfig {
                url: e.nats_url.clone(),
                subject: e.subject.clone(),
                worker_id: e.worker_id.clone(),
                queue_events: EVENTS_QUEUE,
                batch_events: EVENTS_BATCH,
            }),
        })
    }
}
