//! Finding the `xconnector` section in a document (a Dynamo graph config, a file holding just the
//! section, or the section itself), overlaying a service's own section on `Common`'s, and keeping
//! where every value came from so errors and `check-config` can point at the line a user wrote.

use std::collections::HashMap;

use serde_json::Value;

use super::document::{parse_document, parse_document_lenient};
use super::problem::{join_path, report, Problem};
use super::schema::{IntegrationConfig, SdkConfig};
use super::validate::parse_section_for;
use super::worker::worker_block_sizes;
use crate::error::{CoreError, Result};

/// A config as found in one source.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// Where it came from: a file, an environment variable, or `none`.
    pub source: String,
    /// The key path(s) read, e.g. `Common.xconnector + VllmWorker.xconnector`; `None` when the
    /// source holds no section (XConnector stays off).
    pub section: Option<String>,
    /// The validated config; the default (disabled) one when there is no section.
    pub config: SdkConfig,
    /// Every leaf of the normalized config (`SdkConfig::to_value`): its key path, its value, and
    /// where it came from (`<source>: <key path>`) or `default`.
    pub origins: Vec<(String, Value, String)>,
    /// Valid but risky things found in the document (see [`dynamo_warnings`]).
    pub warnings: Vec<String>,
}

impl Resolved {
    /// Nothing to read: XConnector stays off.
    pub fn absent(source: impl Into<String>, warnings: Vec<String>) -> Self {
        let config = SdkConfig::default();
        let origins = leaves(&config.to_value()).into_iter().map(|(p, v)| (p, v, "default".to_owned())).collect();
        Self { source: source.into(), section: None, config, origins, warnings }
    }
}

/// Every top-level key of a Dynamo config is a service; these hold no service settings.
const NOT_SERVICES: &[&str] = &["Common", "xconnector"];

/// Whether a mapping looks like a Dynamo graph config rather than a bare `xconnector` section:
/// it has `Common`, a service with Dynamo's own keys, or only CamelCase service names (Dynamo
/// 0.1 files have neither of the others; every key of the section is lower case).
fn is_dynamo_document(doc: &serde_json::Map<String, Value>) -> bool {
    doc.contains_key("Common")
        || doc.values().any(|v| v.get("common-configs").is_some() || v.get("ServiceArgs").is_some())
        || (!doc.is_empty() && doc.keys().all(|k| k.starts_with(|c: char| c.is_ascii_uppercase())))
}

/// The two ways to break a Dynamo deployment with this section. Dynamo turns every key a service
/// has (its own, and `Common` keys it lists in `common-configs`) into a command-line flag of that
/// service; vLLM then exits on `--xconnector '{...}'` with "unrecognized arguments".
pub fn dynamo_warnings(doc: &Value) -> Vec<String> {
    let Some(doc) = doc.as_object() else { return Vec::new() };
    let mut out = Vec::new();
    if doc.contains_key("xconnector") && is_dynamo_document(doc) {
        out.push(
            "`xconnector` at the top level sits among Dynamo's services, where Dynamo may take it for a \
             service of that name; it is read, but Common.xconnector is the place for it."
                .to_owned(),
        );
    }
    for (service, body) in doc.iter().filter(|(k, _)| !NOT_SERVICES.contains(&k.as_str())) {
        let Some(body) = body.as_object() else { continue };
        let listed = body
            .get("common-configs")
            .and_then(Value::as_array)
            .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some("xconnector")));
        if listed {
            out.push(format!(
                "{service}.common-configs lists `xconnector`: Dynamo will pass it to {service} as \
                 --xconnector '{{...}}' and vLLM exits with \"unrecognized arguments\". Remove it from \
                 common-configs; XConnector reads Common.xconnector by itself."
            ));
        }
        if body.contains_key("xconnector") {
            out.push(format!(
                "{service}.xconnector: Dynamo turns every key under a service into a command-line flag, \
                 so {service} gets --xconnector '{{...}}' and vLLM exits with \"unrecognized arguments\". \
                 Move the section to Common.xconnector."
            ));
        }
    }
    stray_sections(&Value::Object(doc.clone()), "", &mut out);
    out
}

