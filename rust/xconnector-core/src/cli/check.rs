//! `xconnector check-config [FILE] [--service NAME] [--json] [--strict] [-- WORKER ...]`:
//! validates like a worker starting does, then runs the checks only this machine can answer (disk
//! directory, auth key variable, Redis). Exit 1 where the worker would not start with
//! `integration.strict` (or `--strict`, or `XCONNECTOR_STRICT=1`), or could not run XConnector at all.

use std::io;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::args::CheckArgs;
use super::host::{Host, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use crate::config::secrets::redact_at;
use crate::config::{discover, read_config_file, resolve_text, runtime_problems, Environment, Resolved};
use crate::config::{CONFIG_VARS, SERVICE_VAR};
use crate::error::Result;
use crate::pyjson;

/// Values wider than this do not widen the value column of the table.
const VALUE_COLUMN: usize = 40;

/// What the worker would read: FILE with the worker's command line, or (without FILE) what this
/// environment and that command line give a worker of `--service`.
fn resolve(a: &CheckArgs, host: &dyn Host) -> Result<Resolved> {
    let service = a.service.as_deref();
    match &a.file {
        Some(path) => {
            // argv[0] is the program; a command given without one still has its flags read.
            let argv: Vec<String> = std::iter::once(String::new()).chain(a.worker.iter().cloned()).collect();
            resolve_text(&read_config_file(Path::new(path), path)?, path, service, true, &argv)
        }
        None => {
            let mut argv: Vec<String> =
                std::iter::once("xconnector".to_owned()).chain(a.worker.iter().cloned()).collect();
            if let Some(s) = service {
                argv.extend(["--service-name".to_owned(), s.to_owned()]);
            }
            let names = CONFIG_VARS.iter().chain([&SERVICE_VAR]);
            let vars = names.filter_map(|k| host.var(k).map(|v| ((*k).to_owned(), v))).collect();
            discover(&Environment { vars, argv })
        }
    }
}

/// Only "1" and "true" (any case, spaces around) turn a switch on: dd-trace-py's rule, as
/// `xconnector.switches` reads them.
fn switch_on(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

pub fn run(a: &CheckArgs, host: &mut dyn Host) -> io::Result<i32> {
    let found = match resolve(a, host) {
        Ok(found) => found,
        Err(e) => {
            let missing = a.file.as_ref().is_some_and(|p| !Path::new(p).is_file());
            if a.json {
                host.out(&(pyjson::pretty(&json!({"valid": false, "error": e.to_string()})) + "\n"))?;
            } else {
                host.err(&format!("error: {e}\n"))?;
            }
            return Ok(if missing { EXIT_USAGE } else { EXIT_INVALID });
        }
    };
    let enabled = found.section.is_some() && found.config.enabled;
    let problems = if enabled { runtime_problems(&found.config, &|k| host.var(k)) } else { Vec::new() };
    let strict_here =
        a.strict || found.config.integration.strict || switch_on(host.var("XCONNECTOR_STRICT").as_deref());
    let stops = problems.iter().any(|p| p.fatal) || (!problems.is_empty() && strict_here);
    if a.json {
        let origins: Map<String, Value> =
            found.origins.iter().map(|(k, _, o)| (k.clone(), o.as_str().into())).collect();
        let problems: Vec<Value> = problems.iter().map(|p| json!({"message": p.message, "fatal": p.fatal})).collect();
        let doc = json!({
            "valid": true,
            "runs_here": !stops,
            "runtime_problems": problems,
            "enabled": enabled,
            "source": found.source,
            "section": found.section,
            "config": redact_at("", &found.config.to_value()),
            "origins": origins,
            "warnings": found.warnings,
        });
        host.out(&(pyjson::pretty(&doc) + "\n"))?;
    } else {
        let mut text = report(&found, enabled);
        if !problems.is_empty() {
            text += &format!("\non this machine ({}):\n", problems.len());
            for p in &problems {
                text += &format!("  - {}: {}\n", if p.fatal { "error" } else { "warning" }, p.message);
            }
        }
        host.out(&text)?;
    }
    Ok(if stops || (a.strict && !found.warnings.is_empty()) { EXIT_INVALID } else { EXIT_OK })
}

/// Where the config came from, its effective values with where each was set, and the warnings.
fn report(found: &Resolved, enabled: bool) -> String {
    let mut out = match &found.section {
        Some(section) => {
            let state = if enabled { "enabled" } else { "disabled (enabled: false)" };
            format!("{}: valid; XConnector is {state} (read from {section})\n", found.source)
        }
        None if found.source == "none" => {
            "no XConnector config found in this environment; XConnector stays off\n".to_owned()
        }
        None => format!(
            "{}: no xconnector section; XConnector stays off. To turn it on, add `xconnector: {{enabled: true}}` \
             under `Common:`\n",
            found.source
        ),
    };
    if found.section.is_some() {
        let rows: Vec<(&str, String, &str)> = found
            .origins
            .iter()
            .map(|(key, value, origin)| (key.as_str(), pyjson::compact(&redact_at(key, value)), origin.as_str()))
            .collect();
        let kw = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let vw = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0).min(VALUE_COLUMN);
        out += "\neffective configuration (key, value, where it was set):\n";
        for (key, value, origin) in rows {
            out += &format!("  {key:<kw$}  {value:<vw$}  {origin}\n");
        }
    }
    if !found.warnings.is_empty() {
        out += &format!("\nwarnings ({}):\n", found.warnings.len());
        for w in &found.warnings {
            out += &format!("  - {w}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::host::Captured;
    use super::*;

    const RISKY: &str =
        "Common:\n  model: m\n  xconnector:\n    enabled: true\n    adapters:\n      lmcache: {config: \
                         {max_cache_size: 2GiB}}\nVllmWorker:\n  common-configs: [model, xconnector]\n  xconnector: \
                         {enable_distributed: false}\n";

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// Each row of the table: key -> (value, origin).
    fn rows(out: &str) -> std::collections::HashMap<String, (String, String)> {
        out.lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("  - "))
            .map(|l| {
                let mut parts = l.split_whitespace();
                let key = parts.next().unwrap().to_owned();
                let value = parts.next().unwrap().to_owned();
                (key, (value, parts.collect::<Vec<_>>().join(" ")))
            })
            .collect()
    }

    #[test]
    fn a_valid_file_shows_values_origins_and_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "agg.yaml", RISKY);
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &path, "--service", "VllmWorker"]), EXIT_OK, "{}", h.err);
        assert!(h.out.starts_with(&format!(
            "{path}: valid; XConnector is enabled (read from Common.xconnector + VllmWorker.xconnector)\n"
        )));
        let table = rows(&h.out);
        let at = |p: &str| format!("{path}: {p}");
        assert_eq!(table["enable_distributed"], ("false".into(), at("VllmWorker.xconnector.enable_distributed")));
        let size = at("Common.xconnector.adapters.lmcache.config.max_cache_size");
        assert_eq!(table["adapters[0].config.max_cache_size"], ("\"2GiB\"".into(), size));
        assert_eq!(table["performance.block_size"], ("16".into(), "default".into()));
        // Lists as Python prints them, and the value column no wider than 40 for them.
        assert!(h.out.contains("[\"VllmWorker\", \"PrefillWorker\"]           default\n"), "{}", h.out);
        assert_eq!(h.out.matches("\n  - ").count(), 2);
        assert!(h.out.contains("VllmWorker.common-configs lists `xconnector`"));
        // --strict: the warnings fail it.
        assert_eq!(Captured::default().run(&["check-config", &path, "--strict"]), EXIT_INVALID);
        // The worker's command line gives the block size.
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &path, "--", "python", "-m", "dynamo.vllm", "--block-size", "32"]), 0);
        let block = &rows(&h.out)["performance.block_size"];
        assert_eq!(block, &("32".into(), format!("{path}: --block-size 32 on the worker's command line")));
    }

    #[test]
    fn json_output_and_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let text = "xconnector:\n  enabled: true\n  mode: hybrid\n  adapters:\n    lmcache:\n      config: \
                    {storage_backend: redis, remote_url: \"redis://:S3CR3T@127.0.0.1:1\"}\n";
        let path = file(&dir, "x.yaml", text);
        for json in [false, true] {
            let mut h = Captured::default();
            let args = if json { vec!["check-config", &path, "--json"] } else { vec!["check-config", &path] };
            // Redis does not answer on port 1: a warning on this machine, not an error.
            assert_eq!(h.run(&args), EXIT_OK, "{}", h.err);
            assert!(!h.out.contains("S3CR3T") && h.out.contains("redis://:***@127.0.0.1:1"), "{}", h.out);
            assert!(h.out.contains("did not answer a PING"), "{}", h.out);
            if json {
                let doc: Value = serde_json::from_str(&h.out).unwrap();
                assert_eq!(
                    (&doc["valid"], &doc["runs_here"], &doc["enabled"]),
                    (&json!(true), &json!(true), &json!(true))
                );
                assert_eq!(doc["config"]["adapters"][0]["name"], "lmcache");
                assert_eq!(doc["origins"]["enable_caching"], "default");
                assert_eq!(doc["runtime_problems"][0]["fatal"], false);
            }
        }
        // XCONNECTOR_STRICT=1 makes that warning stop the worker.
        let mut h = Captured::default();
        h.vars.insert("XCONNECTOR_STRICT".into(), "1".into());
        assert_eq!(h.run(&["check-config", &path]), EXIT_INVALID);
    }

    #[test]
    fn invalid_configs_exit_1_and_missing_files_2() {
        let dir = tempfile::tempdir().unwrap();
        let bad = file(&dir, "bad.yaml", "xconnector: {enabled: maybe}\n");
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &bad]), EXIT_INVALID);
        assert!(h.err.starts_with(&format!("error: {bad}: ")) && h.err.contains("expected true or false"), "{}", h.err);
        assert!(h.out.is_empty());
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &bad, "--json"]), EXIT_INVALID);
        let doc: Value = serde_json::from_str(&h.out).unwrap();
        assert_eq!(doc["valid"], false);
        assert!(doc["error"].as_str().unwrap().contains("xconnector.enabled: expected true or false"));
        let missing = dir.path().join("missing.yaml").display().to_string();
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &missing]), EXIT_USAGE);
        assert!(h.err.contains("no such file; check the path"));
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &dir.path().display().to_string()]), EXIT_USAGE);
        assert!(h.err.contains("is a directory"));
    }

    #[test]
    fn without_a_file_it_reads_this_environment() {
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config"]), EXIT_OK);
        assert_eq!(h.out, "no XConnector config found in this environment; XConnector stays off\n");
        let mut h = Captured::default();
        let dynamo = r#"{"Common": {"xconnector": {"enabled": true}}, "PrefillWorker": {"xconnector": {"enable_caching": false}}}"#;
        h.vars.insert("DYNAMO_SERVICE_CONFIG".into(), dynamo.into());
        assert_eq!(h.run(&["check-config", "--service", "PrefillWorker"]), EXIT_OK, "{}", h.err);
        assert!(h.out.starts_with(
            "DYNAMO_SERVICE_CONFIG: valid; XConnector is enabled (read from Common.xconnector + PrefillWorker.xconnector)"
        ));
        let mut h = Captured::default();
        h.vars.insert("DYN_DEPLOYMENT_CONFIG".into(), "{not json".into());
        assert_eq!(h.run(&["check-config"]), EXIT_INVALID);
        assert!(h.err.starts_with("error: DYN_DEPLOYMENT_CONFIG: not valid"), "{}", h.err);
    }

    #[test]
    fn a_file_without_a_section_is_valid_and_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "plain.yaml", "Common:\n  model: m\nVllmWorker:\n  common-configs: [model]\n");
        let mut h = Captured::default();
        assert_eq!(h.run(&["check-config", &path]), EXIT_OK);
        assert!(h.out.starts_with(&format!("{path}: no xconnector section; XConnector stays off.")));
    }

    #[test]
    fn switches_are_read_strictly() {
        for on in ["1", "true", " TRUE "] {
            assert!(switch_on(Some(on)), "{on}");
        }
        for off in [None, Some(""), Some("yes"), Some("0"), Some("on")] {
            assert!(!switch_on(off), "{off:?}");
        }
    }
}
