//! Router: order by priority, routing by name and kind, write plans, failure backoff and
//! recovery on a manual clock; overlap scoring of workers.

use std::time::Duration;

use xconnector_core::overlap::OverlapIndex;
use xconnector_core::router::{Clock, Router, WritePolicy};

fn router() -> Router {
    let r = Router::new(Clock::manual(), Duration::from_secs(1), Duration::from_secs(8));
    r.add("disk", "tier", 1, WritePolicy::WriteBehind).unwrap();
    r.add("memory", "tier", 0, WritePolicy::WriteThrough).unwrap();
    r.add("redis", "tier", 2, WritePolicy::WriteBehind).unwrap();
    r.add("peer-cache", "tier", 2, WritePolicy::ReadOnly).unwrap();
    r.add("lmcache", "cache", 0, WritePolicy::WriteThrough).unwrap();
    r
}

fn advance(r: &Router, ms: u64) {
    r.clock().advance(Duration::from_millis(ms)).unwrap();
}

#[test]
fn order_is_priority_then_insertion() {
    let r = router();
    assert_eq!(r.order(Some("tier")), ["memory", "disk", "redis", "peer-cache"]);
    assert_eq!(r.order(None), ["memory", "lmcache", "disk", "redis", "peer-cache"]);
    assert_eq!(
        r.write_plan(Some("tier")),
        [
            ("memory".to_owned(), WritePolicy::WriteThrough),
            ("disk".to_owned(), WritePolicy::WriteBehind),
            ("redis".to_owned(), WritePolicy::WriteBehind)
        ]
    );
    assert_eq!(r.route("cache").unwrap(), "lmcache");
    assert_eq!(r.route("disk").unwrap(), "disk");
    assert_eq!(r.route("tier").unwrap(), "memory");
    let err = r.route("inference").unwrap_err().to_string();
    assert!(
        err.starts_with("nothing is registered as \"inference\"; known targets: disk (tier), lmcache (cache)"),
        "{err}"
    );
    let err = r.add("disk", "tier", 0, WritePolicy::ReadOnly).unwrap_err().to_string();
    assert!(err.contains("already registered"), "{err}");
}

#[test]
fn a_failing_target_is_skipped_backs_off_exponentially_and_recovers() {
    let r = router();
    r.report_failure("memory");
    assert_eq!(r.order(Some("tier")), ["disk", "redis", "peer-cache"]);
    assert_eq!(r.route("tier").unwrap(), "disk");
    let err = r.route("memory").unwrap_err().to_string();
    assert!(err.contains("backing off after 1 consecutive failure(s); retried in 1.0 s"), "{err}");
    advance(&r, 999);
    assert!(!r.order(None).contains(&"memory".to_owned()));
    advance(&r, 1);
    // Half-open: tried again; a second failure doubles the wait.
    assert_eq!(r.order(Some("tier"))[0], "memory");
    r.report_failure("memory");
    advance(&r, 1500);
    assert_eq!(r.order(Some("tier"))[0], "disk");
    advance(&r, 500);
    assert_eq!(r.order(Some("tier"))[0], "memory");
    // Capped at max_backoff (8 s) however many failures.
    for _ in 0..10 {
        r.report_failure("memory");
    }
    let s = r.status().into_iter().find(|t| t.name == "memory").unwrap();
    assert_eq!((s.available, s.consecutive_failures, s.total_failures, s.retry_in), (false, 12, 12, 8.0));
    advance(&r, 8000);
    r.report_success("memory");
    let s = r.status().into_iter().find(|t| t.name == "memory").unwrap();
    assert_eq!((s.available, s.consecutive_failures, s.total_failures), (true, 0, 12));
    r.report_failure("memory");
    assert_eq!(r.status().into_iter().find(|t| t.name == "memory").unwrap().retry_in, 1.0);
}

#[test]
fn when_every_target_of_a_kind_fails_routing_says_when_the_first_returns() {
    let r = router();
    r.report_failure("lmcache");
    let err = r.route("cache").unwrap_err().to_string();
    assert_eq!(err, "every \"cache\" target is backing off after failures; the first is retried in 1.0 s");
    assert!(r.remove("lmcache"));
    assert!(!r.remove("lmcache"));
    assert!(r.route("cache").unwrap_err().to_string().starts_with("nothing is registered"));
    assert!(Router::new(Clock::monotonic(), Duration::ZERO, Duration::ZERO).clock().advance(Duration::ZERO).is_err());
}

#[test]
fn overlap_scores_leading_blocks_per_worker() {
    let idx = OverlapIndex::new();
    idx.stored("w1", &[1, 2, 3, 4]);
    idx.stored("w2", &[1, 2]);
    idx.stored("w3", &[2, 3, 4]); // no first block: no prefix
    idx.stored("w2", &[1, 2]); // idempotent
    assert_eq!(idx.score(&[1, 2, 3, 4, 5]), [("w1".to_owned(), 4), ("w2".to_owned(), 2)]);
    assert_eq!(idx.score(&[9, 1]), []);
    idx.removed("w1", &[3]);
    assert_eq!(idx.score(&[1, 2, 3, 4]), [("w1".to_owned(), 2), ("w2".to_owned(), 2)]);
    idx.clear_worker("w2");
    assert_eq!(idx.score(&[1, 2, 3]), [("w1".to_owned(), 2)]);
    assert_eq!(idx.workers(), [("w1".to_owned(), 3), ("w2".to_owned(), 0), ("w3".to_owned(), 3)]);
    idx.removed("nobody", &[1]);
}
