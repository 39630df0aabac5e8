//! Rules across settings (what the runtime used to find only at the first KV call), duplicate
//! keys, the worker's block size, `strict` on an invalid section, the engine settings derived
//! from a config, and the runtime checks of the worker's machine.

use std::collections::HashMap;

use serde_json::{json, Value};
use xconnector_core::config::{
    discover, parse_document, parse_section, report, resolve_document_for, resolve_text, runtime_problems,
    AuthKeySource, EngineSettings, Environment, SdkConfig, DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES,
};
use xconnector_core::{CoreError, Namespace};

fn lmcache(mode: &str, config: Value) -> Value {
    json!({"enabled": true, "mode": mode, "adapters": [{"name": "lmcache", "config": config}]})
}

fn problems(v: &Value) -> String {
    match parse_section(v, "x") {
        Ok(_) => String::new(),
        Err(p) => report("f", &p).to_string(),
    }
}

fn assert_has(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "missing {n:?} in:\n{text}");
    }
}

#[test]
fn the_cache_adapters_rules_are_the_validators() {
    let p = "x.adapters[0].config";
    assert_has(
        &problems(&lmcache("embedded", json!({"storage_backend": "redis"}))),
        &[&format!("{p}.storage_backend: redis needs remote_url, the Redis server")],
    );
    assert_has(
        &problems(&lmcache("embedded", json!({"remote_url": "redis://h:1"}))),
        &[&format!("{p}.remote_url: a shared Redis tier is hybrid mode; set `mode: hybrid`")],
    );
    let v = json!({"enabled": true, "mode": "hybrid", "enable_distributed": false,
        "adapters": [{"name": "lmcache", "config": {"remote_url": "redis://h:1"}}]});
    assert_has(&problems(&v), &[&format!("{p}.remote_url: enable_distributed is false")]);
    let text = problems(&lmcache("embedded", json!({"remote_auth_key": "k", "remote_auth_key_env": "K"})));
    assert_has(
        &text,
        &[
            &format!("{p}.remote_auth_key_env: remote_auth_key and remote_auth_key_env both give the Redis auth key"),
            &format!("{p}.remote_auth_key_env: the auth key is for the Redis tier; set remote_url too"),
        ],
    );
    assert!(!text.contains(": k\n") && !text.contains("\"k\""), "the secret is never shown: {text}");
    assert_has(
        &problems(&lmcache("embedded", json!({"storage_backend": "disk"}))),
        &[&format!("{p}.storage_backend: disk needs local_disk, the disk tier's directory")],
    );
    let text = problems(&lmcache("embedded", json!({"max_local_disk_size": 5, "local_disk_shared": true})));
    assert_has(
        &text,
        &[
            &format!("{p}.max_local_disk_size: set local_disk too, or remove it"),
            &format!("{p}.local_disk_shared: set local_disk too, or remove it"),
        ],
    );
    assert_eq!(problems(&lmcache("embedded", json!({"local_disk_shared": false}))), "");
    assert_has(
        &problems(&lmcache("embedded", json!({"local_cpu": false}))),
        &[&format!("{p}.local_cpu: false leaves no tier to cache in")],
    );
    assert_has(
        &problems(&lmcache("embedded", json!({"max_cache_size": 1024, "max_local_cpu_size": 1}))),
        &[&format!("{p}.max_local_cpu_size: max_cache_size and max_local_cpu_size both set the memory budget")],
    );
    // Every problem at once, with the per-setting ones.
    let text = problems(&lmcache("embedded", json!({"storage_backend": "hybrid", "chunk_size": 0})));
    assert!(text.contains("(3 problem(s))"), "{text}");
    // A valid hybrid section.
    let ok = lmcache(
        "hybrid",
        json!({"storage_backend": "hybrid", "remote_url": "redis://h:1",
        "local_disk": "/tmp/x", "remote_auth_key_env": "K"}),
    );
    assert_eq!(problems(&ok), "");
}

#[test]
fn hybrid_mode_needs_an_enabled_lmcache_adapter_with_remote_url() {
    assert_has(
        &problems(&lmcache("hybrid", json!({}))),
        &["x.adapters[0].config.remote_url: missing; mode: hybrid adds a shared Redis tier"],
    );
    // The backend's own rule says it already; once is enough.
    let text = problems(&lmcache("hybrid", json!({"storage_backend": "redis"})));
    assert!(text.contains("(1 problem(s))"), "{text}");
    // No lmcache adapter: the SDK would add a default one, without Redis.
    let text = problems(&json!({"enabled": true, "mode": "hybrid"}));
    assert_has(&text, &["x.mode: hybrid adds a shared Redis tier, but no enabled lmcache adapter gives one"]);
    let disabled = json!({"enabled": true, "mode": "hybrid",
        "adapters": [{"name": "lmcache", "enabled": false, "config": {"remote_url": "redis://h:1"}}]});
    assert_has(&problems(&disabled), &["x.mode: hybrid adds a shared Redis tier"]);
}

