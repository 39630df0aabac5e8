//! The config schema: the design's example, both adapter shapes, all-problems-at-once reports,
//! the prior prototype's real files, and a property test over arbitrary documents.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{json, Value};
use xconnector_core::config::{parse_document, parse_section, report, resolve_document, AdapterType, Mode};

const DESIGN_EXAMPLE: &str = r#"
Common:
  model: /data/model/DeepSeek-R1-Distill-Llama-70B
  xconnector:
    enabled: true
    mode: embedded
    adapters:
      - name: lmcache
        type: cache
        config: {storage_backend: memory, max_cache_size: 2048}
      - name: vllm
        type: inference
        config: {enable_prefix_caching: true}
VllmWorker:
  enable-prefix-caching: true
"#;

fn section(doc: &Value) -> &Value {
    &doc["Common"]["xconnector"]
}

#[test]
fn the_design_example_is_valid() {
    let doc = parse_document(DESIGN_EXAMPLE, "example.yaml").unwrap();
    let cfg = parse_section(section(&doc), "Common.xconnector").unwrap();
    assert!(cfg.enabled);
    assert_eq!(cfg.mode, Mode::Embedded);
    let names: Vec<_> = cfg.adapters.iter().map(|a| (a.name.as_str(), a.kind)).collect();
    assert_eq!(names, [("lmcache", AdapterType::Cache), ("vllm", AdapterType::Inference)]);
    assert_eq!(cfg.adapters[0].config["max_cache_size"], json!(2048));
    assert_eq!(cfg.performance.block_size, 16);
}