/// `xconnector` keys deeper than any place XConnector reads (the prototype put one under
/// `VllmWorker.extensions`): said out loud, since otherwise the user's settings silently do nothing.
fn stray_sections(v: &Value, path: &str, out: &mut Vec<String>) {
    let Some(map) = v.as_object() else { return };
    for (k, child) in map {
        let here = join_path(path, k);
        let depth = here.matches('.').count();
        if k == "xconnector" && depth >= 2 {
            out.push(format!(
                "{here} is not read by XConnector, so these settings do nothing; move them to Common.xconnector"
            ));
        } else {
            stray_sections(child, &here, out);
        }
    }
}

/// The sections to read, in overlay order, each with its key path: `Common.xconnector`, then
/// `<service>.xconnector`; a top-level `xconnector:` when neither is there; with `bare`, a
/// document that is neither a Dynamo config nor has such a key is the section itself.
fn sections<'d>(
    doc: &'d Value,
    service: Option<&str>,
    bare: bool,
    warnings: &mut Vec<String>,
) -> Vec<(String, &'d Value)> {
    let mut parts: Vec<(String, &Value)> = Vec::new();
    if let Some(map) = doc.as_object() {
        if let Some(v) = map.get("Common").and_then(|c| c.get("xconnector")) {
            parts.push(("Common.xconnector".to_owned(), v));
        }
        if let Some(v) = service.and_then(|s| map.get(s)).and_then(|c| c.get("xconnector")) {
            parts.push((format!("{}.xconnector", service.unwrap_or_default()), v));
        }
        match (map.get("xconnector"), parts.is_empty()) {
            (Some(v), true) => parts.push(("xconnector".to_owned(), v)),
            (Some(_), false) => warnings
                .push(format!("the top-level `xconnector` section is ignored because {} is set; keep one", parts[0].0)),
            (None, _) => {}
        }
        if parts.is_empty() && bare && !is_dynamo_document(map) {
            parts.push((String::new(), doc));
        }
    } else if bare {
        parts.push((String::new(), doc));
    }
    parts
}

/// Whether the section that `doc` holds for `service` asks for `integration.strict: true`,
/// looked at as written (best effort, for a section that does not validate).
pub fn section_strict(doc: &Value, service: Option<&str>, bare: bool) -> bool {
    let parts = sections(doc, service, bare, &mut Vec::new());
    if parts.is_empty() {
        return false;
    }
    let (merged, _) = overlay(&parts);
    is_strict(&merged)
}

/// `integration.strict: true` in a section as written.
pub fn is_strict(section: &Value) -> bool {
    section.get("integration").and_then(|i| i.get("strict")) == Some(&Value::Bool(true))
}

/// Reads the `xconnector` section of `doc`. `service` (from `--service-name`) overlays
/// `<service>.xconnector` on `Common.xconnector`; a top-level `xconnector:` is read when `Common`
/// has none; with `bare`, a document that is neither a Dynamo config nor has such a key is taken
/// to be the section itself.
pub fn resolve_document(doc: &Value, source: &str, service: Option<&str>, bare: bool) -> Result<Resolved> {
    resolve_document_for(doc, source, service, bare, &[])
}