#[test]
fn a_memory_budget_below_the_floor_is_a_unit_slip() {
    for (key, v) in [
        ("max_cache_size", json!("1KB")),
        ("max_cache_size", json!(0)),
        ("max_cache_size", json!("255KiB")),
        ("max_local_cpu_size", json!(0.0001)),
    ] {
        let text = problems(&lmcache("embedded", json!({key: v})));
        assert_has(&text, &[&format!("x.adapters[0].config.{key}: "), "below the smallest memory budget, 256 KiB"]);
    }
    for (key, v) in
        [("max_cache_size", json!("256KiB")), ("max_cache_size", json!(1)), ("max_local_cpu_size", json!(0.001))]
    {
        assert_eq!(problems(&lmcache("embedded", json!({key: v}))), "", "{key}: {v}");
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn chunk_size_and_performance_block_size_must_fit_the_workers_block_size() {
    let text = r#"
Common:
  block-size: 32
  xconnector:
    enabled: true
    adapters:
      lmcache: {config: {chunk_size: 48}}
    performance: {block_size: 16}
VllmWorker:
  common-configs: [model, block-size]
"#;
    let doc = parse_document(text, "agg.yaml").unwrap();
    let e = resolve_document_for(&doc, "agg.yaml", Some("VllmWorker"), true, &[]).unwrap_err().to_string();
    assert_has(&e, &[
        "Common.xconnector.adapters.lmcache.config.chunk_size: 48 is not a multiple of the worker's block size 32; \
         use 32 (the block size is from Common.block-size: 32 (in VllmWorker.common-configs))",
        "Common.xconnector.performance.block_size: 16 differs from the worker's block size 32 (Common.block-size: 32",
    ]);
    // No service given: each service XConnector acts in (VllmWorker inherits 32).
    let e = resolve_document_for(&doc, "agg.yaml", None, true, &[]).unwrap_err().to_string();
    assert!(e.contains("chunk_size: 48 is not a multiple"), "{e}");
    // The worker's own command line says 16: 48 fits, and performance.block_size matches.
    let cmd = argv(&["python", "-m", "dynamo.vllm", "--block-size=16"]);
    assert!(resolve_document_for(&doc, "agg.yaml", Some("VllmWorker"), true, &cmd).is_ok());
    let cmd = argv(&["python", "-m", "dynamo.vllm", "--block-size", "64"]);
    let e = resolve_document_for(&doc, "agg.yaml", None, true, &cmd).unwrap_err().to_string();
    assert_has(
        &e,
        &["chunk_size: 48 is not a multiple of the worker's block size 64; use 64 (the block size is \
                      from --block-size 64 on the worker's command line)"],
    );
    // A service's own block-size; chunk 24 on 64 and on 32 are both wrong.
    let doc = json!({"Common": {"xconnector": {"enabled": true,
        "adapters": [{"name": "lmcache", "config": {"chunk_size": 24}}]}}, "VllmWorker": {"block-size": 64}});
    let e = resolve_document_for(&doc, "f", Some("VllmWorker"), false, &[]).unwrap_err().to_string();
    assert_has(
        &e,
        &["chunk_size: 24 is not a multiple of the worker's block size 64; use 64 (the block size is from \
                      VllmWorker.block-size: 64)"],
    );
    // Discovery reads the worker's argv too.
    let env = Environment {
        vars: HashMap::from([(
            "DYNAMO_SERVICE_CONFIG".to_owned(),
            json!({"Common": {"xconnector": {"enabled": true,
                "adapters": [{"name": "lmcache", "config": {"chunk_size": 48}}]}}})
            .to_string(),
        )]),
        argv: argv(&["dynamo.vllm", "--block-size", "32"]),
    };
    assert!(discover(&env).unwrap_err().to_string().contains("chunk_size: 48 is not a multiple"));
}

#[test]
fn duplicate_keys_are_errors_in_every_channel() {
    let yaml = "xconnector:\n  enabled: true\nxconnector:\n  enabled: false\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    std::fs::write(&file, yaml).unwrap();
    let channels = [
        ("XCONNECTOR_CONFIG", file.display().to_string()),
        ("XCONNECTOR_CONFIG", "xconnector:\n  enabled: true\nxconnector:\n  enabled: false\n".to_owned()),
        ("DYNAMO_SERVICE_CONFIG", r#"{"Common": {"xconnector": {"enabled": true, "enabled": false}}}"#.to_owned()),
        ("DYN_DEPLOYMENT_CONFIG", "Common:\n  xconnector: {enabled: true}\nCommon: {}\n".to_owned()),
    ];
    for (var, value) in channels {
        let env = Environment { vars: HashMap::from([(var.to_owned(), value)]), argv: Vec::new() };
        let e = discover(&env).unwrap_err().to_string();
        assert!(e.contains("duplicate key `") && e.contains("written at line"), "{var}: {e}");
    }
    let env = Environment { vars: HashMap::new(), argv: argv(&["dynamo", "-f", &file.display().to_string()]) };
    let e = discover(&env).unwrap_err().to_string();
    assert!(e.contains("duplicate key `xconnector`: written at line 1 column 1 and again at line 3 column 1"), "{e}");
}

#[test]
fn an_invalid_section_still_says_whether_it_asked_for_strict() {
    let strict_of = |text: &str| match resolve_text(text, "f", None, true, &[]) {
        Err(CoreError::InvalidSection { strict, .. }) => strict,
        other => panic!("{other:?}"),
    };
    assert!(strict_of("xconnector: {enabled: true, mode: nope, integration: {strict: true}}"));
    assert!(!strict_of("xconnector: {enabled: true, mode: nope, integration: {strict: false}}"));
    assert!(!strict_of("xconnector: {enabled: true, mode: nope}"));
    // Cross-field errors too, and in a file with a repeated key (read as plain serde reads it).
    assert!(strict_of("xconnector:\n  enabled: true\n  mode: hybrid\n  integration: {strict: true}\n"));
    assert!(strict_of("xconnector:\n  enabled: true\n  enabled: true\n  integration: {strict: true}\n"));
    // A service section's strict overlays Common's.
    let doc =
        "Common:\n  xconnector: {enabled: true, mode: x}\nVllmWorker:\n  xconnector: {integration: {strict: true}}\n";
    match resolve_text(doc, "f", Some("VllmWorker"), false, &[]) {
        Err(CoreError::InvalidSection { strict: true, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn engine_settings_come_from_the_adapters_with_their_defaults() {
    let cfg = parse_section(&json!({"enabled": true}), "").unwrap();
    let s = EngineSettings::from_config(&cfg);
    assert_eq!(
        (s.memory_bytes, s.chunk_size, &s.disk, &s.redis, &s.events),
        (DEFAULT_MEMORY_BYTES, None, &None, &None, &None)
    );
    assert_eq!((s.vllm.kv_layout.as_deref(), s.vllm.staging_buffer_bytes), (None, 256 << 20));
    let v = json!({"enabled": true, "mode": "hybrid", "adapters": [
        {"name": "lmcache", "config": {"max_local_cpu_size": 5.0, "chunk_size": 256, "local_disk": "file:///var/x",
            "remote_url": "redis://:pw@h:1", "remote_auth_key_env": "KEY", "remote_ca_file": "/ca.pem"}},
        {"name": "vllm", "config": {"kv_layout": "flashinfer", "staging_buffer_size": "64MiB", "model_id": "m"}},
        {"name": "dynamo", "config": {"namespace": "prod", "nats_url": "nats://n:4222"}}]});
    let s = EngineSettings::from_config(&parse_section(&v, "").unwrap());
    assert_eq!((s.memory_bytes, s.chunk_size), (5_000_000_000, Some(256)));
    let d = s.disk.as_ref().unwrap();
    assert_eq!((d.path.to_str().unwrap(), d.capacity_bytes, d.shared), ("/var/x", DEFAULT_DISK_BYTES, false));
    let r = s.redis.as_ref().unwrap();
    assert_eq!((r.timeout_ms, r.auth_key.clone()), (20, Some(AuthKeySource::Env("KEY".into()))));
    let e = s.events.as_ref().unwrap();
    assert_eq!(e.subject, "prod.xconnector.kv_events");
    assert!(e.worker_id.ends_with(&format!("-{}", std::process::id())), "{}", e.worker_id);
    assert_eq!((s.vllm.kv_layout.as_deref(), s.vllm.staging_buffer_bytes), (Some("flashinfer"), 64 << 20));
    let shown = s.to_value().to_string();
    assert!(!shown.contains("pw") && shown.contains("\"auth_key_env\":\"KEY\""), "{shown}");
    // No peer events without enable_distributed.
    let mut off = v.clone();
    off["enable_distributed"] = json!(false);
    off["adapters"][0]["config"].as_object_mut().unwrap().retain(|k, _| !k.starts_with("remote"));
    off["mode"] = json!("embedded");
    assert_eq!(EngineSettings::from_config(&parse_section(&off, "").unwrap()).events, None);

    // The engine: chunk over KV blocks, its bytes, the auth key read through env.
    let ns = Namespace { model: "m".into(), ..Namespace::default() };
    let env_with = |k: &str| (k == "KEY").then(|| "s3cret".to_owned());
    let ec = s.engine_config(64, 1000, ns.clone(), &env_with).unwrap();
    assert_eq!((ec.block_size, ec.block_bytes, ec.capacity_bytes), (256, 4000, 5_000_000_000));
    assert!(ec.redis.as_ref().unwrap().auth_key.is_some());
    assert_eq!(ec.disk.as_ref().unwrap().dir.to_str(), Some("/var/x"));
    let e = s.engine_config(48, 1000, ns.clone(), &env_with).unwrap_err().to_string();
    assert!(
        e.starts_with("adapters.lmcache.config.chunk_size: 256 is not a multiple of the worker's block size 48"),
        "{e}"
    );
    let e = s.engine_config(64, 1000, ns.clone(), &|_| None).unwrap_err().to_string();
    assert!(e.contains("remote_auth_key_env: the environment variable KEY is not set"), "{e}");
    assert!(!e.contains("s3cret"));
    let small = parse_section(&lmcache("embedded", json!({"max_cache_size": "1MiB"})), "").unwrap();
    let e = EngineSettings::from_config(&small).engine_config(16, 2 << 20, ns, &|_| None).unwrap_err().to_string();
    assert!(e.contains("max_cache_size: the memory budget of 1048576 bytes holds no engine block"), "{e}");
}

#[test]
fn runtime_checks_find_what_only_the_workers_machine_knows() {
    let dir = tempfile::tempdir().unwrap();
    let fine = dir.path().join("new/tier");
    let cfg = |c: Value, mode: &str| parse_section(&lmcache(mode, c), "").unwrap();
    // The messages, and whether each is fatal.
    let check = |c: &SdkConfig, env: &dyn Fn(&str) -> Option<String>| -> (Vec<String>, Vec<bool>) {
        runtime_problems(c, env).into_iter().map(|p| (p.message, p.fatal)).unzip()
    };
    assert_eq!(
        check(&cfg(json!({"local_disk": fine.to_str().unwrap()}), "embedded"), &|_| None).0,
        Vec::<String>::new()
    );
    assert!(!fine.exists(), "the check creates nothing");
    // A file where the directory should be.
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let (p, fatal) = check(&cfg(json!({"local_disk": file.join("sub").to_str().unwrap()}), "embedded"), &|_| None);
    assert_eq!(fatal, [false], "the engine runs without its disk tier");
    assert!(
        p.len() == 1 && p[0].starts_with("adapters.lmcache.config.local_disk: ") && p[0].contains("not a directory"),
        "{p:?}"
    );
    // Unwritable (root may write anywhere: skip that half then).
    if libc_geteuid() != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        let (p, _) = check(&cfg(json!({"local_disk": ro.join("tier").to_str().unwrap()}), "embedded"), &|_| None);
        assert!(p.len() == 1 && p[0].contains("cannot be created in"), "{p:?}");
        let (p, _) = check(&cfg(json!({"local_disk": ro.to_str().unwrap()}), "embedded"), &|_| None);
        assert!(p.len() == 1 && p[0].contains("not writable"), "{p:?}");
    }
    // Auth key variable and a Redis that does not answer (nothing listens on port 1).
    let c = cfg(json!({"remote_url": "redis://:hunter2@127.0.0.1:1", "remote_auth_key_env": "XC_TEST_KEY"}), "hybrid");
    let (p, fatal) = check(&c, &|_| Some(String::new()));
    assert_eq!(fatal, [true, false], "no engine without its key; Redis may come up later: {p:?}");
    assert!(p[0].contains("remote_auth_key_env: the environment variable XC_TEST_KEY is empty"), "{p:?}");
    assert!(
        p[1].starts_with("adapters.lmcache.config.remote_url: Redis at redis://:***@127.0.0.1:1 did not answer"),
        "{p:?}"
    );
    assert!(!p.join("\n").contains("hunter2"));
    let (p, _) = check(&c, &|_| None);
    assert!(p[0].contains("XC_TEST_KEY is not set"), "{p:?}");
}

fn libc_geteuid() -> u32 {
    // The test crate has no libc dependency: read the effective uid from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)?.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn an_unwritten_performance_block_size_is_the_workers() {
    let doc = json!({"Common": {"block-size": 32, "xconnector": {"enabled": true}},
                     "VllmWorker": {"common-configs": ["block-size"]}});
    let r = resolve_document_for(&doc, "g.yaml", Some("VllmWorker"), false, &[]).unwrap();
    assert_eq!(r.config.performance.block_size, 32);
    let origin = r.origins.iter().find(|(p, _, _)| p == "performance.block_size").unwrap();
    assert_eq!(origin.2, "g.yaml: Common.block-size: 32 (in VllmWorker.common-configs)");
    // The worker's command line wins over the document.
    let argv: Vec<String> = ["python", "--block-size", "64"].iter().map(|s| (*s).to_owned()).collect();
    let r = resolve_document_for(&doc, "g.yaml", Some("VllmWorker"), false, &argv).unwrap();
    assert_eq!(r.config.performance.block_size, 64);
    // Unknown (no service, several candidates, or none): the default stays.
    let plain = json!({"xconnector": {"enabled": true}});
    let r = resolve_document_for(&plain, "x.yaml", None, true, &[]).unwrap();
    assert_eq!(r.config.performance.block_size, 16);
}

#[test]
fn strict_written_in_any_copy_of_a_repeated_section_counts() {
    let strict_of = |text: &str| match resolve_text(text, "t.yaml", None, true, &[]) {
        Err(CoreError::InvalidSection { strict, .. }) => strict,
        other => panic!("{other:?}"),
    };
    // Strict in the first copy, which a lenient read drops.
    assert!(strict_of("xconnector:\n  enabled: true\n  integration: {strict: true}\nxconnector:\n  enabled: true\n"));
    assert!(strict_of("{\"xconnector\": {\"integration\": {\"strict\": true}}, \"xconnector\": {}}"));
    // A file that does not parse at all.
    assert!(strict_of("xconnector:\n  integration: {strict: true}\n  enabled: [true\n"));
    assert!(!strict_of("xconnector:\n  enabled: true\nxconnector:\n  integration: {strict: false}\n"));
}

#[test]
fn the_service_is_the_last_flag_else_the_variable() {
    let dynamo = json!({"Common": {"xconnector": {"enabled": true}},
                        "VllmWorker": {"xconnector": {"enable_distributed": false}}})
    .to_string();
    let env = |service_var: Option<&str>, argv: &[&str]| {
        let mut vars: HashMap<String, String> = [("DYNAMO_SERVICE_CONFIG".to_owned(), dynamo.clone())].into();
        if let Some(s) = service_var {
            vars.insert("XCONNECTOR_SERVICE".into(), s.into());
        }
        Environment { vars, argv: argv.iter().map(|s| (*s).to_owned()).collect() }
    };
    let e = env(Some("VllmWorker"), &["python"]);
    assert_eq!(e.service_name().as_deref(), Some("VllmWorker"));
    assert!(!discover(&e).unwrap().config.enable_distributed, "the variable's service overlays Common");
    let e = env(Some("VllmWorker"), &["python", "--service-name", "Frontend", "--service-name=PrefillWorker"]);
    assert_eq!(e.service_name().as_deref(), Some("PrefillWorker"));
    assert_eq!(env(None, &["python"]).service_name(), None);
}

#[test]
fn yaml_1_1_booleans_are_named_as_such() {
    let v = json!({"enabled": "yes", "integration": {"strict": "off"},
                   "adapters": [{"name": "lmcache", "config": {"local_cpu": "On"}}]});
    let text = problems(&v);
    assert!(text.contains("x.enabled: expected true or false, got the string \"yes\" (YAML 1.1 readers such as Dynamo's take it for true, this one for text); write true"), "{text}");
    assert!(text.contains("x.integration.strict: expected true or false, got the string \"off\""), "{text}");
    assert!(text.contains("write false"), "{text}");
    assert!(text.contains("local_cpu: expected true or false, got the string \"On\""), "{text}");
    assert!(problems(&json!({"enabled": "maybe"})).contains("got the string \"maybe\""));
}
