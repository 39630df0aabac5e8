//! `xconnector migrate-config`: the earlier prototype's config files in the current schema
//! (DESIGN section 2). The prototype's files come in three shapes:
//! - a Dynamo graph config whose section sits where Dynamo breaks (top level, under a service,
//!   listed in `common-configs`), where XConnector does not look (`VllmWorker.extensions`), or
//!   nowhere (the prototype searched other files for it);
//! - a file with an `xconnector:` section and the prototype SDK's `sdk:` section;
//! - a standalone `XConnectorService:` service config (adapters keyed by name with `class_path`,
//!   `server:`, `routing:`, `monitoring:`): XConnector is now an engine inside each worker.
//!
//! Invariants, relied on by the command and checked by [`migrate`] before it returns:
//! 1. every value carried over has passed the validator on its own at the place it is written
//!    ([`Builder::set`]), so the result is valid: `resolve_document` reads it without a problem
//!    and without a Dynamo warning;
//! 2. every prototype setting is either carried over unchanged (its path relative to the section
//!    unchanged) or named in a [`Note`] with its key path and what became of it.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{join_path, parse_document, parse_section, read_config_file, resolve_document, KNOWN_ADAPTERS};
use crate::error::{CoreError, Result};

/// What happened to one key of the old file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Key path in the old file (`XConnectorService.server.port`).
    pub path: String,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Migrated {
    /// The new document: the old Dynamo config with its section under `Common.xconnector`, or a
    /// document with an `xconnector:` section.
    pub document: Value,
    /// `document` as YAML (comments of the old file cannot survive the round trip).
    pub text: String,
    /// Where the section was written: `Common.xconnector` or `xconnector`.
    pub section: String,
    pub notes: Vec<Note>,
}

/// Migrates the config file at `path`; `source` names it in errors.
pub fn migrate_file(path: &Path, source: &str) -> Result<Migrated> {
    migrate(&read_config_file(path, source)?, source)
}

/// Migrates config text (YAML or JSON) of the prototype; `source` names it in errors.
pub fn migrate(text: &str, source: &str) -> Result<Migrated> {
    let Value::Object(map) = parse_document(text, source)? else {
        return Err(CoreError::config(format!(
            "{source}: expected a mapping at the top level (a Dynamo config or a file with an `xconnector:` \
             section); point migrate-config at the prototype's config file"
        )));
    };
    let dynamo = !map.contains_key("XConnectorService") && is_dynamo(&map);
    let mut b = Builder::new(if dynamo { "Common.xconnector" } else { "xconnector" });
    let document = if dynamo { b.dynamo(map) } else { b.standalone(map, source)? };
    check(&document, source)?;
    let text = serde_yaml_ng::to_string(&document)
        .map_err(|e| CoreError::Internal(format!("writing the migrated config as YAML: {e}")))?;
    Ok(Migrated { document, text, section: b.to, notes: b.notes })
}

/// Invariant 1, checked: the validator accepts the result and has nothing to warn about.
fn check(document: &Value, source: &str) -> Result<()> {
    let r = resolve_document(document, source, None, true)
        .map_err(|e| CoreError::Internal(format!("the migrated config does not validate: {e}")))?;
    if r.section.is_none() || !r.warnings.is_empty() {
        return Err(CoreError::Internal(format!("the migrated config is not clean: {:?}", r.warnings)));
    }
    Ok(())
}

/// A Dynamo graph config: `Common`, a service with Dynamo's own keys, or only CamelCase service
/// names (the prototype's own `xconnector`/`sdk` files have lower-case keys).
fn is_dynamo(doc: &Map<String, Value>) -> bool {
    doc.contains_key("Common")
        || doc.values().any(|v| v.get("common-configs").is_some() || v.get("ServiceArgs").is_some())
        || (!doc.is_empty() && doc.keys().all(|k| k.starts_with(|c: char| c.is_ascii_uppercase())))
}

const NOT_IN_SCHEMA: &str = "not part of the current schema (see DESIGN section 2 / docs/migrating.md)";

