//! Secrets in configs never reach output: URL passwords, and the values of settings that are
//! secrets by name (`remote_auth_key`, `*password*`, `*secret*`, `*token*`). check-config, the
//! validator's messages and connection errors show them as `***`.

use serde_json::{Map, Value};

/// What a hidden value is shown as.
pub const HIDDEN: &str = "***";

/// Whether a setting (a key, or the last part of a dotted key path) holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    last.ends_with("auth_key")
        || ["password", "passwd", "secret", "token", "credential"].iter().any(|w| last.contains(w))
}

/// `text` with the password of every URL in it hidden, and secret query parameters
/// (`?password=...`). A URL's user info is everything from its `://` to the last `@` before the
/// next URL (or the end), spaces, commas and slashes included: a password may hold any of them,
/// and hiding a few words of a message beats showing a secret. A lone user part is a NATS token
/// and hidden whole. Words written without `//` (`redis:pw@host`) are user info up to their `@`.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(s) = rest.find("://") {
        let (head, after) = rest.split_at(s + 3);
        out += &hide_bare_userinfo(head);
        // This URL's span ends where the next URL's scheme word starts.
        let next = after.find("://").map_or(after.len(), |n| {
            after[..n].rfind(|c: char| c.is_whitespace() || c == ',' || c == ';').map_or(0, |w| w + 1)
        });
        let span = &after[..next];
        let host = match span.rfind('@') {
            Some(at) => {
                out += &match span[..at].split_once(':') {
                    Some((user, _password)) => format!("{user}:{HIDDEN}@"),
                    None => format!("{HIDDEN}@"),
                };
                &span[at + 1..]
            }
            None => span,
        };
        let (url, words) = host.split_at(host.find(char::is_whitespace).unwrap_or(host.len()));
        out += &hide_query_secrets(url);
        out += words;
        rest = &after[next..];
    }
    out + &hide_bare_userinfo(rest)
}

/// A URL written without `//` (`redis:password@host`): in each word holding an `@`, what sits
/// between its scheme and its last `@` is user info.
fn hide_bare_userinfo(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| match word.rfind('@') {
            Some(at) => {
                let start = word[..at].find(':').map_or(0, |c| c + 1);
                format!("{}{HIDDEN}{}", &word[..start], &word[at..])
            }
            None => word.to_owned(),
        })
        .collect()
}

fn hide_query_secrets(url: &str) -> String {
    let Some((path, query)) = url.split_once('?') else { return url.to_owned() };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={HIDDEN}"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

/// Whether a value may be echoed in a message as it is: short and plainly not a credential
/// (a word, a number, a dotted or dashed name).
pub fn is_plain(s: &str) -> bool {
    s.len() <= 40 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// `value` with every secret hidden: values under secret keys, and passwords in URL strings.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(redact_map(m)),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_url(s)),
        other => other.clone(),
    }
}

fn redact_map(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter().map(|(k, v)| (k.clone(), redact_at(k, v))).collect()
}

/// A value at `key` as it may be shown.
pub fn redact_at(key: &str, value: &Value) -> Value {
    match value {
        Value::String(s) if is_secret_key(key) && !s.is_empty() => Value::String(HIDDEN.into()),
        other => redact(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_and_tokens_are_hidden() {
        assert_eq!(redact_url("redis://:hunter2@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(redact_url("rediss://app:hunter2@h:6380"), "rediss://app:***@h:6380");
        // A password with spaces or a comma in it: the user info runs to the last `@`, whatever
        // follows (a value, a newline, running text, a quote).
        for tail in ["", " down", "\n", "\" refused"] {
            let shown = redact_url(&format!("rediss://:pa ss,S3CR3T9@127.0.0.1:1{tail}"));
            assert_eq!(shown, format!("rediss://:***@127.0.0.1:1{tail}"));
        }
        // Every URL in a text, and words written without `//`, in any order.
        assert_eq!(redact_url("a redis://:pw@h:1 b redis://:pw2@h:2"), "a redis://:***@h:1 b redis://:***@h:2");
        let mixed = redact_url("redis:hunter2@h2:1 then redis://h:1 x redis:hunter3@h3:1");
        assert!(!mixed.contains("hunter"), "{mixed}");
        // An @ later in running text hides the words before it: never a secret shown.
        let text = redact_url("failed: redis://h:6379 (refused) while user root@host logged");
        assert!(text.starts_with("failed: redis://h:***@host logged"), "{text}");
        // Long hostile input: linear, no recursion.
        assert_eq!(redact_url(&"a:// ".repeat(50_000)).len(), 250_000);
        // Written without `//`: still user info.
        assert_eq!(redact_url("bad \"redis:hunter2@127.0.0.1:6379\" x"), "bad \"redis:***@127.0.0.1:6379\" x");
        assert_eq!(redact_url("redis::pw@h"), "redis:***@h");
        assert_eq!(redact_url("nats://s3cr3t@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(redact_url("nats://u:p@a:1,nats://b:2"), "nats://u:***@a:1,nats://b:2");
        assert_eq!(redact_url("nats://a:4222,nats://app:S3CR3T@b:4222"), "nats://a:4222,nats://app:***@b:4222");
        assert_eq!(redact_url("redis://:S3/CR?3#T@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://h:1/0?password=S3CR3T&db=1"), "redis://h:1/0?password=***&db=1");
        assert_eq!(redact_url("at nats://u:p@h:1: refused"), "at nats://u:***@h:1: refused");
        assert_eq!(redact_url("no url here"), "no url here");
        assert_eq!(redact_url("redis://:p@ss@h:1"), "redis://:***@h:1");
    }

    #[test]
    fn secret_keys_are_hidden_wherever_they_are() {
        let v: Value = serde_json::json!({
            "adapters": [{"config": {"remote_url": "redis://:pw@h:1", "remote_auth_key": "k3y",
                                     "remote_auth_key_env": "MY_VAR", "local_disk": "/x"}}],
            "x": {"nats_token": "t0k", "password": "", "n": 3}
        });
        let text = redact(&v).to_string();
        for leak in ["pw@", "k3y", "t0k"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
        // An env var's name is not the secret; empty values show they are unset.
        assert!(text.contains("MY_VAR") && text.contains("/x") && text.contains("\"password\":\"\""), "{text}");
        assert_eq!(redact_at("adapters.lmcache.config.remote_auth_key", &Value::String("k".into())), HIDDEN);
    }
}
