//! A problem found in a config: where (its full key path) and what to do about it. Shared by
//! the validator and the adapters' setting checks, so neither needs the other's module.

use serde_json::Value;

use crate::error::CoreError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// `path.key`, or just `key` at the top level (a bare section has the empty path).
pub fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// How a value reads in an error message ("a list", "a string", ...).
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// What to say about a string given where a boolean belongs: `yes`/`no`/`on`/`off` are booleans
/// to YAML 1.1 readers (PyYAML, which `dynamo serve` reads the file with) but strings to this
/// YAML 1.2 reader, so the same file would mean different things through different channels.
pub fn not_a_boolean(v: &Value) -> String {
    let Value::String(text) = v else { return format!("expected true or false, got {}", kind(v)) };
    let yaml11 = match text.to_ascii_lowercase().as_str() {
        "yes" | "y" | "on" => Some(true),
        "no" | "n" | "off" => Some(false),
        _ => None,
    };
    match yaml11 {
        Some(b) => format!(
            "expected true or false, got the string {text:?} (YAML 1.1 readers such as Dynamo's take it for {b}, \
             this one for text); write {b}"
        ),
        None => format!("expected true or false, got the string {text:?}"),
    }
}

/// Turns a list of problems into one error that lists them all.
pub fn report(source: &str, problems: &[Problem]) -> CoreError {
    let mut msg = format!("{source}: invalid XConnector configuration ({} problem(s)):", problems.len());
    for p in problems {
        msg.push_str(&format!("\n  - {}: {}", p.path, p.message));
    }
    CoreError::config(msg)
}
