//! The settings each built-in adapter accepts under `config:`, with their types. Unknown keys are
//! errors (LMCache only warns on them; its users lose hours to typos).

use serde_json::{Map, Value};

use super::problem::{join_path, kind, not_a_boolean, Problem};
use super::size::{mib_to_bytes, parse_size};

/// What a setting's value must be.
#[derive(Clone, Copy, Debug)]
pub enum Setting {
    Bool,
    /// An integer >= the bound.
    Int(i64),
    /// An integer in `min..=max`.
    IntIn(i64, i64),
    /// A non-empty string never echoed in messages (a shared secret).
    Secret,
    /// The name of an environment variable.
    EnvName,
    /// Integer MiB (the design's `max_cache_size: 2048`) or a string with a unit.
    SizeMib,
    /// A number of GB, as LMCache reads `max_local_cpu_size: 5.0`, or a string with a unit.
    SizeGb,
    Str,
    OneOf(&'static [&'static str]),
    /// A URL with one of these schemes.
    Url(&'static [&'static str]),
}

pub const LMCACHE_SETTINGS: &[(&str, Setting)] = &[
    ("storage_backend", Setting::OneOf(&["memory", "disk", "redis", "hybrid"])),
    ("max_cache_size", Setting::SizeMib),
    ("chunk_size", Setting::Int(1)),
    ("local_cpu", Setting::Bool),
    ("max_local_cpu_size", Setting::SizeGb),
    ("local_disk", Setting::Str),
    ("max_local_disk_size", Setting::SizeGb),
    // The disk directory is shared by several users' workers on purpose (group-writable).
    ("local_disk_shared", Setting::Bool),
    ("remote_url", Setting::Url(&["redis", "rediss", "redis-cluster", "rediss-cluster"])),
    ("remote_ca_file", Setting::Str),
    // The most a request waits on Redis, in ms (redis_tier.rs: the budget).
    ("remote_timeout_ms", Setting::IntIn(1, 60_000)),
    // Seconds a value lives in Redis (SET .. PX), at most a year; none: until Redis evicts it.
    ("remote_ttl_s", Setting::IntIn(1, crate::redis_tier::MAX_TTL_SECS as i64)),
    // The shared secret of the values' MAC, or the environment variable holding it.
    ("remote_auth_key", Setting::Secret),
    ("remote_auth_key_env", Setting::EnvName),
];

pub const VLLM_SETTINGS: &[(&str, Setting)] = &[
    ("enable_prefix_caching", Setting::Bool),
    ("kv_layout", Setting::OneOf(&["auto", "flash_attn", "flashinfer", "standard", "mla"])),
    ("staging_buffer_size", Setting::SizeMib),
    // The model's identity in the namespace, for one model mounted at different paths.
    ("model_id", Setting::Str),
];

pub const DYNAMO_SETTINGS: &[(&str, Setting)] = &[
    ("namespace", Setting::Str),
    ("component", Setting::Str),
    ("worker_id", Setting::Str),
    ("nats_url", Setting::Url(&["nats", "tls"])),
    ("kv_events_subject", Setting::Str),
];

pub fn settings_of(adapter: &str) -> &'static [(&'static str, Setting)] {
    match adapter {
        "lmcache" => LMCACHE_SETTINGS,
        "vllm" => VLLM_SETTINGS,
        "dynamo" => DYNAMO_SETTINGS,
        _ => &[],
    }
}

/// A size setting in bytes (`None` when absent). Errors say what to write.
pub fn size_bytes(v: &Value, setting: Setting) -> Result<u64, String> {
    match (v, setting) {
        (Value::String(s), _) => parse_size(s),
        (Value::Number(n), Setting::SizeMib) => match n.as_i64() {
            Some(i) => mib_to_bytes(i),
            None => Err(format!("{n} is not a whole number of MiB; write e.g. \"1.5GiB\"")),
        },
        (Value::Number(n), Setting::SizeGb) => match n.as_f64() {
            Some(gb) if (0.0..1e9).contains(&gb) => Ok((gb * 1e9) as u64),
            _ => Err(format!("{n} is not a size in GB >= 0")),
        },
        (other, Setting::SizeGb) => {
            Err(format!("expected a size (GB, as LMCache reads it, or \"5GiB\"), got {}", kind(other)))
        }
        (other, _) => Err(format!("expected a size (MiB or \"2GiB\"), got {}", kind(other))),
    }
}

/// A rejected value as a message may show it: as it is if plainly not a credential, else its kind.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) if super::secrets::is_plain(s) => format!("{s:?}"),
        Value::String(_) => "a string that is not shown (it may be a secret)".to_owned(),
        other => super::secrets::redact(other).to_string(),
    }
}

/// Problems with an adapter's `config:` mapping, each at its key path.
pub fn check_settings(adapter: &str, config: &Map<String, Value>, path: &str) -> Vec<Problem> {
    let schema = settings_of(adapter);
    let mut out = Vec::new();
    for (key, value) in config {
        let p = join_path(path, key);
        let Some(&(_, setting)) = schema.iter().find(|(k, _)| k == key) else {
            let keys: Vec<&str> = schema.iter().map(|(k, _)| *k).collect();
            out.push(Problem { path: p, message: format!("unknown {adapter} setting; accepted: {}", keys.join(", ")) });
            continue;
        };
        let message = match (setting, value) {
            (Setting::Bool, Value::Bool(_)) | (Setting::Str, Value::String(_)) => None,
            (Setting::Bool, other) => Some(not_a_boolean(other)),
            (Setting::Str, other) => Some(format!("expected a string, got {}", kind(other))),
            (Setting::Int(min), v) => match v.as_i64() {
                Some(i) if i >= min => None,
                _ => Some(format!("expected an integer >= {min}, got {v}")),
            },
            (Setting::IntIn(min, max), v) => match v.as_i64() {
                Some(i) if (min..=max).contains(&i) => None,
                _ => Some(format!("expected an integer from {min} to {max}, got {v}")),
            },
            (Setting::Secret, Value::String(s)) if !s.is_empty() => None,
            (Setting::Secret, Value::String(_)) => Some("the secret is empty; give a long random string".to_owned()),
            (Setting::Secret, other) => Some(format!("expected a string (the secret), got {}", kind(other))),
            (Setting::EnvName, Value::String(s))
                if s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                None
            }
            // Not echoed unless plainly a name: a secret pasted here by mistake stays unprinted.
            (Setting::EnvName, v) => Some(format!(
                "expected the name of an environment variable (e.g. XCONNECTOR_REDIS_KEY), got {}",
                shown(v)
            )),
            (Setting::SizeMib | Setting::SizeGb, v) => size_bytes(v, setting).err(),
            (Setting::OneOf(choices), Value::String(s)) if choices.contains(&s.as_str()) => None,
            (Setting::OneOf(choices), v) => Some(format!("expected one of {}, got {}", choices.join(", "), shown(v))),
            (Setting::Url(schemes), Value::String(s))
                if s.split_once("://").is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty()) =>
            {
                None
            }
            // Shown without its password: a rejected URL is still someone's credentials.
            (Setting::Url(schemes), v) => Some(format!(
                "expected a URL like {}://host:port, got {}",
                schemes.first().copied().unwrap_or("scheme"),
                super::secrets::redact(v)
            )),
        };
        if let Some(message) = message {
            out.push(Problem { path: p, message });
        }
    }
    out
}
