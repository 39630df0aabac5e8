//! Config text to a generic value: YAML (or JSON, which is YAML).
//!
//! A mapping that holds the same key twice is an error here. Neither serde_yaml_ng nor
//! serde_json says anything when they fill a `serde_json::Value` from such a mapping: the map
//! insert keeps the last value, so a second `xconnector:` silently replaces the first. The value
//! is therefore built by [`Checked`], a visitor that remembers each mapping's keys; on a repeat it
//! fails, and a second pass stops at the key's first occurrence, so the error names
//! both places by line and column (the parser puts them on the errors it passes up).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::{CoreError, Result};

/// Parses YAML (or JSON) text into a generic value, with a located error. A duplicate key in any
/// mapping is an error naming the key, the mapping's key path and both lines.
pub fn parse_document(text: &str, source: &str) -> Result<Value> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Checked { path: String::new(), find: None }).deserialize(de) {
        Ok(v) if has_merge_key(&v) => with_merges_applied(text, source),
        Ok(v) => Ok(v),
        Err(e) => Err(CoreError::config(match duplicate_of(&e) {
            Some((path, key)) => duplicate_message(text, source, &path, &key, e.location()),
            None => format!("{source}: not valid YAML/JSON: {e}"),
        })),
    }
}

/// Whether a mapping anywhere uses YAML's merge key (`<<: *defaults`).
fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("<<") || m.values().any(has_merge_key),
        Value::Array(a) => a.iter().any(has_merge_key),
        _ => false,
    }
}

/// The document with its merge keys applied, as PyYAML (which `dynamo serve` reads files with)
/// applies them: a mapping's own keys win over merged ones. Read after the duplicate check, so a
/// key written twice is still an error; a key the merge brings in again is not.
fn with_merges_applied(text: &str, source: &str) -> Result<Value> {
    let bad = |e: serde_yaml_ng::Error| CoreError::config(format!("{source}: a merge key `<<` cannot be applied: {e}"));
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(bad)?;
    doc.apply_merge().map_err(bad)?;
    serde_json::to_value(doc).map_err(|e| CoreError::config(format!("{source}: not valid YAML/JSON: {e}")))
}

/// The document as plain serde reads it (a repeated key: the last one wins), for best-effort
/// looks at a document that [`parse_document`] rejected. `None` if it does not parse at all.
pub fn parse_document_lenient(text: &str) -> Option<Value> {
    serde_yaml_ng::from_str(text).ok()
}

/// What the visitor's error says, so the duplicate can be recognised among the parser's errors.
const DUPLICATE: &str = "\u{1}duplicate key\u{1}";
const FIRST: &str = "\u{1}first occurrence\u{1}";

/// `(mapping path, key)` when `e` is the visitor's duplicate-key error.
fn duplicate_of(e: &serde_yaml_ng::Error) -> Option<(String, String)> {
    let text = e.to_string();
    let rest = &text[text.find(DUPLICATE)? + DUPLICATE.len()..];
    let (path, rest) = rest.split_once('\u{1}')?;
    let (key, _) = rest.split_once('\u{1}')?;
    Some((path.to_owned(), key.to_owned()))
}

fn at(loc: Option<serde_yaml_ng::Location>) -> String {
    loc.map_or_else(|| "an unknown place".to_owned(), |l| format!("line {} column {}", l.line(), l.column()))
}

fn duplicate_message(
    text: &str,
    source: &str,
    path: &str,
    key: &str,
    second: Option<serde_yaml_ng::Location>,
) -> String {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let first = (Checked { path: String::new(), find: Some((path, key)) }).deserialize(de).err().and_then(|e| {
        let found = e.to_string().contains(FIRST);
        found.then(|| e.location()).flatten()
    });
    let shown = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    format!(
        "{source}: duplicate key `{shown}`: written at {} and again at {}; a YAML/JSON reader keeps only \
         the last one, so the first one's settings would be lost without a word: merge the two into one",
        at(first),
        at(second)
    )
}

