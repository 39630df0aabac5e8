//! Where the config comes from: Dynamo's real config files, the service overlay, the discovery
//! order, and every way a config file can be unreadable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use xconnector_core::config::{
    discover, dynamo_warnings, parse_document, read_config_file, resolve_document, worker_block_sizes, AdapterType,
    Environment,
};

const DESIGN_SECTION: &str = r#"
enabled: true
mode: embedded
adapters:
  - name: lmcache
    type: cache
    config: {storage_backend: memory, max_cache_size: 2048}
  - name: vllm
    type: inference
    config: {enable_prefix_caching: true}
"#;

fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
}

fn dynamo_fixtures() -> Vec<PathBuf> {
    let mut out = Vec::new();
    yaml_files(&fixture_root().join("dynamo-configs"), &mut out);
    assert!(out.len() >= 20, "{out:?}");
    out
}

fn get<'a>(origins: &'a [(String, Value, String)], key: &str) -> &'a str {
    &origins.iter().find(|(k, _, _)| k == key).unwrap_or_else(|| panic!("no origin for {key}: {origins:?}")).2
}

#[test]
fn every_dynamo_config_loads_and_says_xconnector_is_off() {
    for path in dynamo_fixtures() {
        let source = path.display().to_string();
        let text = read_config_file(&path, &source).unwrap();
        let doc = parse_document(&text, &source).unwrap();
        // bare: also when read as a file that might hold just the section (check-config).
        for bare in [false, true] {
            let r = resolve_document(&doc, &source, Some("VllmWorker"), bare).unwrap();
            assert_eq!((r.section.as_deref(), r.config.enabled), (None, false), "{source}");
            assert_eq!(r.source, source);
            assert!(r.warnings.is_empty(), "{source}: {:?}", r.warnings);
            assert!(r.origins.iter().all(|(_, _, o)| o == "default"));
        }
    }
}

#[test]
fn every_dynamo_config_with_the_design_section_under_common_is_enabled() {
    let section: Value = serde_yaml_ng::from_str(DESIGN_SECTION).unwrap();
    for path in dynamo_fixtures() {
        let mut doc = parse_document(&std::fs::read_to_string(&path).unwrap(), "f").unwrap();
        let map = doc.as_object_mut().unwrap();
        let common = map.entry("Common").or_insert_with(|| json!({}));
        common.as_object_mut().unwrap().insert("xconnector".into(), section.clone());
        for service in [None, Some("VllmWorker"), Some("PrefillWorker"), Some("Frontend")] {
            let r = resolve_document(&doc, "f.yaml", service, false).unwrap();
            assert_eq!(r.section.as_deref(), Some("Common.xconnector"), "{}", path.display());
            assert!(r.config.enabled);
            let adapters: Vec<_> = r.config.adapters.iter().map(|a| (a.name.as_str(), a.kind)).collect();
            assert_eq!(adapters, [("lmcache", AdapterType::Cache), ("vllm", AdapterType::Inference)]);
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            assert_eq!(get(&r.origins, "mode"), "f.yaml: Common.xconnector.mode");
            assert_eq!(
                get(&r.origins, "adapters[0].config.max_cache_size"),
                "f.yaml: Common.xconnector.adapters[0].config.max_cache_size"
            );
            // Unwritten: the worker's block size where the file says it (tested on its own in
            // config_rules.rs), else the default.
            let services = ["VllmWorker".to_owned(), "PrefillWorker".to_owned()];
            match worker_block_sizes(&doc, service, &services, &[]).as_slice() {
                [b] => {
                    assert_eq!(u64::from(r.config.performance.block_size), b.tokens);
                    assert_eq!(get(&r.origins, "performance.block_size"), format!("f.yaml: {}", b.origin));
                }
                _ => assert_eq!(get(&r.origins, "performance.block_size"), "default"),
            }
        }
    }
}

