//! vLLM v1's `kv_transfer_config` with XConnector in it (DESIGN 3.2, item 3): XConnector's
//! connector alone when the engine has none; next to the engine's own one in vLLM's
//! `MultiConnector` (the engine's first: it serves P/D transfers) when it has one; nothing to do
//! when XConnector is in it already. An inline Redis auth key never travels inside vLLM's config
//! (vLLM may print it): it is handed back to be put in the environment the engine processes
//! inherit, and the section names that variable instead.

use serde_json::{json, Map, Value};

pub const CONNECTOR: &str = "XConnectorV1";
pub const CONNECTOR_MODULE: &str = "xconnector.integrations.vllm.connector";
/// The variable an inline `remote_auth_key` travels in to vLLM's engine processes.
pub const AUTH_KEY_ENV: &str = "XCONNECTOR_REDIS_AUTH_KEY";

/// What a child of MultiConnector keeps of the engine's own connector config.
const CHILD_KEYS: &[&str] = &[
    "kv_connector",
    "kv_connector_module_path",
    "kv_role",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "kv_buffer_device",
    "kv_buffer_size",
    "kv_connector_extra_config",
];

/// The config to run with (`None`: XConnector is in `existing` already), and an inline auth key
/// to put in [`AUTH_KEY_ENV`] (never in the config).
#[derive(Debug, PartialEq)]
pub struct Transfer {
    pub config: Option<Value>,
    pub auth_key: Option<String>,
}

/// `section` with an inline `remote_auth_key` taken out (returned) and named by its variable.
fn without_inline_secret(section: &Value) -> (Value, Option<String>) {
    let mut out = section.clone();
    let mut secret = None;
    if let Some(adapters) = out.get_mut("adapters").and_then(Value::as_array_mut) {
        for cfg in adapters.iter_mut().filter_map(|a| a.get_mut("config")).filter_map(Value::as_object_mut) {
            if let Some(Value::String(key)) = cfg.remove("remote_auth_key") {
                secret = Some(key);
                cfg.insert("remote_auth_key_env".into(), AUTH_KEY_ENV.into());
            }
        }
    }
    (out, secret)
}

fn text<'v>(m: &'v Map<String, Value>, key: &str) -> Option<&'v str> {
    m.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// What to tell a user whose vLLM runs XConnector with `kv_load_failure_policy` `policy`: with
/// `fail` (vLLM's default), a prefix XConnector said it holds but could not load (evicted in
/// between, a fault of the cache) fails the request instead of being recomputed.
pub fn failure_policy_warning(policy: Option<&str>) -> Option<String> {
    (policy == Some("fail")).then(|| {
        "XConnector: vLLM's kv_load_failure_policy is \"fail\" (its default), so a request whose cached prefix \
         cannot be loaded (evicted after the lookup, a cache fault) fails instead of being recomputed; set \
         \"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config (under MultiConnector, in it and in \
         XConnector's entry)"
            .to_owned()
    })
}

/// The `kv_transfer_config` an engine whose own is `existing` (a mapping; null: none) should run
/// with for XConnector's `section`.
pub fn transfer_config(existing: &Value, section: &Value) -> Transfer {
    let (section, auth_key) = without_inline_secret(section);
    let ours = json!({
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"xconnector": section},
    });
    let current = existing.as_object().filter(|c| c.get("kv_connector").is_some_and(|k| !k.is_null()));
    let Some(current) = current else {
        let mut alone = ours;
        alone["kv_load_failure_policy"] = "recompute".into();
        return Transfer { config: Some(alone), auth_key };
    };
    let children = current.get("kv_connector_extra_config").and_then(|e| e.get("connectors")).and_then(Value::as_array);
    let mut names = std::iter::once(current.get("kv_connector"))
        .chain(children.into_iter().flatten().map(|c| c.get("kv_connector")));
    if names.any(|n| n.and_then(Value::as_str) == Some(CONNECTOR)) {
        return Transfer { config: None, auth_key: None };
    }
    let inner: Map<String, Value> = current
        .iter()
        .filter(|(k, v)| CHILD_KEYS.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let policy = text(current, "kv_load_failure_policy").unwrap_or("recompute");
    // vLLM builds each child's config from its entry alone: XConnector's own copy of the policy
    // is the one it can see (the scheduler reads the outer one).
    let mut ours = ours;
    ours["kv_load_failure_policy"] = policy.into();
    let config = json!({
        "kv_connector": "MultiConnector",
        "kv_role": text(current, "kv_role").unwrap_or("kv_both"),
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": {"connectors": [inner, ours]},
    });
    Transfer { config: Some(config), auth_key }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failing_policy_is_warned_about() {
        assert!(failure_policy_warning(Some("fail")).unwrap().contains("\"recompute\""));
        assert_eq!(failure_policy_warning(Some("recompute")), None);
        assert_eq!(failure_policy_warning(None), None, "a vLLM without the setting");
    }

    #[test]
    fn alone_beside_the_engines_own_or_not_twice() {
        let section = json!({"enabled": true});
        let alone = transfer_config(&Value::Null, &section).config.unwrap();
        assert_eq!(alone["kv_connector"], CONNECTOR);
        assert_eq!(alone["kv_load_failure_policy"], "recompute");
        assert_eq!(alone["kv_connector_extra_config"]["xconnector"], section);
        // A config whose connector is null is no connector.
        assert_eq!(transfer_config(&json!({"kv_connector": null}), &section).config.unwrap(), alone);
        let nixl = json!({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_port": null, "engine_id": "e"});
        let multi = transfer_config(&nixl, &section).config.unwrap();
        assert_eq!(multi["kv_connector"], "MultiConnector");
        let children = multi["kv_connector_extra_config"]["connectors"].as_array().unwrap();
        // The engine's own first, with only the keys a child keeps (no nulls).
        assert_eq!(children[0], json!({"kv_connector": "NixlConnector", "kv_role": "kv_both"}));
        assert_eq!(children[1]["kv_connector"], CONNECTOR);
        assert_eq!(children[1]["kv_load_failure_policy"], "recompute", "the policy XConnector itself sees");
        assert_eq!(transfer_config(&multi, &section).config, None, "never composed twice");
        assert_eq!(transfer_config(&alone, &section).config, None);
    }

    #[test]
    fn an_inline_auth_key_travels_outside_the_config() {
        let section = json!({"adapters": [{"name": "lmcache", "config": {"remote_auth_key": "s3cret", "x": 1}}]});
        let t = transfer_config(&Value::Null, &section);
        assert_eq!(t.auth_key.as_deref(), Some("s3cret"));
        let config = t.config.unwrap();
        assert!(!config.to_string().contains("s3cret"));
        let cfg = &config["kv_connector_extra_config"]["xconnector"]["adapters"][0]["config"];
        assert_eq!(cfg, &json!({"x": 1, "remote_auth_key_env": AUTH_KEY_ENV}));
    }
}