/// Deserializes a document into a `serde_json::Value` (as serde_json's own visitor would),
/// failing on a mapping's repeated key. With `find`, it instead fails at the first occurrence of
/// that key in the mapping at that path (the second pass that locates it).
struct Checked<'a> {
    /// Key path of the value being read (`Common.xconnector`, `adapters[0]`), empty at the top.
    path: String,
    find: Option<(&'a str, &'a str)>,
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        match (i64::try_from(v), u64::try_from(v)) {
            (Ok(i), _) => Ok(Value::Number(i.into())),
            (_, Ok(u)) => Ok(Value::Number(u.into())),
            _ => Err(E::custom(format!("the integer {v} is out of range"))),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(|u| Value::Number(u.into()))
            .map_err(|_| E::custom(format!("the integer {v} is out of range")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json: a non-finite float has no JSON number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) =
            seq.next_element_seed(Checked { path: format!("{}[{}]", self.path, out.len()), find: self.find })?
        {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        loop {
            // The key is checked while it is read, so the parser's error points at the key itself.
            let seed = Key { path: &self.path, seen: &out, find: self.find };
            let Some(key) = map.next_key_seed(seed)? else { break };
            let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            let value = map.next_value_seed(Checked { path, find: self.find })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping's key, checked against the keys read before it.
struct Key<'k> {
    path: &'k str,
    seen: &'k Map<String, Value>,
    find: Option<(&'k str, &'k str)>,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_string(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        match self.find {
            Some((path, k)) if path == self.path && k == key => Err(E::custom(FIRST)),
            None if self.seen.contains_key(key) => Err(E::custom(format!("{DUPLICATE}{}\u{1}{key}\u{1}", self.path))),
            _ => Ok(key.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_plain_serde() {
        let text = "a: [1, -2, 3.5, .inf, null, ~, true, 'x']\nb: {c: {d: 18446744073709551615}}\n";
        assert_eq!(parse_document(text, "t").unwrap(), parse_document_lenient(text).unwrap());
    }

    #[test]
    fn a_repeated_key_is_an_error_naming_both_lines() {
        let text = "Common:\n  xconnector:\n    enabled: true\n  model: m\n  xconnector:\n    enabled: false\n";
        let e = parse_document(text, "agg.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with(
                "agg.yaml: duplicate key `Common.xconnector`: written at line 2 column 3 and again at line 5 column 3; "
            ),
            "{e}"
        );
        assert!(e.contains("merge the two into one"), "{e}");
        // JSON (DYNAMO_SERVICE_CONFIG) and flow mappings inside lists: the same, columns included.
        let json = "{\"a\": 1,\n \"b\": {\"c\": 1, \"c\": 2}}";
        let e = parse_document(json, "DYNAMO_SERVICE_CONFIG").unwrap_err().to_string();
        assert!(e.contains("duplicate key `b.c`: written at line 2 column 8 and again at line 2 column 16"), "{e}");
        let e = parse_document("x: 1\nx: 2\n", "t").unwrap_err().to_string();
        assert!(e.contains("duplicate key `x`: written at line 1 column 1 and again at line 2 column 1"), "{e}");
        let e = parse_document("l:\n  - {k: 1}\n  - {k: 1, j: 2, k: 3}\n", "t").unwrap_err().to_string();
        assert!(e.contains("duplicate key `l[1].k`: written at line 3 column 6 and again at line 3 column 18"), "{e}");
        // The same key in different mappings is fine.
        assert!(parse_document("a: {k: 1}\nb: {k: 1}\n", "t").is_ok());
    }

    #[test]
    fn merge_keys_are_applied_as_pyyaml_applies_them() {
        let text = "base: &b {block-size: 32, model: m}\nVllmWorker:\n  <<: *b\n  model: own\nlist: [{<<: *b}]\n";
        let v = parse_document(text, "t").unwrap();
        assert_eq!(v["VllmWorker"], serde_json::json!({"block-size": 32, "model": "own"}));
        assert_eq!(v["list"][0], serde_json::json!({"block-size": 32, "model": "m"}));
        // A key written twice beside a merge is still a duplicate.
        let e = parse_document("b: &b {x: 1}\nc:\n  <<: *b\n  y: 1\n  y: 2\n", "t").unwrap_err().to_string();
        assert!(e.contains("duplicate key `c.y`"), "{e}");
    }
}
