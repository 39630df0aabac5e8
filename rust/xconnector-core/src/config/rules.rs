//! Rules across settings: what each setting means depends on others (a Redis backend needs a
//! Redis URL, hybrid mode needs the shared tier), on the memory floor, and on the worker's block
//! size. They run on whatever the validator could read, after the per-setting checks, and add to
//! the same report; a setting that already failed its own check is not reported again here.

use serde_json::{Map, Value};

use super::adapters::{size_bytes, Setting};
use super::geometry::engine_block;
use super::problem::{join_path, Problem};
use super::schema::{Mode, SdkConfig};
use super::worker::WorkerBlockSize;

/// The smallest memory budget accepted (`max_cache_size`, `max_local_cpu_size`). One KV block of
/// a real model is hundreds of KiB to several MiB (a 70B model: 5 MiB per 16 tokens), so a
/// budget below this holds nothing and is a unit slip (`"1KB"`, or `0.0001` GB). Kept below the
/// 256 KiB that tests of tiny models use to force evictions.
pub const MIN_MEMORY_BYTES: u64 = 256 << 10;

/// What the validator knows beyond the typed config.
pub struct Context<'a> {
    /// Key path of the section (`Common.xconnector`), empty for a bare section.
    pub path: &'a str,
    /// Where each adapter of the config was read from (aligned with `SdkConfig::adapters`).
    pub adapter_paths: &'a [String],
    /// Whether `performance.block_size` was written (rather than defaulted).
    pub explicit_block_size: bool,
    /// The worker's block sizes, where the document or its command line says them.
    pub block_sizes: &'a [WorkerBlockSize],
}

/// Present and not null (a value of the wrong type was reported by its own check).
fn has(s: &Map<String, Value>, key: &str) -> bool {
    s.get(key).is_some_and(|v| !v.is_null() && v.as_str() != Some(""))
}

pub fn check(cfg: &SdkConfig, cx: &Context<'_>) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut hybrid_served = false;
    for (a, path) in cfg.adapters.iter().zip(cx.adapter_paths) {
        if a.name != "lmcache" {
            continue;
        }
        let p = join_path(path, "config");
        let s = &a.config;
        lmcache(cfg, s, &p, cx, &mut out);
        if a.enabled && has(s, "remote_url") {
            hybrid_served = true;
        }
    }
    if cfg.mode == Mode::Hybrid && !hybrid_served {
        let lmcache = cfg.adapters.iter().zip(cx.adapter_paths).find(|(a, _)| a.name == "lmcache" && a.enabled);
        match lmcache {
            // Its storage_backend may already say it needs remote_url; say it once.
            Some((a, _))
                if matches!(a.config.get("storage_backend").and_then(Value::as_str), Some("redis" | "hybrid")) => {}
            Some((_, path)) => out.push(Problem::new(
                format!("{path}.config.remote_url"),
                "missing; mode: hybrid adds a shared Redis tier: set remote_url (e.g. remote_url: \
                 \"redis://redis.internal:6379\"), or use mode: embedded",
            )),
            None => out.push(Problem::new(
                join_path(cx.path, "mode"),
                "hybrid adds a shared Redis tier, but no enabled lmcache adapter gives one (XConnector would run \
                 its default lmcache adapter, without Redis): add {name: lmcache, config: {remote_url: \
                 \"redis://redis.internal:6379\"}} to adapters, or use mode: embedded",
            )),
        }
    }
    if cx.explicit_block_size {
        for b in cx.block_sizes.iter().filter(|b| u64::from(cfg.performance.block_size) != b.tokens) {
            out.push(Problem::new(
                join_path(cx.path, "performance.block_size"),
                format!(
                    "{} differs from the worker's block size {} ({}); set it to {} or remove it",
                    cfg.performance.block_size, b.tokens, b.origin, b.tokens
                ),
            ));
        }
    }
    out
}