#[test]
fn a_service_section_overlays_common_and_errors_point_at_the_line_written() {
    let doc = json!({
        "Common": {"xconnector": {"enabled": true, "enable_distributed": false,
            "adapters": {"lmcache": {"config": {"max_cache_size": 1024}}}}},
        "VllmWorker": {"xconnector": {"enable_distributed": true,
            "adapters": {"lmcache": {"config": {"max_cache_size": "4GiB"}}, "vllm": null}}},
    });
    let r = resolve_document(&doc, "d.yaml", Some("VllmWorker"), false).unwrap();
    assert_eq!(r.section.as_deref(), Some("Common.xconnector + VllmWorker.xconnector"));
    assert!(r.config.enable_distributed);
    assert_eq!(r.config.adapters[0].config["max_cache_size"], json!("4GiB"));
    assert_eq!(get(&r.origins, "enabled"), "d.yaml: Common.xconnector.enabled");
    assert_eq!(get(&r.origins, "enable_distributed"), "d.yaml: VllmWorker.xconnector.enable_distributed");
    assert_eq!(
        get(&r.origins, "adapters[0].config.max_cache_size"),
        "d.yaml: VllmWorker.xconnector.adapters.lmcache.config.max_cache_size"
    );
    // The name of a mapping-shaped adapter comes from its key.
    assert_eq!(get(&r.origins, "adapters[1].name"), "d.yaml: VllmWorker.xconnector.adapters.vllm");
    assert_eq!(get(&r.origins, "adapters[1].type"), "default");
    // Another service does not see VllmWorker's overlay.
    let other = resolve_document(&doc, "d.yaml", Some("PrefillWorker"), false).unwrap();
    assert!(!other.config.enable_distributed);

    let bad = json!({
        "Common": {"xconnector": {"enabled": true, "mode": "embedded"}},
        "VllmWorker": {"xconnector": {"mode": "fast", "performance": {"block_size": -1}}},
    });
    let err = resolve_document(&bad, "d.yaml", Some("VllmWorker"), false).unwrap_err().to_string();
    assert!(err.contains("- VllmWorker.xconnector.mode: expected \"embedded\" or \"hybrid\""), "{err}");
    assert!(err.contains("- VllmWorker.xconnector.performance.block_size: expected an integer"), "{err}");
    // A missing key is reported where it would go: the first section.
    let missing = json!({"Common": {"xconnector": {"mode": "embedded"}}});
    let err = resolve_document(&missing, "m.yaml", None, false).unwrap_err().to_string();
    assert!(err.contains("- Common.xconnector.enabled: missing"), "{err}");
}

#[test]
fn warns_about_the_two_ways_to_break_dynamo() {
    let doc = json!({
        "Common": {"model": "m", "xconnector": {"enabled": true}},
        "VllmWorker": {"common-configs": ["model", "xconnector"], "xconnector": {"enabled": false}},
        "Frontend": {"port": 8000},
    });
    let w = dynamo_warnings(&doc);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("VllmWorker.common-configs lists `xconnector`") && w[0].contains("unrecognized arguments")
    );
    assert!(w[1].starts_with("VllmWorker.xconnector: ") && w[1].contains("Move the section to Common.xconnector"));
    // The prototype's top-level block next to services is read, with a warning.
    let top =
        json!({"Common": {"model": "m"}, "VllmWorker": {"common-configs": ["model"]}, "xconnector": {"enabled": true}});
    let r = resolve_document(&top, "t.yaml", Some("VllmWorker"), false).unwrap();
    assert_eq!(r.section.as_deref(), Some("xconnector"));
    assert!(r.warnings[0].contains("Common.xconnector is the place for it"), "{:?}", r.warnings);
}

