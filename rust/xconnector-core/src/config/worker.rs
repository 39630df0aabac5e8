//! The worker's KV block size, where the config file or the worker's command line says it, so
//! the validator can check the settings that must fit it (`chunk_size`, `performance.block_size`)
//! before the worker starts rather than at its first KV call.
//!
//! Dynamo turns a service's keys into the worker's flags: its own `block-size`, or `Common`'s
//! when the service lists `block-size` in its `common-configs`. A worker started by hand (Dynamo
//! 1.x: `python -m dynamo.vllm --block-size 32 ...`) has it on its command line, which then wins.

use serde_json::Value;

use super::argv::flag;

/// A block size the worker runs with, and where that was read (`Common.block-size: 32`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerBlockSize {
    pub tokens: u64,
    pub origin: String,
}

fn tokens(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|&t| t > 0)
}

fn common(doc: &Value) -> Option<WorkerBlockSize> {
    let v = doc.get("Common")?.get("block-size")?;
    Some(WorkerBlockSize { tokens: tokens(v)?, origin: format!("Common.block-size: {v}") })
}

/// The block size of `service` as the document gives it; `None` when the service is not in the
/// document or does not say (then vLLM's default applies, which depends on the platform).
fn of_service(doc: &Value, service: &str) -> Option<WorkerBlockSize> {
    let body = doc.get(service)?;
    if let Some(v) = body.get("block-size") {
        return Some(WorkerBlockSize { tokens: tokens(v)?, origin: format!("{service}.block-size: {v}") });
    }
    let listed = body
        .get("common-configs")
        .and_then(Value::as_array)
        .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some("block-size")));
    let c = common(doc).filter(|_| listed)?;
    Some(WorkerBlockSize { origin: format!("{} (in {service}.common-configs)", c.origin), ..c })
}

/// The block sizes the config must fit: the worker's `--block-size` if `argv` has one;
/// otherwise `service`'s (or, with no service, each of `services` found in the document), or
/// `Common.block-size` when none of those services is in the document.
pub fn worker_block_sizes(
    doc: &Value,
    service: Option<&str>,
    services: &[String],
    argv: &[String],
) -> Vec<WorkerBlockSize> {
    if let Some((f, v)) = flag(argv, &["--block-size"]) {
        return match tokens(&Value::String(v.clone())) {
            Some(t) => vec![WorkerBlockSize { tokens: t, origin: format!("{f} {v} on the worker's command line") }],
            None => Vec::new(),
        };
    }
    let names: Vec<&str> = match service {
        Some(s) => vec![s],
        None => services.iter().map(String::as_str).collect(),
    };
    let present: Vec<&str> = names.into_iter().filter(|s| doc.get(*s).is_some_and(Value::is_object)).collect();
    if present.is_empty() {
        return common(doc).into_iter().collect();
    }
    let mut out: Vec<WorkerBlockSize> = Vec::new();
    for b in present.into_iter().filter_map(|s| of_service(doc, s)) {
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn where_the_block_size_comes_from() {
        let doc = json!({
            "Common": {"block-size": 64},
            "VllmWorker": {"common-configs": ["model", "block-size"]},
            "PrefillWorker": {"block-size": "32"},
            "Processor": {"common-configs": ["model"]}
        });
        let services = args(&["VllmWorker", "PrefillWorker"]);
        let got = worker_block_sizes(&doc, Some("VllmWorker"), &services, &[]);
        assert_eq!(
            got,
            [WorkerBlockSize { tokens: 64, origin: "Common.block-size: 64 (in VllmWorker.common-configs)".into() }]
        );
        let got = worker_block_sizes(&doc, Some("PrefillWorker"), &services, &[]);
        assert_eq!(got[0].origin, "PrefillWorker.block-size: \"32\"");
        // Not listed in common-configs: vLLM's own default applies, unknown here.
        assert!(worker_block_sizes(&doc, Some("Processor"), &services, &[]).is_empty());
        // No service: every service XConnector acts in.
        let all: Vec<u64> = worker_block_sizes(&doc, None, &services, &[]).iter().map(|b| b.tokens).collect();
        assert_eq!(all, [64, 32]);
        // A document without those services: Common's.
        let bare = json!({"Common": {"block-size": 16}});
        assert_eq!(worker_block_sizes(&bare, None, &services, &[])[0].origin, "Common.block-size: 16");
        // The worker's own command line wins, both spellings, last one counts.
        let argv = args(&["python", "-m", "dynamo.vllm", "--block-size", "16", "--block-size=32"]);
        let got = worker_block_sizes(&doc, Some("VllmWorker"), &services, &argv);
        assert_eq!(
            got,
            [WorkerBlockSize { tokens: 32, origin: "--block-size 32 on the worker's command line".into() }]
        );
        assert!(worker_block_sizes(&json!({}), None, &services, &[]).is_empty());
    }
}
