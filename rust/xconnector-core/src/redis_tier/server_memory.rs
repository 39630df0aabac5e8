//! What the Redis server will do when the shared tier fills it, read once at connect from
//! `INFO memory` (which works where `CONFIG` is renamed away): a server without a memory limit
//! grows until its machine runs out, and one that evicts nothing of ours refuses every write once
//! full, so new blocks silently stop being shared. Either is logged once per tier opened.

/// The advice for a server with `maxmemory` bytes (0: no limit) and `policy`, when values are
/// written with a TTL or not; None when it evicts our values as it fills.
pub fn advice(maxmemory: u64, policy: &str, ttl: bool) -> Option<String> {
    let fix = "set maxmemory-policy allkeys-lru on the server (README: Tiers, hybrid mode)";
    if maxmemory == 0 {
        return Some(format!(
            "has no memory limit (maxmemory 0): the shared tier grows until that machine runs out of memory; set \
             maxmemory, and {fix}"
        ));
    }
    match policy {
        "noeviction" => Some(format!(
            "refuses writes once full (maxmemory-policy noeviction): new blocks then stop being shared; {fix}"
        )),
        p if p.starts_with("volatile-") && !ttl => Some(format!(
            "evicts only keys with a TTL (maxmemory-policy {p}) and these values have none, so once full it \
             refuses writes; {fix}, or give values a TTL (remote_ttl_s)"
        )),
        _ => None,
    }
}

/// The advice for the server an `INFO memory` reply describes (None: it makes room, or does not
/// say: a Redis-compatible server without these fields).
pub fn advice_from_info(info: &str, ttl: bool) -> Option<String> {
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':'))).map(str::trim)
    };
    advice(field("maxmemory")?.parse().ok()?, field("maxmemory_policy")?, ttl)
}

/// Warns about the server `shown` (its URL without a password) if its `INFO memory` reply says
/// it will not make room for new blocks; whether it did.
pub fn warn_about_memory(shown: &str, info: &str, ttl: bool) -> bool {
    let advice = advice_from_info(info, ttl);
    if let Some(advice) = &advice {
        tracing::warn!("XConnector: Redis at {shown} {advice}");
    }
    advice.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_for_each_kind_of_server() {
        let mib = 64 << 20;
        assert!(advice(0, "allkeys-lru", false).unwrap().contains("no memory limit"));
        assert!(advice(mib, "noeviction", true).unwrap().contains("refuses writes once full"));
        assert!(advice(mib, "volatile-lru", false).unwrap().contains("remote_ttl_s"));
        for ok in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert_eq!(advice(mib, ok, false), None, "{ok}");
        }
        assert_eq!(advice(mib, "volatile-ttl", true), None, "values with a TTL are evictable");
    }

    #[test]
    fn fields_are_read_from_an_info_reply() {
        // `maxmemory_human` and `maxmemory_policy` share a prefix with `maxmemory`.
        let info = "# Memory\r\nused_memory:1000\r\nmaxmemory_human:64.00M\r\nmaxmemory:67108864\r\n\
                    maxmemory_policy:noeviction\r\n";
        assert!(advice_from_info(info, false).unwrap().contains("noeviction"));
        assert_eq!(advice_from_info("# Memory\r\nused_memory:1\r\n", false), None, "no fields, no advice");
        assert_eq!(advice_from_info("maxmemory:67108864\r\nmaxmemory_policy:allkeys-lru\r\n", false), None);
    }
}
