//! The strict validator: walks a parsed `xconnector` section, builds the typed config, and collects
//! every problem with its key path instead of stopping at the first.

use serde_json::{Map, Value};

use super::adapters::check_settings;
use super::problem::{join_path, kind, not_a_boolean, Problem};
use super::rules::{self, Context};
use super::schema::{
    AdapterConfig, AdapterType, IntegrationConfig, Mode, PerformanceConfig, SdkConfig, KNOWN_ADAPTERS,
};
use super::worker::WorkerBlockSize;

const TOP_KEYS: &[&str] =
    &["enabled", "mode", "enable_distributed", "enable_caching", "adapters", "integration", "performance"];
const ADAPTER_KEYS: &[&str] = &["name", "type", "config", "enabled", "priority"];
const INTEGRATION_KEYS: &[&str] = &["targets", "services", "strict"];
const PERFORMANCE_KEYS: &[&str] = &["block_size", "worker_threads", "pin_memory", "batch_size", "metrics_port"];

struct Walker {
    problems: Vec<Problem>,
    /// Where each adapter of the result was read from (aligned with `SdkConfig::adapters`).
    adapter_paths: Vec<String>,
    /// Whether `performance.block_size` was written.
    explicit_block_size: bool,
}

/// Edit distance, for "did you mean" hints on misspelt keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

