//! Whether a process patches its workers, decided when the autopatch installs itself: the
//! config found, the Dynamo service the process runs, and the startup check, what only this
//! machine can tell about the valid config ([`runtime_problems`]: the disk directory, the auth
//! key's variable, Redis answering), run once per process and config, each problem logged once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::config::{
    discover, engine_block, parse_section, read_config_file, report, resolve_text, runtime_problems, EngineSettings,
    Environment, SdkConfig,
};
use crate::error::{CoreError, Result};

/// Each config checked in this process (by its normalized form) and whether XConnector can run.
static CHECKED: Mutex<BTreeMap<String, bool>> = Mutex::new(BTreeMap::new());

/// Whether XConnector can run with `cfg` here (false: a fatal problem, the worker runs without
/// it). The first call for a config checks and logs each problem as an error (off, or degraded);
/// later calls return the remembered answer silently. With `strict`, any problem is a
/// [`CoreError::Config`] naming them all (startup stops), and nothing is remembered.
pub fn check_machine(cfg: &SdkConfig, env: &dyn Fn(&str) -> Option<String>, strict: bool) -> Result<bool> {
    let key = cfg.to_value().to_string();
    if let Some(&ok) = CHECKED.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(ok);
    }
    let problems = runtime_problems(cfg, env);
    if strict && !problems.is_empty() {
        let said: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        return Err(CoreError::Config(format!("XConnector cannot start on this machine: {}", said.join("; "))));
    }
    for p in &problems {
        let what = if p.fatal { "is off, the worker runs without it" } else { "runs degraded" };
        tracing::error!("XConnector {what}: {}", p.message);
    }
    let ok = !problems.iter().any(|p| p.fatal);
    CHECKED.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ok);
    Ok(ok)
}

/// Whether a process patches its worker classes with the config discovery found (`section`
/// false: the source holds none): not when it is off, not in a Dynamo service outside
/// `integration.services` (the supervisor, the frontend), and in a listed service only when
/// [`check_machine`] passes; a process outside Dynamo (`service` None) patches unchecked. Only
/// listed services' workers pay for the check: every process that imports the graph gets here.
pub fn worker_patches(
    cfg: &SdkConfig,
    section: bool,
    source: &str,
    service: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    strict: bool,
) -> Result<bool> {
    if !section || !cfg.enabled {
        tracing::debug!("XConnector is off (config source: {source})");
        return Ok(false);
    }
    let services = &cfg.integration.services;
    match service {
        Some(s) if !services.iter().any(|listed| listed == s) => {
            tracing::debug!("XConnector: service {s} not in {services:?}; nothing patched");
            Ok(false)
        }
        Some(_) => check_machine(cfg, env, strict),
        None => Ok(true),
    }
}