fn env(vars: &[(&str, &str)], argv: &[&str]) -> Environment {
    Environment {
        vars: vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[test]
fn discovery_order_and_the_source_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("xc.yaml");
    // Hybrid mode with its Redis URL (nothing connects: discovery only reads).
    let redis = json!({"lmcache": {"config": {"remote_url": "redis://127.0.0.1:6379"}}});
    std::fs::write(&file, format!("xconnector:\n  enabled: true\n  mode: hybrid\n  adapters: {redis}\n")).unwrap();
    let dynamo = json!({"Common": {"xconnector": {"enabled": true}},
                        "VllmWorker": {"xconnector": {"mode": "hybrid", "adapters": redis}}})
    .to_string();
    let argv = ["serve_dynamo", "graphs.agg:Frontend", "--service-name", "VllmWorker"];

    let all = env(&[("XCONNECTOR_CONFIG", file.to_str().unwrap()), ("DYNAMO_SERVICE_CONFIG", &dynamo)], &argv);
    let r = discover(&all).unwrap();
    assert_eq!(r.source, format!("XCONNECTOR_CONFIG={}", file.display()));
    assert_eq!(r.section.as_deref(), Some("xconnector"));

    let r = discover(&env(&[("XCONNECTOR_CONFIG", " "), ("DYNAMO_SERVICE_CONFIG", &dynamo)], &argv)).unwrap();
    assert_eq!(
        (r.source.as_str(), r.section.as_deref()),
        ("DYNAMO_SERVICE_CONFIG", Some("Common.xconnector + VllmWorker.xconnector"))
    );
    assert_eq!(r.config.mode, xconnector_core::config::Mode::Hybrid);

    // Without --service-name only Common is read.
    let r = discover(&env(&[("DYNAMO_SERVICE_CONFIG", &dynamo)], &["serve_dynamo"])).unwrap();
    assert_eq!(r.section.as_deref(), Some("Common.xconnector"));

    // The first channel that is set decides, even without a section.
    let r = discover(&env(
        &[("DYNAMO_SERVICE_CONFIG", r#"{"Common": {"model": "m"}}"#), ("DYN_DEPLOYMENT_CONFIG", &dynamo)],
        &argv,
    ))
    .unwrap();
    assert_eq!((r.source.as_str(), r.section.as_deref(), r.config.enabled), ("DYNAMO_SERVICE_CONFIG", None, false));

    let yaml = "Common:\n  xconnector: {enabled: true}\n";
    let r = discover(&env(&[("DYN_DEPLOYMENT_CONFIG", yaml)], &argv)).unwrap();
    assert_eq!((r.source.as_str(), r.config.enabled), ("DYN_DEPLOYMENT_CONFIG", true));

    let dyn_file = dir.path().join("agg.yaml");
    std::fs::write(&dyn_file, yaml).unwrap();
    let p = dyn_file.to_str().unwrap();
    for args in [
        vec!["dynamo", "serve", "graphs.agg:Frontend", "-f", p],
        vec!["dynamo", "serve", "--config-file", p],
        vec!["dynamo", "serve", &format!("--config-file={p}")],
        vec!["dynamo", "serve", "--config", "/nonexistent", "--config", p],
    ] {
        let r = discover(&env(&[], &args)).unwrap();
        assert!(r.config.enabled && r.source.ends_with(p), "{args:?} -> {}", r.source);
    }

    let inline = json!({"enabled": true, "mode": "hybrid", "adapters": redis}).to_string();
    let inline = env(&[("XCONNECTOR_CONFIG", &inline)], &[]);
    let r = discover(&inline).unwrap();
    assert_eq!((r.source.as_str(), r.section.as_deref()), ("XCONNECTOR_CONFIG (inline)", Some("(whole document)")));

    let r = discover(&env(&[], &["python", "worker.py"])).unwrap();
    assert_eq!((r.source.as_str(), r.section, r.config.enabled), ("none", None, false));
}

#[test]
fn broken_channels_are_errors_that_name_them() {
    let e = |vars: &[(&str, &str)]| discover(&env(vars, &[])).unwrap_err().to_string();
    let err = e(&[("DYNAMO_SERVICE_CONFIG", r#"{"Common": {"xconnector": {"enabled": true}"#)]);
    assert!(err.starts_with("DYNAMO_SERVICE_CONFIG: not valid YAML/JSON"), "{err}");
    let err = e(&[("DYN_DEPLOYMENT_CONFIG", "Common: [1, 2")]);
    assert!(err.starts_with("DYN_DEPLOYMENT_CONFIG: not valid YAML/JSON"), "{err}");
    let err = e(&[("DYNAMO_SERVICE_CONFIG", r#"{"Common": {"xconnector": {"enabled": "yes"}}}"#)]);
    assert!(err.contains("Common.xconnector.enabled: expected true or false, got the string \"yes\""), "{err}");
    let err = e(&[("XCONNECTOR_CONFIG", "/no/such/xc.yaml")]);
    assert!(err.starts_with("XCONNECTOR_CONFIG=/no/such/xc.yaml: no such file"), "{err}");
    let err = discover(&env(&[], &["dynamo", "-f", "missing.yaml"])).unwrap_err().to_string();
    assert!(err.starts_with("-f missing.yaml: no such file (relative to the working directory"), "{err}");
}

#[test]
fn unreadable_files_get_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str, bytes: Option<&[u8]>| {
        let p = dir.path().join(name);
        if let Some(b) = bytes {
            std::fs::write(&p, b).unwrap();
        }
        read_config_file(&p, "src").map_err(|e| e.to_string())
    };
    let err = read_config_file(dir.path(), "src").unwrap_err().to_string();
    assert!(err.contains("is a directory; point it at a YAML file"), "{err}");
    assert!(read("missing.yaml", None).unwrap_err().contains("no such file"));
    for empty in [&b""[..], b"  \n\n", b"\xef\xbb\xbf\n"] {
        assert!(read("empty.yaml", Some(empty)).unwrap_err().contains("is empty; expected YAML"));
    }
    let big = vec![b'#'; 10 * 1000 * 1000];
    let err = read("big.yaml", Some(&big)).unwrap_err();
    assert!(err.contains("is 10.0 MB, more than the 1 MiB a config may be"), "{err}");
    let err = read("latin1.yaml", Some(b"xconnector:\n  enabled: true # caf\xe9\n")).unwrap_err();
    assert!(err.contains("is not UTF-8 text (byte 0xe9 at offset 33); save it as UTF-8"), "{err}");
    assert_eq!(read("bom.yaml", Some(b"\xef\xbb\xbfenabled: true\n")).unwrap(), "enabled: true\n");
    #[cfg(unix)]
    {
        let err = read_config_file(Path::new("/dev/null"), "src").unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
    }
}
