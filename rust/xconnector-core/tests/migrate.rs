//! `migrate` over every file of the earlier prototype: the result validates with no Dynamo
//! warning, the services' own keys are kept, and every old setting is either carried over to the
//! same place in the new section or named in a note (the module's invariants 1 and 2).

use std::path::PathBuf;

use serde_json::Value;
use xconnector_core::config::{parse_document, resolve_document};
use xconnector_core::migrate::{migrate, migrate_file, Migrated};

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/prior-xconnector-configs");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    assert!(out.len() >= 7, "{out:?}");
    out
}

fn fixture(name: &str) -> (Value, Migrated) {
    let path = fixtures().into_iter().find(|p| p.file_name().unwrap() == name).unwrap();
    let doc = parse_document(&std::fs::read_to_string(&path).unwrap(), name).unwrap();
    (doc, migrate_file(&path, name).unwrap())
}

/// Every leaf of `v` (empty mappings included) as (key path, segments, value).
fn leaves(v: &Value, path: &str, segs: &mut Vec<String>, out: &mut Vec<(String, Vec<String>, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                segs.push(k.clone());
                leaves(child, &if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, segs, out);
                segs.pop();
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, child) in items.iter().enumerate() {
                segs.push(format!("[{i}]"));
                leaves(child, &format!("{path}[{i}]"), segs, out);
                segs.pop();
            }
        }
        leaf => out.push((path.to_owned(), segs.clone(), leaf.clone())),
    }
}

/// The value at `segs` (relative to an old section) in the new section, adapters found by name.
fn carried<'v>(old: &Value, new: &'v Value, segs: &[String]) -> Option<&'v Value> {
    if segs.first().map(String::as_str) == Some("adapters") && segs.len() > 1 {
        let name = match segs[1].strip_prefix('[') {
            Some(i) => old["adapters"][i.trim_end_matches(']').parse::<usize>().ok()?]["name"].as_str()?.to_owned(),
            None => segs[1].clone(),
        };
        let entry = new["adapters"].as_array()?.iter().find(|a| a["name"] == name.as_str())?;
        return segs[2..].iter().try_fold(entry, |v, k| v.get(k));
    }
    segs.iter().try_fold(new, |v, k| v.get(k))
}

/// The old sections of a prototype file, by key path.
fn old_sections(doc: &Value) -> Vec<(&'static str, &Value)> {
    [
        ("xconnector", &doc["xconnector"]),
        ("sdk", &doc["sdk"]),
        ("XConnectorService", &doc["XConnectorService"]),
        ("Common.xconnector", &doc["Common"]["xconnector"]),
        ("VllmWorker.xconnector", &doc["VllmWorker"]["xconnector"]),
        ("VllmWorker.extensions.xconnector", &doc["VllmWorker"]["extensions"]["xconnector"]),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_null())
    .collect()
}

