//! Whether a process patches its workers, decided when the autopatch installs itself: the
//! config found, the Dynamo service the process runs, and the startup check, what only this
//! machine can tell about the valid config ([`runtime_problems`]: the disk directory, the auth
//! key's variable, Redis answering), run once per process and config, each problem logged once.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::config::{runtime_problems, SdkConfig};
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use serde_json::json;

    use super::*;
    use crate::config::parse_section;

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
}