/// The config of a vLLM v1 connector (XConnector named as vLLM's KV connector, so on unless
/// told otherwise): `kv_connector_extra_config.xconnector` as given (`section`: the section,
/// `enabled` unless it says not, or the path of a YAML file), else what discovery finds in `env`,
/// else the defaults; with the tokens of its engine blocks on a worker of `block_size` tokens
/// per KV block (`chunk_size`, which must be a multiple of it). None when it is off, caching is
/// off, or [`check_machine`] fails here; `strict` (or the config's own `integration.strict`)
/// makes the check's problems an error.
pub fn connector_config(
    section: &Value,
    env: &Environment,
    strict: bool,
    block_size: u64,
) -> Result<Option<(SdkConfig, u64)>> {
    const SOURCE: &str = "kv_connector_extra_config.xconnector";
    let cfg = match section {
        Value::String(path) => {
            let text = read_config_file(Path::new(path), path)?;
            resolve_text(&text, path, None, true, &[String::new()])?.config
        }
        Value::Object(fields) => {
            let mut fields = fields.clone();
            fields.entry("enabled").or_insert(Value::Bool(true));
            parse_section(&Value::Object(fields), "").map_err(|p| report(SOURCE, &p))?
        }
        Value::Null => match discover(env)? {
            found if found.section.is_some() => found.config,
            _ => parse_section(&json!({"enabled": true}), "").map_err(|p| report("the defaults", &p))?,
        },
        other => {
            let kind = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "a list",
            };
            return Err(CoreError::config(format!(
                "{SOURCE} must be the XConnector section (a mapping) or the path of a YAML file, not {kind}"
            )));
        }
    };
    if !(cfg.enabled && cfg.enable_caching) {
        return Ok(None);
    }
    let chunk = EngineSettings::from_config(&cfg).chunk_size;
    let block = engine_block(chunk, block_size).map_err(|e| CoreError::config(format!("{SOURCE}: chunk_size {e}")))?;
    let strict = strict || cfg.integration.strict;
    Ok(check_machine(&cfg, &|name| env.vars.get(name).cloned(), strict)?.then_some((cfg, block.tokens)))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashMap;

    use super::*;

    fn lmcache(mode: &str, settings: serde_json::Value) -> SdkConfig {
        let section = json!({"enabled": true, "mode": mode, "adapters": [{"name": "lmcache", "config": settings}]});
        parse_section(&section, "").expect("a valid section")
    }

    #[test]
    fn a_disk_directory_it_cannot_use_degrades_and_is_checked_once() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, "not a directory").unwrap();
        let cfg = lmcache("embedded", json!({"local_disk": blocker.join("tier").to_str().unwrap()}));
        let err = check_machine(&cfg, &|_| None, true).unwrap_err().to_string();
        assert!(err.contains("cannot start on this machine") && err.contains("local_disk"), "{err}");
        assert!(check_machine(&cfg, &|_| None, false).unwrap());
        // Remembered now: even strict gets the answer without checking again.
        assert!(check_machine(&cfg, &|_| None, true).unwrap());
    }

    #[test]
    fn only_an_enabled_config_in_a_listed_service_is_checked_and_patches() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, "not a directory").unwrap();
        // Strict, so a check that runs fails: the cases that must not check return Ok.
        let disk = json!({"local_disk": blocker.join("tier").to_str().unwrap()});
        let cfg = lmcache("embedded", disk);
        let none = |_: &str| None;
        assert!(!worker_patches(&cfg, false, "none", Some("VllmWorker"), &none, true).unwrap());
        let off = parse_section(&json!({"enabled": false}), "").unwrap();
        assert!(!worker_patches(&off, true, "f.yaml", None, &none, true).unwrap());
        assert!(!worker_patches(&cfg, true, "f.yaml", Some("Frontend"), &none, true).unwrap());
        assert!(worker_patches(&cfg, true, "f.yaml", None, &none, true).unwrap());
        let err = worker_patches(&cfg, true, "f.yaml", Some("PrefillWorker"), &none, true).unwrap_err();
        assert!(err.to_string().contains("cannot start on this machine"), "{err}");
    }

    #[test]
    fn a_missing_auth_key_variable_turns_it_off_once() {
        let settings = json!({
            "storage_backend": "redis",
            "remote_url": "redis://127.0.0.1:1",
            "remote_auth_key_env": "XC_STARTUP_CHECK_TEST_KEY",
        });
        let cfg = lmcache("hybrid", settings);
        let asked = Cell::new(0);
        let env = |_: &str| {
            asked.set(asked.get() + 1);
            None
        };
        assert!(!check_machine(&cfg, &env, false).unwrap());
        let first = asked.get();
        assert!(first > 0);
        assert!(!check_machine(&cfg, &env, false).unwrap());
        assert_eq!(asked.get(), first, "the second call checks nothing");
    }

    fn env(vars: &[(&str, &str)]) -> Environment {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Environment { vars, argv: vec!["vllm".into()] }
    }

    #[test]
    fn a_connector_runs_with_its_own_section_on_unless_it_says_off() {
        let none = env(&[]);
        let on = connector_config(&json!({"performance": {"block_size": 16}}), &none, false, 16).unwrap();
        assert!(on.is_some_and(|(c, block)| c.enabled && block == 16));
        let chunked = json!({"adapters": [{"name": "lmcache", "config": {"chunk_size": 64}}]});
        assert_eq!(connector_config(&chunked, &none, false, 32).unwrap().map(|(_, b)| b), Some(64));
        let err = connector_config(&chunked, &none, false, 48).unwrap_err().to_string();
        assert!(err.contains("chunk_size") && err.contains("use 48"), "{err}");
        assert!(connector_config(&json!({"enabled": false}), &none, false, 16).unwrap().is_none());
        assert!(connector_config(&json!({"enable_caching": false}), &none, false, 16).unwrap().is_none());
        let err = connector_config(&json!({"mode": "sideways"}), &none, false, 16).unwrap_err().to_string();
        assert!(err.contains("kv_connector_extra_config.xconnector") && err.contains("mode"), "{err}");
        let err = connector_config(&json!(3), &none, false, 16).unwrap_err().to_string();
        assert!(err.contains("must be the XConnector section") && err.contains("a number"), "{err}");
    }

    #[test]
    fn a_connector_reads_a_named_file_else_discovery_else_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let off = dir.path().join("off.yaml");
        std::fs::write(&off, "xconnector:\n  enabled: false\n").unwrap();
        let on = dir.path().join("on.yaml");
        std::fs::write(&on, "xconnector:\n  enabled: true\n  performance:\n    block_size: 32\n").unwrap();
        let path = |p: &std::path::Path| Value::String(p.to_str().unwrap().into());
        let none = env(&[]);
        let got = connector_config(&path(&on), &none, false, 16).unwrap().expect("on");
        assert_eq!(got.0.performance.block_size, 32);
        assert!(connector_config(&path(&off), &none, false, 16).unwrap().is_none());
        let found = env(&[("XCONNECTOR_CONFIG", off.to_str().unwrap())]);
        assert!(connector_config(&Value::Null, &found, false, 16).unwrap().is_none(), "discovery's says off");
        let (defaults, _) = connector_config(&Value::Null, &none, false, 16).unwrap().expect("defaults: on");
        assert!(defaults.enabled && defaults.enable_caching);
    }
}