/// Why a prototype key has no equivalent, by its name.
fn reason(key: &str) -> &'static str {
    match key {
        "config_file" => {
            "XConnector reads this section or the file XCONNECTOR_CONFIG names; migrate that file with \
             `xconnector migrate-config` and merge its section here"
        }
        "xconnector_path" => "XConnector is an installed package (pip install); no path is needed",
        "offline_mode" => "XConnector contacts no service at startup, so there is nothing to take offline",
        "etcd" | "etcd_config" => "XConnector runs inside each worker and does not use etcd",
        "nats" => {
            "the prototype's NATS client is gone: XConnector's own KV events take the dynamo adapter's \
             `config.nats_url`, and Dynamo 1.x's router gets XConnector's blocks through vLLM's KV events"
        }
        "kv_transfer" => {
            "vLLM's connector is the worker's own `kv-transfer-config`; XConnector loads as XConnectorV1 \
             or next to it in vLLM's MultiConnector"
        }
        "logging" | "log_level" => {
            "XConnector logs through Python's logging (logger `xconnector`) into the worker's log; \
             XCONNECTOR_LOG turns on its own stderr output"
        }
        "fault_tolerance" | "fail_on_error" => {
            "XConnector always fails open: an error falls back to the worker's own path"
        }
        "namespace" | "component_name" | "service_id" => {
            "the identity of the prototype's service in Dynamo; XConnector runs inside each worker, not as a service"
        }
        "server" => "XConnector is an engine inside the worker, not an HTTP service pod: there is no server",
        "routing" => {
            "routing is in-process and fixed (memory, disk, remote tier in that order); Dynamo's KV router \
             picks the worker"
        }
        "monitoring" | "prometheus" | "health_check" | "metrics_enabled" | "health_check_interval" => {
            "metrics are always on, as Prometheus text on the worker's /metrics (or on \
             performance.metrics_port); there is no service to health-check"
        }
        "ttl" => "the cache evicts by size (least recently used prefix leaves first), not by age",
        "enable_compression" | "compression" => "blocks are stored as the engine lays them out, uncompressed",
        "block_size" | "cache_config" | "num_gpu_blocks" | "num_cpu_blocks" | "cache_dtype" => {
            "the KV geometry (block size, dtype, layout) is read from the vLLM engine at runtime"
        }
        "model_name" => {
            "the model comes from vLLM's own configuration (`model_id` is only for one model mounted at \
             different paths)"
        }
        "engine_args"
        | "tensor_parallel_size"
        | "pipeline_parallel_size"
        | "max_batch_size"
        | "kv_cache_dtype"
        | "enable_chunked_prefill"
        | "chunked_prefill_enabled" => {
            "vLLM's engine settings belong to the worker (its own keys / vLLM flags); XConnector reads them \
             from the running engine"
        }
        "routing_policy" => "Dynamo's KV router picks workers; XConnector's blocks reach it as KV events",
        "connection_pool_size"
        | "request_timeout"
        | "max_concurrent_requests"
        | "keep_alive_timeout"
        | "result_cache" => "a setting of the prototype's HTTP service; XConnector is called in-process",
        _ => NOT_IN_SCHEMA,
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Top,
    Integration,
    Performance,
    Adapter(usize),
    Config(usize),
}

/// How a carried value's place relates to its old one.
#[derive(Clone, Copy)]
enum How {
    /// Same key path relative to the section: no note.
    Same,
    /// Another key path: noted.
    Moved,
    /// Another key or value, for this reason: noted.
    Because(&'static str),
}

struct AdapterOut {
    name: &'static str,
    kind: &'static str,
    fields: Map<String, Value>,
    config: Map<String, Value>,
}

/// The new section, built key by key from one or more old sections.
struct Builder {
    /// Where the section goes: `Common.xconnector` or `xconnector`.
    to: String,
    top: Map<String, Value>,
    integration: Map<String, Value>,
    performance: Map<String, Value>,
    adapters: Vec<AdapterOut>,
    /// New key path -> old key path, for conflicts between old sections.
    origins: HashMap<String, String>,
    /// `cache:` block settings, applied to the lmcache adapter after the adapters themselves.
    deferred: Vec<(&'static str, Value, String)>,
    notes: Vec<Note>,
}

impl Builder {
    fn new(to: &str) -> Self {
        Self {
            to: to.to_owned(),
            top: Map::new(),
            integration: Map::new(),
            performance: Map::new(),
            adapters: Vec::new(),
            origins: HashMap::new(),
            deferred: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn note(&mut self, path: &str, message: impl Into<String>) {
        let path = if path.is_empty() { "(whole document)" } else { path };
        self.notes.push(Note { path: path.to_owned(), message: message.into() });
    }

    /// A key with no equivalent: one note per leaf (mappings are walked), so every dropped
    /// setting is named by its own key path.
    fn drop_tree(&mut self, path: &str, v: &Value, why: &str) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    self.drop_tree(&join_path(path, k), child, why);
                }
            }
            _ => self.note(path, format!("no equivalent: {why}; dropped")),
        }
    }