impl Walker {
    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem { path: path.to_owned(), message: message.into() });
    }

    fn mapping<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            other => {
                self.problem(path, format!("expected a mapping of keys, got {}", kind(other)));
                None
            }
        }
    }

    fn unknown_keys(&mut self, m: &Map<String, Value>, path: &str, allowed: &[&str]) {
        for key in m.keys().filter(|k| !allowed.contains(&k.as_str())) {
            let hint = allowed
                .iter()
                .filter(|a| distance(key, a) <= 2)
                .min_by_key(|a| distance(key, a))
                .map(|a| format!("did you mean {a:?}? "))
                .unwrap_or_default();
            self.problem(&join_path(path, key), format!("unknown key; {hint}accepted keys: {}", allowed.join(", ")));
        }
    }

    fn boolean(&mut self, m: &Map<String, Value>, path: &str, key: &str, default: bool) -> bool {
        match m.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(&join_path(path, key), not_a_boolean(other));
                default
            }
        }
    }

    fn integer(&mut self, m: &Map<String, Value>, path: &str, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = m.get(key)?;
        match v.as_i64() {
            Some(i) if (min..=max).contains(&i) => Some(i),
            _ => {
                let got = if v.is_number() { format!("{v}") } else { kind(v).to_owned() };
                self.problem(&join_path(path, key), format!("expected an integer in {min}..={max}, got {got}"));
                None
            }
        }
    }

    fn strings(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> Option<Vec<String>> {
        let v = m.get(key)?;
        let items = match v {
            Value::Array(items) => items,
            other => {
                self.problem(&join_path(path, key), format!("expected a list of strings, got {}", kind(other)));
                return None;
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) => out.push(s.to_owned()),
                None => self.problem(
                    &format!("{}[{i}]", join_path(path, key)),
                    format!("expected a string, got {}", kind(item)),
                ),
            }
        }
        Some(out)
    }

    fn section(&mut self, v: &Value, path: &str) -> SdkConfig {
        let mut cfg = SdkConfig::default();
        let Some(m) = self.mapping(v, path) else { return cfg };
        self.unknown_keys(m, path, TOP_KEYS);
        match m.get("enabled") {
            None => self.problem(
                &join_path(path, "enabled"),
                "missing; set `enabled: true` to turn XConnector on (or `false` to keep it off)",
            ),
            Some(_) => cfg.enabled = self.boolean(m, path, "enabled", false),
        }
        match m.get("mode") {
            None => {}
            Some(Value::String(s)) if s == "embedded" => cfg.mode = Mode::Embedded,
            Some(Value::String(s)) if s == "hybrid" => cfg.mode = Mode::Hybrid,
            Some(other) => {
                self.problem(&join_path(path, "mode"), format!("expected \"embedded\" or \"hybrid\", got {other}"))
            }
        }
        cfg.enable_distributed = self.boolean(m, path, "enable_distributed", true);
        cfg.enable_caching = self.boolean(m, path, "enable_caching", true);
        if let Some(a) = m.get("adapters") {
            let (adapters, paths) = self.adapters(a, &join_path(path, "adapters")).into_iter().unzip();
            cfg.adapters = adapters;
            self.adapter_paths = paths;
        }
        if let Some(i) = m.get("integration") {
            cfg.integration = self.integration(i, &join_path(path, "integration"));
        }
        if let Some(p) = m.get("performance") {
            cfg.performance = self.performance(p, &join_path(path, "performance"));
        }
        cfg
    }

    /// The adapters, sorted by priority, each with the key path it was read from.
    fn adapters(&mut self, v: &Value, path: &str) -> Vec<(AdapterConfig, String)> {
        let mut out: Vec<(AdapterConfig, String)> = Vec::new();
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.extend(self.adapter(item, &p, None).map(|a| (a, p)));
                }
            }
            Value::Object(m) => {
                let empty = Value::Object(Map::new());
                for (name, item) in m {
                    let p = join_path(path, name);
                    // `adapters: {lmcache: }` (YAML null) means "this adapter, default settings".
                    let item = if item.is_null() { &empty } else { item };
                    out.extend(self.adapter(item, &p, Some(name)).map(|a| (a, p)));
                }
            }
            other => self.problem(
                path,
                format!("expected a list of adapters or a mapping name -> adapter, got {}", kind(other)),
            ),
        }
        let mut seen = std::collections::HashSet::new();
        for (a, p) in &out {
            if !seen.insert(a.name.clone()) {
                self.problem(p, format!("adapter {:?} is configured twice; keep one entry", a.name));
            }
        }
        // Stable: equal priorities keep the order they were written in.
        out.sort_by_key(|(a, _)| a.priority);
        out
    }

    fn adapter(&mut self, v: &Value, path: &str, key_name: Option<&str>) -> Option<AdapterConfig> {
        let m = self.mapping(v, path)?;
        let known: Vec<&str> = KNOWN_ADAPTERS.iter().map(|(n, _)| *n).collect();
        for key in m.keys().filter(|k| !ADAPTER_KEYS.contains(&k.as_str())) {
            let p = join_path(path, key);
            if key == "class_path" {
                self.problem(&p, "adapters are built in and chosen by `name`; remove `class_path`");
            } else {
                self.problem(
                    &p,
                    format!(
                        "unknown key; adapter settings go under `config:` (accepted keys: {})",
                        ADAPTER_KEYS.join(", ")
                    ),
                );
            }
        }
        let name = match (key_name, m.get("name")) {
            (Some(k), None) => k.to_owned(),
            (Some(k), Some(Value::String(n))) if n == k => k.to_owned(),
            (Some(k), Some(n)) => {
                self.problem(&join_path(path, "name"), format!("is {n} but the entry is keyed {k:?}; make them agree"));
                return None;
            }
            (None, Some(Value::String(n))) => n.clone(),
            (None, Some(other)) => {
                self.problem(
                    &join_path(path, "name"),
                    format!("expected one of {}, got {}", known.join(", "), kind(other)),
                );
                return None;
            }
            (None, None) => {
                self.problem(&join_path(path, "name"), format!("missing; one of {}", known.join(", ")));
                return None;
            }
        };
        let Some(&(_, expected)) = KNOWN_ADAPTERS.iter().find(|(n, _)| *n == name) else {
            self.problem(
                &join_path(path, "name"),
                format!("unknown adapter {name:?}; known adapters: {}", known.join(", ")),
            );
            return None;
        };
        let kind_ok = match m.get("type") {
            None => true,
            Some(Value::String(t)) => {
                let parsed = match t.as_str() {
                    "cache" => Some(AdapterType::Cache),
                    "inference" => Some(AdapterType::Inference),
                    "distributed" => Some(AdapterType::Distributed),
                    _ => None,
                };
                let ok = parsed == Some(expected);
                if !ok {
                    let want = expected.as_str();
                    self.problem(&join_path(path, "type"), format!("adapter {name:?} is of type {want:?}, not {t:?}"));
                }
                ok
            }
            Some(other) => {
                self.problem(
                    &join_path(path, "type"),
                    format!("expected cache, inference or distributed, got {}", kind(other)),
                );
                false
            }
        };
        let config = match m.get("config") {
            None => Map::new(),
            Some(c) => self.mapping(c, &join_path(path, "config")).cloned().unwrap_or_default(),
        };
        self.problems.extend(check_settings(&name, &config, &join_path(path, "config")));
        let enabled = self.boolean(m, path, "enabled", true);
        let priority = self.integer(m, path, "priority", i64::from(i32::MIN), i64::from(i32::MAX)).unwrap_or(0);
        kind_ok.then_some(AdapterConfig { name, kind: expected, config, enabled, priority })
    }

    fn integration(&mut self, v: &Value, path: &str) -> IntegrationConfig {
        let mut cfg = IntegrationConfig::default();
        let Some(m) = self.mapping(v, path) else { return cfg };
        self.unknown_keys(m, path, INTEGRATION_KEYS);
        if let Some(targets) = self.strings(m, path, "targets") {
            for (i, t) in targets.iter().enumerate() {
                let ok = t.split_once(':').is_some_and(|(module, class)| !module.is_empty() && !class.is_empty());
                if !ok {
                    self.problem(
                        &format!("{}[{i}]", join_path(path, "targets")),
                        format!("{t:?} is not \"module:Class\""),
                    );
                }
            }
            cfg.targets = targets;
        }
        if let Some(services) = self.strings(m, path, "services") {
            cfg.services = services;
        }
        cfg.strict = self.boolean(m, path, "strict", false);
        cfg
    }

    fn performance(&mut self, v: &Value, path: &str) -> PerformanceConfig {
        let mut cfg = PerformanceConfig::default();
        let Some(m) = self.mapping(v, path) else { return cfg };
        self.unknown_keys(m, path, PERFORMANCE_KEYS);
        let max = i64::from(u32::MAX);
        self.explicit_block_size = m.contains_key("block_size");
        if let Some(b) = self.integer(m, path, "block_size", 1, max) {
            cfg.block_size = b as u32;
        }
        if let Some(t) = self.integer(m, path, "worker_threads", 0, 1024) {
            cfg.worker_threads = t as u32;
        }
        cfg.pin_memory = self.boolean(m, path, "pin_memory", false);
        if let Some(b) = self.integer(m, path, "batch_size", 1, max) {
            cfg.batch_size = b as u32;
        }
        if !matches!(m.get("metrics_port"), None | Some(Value::Null)) {
            cfg.metrics_port = self.integer(m, path, "metrics_port", 1, 65535).map(|p| p as u16);
        }
        cfg
    }
}