/// [`resolve_document`] for a worker started with `argv` (its own command line, or none): the
/// settings that must fit the worker's block size are checked against the one its command line
/// (`--block-size`) or the document (`Common.block-size`, the service's `block-size`) gives.
/// An invalid section is [`CoreError::InvalidSection`], which says whether it asked for strict.
pub fn resolve_document_for(
    doc: &Value,
    source: &str,
    service: Option<&str>,
    bare: bool,
    argv: &[String],
) -> Result<Resolved> {
    let mut warnings = dynamo_warnings(doc);
    let parts = sections(doc, service, bare, &mut warnings);
    if parts.is_empty() {
        return Ok(Resolved::absent(source, warnings));
    }
    let (merged, provenance) = overlay(&parts);
    let base = parts[0].0.as_str();
    let services = merged
        .get("integration")
        .and_then(|i| i.get("services"))
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_else(|| IntegrationConfig::default().services);
    let block_sizes = worker_block_sizes(doc, service, &services, argv);
    let (mut config, adapter_paths) = parse_section_for(&merged, base, &block_sizes).map_err(|problems| {
        let located: Vec<Problem> = problems
            .into_iter()
            .map(|p| Problem { path: locate_path(&p.path, base, &provenance), message: p.message })
            .collect();
        CoreError::InvalidSection { message: report(source, &located).to_string(), strict: is_strict(&merged) }
    })?;
    // `performance.block_size` not written: the worker's, where the document or its command line
    // says it (the v0 path moves KV in blocks of this size; 16 would not fit a 32-token worker).
    let written = merged.get("performance").and_then(|p| p.get("block_size")).is_some();
    let inherited = match block_sizes.as_slice() {
        [b] if !written => u32::try_from(b.tokens).ok().map(|t| (t, b.origin.clone())),
        _ => None,
    };
    if let Some((tokens, _)) = &inherited {
        config.performance.block_size = *tokens;
    }
    let mut origins = origins(&config, &adapter_paths, base, &provenance, source);
    if let Some((_, origin)) = inherited {
        for (_, _, o) in origins.iter_mut().filter(|(path, _, _)| path == "performance.block_size") {
            *o = format!("{source}: {origin}");
        }
    }
    let section = parts.iter().map(|(p, _)| if p.is_empty() { "(whole document)" } else { p }).collect::<Vec<_>>();
    Ok(Resolved { source: source.to_owned(), section: Some(section.join(" + ")), config, origins, warnings })
}

/// Config text (from `source`) to its resolved section, as [`resolve_document_for`] does. Text
/// that does not parse (a repeated key included) is an [`CoreError::InvalidSection`] too, whose
/// `strict` is read from the text as plain serde reads it, if it reads at all.
pub fn resolve_text(text: &str, source: &str, service: Option<&str>, bare: bool, argv: &[String]) -> Result<Resolved> {
    match parse_document(text, source) {
        Ok(doc) => resolve_document_for(&doc, source, service, bare, argv),
        Err(e) => {
            // A lenient read keeps the last of repeated keys, and a broken file reads not at all:
            // `strict: true` written anywhere counts, so a startup the user asked to stop stops.
            let strict = parse_document_lenient(text).is_some_and(|doc| section_strict(&doc, service, bare))
                || writes_strict_true(text);
            Err(CoreError::InvalidSection { message: e.to_string(), strict })
        }
    }
}

/// Whether the text has `strict: true` (YAML or JSON, quoted key or not) anywhere.
fn writes_strict_true(text: &str) -> bool {
    text.match_indices("strict").any(|(at, word)| {
        let rest = text[at + word.len()..].trim_start_matches(['"', '\'']).trim_start();
        let Some(value) = rest.strip_prefix(':') else { return false };
        let value = value.trim_start();
        ["true", "True", "TRUE"].iter().any(|t| value.starts_with(t))
    })
}

/// Deep-merges the sections (later ones win; mappings merge key by key, anything else is
/// replaced) and maps every node's path, relative to the section, to the absolute key path of
/// the section it came from.
fn overlay(parts: &[(String, &Value)]) -> (Value, HashMap<String, String>) {
    let mut merged = parts[0].1.clone();
    for (_, over) in &parts[1..] {
        merge(&mut merged, over);
    }
    let mut provenance = HashMap::new();
    let mut nodes = Vec::new();
    walk(&merged, String::new(), &mut nodes);
    for (rel, segments) in nodes {
        let from = parts.iter().rev().find(|(_, v)| lookup(v, &segments).is_some()).map_or("", |(p, _)| p.as_str());
        provenance.insert(rel.clone(), absolute(from, &rel));
    }
    (merged, provenance)
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

#[derive(Clone, Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Every node of `v` (itself included), as (rendered relative path, segments).
fn walk(v: &Value, rel: String, out: &mut Vec<(String, Vec<Segment>)>) {
    fn go(v: &Value, rel: &str, segs: &mut Vec<Segment>, out: &mut Vec<(String, Vec<Segment>)>) {
        out.push((rel.to_owned(), segs.clone()));
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    segs.push(Segment::Key(k.clone()));
                    go(child, &join_path(rel, k), segs, out);
                    segs.pop();
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    segs.push(Segment::Index(i));
                    go(child, &format!("{rel}[{i}]"), segs, out);
                    segs.pop();
                }
            }
            _ => {}
        }
    }
    go(v, &rel, &mut Vec::new(), out);
}