    /// The document with this one value at `slot.key`, for the validator.
    fn fragment(&self, slot: Slot, key: &str, value: &Value) -> Value {
        let mut kv = Map::new();
        kv.insert(key.to_owned(), value.clone());
        match slot {
            Slot::Top if key == "enabled" => Value::Object(kv),
            Slot::Top => {
                kv.insert("enabled".into(), json!(true));
                Value::Object(kv)
            }
            Slot::Integration => json!({"enabled": true, "integration": kv}),
            Slot::Performance => json!({"enabled": true, "performance": kv}),
            Slot::Adapter(i) => {
                kv.insert("name".into(), json!(self.adapters[i].name));
                json!({"enabled": true, "adapters": [kv]})
            }
            Slot::Config(i) => json!({"enabled": true, "adapters": [{"name": self.adapters[i].name, "config": kv}]}),
        }
    }

    fn target(&self, slot: Slot, key: &str) -> String {
        match slot {
            Slot::Top => join_path(&self.to, key),
            Slot::Integration => format!("{}.integration.{key}", self.to),
            Slot::Performance => format!("{}.performance.{key}", self.to),
            Slot::Adapter(i) => format!("{}.adapters[{i}].{key}", self.to),
            Slot::Config(i) => format!("{}.adapters[{i}].config.{key}", self.to),
        }
    }

    fn slot(&mut self, slot: Slot) -> &mut Map<String, Value> {
        match slot {
            Slot::Top => &mut self.top,
            Slot::Integration => &mut self.integration,
            Slot::Performance => &mut self.performance,
            Slot::Adapter(i) => &mut self.adapters[i].fields,
            Slot::Config(i) => &mut self.adapters[i].config,
        }
    }

    /// Carries `value` (from old path `from`) to `slot.key` if the validator accepts it there
    /// (invariant 1), and notes anything that is not a plain carry-over (invariant 2).
    fn set(&mut self, slot: Slot, key: &str, value: Value, from: &str, how: How) {
        if let Err(problems) = parse_section(&self.fragment(slot, key, &value), "") {
            let why = problems.first().map_or("rejected by the validator", |p| p.message.as_str());
            return self.note(from, format!("{why}; dropped"));
        }
        let target = self.target(slot, key);
        if let Some(same) = self.slot(slot).get(key).map(|existing| *existing == value) {
            let earlier = self.origins.get(&target).cloned().unwrap_or_else(|| "the defaults".to_owned());
            match (same, how) {
                (true, How::Same) => {}
                (true, _) => self.note(from, format!("-> {target}, which {earlier} already sets to the same value")),
                (false, _) => self.note(
                    from,
                    format!("{target} is already set from {earlier} to another value, which is kept; dropped"),
                ),
            }
            return;
        }
        self.slot(slot).insert(key.to_owned(), value);
        self.origins.insert(target.clone(), from.to_owned());
        match how {
            How::Same => {}
            How::Moved => self.note(from, format!("-> {target}")),
            How::Because(why) => self.note(from, format!("-> {target}: {why}")),
        }
    }