/// Validates an `xconnector` section found at `path` (e.g. `Common.xconnector`).
pub fn parse_section(value: &Value, path: &str) -> Result<SdkConfig, Vec<Problem>> {
    parse_section_traced(value, path).map(|(cfg, _)| cfg)
}

/// [`parse_section`], plus the key path each adapter was read from (aligned with `adapters`).
pub fn parse_section_traced(value: &Value, path: &str) -> Result<(SdkConfig, Vec<String>), Vec<Problem>> {
    parse_section_for(value, path, &[])
}

/// [`parse_section_traced`] for a worker whose block sizes are known: the settings that must fit
/// them are checked too (see `rules.rs`).
pub fn parse_section_for(
    value: &Value,
    path: &str,
    block_sizes: &[WorkerBlockSize],
) -> Result<(SdkConfig, Vec<String>), Vec<Problem>> {
    let mut w = Walker { problems: Vec::new(), adapter_paths: Vec::new(), explicit_block_size: false };
    let cfg = w.section(value, path);
    if value.is_object() {
        let cx =
            Context { path, adapter_paths: &w.adapter_paths, explicit_block_size: w.explicit_block_size, block_sizes };
        let more = rules::check(&cfg, &cx);
        w.problems.extend(more);
    }
    if w.problems.is_empty() {
        Ok((cfg, w.adapter_paths))
    } else {
        Err(w.problems)
    }
}

/// Validates one adapter entry on its own (`name` is required).
pub fn parse_adapter(value: &Value, path: &str) -> Result<AdapterConfig, Vec<Problem>> {
    let mut w = Walker { problems: Vec::new(), adapter_paths: Vec::new(), explicit_block_size: false };
    match w.adapter(value, path, None) {
        Some(a) if w.problems.is_empty() => Ok(a),
        _ => Err(w.problems),
    }
}
