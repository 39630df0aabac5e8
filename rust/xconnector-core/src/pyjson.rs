//! JSON written the way Python's `json.dumps` writes it (`", "` and `": "` between items,
//! `indent=2` when pretty, every non-ASCII character escaped): `check-config` prints values in
//! this form, and scripts that read its `--json` output were written against Python's.

use serde_json::Value;

/// `json.dumps(value)`.
pub fn compact(value: &Value) -> String {
    let mut out = String::new();
    write(&mut out, value, None, 0);
    out
}

/// `json.dumps(value, indent=2)`.
pub fn pretty(value: &Value) -> String {
    let mut out = String::new();
    write(&mut out, value, Some(2), 0);
    out
}

fn write(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    let (open, close, items): (char, char, Vec<(Option<&String>, &Value)>) = match value {
        Value::Array(a) if !a.is_empty() => ('[', ']', a.iter().map(|v| (None, v)).collect()),
        Value::Object(m) if !m.is_empty() => ('{', '}', m.iter().map(|(k, v)| (Some(k), v)).collect()),
        Value::Array(_) => return out.push_str("[]"),
        Value::Object(_) => return out.push_str("{}"),
        Value::String(s) => return out.push_str(&string(s)),
        other => return out.push_str(&other.to_string()),
    };
    out.push(open);
    for (i, (key, v)) in items.into_iter().enumerate() {
        match indent {
            Some(n) => {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&" ".repeat(n * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        if let Some(k) = key {
            out.push_str(&string(k));
            out.push_str(": ");
        }
        write(out, v, indent, depth + 1);
    }
    if let Some(n) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
    out.push(close);
}

/// `s` as a JSON string the way Python's `json.dumps` writes it (`ensure_ascii`): every character
/// outside printable ASCII escaped, astral ones as surrogate pairs.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn written_as_python_writes_it() {
        let v = json!({"a": [1, "x"], "b": {}, "c": [], "d": null, "e": true, "f": 1.5});
        assert_eq!(compact(&v), r#"{"a": [1, "x"], "b": {}, "c": [], "d": null, "e": true, "f": 1.5}"#);
        assert_eq!(
            pretty(&json!({"a": [1, {"b": 2}], "c": {}})),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": 2\n    }\n  ],\n  \"c\": {}\n}"
        );
        assert_eq!(pretty(&json!([])), "[]");
    }

    #[test]
    fn strings_are_escaped_as_python_escapes_them() {
        let s = "q\"b\\n\nt\té\u{7f}\u{1}😀/";
        assert_eq!(compact(&json!(s)), r#""q\"b\\n\nt\t\u00e9\u007f\u0001\ud83d\ude00/""#);
        // What serde reads back is what was written.
        assert_eq!(serde_json::from_str::<Value>(&compact(&json!(s))).unwrap(), json!(s));
    }
}
