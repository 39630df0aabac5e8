//! How a call uses the [`Router`]: which targets it tries, in which order, and what its outcome
//! does to the target's backoff. The SDK's fail-open path (`XConnectorSDK.cache_call`, v0 and v1
//! alike) and the compatibility facade's `route` both go through here, so the rule is in one place.
//!
//! Invariants: a registered *name* is tried alone (an error while it backs off: the caller asked
//! for that target); a *kind* is tried in router order, available targets only, and an error
//! (from [`Router::route`]) when none is available. A failure backs the target off only when it
//! is the target's fault ([`backs_off`]); the caller's bad input or config never does.

use crate::error::{CoreError, Result};
use crate::router::{Router, WritePolicy};

/// Fallback reasons (the `reason` label of `xconnector_fallbacks_total`) that are the target's
/// fault, so the router skips it for a backoff period: a failed cache operation, an internal error.
pub fn backs_off(reason: &str) -> bool {
    matches!(reason, "cache_error" | "internal_error")
}

/// How the router treats an adapter of each type (DESIGN section 6): the cache takes stores;
/// inference and distributed adapters only serve.
pub fn adapter_policy(kind: &str) -> Result<WritePolicy> {
    match kind {
        "cache" => Ok(WritePolicy::WriteThrough),
        "inference" | "distributed" => Ok(WritePolicy::ReadOnly),
        other => Err(CoreError::config(format!("unknown adapter type {other:?}; use cache, inference or distributed"))),
    }
}

impl Router {
    /// Registers an adapter with the write policy its type implies ([`adapter_policy`]).
    pub fn add_adapter(&self, name: &str, kind: &str, priority: i64) -> Result<()> {
        self.add(name, kind, priority, adapter_policy(kind)?)
    }

    /// Targets to try for `selector` (a name or a kind), in order; an error when there is none now.
    pub fn candidates(&self, selector: &str) -> Result<Vec<String>> {
        if self.status().iter().any(|t| t.name == selector) {
            return Ok(vec![self.route(selector)?]);
        }
        let order = self.order(Some(selector));
        if order.is_empty() {
            return Ok(vec![self.route(selector)?]);
        }
        Ok(order)
    }

    /// Records a call's outcome on `name`: `None` a success (healthy again), `Some(reason)` a
    /// fallback, which backs the target off when [`backs_off`] says it is the target's fault.
    /// Returns whether the target now backs off because of it.
    pub fn settle(&self, name: &str, failure: Option<&str>) -> bool {
        match failure {
            None => {
                self.report_success(name);
                false
            }
            Some(reason) if backs_off(reason) => {
                self.report_failure(name);
                true
            }
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::router::Clock;

    fn router() -> Router {
        let r = Router::new(Clock::manual(), Duration::from_secs(1), Duration::from_secs(8));
        r.add("disk", "tier", 1, WritePolicy::WriteBehind).unwrap();
        r.add("memory", "tier", 0, WritePolicy::WriteThrough).unwrap();
        r
    }

    #[test]
    fn a_name_is_tried_alone_and_a_kind_in_order() {
        let r = router();
        assert_eq!(r.candidates("tier").unwrap(), ["memory", "disk"]);
        assert_eq!(r.candidates("disk").unwrap(), ["disk"]);
        assert!(matches!(r.candidates("storage"), Err(CoreError::Config(_))));
    }

    #[test]
    fn only_the_targets_fault_backs_it_off_and_success_heals() {
        let r = router();
        assert!(!r.settle("memory", Some("invalid_input")));
        assert!(!r.settle("memory", Some("config_error")));
        assert_eq!(r.candidates("tier").unwrap(), ["memory", "disk"]);
        assert!(r.settle("memory", Some("internal_error")));
        assert_eq!(r.candidates("tier").unwrap(), ["disk"]);
        assert!(matches!(r.candidates("memory"), Err(CoreError::Cache(_))));
        assert!(r.settle("disk", Some("cache_error")));
        assert!(matches!(r.candidates("tier"), Err(CoreError::Cache(_))));
        r.clock().advance(Duration::from_secs(1)).unwrap();
        assert!(!r.settle("memory", None));
        assert_eq!(r.status().iter().find(|t| t.name == "memory").unwrap().consecutive_failures, 0);
        assert_eq!(r.candidates("tier").unwrap(), ["memory", "disk"]);
    }

    #[test]
    fn adapters_get_their_types_policy() {
        let r = router();
        r.add_adapter("lmcache", "cache", 0).unwrap();
        r.add_adapter("vllm", "inference", 0).unwrap();
        r.add_adapter("dynamo", "distributed", 0).unwrap();
        let plan: Vec<String> = r.write_plan(None).into_iter().map(|(n, _)| n).collect();
        assert!(plan.contains(&"lmcache".to_owned()));
        assert!(!plan.contains(&"vllm".to_owned()) && !plan.contains(&"dynamo".to_owned()));
        assert!(matches!(r.add_adapter("x", "storage", 0), Err(CoreError::Config(_))));
        assert!(r.status().iter().all(|t| t.name != "x"));
    }
}