#[test]
fn adapters_as_a_mapping_keyed_by_name() {
    let v = json!({"enabled": true, "adapters": {
        "vllm": {"config": {}, "priority": 2},
        "lmcache": {"type": "cache", "config": {"max_cache_size": "2GiB"}, "priority": 1}}});
    let cfg = parse_section(&v, "x").unwrap();
    // Sorted by priority, lower first.
    assert_eq!(cfg.adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["lmcache", "vllm"]);
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let v = json!({
        "enabld": true,
        "mode": "distributed",
        "adapters": [
            {"name": "lmcache", "type": "inference", "config": {"max_cache_size": -3}},
            {"name": "redis-cache"},
            {"name": "vllm", "class_path": "x.y.Z"},
            {"type": "cache"}
        ],
        "performance": {"block_size": 0, "metrics_port": 70000, "pin_memory": "yes"},
        "integration": {"targets": ["no_colon"], "strict": 1}
    });
    let problems = parse_section(&v, "Common.xconnector").unwrap_err();
    let text = report("cfg.yaml", &problems).to_string();
    for needle in [
        "Common.xconnector.enabld: unknown key; did you mean \"enabled\"?",
        "Common.xconnector.enabled: missing",
        "Common.xconnector.mode: expected \"embedded\" or \"hybrid\"",
        "Common.xconnector.adapters[0].type: adapter \"lmcache\" is of type \"cache\"",
        "Common.xconnector.adapters[0].config.max_cache_size: -3 is negative",
        "Common.xconnector.adapters[1].name: unknown adapter \"redis-cache\"; known adapters: lmcache, vllm, dynamo",
        "Common.xconnector.adapters[2].class_path: adapters are built in",
        "Common.xconnector.adapters[3].name: missing",
        "Common.xconnector.performance.block_size: expected an integer in 1..=",
        "Common.xconnector.performance.metrics_port: expected an integer in 1..=65535, got 70000",
        "Common.xconnector.performance.pin_memory: expected true or false, got the string \"yes\"",
        "Common.xconnector.integration.targets[0]: \"no_colon\" is not \"module:Class\"",
        "Common.xconnector.integration.strict: expected true or false",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(text.starts_with("cfg.yaml: invalid XConnector configuration (13 problem(s))"), "{text}");
}

#[test]
fn sizes_accept_mib_integers_and_unit_strings_only() {
    for ok in [json!(2048), json!("2GiB"), json!("512MB"), json!(1)] {
        let v = json!({"enabled": true, "adapters": [{"name": "lmcache", "config": {"max_cache_size": ok}}]});
        assert!(parse_section(&v, "x").is_ok(), "{v}");
    }
    // 0 (and anything under the memory floor) holds no block.
    for bad in [json!(1.5), json!("lots"), json!(true), json!("3 parsecs"), json!(0), json!("1KB")] {
        let v = json!({"enabled": true, "adapters": [{"name": "lmcache", "config": {"max_cache_size": bad}}]});
        let p = parse_section(&v, "x").unwrap_err();
        assert_eq!(p[0].path, "x.adapters[0].config.max_cache_size", "{p:?}");
    }
}

#[test]
fn malformed_documents_are_located_errors() {
    let err = parse_document("a: [1, 2\nb: 3", "bad.yaml").unwrap_err().to_string();
    assert!(err.starts_with("bad.yaml: not valid YAML/JSON:") && err.contains("line"), "{err}");
    let err = parse_document("{\"enabled\": true", "env XCONNECTOR_CONFIG").unwrap_err().to_string();
    assert!(err.starts_with("env XCONNECTOR_CONFIG: not valid YAML/JSON"), "{err}");
    // YAML reads a bare `tru` as a string: the validator, not the parser, rejects it.
    let doc = parse_document("{\"enabled\": tru}", "env").unwrap();
    let p = parse_section(&doc, "env").unwrap_err();
    assert_eq!(p[0].message, "expected true or false, got the string \"tru\"");
}

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

/// The prototype's files: each `xconnector`-shaped section found is either accepted or rejected
/// with located problems; nothing panics.
#[test]
fn prior_prototype_configs_are_accepted_or_rejected_clearly() {
    let mut rejected = 0;
    for path in fixtures("prior-xconnector-configs") {
        let text = std::fs::read_to_string(&path).unwrap();
        let doc = parse_document(&text, &path.display().to_string()).unwrap();
        let candidates = [
            ("Common.xconnector", &doc["Common"]["xconnector"]),
            ("xconnector", &doc["xconnector"]),
            ("VllmWorker.extensions.xconnector", &doc["VllmWorker"]["extensions"]["xconnector"]),
        ];
        for (where_, v) in candidates.into_iter().filter(|(_, v)| !v.is_null()) {
            if let Err(problems) = parse_section(v, where_) {
                rejected += 1;
                assert!(problems.iter().all(|p| p.path.starts_with(where_) && !p.message.is_empty()));
            }
        }
    }
    // The prototype's sections use keys the schema does not have (config_file, class_path, ...).
    assert!(rejected >= 3, "{rejected}");
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        "[a-z_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("enabled".to_owned()),
                    Just("adapters".to_owned()),
                    Just("name".to_owned()),
                    Just("config".to_owned()),
                    Just("performance".to_owned()),
                    Just("max_cache_size".to_owned()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Never panics; whatever it accepts is within the schema (known top-level keys, `enabled`
    /// present and boolean, only known adapters).
    #[test]
    fn parser_never_panics_and_never_accepts_what_the_schema_forbids(v in arb_value()) {
        if let Ok(cfg) = parse_section(&v, "x") {
            let m = v.as_object().expect("only a mapping can be accepted");
            prop_assert!(m.keys().all(|k| ["enabled", "mode", "enable_distributed", "enable_caching",
                "adapters", "integration", "performance"].contains(&k.as_str())));
            prop_assert_eq!(m.get("enabled"), Some(&Value::Bool(cfg.enabled)));
            prop_assert!(cfg.adapters.iter().all(|a| ["lmcache", "vllm", "dynamo"].contains(&a.name.as_str())));
        }
    }

    /// Overlaying arbitrary sections never panics; an accepted result's values all come from the
    /// two sections or are defaults, and errors are one report naming the source.
    #[test]
    fn resolving_arbitrary_sections_never_panics(common in arb_value(), service in arb_value()) {
        let doc = json!({"Common": {"xconnector": common}, "VllmWorker": {"xconnector": service}});
        match resolve_document(&doc, "p", Some("VllmWorker"), false) {
            Ok(r) => {
                prop_assert!(r.section.is_some());
                for (_, _, origin) in &r.origins {
                    prop_assert!(origin == "default" || origin.starts_with("p: Common.xconnector")
                        || origin.starts_with("p: VllmWorker.xconnector"), "{}", origin);
                }
                // What was accepted validates again from its normalized form, unchanged.
                prop_assert_eq!(parse_section(&r.config.to_value(), "n").unwrap(), r.config);
            }
            Err(e) => prop_assert!(e.to_string().starts_with("p: invalid XConnector configuration")),
        }
    }

    /// Arbitrary text never panics the document parser.
    #[test]
    fn document_parser_never_panics(s in "\\PC{0,200}") {
        let _ = parse_document(&s, "fuzz");
    }
}

#[test]
fn adapter_settings_are_checked_per_adapter() {
    let v = json!({"enabled": true, "mode": "hybrid", "adapters": [
        {"name": "lmcache", "config": {"chunk_size": 256, "local_cpu": true, "max_local_cpu_size": 5.0,
            "local_disk": "/var/cache/xc", "max_local_disk_size": "20GiB", "remote_url": "redis://cache:6379",
            "storage_backend": "memory"}},
        {"name": "vllm", "config": {"kv_layout": "flashinfer", "staging_buffer_size": 256}},
        {"name": "dynamo", "config": {"namespace": "dynamo", "worker_id": "w0"}}]});
    assert!(parse_section(&v, "x").is_ok());
    let bad = json!({"enabled": true, "adapters": [
        {"name": "lmcache", "config": {"chunk_sise": 256, "chunk_size": 0, "remote_url": "http://x",
            "storage_backend": "local", "max_local_cpu_size": -1}},
        {"name": "vllm", "config": {"kv_layout": "HND", "enable_prefix_caching": "yes"}}]});
    let text = report("f", &parse_section(&bad, "x").unwrap_err()).to_string();
    for needle in [
        "x.adapters[0].config.chunk_sise: unknown lmcache setting; accepted: storage_backend, max_cache_size, chunk_size,",
        "x.adapters[0].config.chunk_size: expected an integer >= 1, got 0",
        "x.adapters[0].config.remote_url: expected a URL like redis://host:port, got \"http://x\"",
        "x.adapters[0].config.storage_backend: expected one of memory, disk, redis, hybrid, got \"local\"",
        "x.adapters[0].config.max_local_cpu_size: -1 is not a size in GB >= 0",
        "x.adapters[1].config.kv_layout: expected one of auto, flash_attn, flashinfer, standard, mla, got \"HND\"",
        "x.adapters[1].config.enable_prefix_caching: expected true or false, got the string \"yes\" (YAML 1.1 readers such as Dynamo's take it for true, this one for text); write true",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    use xconnector_core::config::{size_bytes, Setting};
    assert_eq!(size_bytes(&json!(5.0), Setting::SizeGb), Ok(5_000_000_000));
    assert_eq!(size_bytes(&json!(2048), Setting::SizeMib), Ok(2 << 30));
    assert_eq!(size_bytes(&json!("1GiB"), Setting::SizeGb), Ok(1 << 30));
}