fn lookup<'v>(v: &'v Value, segments: &[Segment]) -> Option<&'v Value> {
    segments.iter().try_fold(v, |node, seg| match seg {
        Segment::Key(k) => node.get(k),
        Segment::Index(i) => node.get(*i),
    })
}

/// `base` + a relative path (`mode`, `adapters[0].name`, or empty for the section itself).
fn absolute(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_owned()
    } else if rel.starts_with('[') || base.is_empty() {
        format!("{base}{rel}")
    } else {
        format!("{base}.{rel}")
    }
}

fn relative<'p>(path: &'p str, base: &str) -> Option<&'p str> {
    if base.is_empty() {
        return Some(path);
    }
    let rest = path.strip_prefix(base)?;
    match rest.as_bytes().first() {
        None => Some(""),
        Some(b'.') => Some(&rest[1..]),
        Some(b'[') => Some(rest),
        Some(_) => None,
    }
}

/// A validator path (written as if everything came from `base`) as the path the user wrote: the
/// deepest node that exists in the merged section says which section it came from.
fn locate_path(path: &str, base: &str, provenance: &HashMap<String, String>) -> String {
    let Some(rel) = relative(path, base) else { return path.to_owned() };
    let mut cut = rel.len();
    loop {
        if let Some(abs) = provenance.get(&rel[..cut]) {
            let rest = &rel[cut..];
            return absolute(abs, rest.strip_prefix('.').unwrap_or(rest));
        }
        match rel[..cut].rfind(['.', '[']) {
            Some(i) => cut = i,
            None if cut > 0 => cut = 0,
            None => return path.to_owned(),
        }
    }
}

/// The leaves of a normalized config that `check-config` prints: scalars, lists of scalars and
/// empty mappings are leaves; the adapter list is walked entry by entry.
pub(crate) fn leaves(v: &Value) -> Vec<(String, Value)> {
    fn go(v: &Value, rel: String, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    go(child, join_path(&rel, k), out);
                }
            }
            Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
                for (i, child) in items.iter().enumerate() {
                    go(child, format!("{rel}[{i}]"), out);
                }
            }
            leaf => out.push((rel, leaf.clone())),
        }
    }
    let mut out = Vec::new();
    go(v, String::new(), &mut out);
    out
}

fn origins(
    config: &SdkConfig,
    adapter_paths: &[String],
    base: &str,
    provenance: &HashMap<String, String>,
    source: &str,
) -> Vec<(String, Value, String)> {
    leaves(&config.to_value())
        .into_iter()
        .map(|(path, value)| {
            // Effective `adapters[i]...` is wherever adapter i was written (list index or name key).
            let written = match adapter_index(&path) {
                Some((i, rest)) => adapter_paths.get(i).map(|p| {
                    let p = relative(p, base).unwrap_or(p);
                    (join_path(p, rest), p.to_owned(), rest == "name")
                }),
                None => Some((path.clone(), String::new(), false)),
            };
            let origin = written.and_then(|(rel, entry, is_name)| {
                provenance.get(&rel).or_else(|| if is_name { provenance.get(&entry) } else { None })
            });
            (path, value, origin.map_or_else(|| "default".to_owned(), |abs| format!("{source}: {abs}")))
        })
        .collect()
}

/// `adapters[3].config.x` -> (3, "config.x").
fn adapter_index(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("adapters[")?;
    let close = rest.find(']')?;
    let i = rest[..close].parse().ok()?;
    Some((i, rest[close + 1..].trim_start_matches('.')))
}