fn lmcache(cfg: &SdkConfig, s: &Map<String, Value>, p: &str, cx: &Context<'_>, out: &mut Vec<Problem>) {
    let at = |key: &str| join_path(p, key);
    let backend = s.get("storage_backend").and_then(Value::as_str).unwrap_or("memory");
    let url = has(s, "remote_url");
    let disk = has(s, "local_disk");
    if matches!(backend, "redis" | "hybrid") && !url {
        out.push(Problem::new(
            at("storage_backend"),
            format!(
                "{backend} needs remote_url, the Redis server (e.g. remote_url: \"redis://:password@redis.internal:6379\")"
            ),
        ));
    }
    if url && cfg.mode != Mode::Hybrid {
        out.push(Problem::new(
            at("remote_url"),
            "a shared Redis tier is hybrid mode; set `mode: hybrid` in the xconnector section (or remove remote_url \
             for embedded mode)",
        ));
    }
    if url && !cfg.enable_distributed {
        out.push(Problem::new(
            at("remote_url"),
            "enable_distributed is false, which turns the shared tier off; remove remote_url or set \
             enable_distributed: true",
        ));
    }
    let (key, env) = (s.contains_key("remote_auth_key"), s.contains_key("remote_auth_key_env"));
    if key && env {
        out.push(Problem::new(
            at("remote_auth_key_env"),
            "remote_auth_key and remote_auth_key_env both give the Redis auth key; keep one (remote_auth_key_env \
             keeps the secret out of the config)",
        ));
    }
    if (key || env) && !url {
        let setting = if env { "remote_auth_key_env" } else { "remote_auth_key" };
        out.push(Problem::new(at(setting), "the auth key is for the Redis tier; set remote_url too, or remove it"));
    }
    if matches!(backend, "disk" | "hybrid") && !disk {
        out.push(Problem::new(
            at("storage_backend"),
            format!(
                "{backend} needs local_disk, the disk tier's directory (e.g. local_disk: \"/var/cache/xconnector\")"
            ),
        ));
    }
    for setting in ["max_local_disk_size", "local_disk_shared"] {
        let set = match s.get(setting) {
            Some(Value::Bool(b)) => *b,
            Some(v) => !v.is_null(),
            None => false,
        };
        if set && !disk {
            out.push(Problem::new(at(setting), "set local_disk too, or remove it"));
        }
    }
    if s.get("local_cpu") == Some(&Value::Bool(false)) {
        out.push(Problem::new(
            at("local_cpu"),
            "false leaves no tier to cache in; XConnector always keeps a memory tier, so remove local_cpu or set it \
             to true",
        ));
    }
    if s.contains_key("max_cache_size") && s.contains_key("max_local_cpu_size") {
        out.push(Problem::new(
            at("max_local_cpu_size"),
            "max_cache_size and max_local_cpu_size both set the memory budget; keep one",
        ));
    }
    for (setting, unit) in [("max_cache_size", Setting::SizeMib), ("max_local_cpu_size", Setting::SizeGb)] {
        let Some(v) = s.get(setting) else { continue };
        if let Ok(bytes) = size_bytes(v, unit) {
            if bytes < MIN_MEMORY_BYTES {
                out.push(Problem::new(
                    at(setting),
                    format!(
                        "{v} is {bytes} bytes, below the smallest memory budget, {} KiB (one KV block of a real model \
                         is often larger); give e.g. \"2GiB\"{}",
                        MIN_MEMORY_BYTES >> 10,
                        if matches!(unit, Setting::SizeMib) {
                            " (a plain number is MiB)"
                        } else {
                            " (a plain number is GB)"
                        }
                    ),
                ));
            }
        }
    }
    if let Some(chunk) = s.get("chunk_size").and_then(Value::as_u64).filter(|&c| c > 0) {
        for b in cx.block_sizes {
            if let Err(e) = engine_block(Some(chunk), b.tokens) {
                out.push(Problem::new(at("chunk_size"), format!("{e} (the block size is from {})", b.origin)));
            }
        }
    }
}