    /// One old section (`xconnector:`, `sdk:`, `XConnectorService:`, or a bare one at `from` = "").
    fn section(&mut self, v: &Value, from: &str) {
        let Some(m) = v.as_object() else {
            return self.note(from, "expected a mapping of settings; dropped");
        };
        for (k, val) in m {
            let p = join_path(from, k);
            match k.as_str() {
                "enabled" | "mode" | "enable_distributed" | "enable_caching" => {
                    self.set(Slot::Top, k, val.clone(), &p, How::Same)
                }
                "enable_kv_cache" => self.set(
                    Slot::Top,
                    "enable_caching",
                    val.clone(),
                    &p,
                    How::Because("the prototype SDK's name for it"),
                ),
                "fail_on_error" => self.set(
                    Slot::Integration,
                    "strict",
                    val.clone(),
                    &p,
                    How::Because("strict raises at startup on a configuration error; otherwise it fails open"),
                ),
                "adapters" => self.adapters(val, &p),
                "cache" => self.cache_block(val, &p),
                "integration" | "performance" | "monitoring" => self.grouped(k, val, &p),
                _ => self.drop_tree(&p, val, reason(k)),
            }
        }
    }

    /// `integration:`, `performance:` (current keys carried, the prototype service's dropped) and
    /// `monitoring:` (only its `metrics_port` has an equivalent).
    fn grouped(&mut self, group: &str, v: &Value, from: &str) {
        let Some(m) = v.as_object() else { return self.drop_tree(from, v, "expected a mapping") };
        for (k, val) in m {
            let p = join_path(from, k);
            match (group, k.as_str()) {
                ("integration", _) => self.set(Slot::Integration, k, val.clone(), &p, How::Same),
                ("performance", "block_size" | "worker_threads" | "pin_memory" | "batch_size" | "metrics_port") => {
                    self.set(Slot::Performance, k, val.clone(), &p, How::Same)
                }
                ("monitoring", "metrics_port") => self.set(Slot::Performance, k, val.clone(), &p, How::Moved),
                ("monitoring", _) => {
                    let why = Some(reason(k)).filter(|r| *r != NOT_IN_SCHEMA).unwrap_or(reason("monitoring"));
                    self.drop_tree(&p, val, why)
                }
                _ => self.drop_tree(&p, val, reason(k)),
            }
        }
    }

    /// The prototype's `cache:` block: defaults for the lmcache adapter's own settings.
    fn cache_block(&mut self, v: &Value, from: &str) {
        let Some(m) = v.as_object() else { return self.drop_tree(from, v, "expected a mapping") };
        for (k, val) in m {
            let p = join_path(from, k);
            match k.as_str() {
                "provider" => self.deferred.push(("storage_backend", val.clone(), p)),
                "max_size" => self.deferred.push(("max_cache_size", val.clone(), p)),
                _ => self.drop_tree(&p, val, reason(k)),
            }
        }
    }