#[test]
fn every_prototype_file_migrates_to_a_valid_config_that_keeps_or_names_every_setting() {
    for path in fixtures() {
        let name = path.display().to_string();
        let doc = parse_document(&std::fs::read_to_string(&path).unwrap(), &name).unwrap();
        let m = migrate_file(&path, &name).unwrap_or_else(|e| panic!("{e}"));
        // Invariant 1: valid, on, no warning; the YAML text is the document.
        let r = resolve_document(&m.document, &name, None, true).unwrap();
        assert!(r.config.enabled && r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        assert_eq!(parse_document(&m.text, &name).unwrap(), m.document, "{name}");
        assert!(!m.text.contains('#'), "{name}: comments cannot survive and none are made up");
        let new = if m.section == "Common.xconnector" {
            &m.document["Common"]["xconnector"]
        } else {
            &m.document["xconnector"]
        };
        // Invariant 2: each old leaf is at the same place in the new section, or has its note.
        for (base, old) in old_sections(&doc) {
            let mut found = Vec::new();
            leaves(old, base, &mut Vec::new(), &mut found);
            for (leaf, segs, value) in found {
                // A list dropped as a whole has one note for the list.
                let noted = m.notes.iter().any(|n| n.path == leaf || leaf.starts_with(&format!("{}[", n.path)));
                let kept = carried(old, new, &segs) == Some(&value);
                assert!(noted || kept, "{name}: {leaf} = {value} is neither carried over nor noted: {:#?}", m.notes);
            }
        }
    }
}

#[test]
fn dynamo_files_keep_every_service_key_and_get_the_section_under_common() {
    for path in fixtures() {
        let name = path.display().to_string();
        let m = migrate_file(&path, &name).unwrap();
        if m.section != "Common.xconnector" {
            continue;
        }
        let mut old = parse_document(&std::fs::read_to_string(&path).unwrap(), &name).unwrap();
        // What the migration removes on purpose, each with a note.
        let old_map = old.as_object_mut().unwrap();
        old_map.shift_remove("xconnector");
        if let Some(w) = old_map.get_mut("VllmWorker").and_then(Value::as_object_mut) {
            w.shift_remove("extensions");
        }
        let mut new = m.document.clone();
        new["Common"].as_object_mut().unwrap().shift_remove("xconnector");
        assert_eq!(new, old, "{name}");
        // Common first, the services in their order.
        let keys: Vec<&String> = m.document.as_object().unwrap().keys().collect();
        let old_keys: Vec<&String> = old.as_object().unwrap().keys().collect();
        assert_eq!(keys, old_keys, "{name}");
    }
}

#[test]
fn the_service_config_maps_its_adapters_and_names_what_has_no_equivalent() {
    let (old, m) = fixture("xconnector_config.yaml");
    let svc = &old["XConnectorService"];
    let new = &m.document["xconnector"];
    assert_eq!(m.document.as_object().unwrap().len(), 1);
    let by_name = |n: &str| new["adapters"].as_array().unwrap().iter().find(|a| a["name"] == n).unwrap().clone();
    let lm = by_name("lmcache");
    assert_eq!(lm["config"]["max_cache_size"], svc["adapters"]["lmcache"]["config"]["max_cache_size"]);
    assert_eq!(lm["config"]["storage_backend"], svc["adapters"]["lmcache"]["config"]["storage_backend"]);
    assert_eq!(lm["config"]["chunk_size"], svc["adapters"]["lmcache"]["config"]["engine_config"]["chunk_size"]);
    let dy = by_name("dynamo");
    assert_eq!(dy["config"]["component"], svc["adapters"]["dynamo"]["config"]["component_name"]);
    assert_eq!(new["performance"]["metrics_port"], svc["monitoring"]["metrics_port"]);
    let paths: Vec<&str> = m.notes.iter().map(|n| n.path.as_str()).collect();
    for dropped in [
        "XConnectorService.server.port",
        "XConnectorService.adapters.vllm.class_path",
        "XConnectorService.adapters.lmcache.config.enable_compression",
        "XConnectorService.routing.rules",
    ] {
        assert!(paths.contains(&dropped), "{dropped}: {paths:?}");
    }
}

#[test]
fn sdk_and_xconnector_sections_merge_and_the_adapter_s_own_size_wins() {
    let (old, m) = fixture("dynamo-xconnector.yaml");
    let new = &m.document["xconnector"];
    assert_eq!(new["enable_caching"], old["sdk"]["enable_kv_cache"]);
    assert_eq!(new["adapters"][0]["config"]["max_cache_size"], old["sdk"]["adapters"][0]["config"]["max_cache_size"]);
    let conflict = m.notes.iter().find(|n| n.path == "xconnector.cache.max_size").unwrap();
    assert!(conflict.message.contains("sdk.adapters[0].config.max_cache_size"), "{conflict:?}");
}

#[test]
fn a_bare_section_is_migrated_and_a_current_config_is_left_as_it_is() {
    let m = migrate("enabled: true\nadapters: {lmcache: {max_cache_size: 512}}\n", "bare.yaml").unwrap();
    assert_eq!(m.document["xconnector"]["adapters"][0]["config"]["max_cache_size"], 512);
    let current = "Common:\n  xconnector:\n    enabled: true\n    adapters:\n    - name: lmcache\n      type: cache\n";
    let m = migrate(current, "cur.yaml").unwrap();
    assert!(m.notes.is_empty(), "{:?}", m.notes);
    assert_eq!(m.document, parse_document(current, "cur.yaml").unwrap());
}
