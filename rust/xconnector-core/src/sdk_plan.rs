//! Which adapters an SDK loads (DESIGN section 2): the enabled ones it is configured with, plus
//! the `lmcache` cache and `vllm` inference adapters with their defaults when none of that type
//! is configured, each name once.
//!
//! Invariant relied on by the SDK: every built-in adapter has a type of its own
//! ([`KNOWN_ADAPTERS`]), so with one adapter per name an SDK holds at most one adapter of each
//! type, and "the cache adapter" needs no ranking.

use serde_json::Map;

use crate::config::{AdapterConfig, AdapterType, KNOWN_ADAPTERS};
use crate::error::{CoreError, Result};

/// Loaded with their defaults when no configured adapter has their type.
pub const DEFAULT_ADAPTERS: [&str; 2] = ["lmcache", "vllm"];

fn kind_of(name: &str) -> Option<AdapterType> {
    KNOWN_ADAPTERS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// The adapters to load after those named in `loaded`, in order. `initial` (the SDK's own
/// config): the enabled of `configured`, then the defaults for the types they lack; otherwise
/// (adapters loaded later, by hand) `configured` as given. A name given twice, or already
/// loaded, is a config error: each adapter is loaded once.
pub fn adapters_to_load(configured: &[AdapterConfig], loaded: &[String], initial: bool) -> Result<Vec<AdapterConfig>> {
    let mut plan: Vec<AdapterConfig> = configured.iter().filter(|a| a.enabled || !initial).cloned().collect();
    if initial {
        for name in DEFAULT_ADAPTERS {
            let kind = kind_of(name).expect("the defaults are built-in adapters");
            if !plan.iter().any(|a| a.kind == kind) {
                plan.push(AdapterConfig {
                    name: name.to_owned(),
                    kind,
                    config: Map::new(),
                    enabled: true,
                    priority: 0,
                });
            }
        }
    }
    let mut seen: Vec<&str> = loaded.iter().map(String::as_str).collect();
    for a in &plan {
        if seen.contains(&a.name.as_str()) {
            return Err(CoreError::config(format!(
                "adapter '{}' is configured twice; each adapter is loaded once (merge the two entries' settings)",
                a.name
            )));
        }
        seen.push(&a.name);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, enabled: bool) -> AdapterConfig {
        let kind = kind_of(name).unwrap();
        AdapterConfig { name: name.into(), kind, config: Map::new(), enabled, priority: 0 }
    }

    fn names(plan: &[AdapterConfig]) -> Vec<&str> {
        plan.iter().map(|a| a.name.as_str()).collect()
    }

    #[test]
    fn defaults_fill_the_types_nobody_configured() {
        assert_eq!(names(&adapters_to_load(&[], &[], true).unwrap()), ["lmcache", "vllm"]);
        let configured = [adapter("dynamo", true), adapter("vllm", true)];
        assert_eq!(names(&adapters_to_load(&configured, &[], true).unwrap()), ["dynamo", "vllm", "lmcache"]);
        // A disabled adapter is not loaded, and its type gets the default again.
        let plan = adapters_to_load(&[adapter("lmcache", false)], &[], true).unwrap();
        assert_eq!(names(&plan), ["lmcache", "vllm"]);
        assert!(plan[0].enabled && plan[0].config.is_empty());
    }

    #[test]
    fn adapters_loaded_later_are_taken_as_given() {
        let plan = adapters_to_load(&[adapter("dynamo", false)], &["lmcache".into(), "vllm".into()], false).unwrap();
        assert_eq!(names(&plan), ["dynamo"]);
    }

    #[test]
    fn each_name_is_loaded_once() {
        let twice = [adapter("vllm", true), adapter("vllm", true)];
        let err = adapters_to_load(&twice, &[], true).unwrap_err();
        assert!(matches!(err, CoreError::Config(_)));
        assert!(err.to_string().starts_with("adapter 'vllm' is configured twice"), "{err}");
        let again = adapters_to_load(&[adapter("lmcache", true)], &["lmcache".into()], false);
        assert!(again.unwrap_err().to_string().contains("'lmcache' is configured twice"));
    }
}