    fn adapters(&mut self, v: &Value, from: &str) {
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.adapter(None, item, &format!("{from}[{i}]"));
                }
            }
            Value::Object(m) => {
                self.note(from, format!("a mapping name -> adapter; written as a list at {}.adapters", self.to));
                for (name, item) in m {
                    self.adapter(Some(name), item, &join_path(from, name));
                }
            }
            other => self.drop_tree(from, other, "expected a list of adapters or a mapping name -> adapter"),
        }
    }

    /// The index of the adapter `name` in the new list, added if new.
    fn adapter_index(&mut self, name: &'static str, kind: &'static str) -> usize {
        if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
            return i;
        }
        self.adapters.push(AdapterOut { name, kind, fields: Map::new(), config: Map::new() });
        self.adapters.len() - 1
    }

    fn adapter(&mut self, key_name: Option<&str>, v: &Value, from: &str) {
        let empty = Map::new();
        let m = match v {
            Value::Null => &empty,
            Value::Object(m) => m,
            other => return self.drop_tree(from, other, "an adapter is a mapping of settings"),
        };
        let name = key_name.or_else(|| m.get("name").and_then(Value::as_str));
        let Some(&(name, kind)) = name.and_then(|n| KNOWN_ADAPTERS.iter().find(|(k, _)| *k == n)) else {
            let known: Vec<&str> = KNOWN_ADAPTERS.iter().map(|(n, _)| *n).collect();
            return self
                .note(from, format!("no built-in adapter of this name (they are {}); dropped", known.join(", ")));
        };
        let i = self.adapter_index(name, kind.as_str());
        for (k, val) in m {
            let p = join_path(from, k);
            match k.as_str() {
                "name" => {}
                "type" | "enabled" | "priority" => self.set(Slot::Adapter(i), k, val.clone(), &p, How::Same),
                "class_path" => self.drop_tree(&p, val, "adapters are built in and chosen by `name`"),
                "config" => match val {
                    Value::Object(c) => {
                        for (ck, cv) in c {
                            self.setting(i, ck, cv, &join_path(&p, ck), How::Same);
                        }
                    }
                    Value::Null => {}
                    other => self.drop_tree(&p, other, "expected a mapping of settings"),
                },
                // The prototype also wrote settings next to `enabled` (`lmcache: {max_cache_size: ..}`).
                _ => self.setting(i, k, val, &p, How::Moved),
            }
        }
    }

    /// One adapter setting, renamed or dropped where the prototype's differs from the current one.
    fn setting(&mut self, i: usize, key: &str, v: &Value, from: &str, how: How) {
        let name = self.adapters[i].name;
        match (name, key, v.as_str()) {
            ("lmcache", "storage_backend", Some("local")) => self.set(
                Slot::Config(i),
                key,
                json!("memory"),
                from,
                How::Because(
                    "\"local\" is the in-process memory tier now (`disk` with `local_disk` keeps blocks in files)",
                ),
            ),
            ("lmcache", "storage_backend", Some("distributed")) => self.drop_tree(
                from,
                v,
                "a shared tier is `mode: hybrid` with the lmcache adapter's `remote_url: redis://...`",
            ),
            ("lmcache", "engine_config", _) => {
                let Some(m) = v.as_object() else { return self.drop_tree(from, v, reason(key)) };
                for (k, val) in m {
                    let p = join_path(from, k);
                    match k.as_str() {
                        "chunk_size" => self.set(Slot::Config(i), k, val.clone(), &p, How::Moved),
                        _ => self.drop_tree(&p, val, reason(k)),
                    }
                }
            }
            ("dynamo", "component_name", _) => self.set(Slot::Config(i), "component", v.clone(), from, How::Moved),
            (_, "enable_compression" | "cache_config" | "block_size" | "model_name" | "engine_args", _)
            | (_, "routing_policy" | "etcd_config", _)
            | (_, "tensor_parallel_size" | "pipeline_parallel_size" | "max_batch_size", _)
            | (_, "kv_cache_dtype" | "enable_chunked_prefill", _) => self.drop_tree(from, v, reason(key)),
            _ => self.set(Slot::Config(i), key, v.clone(), from, how),
        }
    }

    /// The new section, after the `cache:` block's defaults and `enabled` are settled.
    fn finish(&mut self) -> Value {
        for (key, value, from) in std::mem::take(&mut self.deferred) {
            let i = self.adapter_index("lmcache", "cache");
            self.set(Slot::Config(i), key, value, &from, How::Moved);
        }
        if !self.top.contains_key("enabled") {
            let to = join_path(&self.to, "enabled");
            self.note(
                &to,
                "set to true: the prototype turned a section on by being there; the current schema asks for it",
            );
            self.top.insert("enabled".into(), json!(true));
        }
        let mut out = Map::new();
        out.insert("enabled".into(), self.top["enabled"].clone());
        out.extend(self.top.iter().filter(|(k, _)| *k != "enabled").map(|(k, v)| (k.clone(), v.clone())));
        if !self.adapters.is_empty() {
            let list = self.adapters.iter().map(|a| {
                let mut e = Map::new();
                e.insert("name".into(), json!(a.name));
                e.insert("type".into(), json!(a.kind));
                if !a.config.is_empty() {
                    e.insert("config".into(), Value::Object(a.config.clone()));
                }
                e.extend(a.fields.iter().filter(|(k, _)| *k != "type").map(|(k, v)| (k.clone(), v.clone())));
                Value::Object(e)
            });
            out.insert("adapters".into(), Value::Array(list.collect()));
        }
        for (key, m) in [("integration", &self.integration), ("performance", &self.performance)] {
            if !m.is_empty() {
                out.insert(key.into(), Value::Object(m.clone()));
            }
        }
        Value::Object(out)
    }

    /// A Dynamo config: every section found is merged into `Common.xconnector` (the one found
    /// there first, so it wins), and nothing that breaks Dynamo stays.
    fn dynamo(&mut self, mut doc: Map<String, Value>) -> Value {
        let mut found = false;
        if let Some(v) = doc.get_mut("Common").and_then(Value::as_object_mut).and_then(|c| c.shift_remove("xconnector"))
        {
            found = true;
            self.section(&v, "Common.xconnector");
        }
        if let Some(v) = doc.shift_remove("xconnector") {
            found = true;
            self.note("xconnector", "moved to Common.xconnector: Dynamo takes every top-level key for a service");
            self.section(&v, "xconnector");
        }
        for (service, body) in doc.iter_mut().filter(|(k, _)| *k != "Common") {
            let Some(body) = body.as_object_mut() else { continue };
            if let Some(Value::Array(list)) = body.get_mut("common-configs") {
                let before = list.len();
                list.retain(|k| k.as_str() != Some("xconnector"));
                if list.len() != before {
                    self.note(
                        &format!("{service}.common-configs"),
                        format!(
                            "`xconnector` removed: Dynamo would pass it to {service} as --xconnector '{{...}}' and \
                             vLLM exits with \"unrecognized arguments\"; XConnector reads Common.xconnector itself"
                        ),
                    );
                }
            }
            found |= self.nested(body, service);
        }
        if !found {
            self.note(
                "Common.xconnector",
                "added with enabled: true: this file has no XConnector section (the prototype searched other \
                 files such as dynamo-xconnector.yaml, or read ENABLE_XCONNECTOR); migrate that file too and \
                 merge its section here",
            );
            self.top.insert("enabled".into(), json!(true));
        }
        let section = self.finish();
        let mut out = Map::new();
        let mut common = match doc.shift_remove("Common") {
            Some(Value::Object(c)) => c,
            _ => Map::new(),
        };
        common.insert("xconnector".into(), section);
        out.insert("Common".into(), Value::Object(common));
        out.extend(doc);
        Value::Object(out)
    }

    /// Moves every `xconnector` key inside a service (at any depth) into the new section, and
    /// removes mappings left empty by that (an empty `extensions:` would still reach vLLM as a
    /// flag). Returns whether one was found.
    fn nested(&mut self, obj: &mut Map<String, Value>, path: &str) -> bool {
        let mut found = false;
        if let Some(v) = obj.shift_remove("xconnector") {
            found = true;
            let p = join_path(path, "xconnector");
            let why = if path.contains('.') {
                "XConnector does not read it there".to_owned()
            } else {
                format!(
                    "under a service Dynamo passes it to {path} as --xconnector '{{...}}' and vLLM exits with \
                     \"unrecognized arguments\""
                )
            };
            self.note(&p, format!("moved to Common.xconnector: {why}"));
            self.section(&v, &p);
        }
        let keys: Vec<String> = obj.keys().cloned().collect();
        for k in keys {
            let Some(Value::Object(child)) = obj.get_mut(&k) else { continue };
            let p = join_path(path, &k);
            if self.nested(child, &p) {
                found = true;
                if child.is_empty() {
                    obj.shift_remove(&k);
                    self.note(&p, "removed: it held only the xconnector section");
                }
            }
        }
        found
    }

    /// A file of `xconnector:` / `sdk:` / `XConnectorService:` sections (or a bare section): the
    /// result is a document with one `xconnector:` section; other top-level keys stay.
    fn standalone(&mut self, mut doc: Map<String, Value>, source: &str) -> Result<Value> {
        let mut found = false;
        if let Some(v) = doc.shift_remove("xconnector") {
            found = true;
            self.section(&v, "xconnector");
        }
        if let Some(v) = doc.shift_remove("sdk") {
            found = true;
            self.note("sdk", "merged into xconnector: the prototype SDK's settings are part of the one section now");
            self.section(&v, "sdk");
        }
        if let Some(v) = doc.shift_remove("XConnectorService") {
            found = true;
            self.note(
                "XConnectorService",
                "became the xconnector section: XConnector is an engine inside each worker now, not a service \
                 pod; deploy no XConnectorService and turn it on in the workers (docs/migrating.md)",
            );
            self.section(&v, "XConnectorService");
        }
        const SECTION_KEYS: &[&str] = &["enabled", "mode", "adapters", "enable_distributed", "enable_kv_cache"];
        if !found && doc.keys().any(|k| SECTION_KEYS.contains(&k.as_str())) {
            found = true;
            self.note("", "read as the prototype's section itself; written under `xconnector:`");
            self.section(&Value::Object(std::mem::take(&mut doc)), "");
        }
        if !found {
            return Err(CoreError::config(format!(
                "{source}: no XConnector settings found (no `xconnector:`, `sdk:` or `XConnectorService:` \
                 section, and not a Dynamo config); point migrate-config at the prototype's XConnector or \
                 Dynamo config file"
            )));
        }
        let mut out = Map::new();
        out.insert("xconnector".into(), self.finish());
        out.extend(doc);
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Migrated {
        migrate(text, "t.yaml").unwrap()
    }

    fn note<'m>(m: &'m Migrated, path: &str) -> &'m str {
        m.notes.iter().find(|n| n.path == path).map(|n| n.message.as_str()).unwrap_or_else(|| panic!("{path}: {m:?}"))
    }

    #[test]
    fn a_service_section_moves_to_common_and_leaves_nothing_that_breaks_dynamo() {
        let m = run("Common: {model: m}\nVllmWorker:\n  common-configs: [model, xconnector]\n  \
                     xconnector: {enabled: true, enable_distributed: false}\n  extensions: {xconnector: {enabled: false}}\n");
        assert_eq!(m.section, "Common.xconnector");
        assert_eq!(m.document["Common"]["xconnector"], json!({"enabled": true, "enable_distributed": false}));
        assert_eq!(m.document["VllmWorker"], json!({"common-configs": ["model"]}));
        assert!(note(&m, "VllmWorker.common-configs").contains("unrecognized arguments"));
        assert!(note(&m, "VllmWorker.extensions.xconnector.enabled")
            .contains("already set from VllmWorker.xconnector.enabled"));
        assert!(note(&m, "VllmWorker.extensions").starts_with("removed"));
    }

    #[test]
    fn values_the_validator_rejects_are_dropped_with_its_reason() {
        let m = run("xconnector:\n  enabled: true\n  mode: service\n  adapters:\n    lmcache: {max_cache_size: -1, \
                     storage_backend: local}\n    redis: {}\n");
        assert_eq!(
            m.document["xconnector"],
            json!({"enabled": true, "adapters": [{"name": "lmcache", "type": "cache", "config": {"storage_backend": "memory"}}]})
        );
        assert!(note(&m, "xconnector.mode").contains("expected \"embedded\" or \"hybrid\""));
        assert!(note(&m, "xconnector.adapters.lmcache.max_cache_size").contains("negative"));
        assert!(note(&m, "xconnector.adapters.redis").contains("no built-in adapter"));
        assert!(note(&m, "xconnector.adapters.lmcache.storage_backend")
            .contains("-> xconnector.adapters[0].config.storage_backend"));
    }

    #[test]
    fn a_dynamo_config_without_a_section_gets_one_that_is_on() {
        let m = run("Common: {model: m}\nVllmWorker: {common-configs: [model]}\n");
        assert_eq!(m.document["Common"]["xconnector"], json!({"enabled": true}));
        assert!(note(&m, "Common.xconnector").contains("no XConnector section"));
    }

    #[test]
    fn nothing_to_migrate_is_an_error_that_names_the_file() {
        for text in ["foo: 1\n", "- a\n", "just text\n"] {
            let e = migrate(text, "bad.yaml").unwrap_err().to_string();
            assert!(e.starts_with("bad.yaml: "), "{e}");
            assert!(e.contains("point migrate-config at"), "{e}");
        }
        assert!(migrate("a: [1\n", "bad.yaml").unwrap_err().to_string().contains("not valid YAML"));
    }
}
