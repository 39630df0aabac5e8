//! Prometheus exposition of an engine's counters (DESIGN section 8), named in Dynamo's style
//! (`_total`, `_seconds`, `_bytes`), and the latency histograms behind them.

use std::fmt::Write as _;

pub use crate::histogram::{Histogram, HistogramSnapshot, BUCKETS};
use crate::stats::EngineStats;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(base: &[(&str, String)], extra: &[(&str, &str)]) -> String {
    let all: Vec<String> = base
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .chain(extra.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

/// The text exposition format (version 0.0.4) of one engine's metrics; `base` labels go on every
/// sample (e.g. the engine's namespace).
pub fn render(s: &EngineStats, hists: &[(&str, &str, HistogramSnapshot)], base: &[(&str, String)]) -> String {
    let mut out = String::new();
    let l = |extra: &[(&str, &str)]| labels(base, extra);
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (suffix_labels, v) in samples {
            let _ = writeln!(out, "{name}{suffix_labels} {v}");
        }
    };
    let c = |v: u64| v as f64;
    family("xconnector_lookup_total", "counter", "Prefix lookups.", vec![(l(&[]), c(s.lookups))]);
    family(
        "xconnector_hit_tokens_total",
        "counter",
        "Prompt tokens found cached by lookups.",
        vec![(l(&[]), c(s.hit_tokens))],
    );
    family(
        "xconnector_miss_tokens_total",
        "counter",
        "Prompt tokens looked up but not cached.",
        vec![(l(&[]), c(s.miss_tokens))],
    );
    family(
        "xconnector_blocks_stored_total",
        "counter",
        "Blocks newly stored in memory.",
        vec![(l(&[]), c(s.stored_blocks))],
    );
    family(
        "xconnector_bytes_stored_total",
        "counter",
        "Bytes of KV newly stored in memory.",
        vec![(l(&[]), c(s.stored_bytes))],
    );
    family(
        "xconnector_blocks_loaded_total",
        "counter",
        "Blocks loaded into the worker's KV cache.",
        vec![(l(&[]), c(s.loaded_blocks))],
    );
    family(
        "xconnector_bytes_loaded_total",
        "counter",
        "Bytes of KV loaded into the worker's KV cache.",
        vec![(l(&[]), c(s.loaded_bytes))],
    );
    family(
        "xconnector_promoted_blocks_total",
        "counter",
        "Blocks copied up from disk or Redis into memory.",
        vec![(l(&[]), c(s.promoted_blocks))],
    );
    family(
        "xconnector_write_behind_dropped_total",
        "counter",
        "Blocks not written to the disk tier because its queue was full.",
        vec![(l(&[]), c(s.write_behind_dropped))],
    );
    let mut evictions = vec![(l(&[("tier", "memory")]), c(s.tier.evicted_blocks))];
    let mut bytes = vec![(l(&[("tier", "memory")]), c(s.tier.used_bytes))];
    let mut entries = vec![(l(&[("tier", "memory")]), c(s.tier.entries))];
    let mut capacity = vec![(l(&[("tier", "memory")]), c(s.tier.capacity_bytes))];
    if let Some(d) = s.disk {
        evictions.push((l(&[("tier", "disk")]), c(d.evicted_blocks)));
        bytes.push((l(&[("tier", "disk")]), c(d.used_bytes)));
        entries.push((l(&[("tier", "disk")]), c(d.entries)));
        capacity.push((l(&[("tier", "disk")]), c(d.capacity_bytes)));
    }
    if let Some(d) = s.disk {
        family(
            "xconnector_disk_leftover_files_total",
            "counter",
            "Files a crash or power loss left in the disk tier (temporary, truncated, special), removed at start.",
            vec![(l(&[]), c(d.leftover_files))],
        );
        family(
            "xconnector_disk_write_errors_total",
            "counter",
            "Failed disk tier writes (a full filesystem included).",
            vec![(l(&[]), c(d.write_errors))],
        );
        family(
            "xconnector_disk_full_episodes_total",
            "counter",
            "Times the disk tier found its filesystem full and lowered its budget.",
            vec![(l(&[]), c(d.full_episodes))],
        );
        family(
            "xconnector_disk_budget_bytes",
            "gauge",
            "The disk tier's budget in force: its capacity, or less while the filesystem is full.",
            vec![(l(&[]), c(d.budget_bytes))],
        );
    }
    family(
        "xconnector_tier_off",
        "gauge",
        "1 when a configured tier is off because it could not be used or trusted.",
        vec![(l(&[("tier", "disk")]), c(s.disk_refused))],
    );
    family("xconnector_evictions_total", "counter", "Blocks evicted, by tier.", evictions);
    family("xconnector_tier_bytes", "gauge", "Bytes of KV held, by tier.", bytes);
    family("xconnector_tier_entries", "gauge", "Blocks held, by tier.", entries);
    family("xconnector_tier_capacity_bytes", "gauge", "Byte budget, by tier.", capacity);
    // In memory: blocks changed through a view of them.
    let mut damaged = vec![(l(&[("tier", "memory")]), c(s.tier.spoiled_blocks))];
    let mut mismatched = vec![(l(&[("tier", "memory")]), c(s.tier.mismatched_blocks))];
    if let Some(d) = s.disk {
        damaged.push((l(&[("tier", "disk")]), c(d.corrupt_blocks)));
        mismatched.push((l(&[("tier", "disk")]), c(d.mismatched_blocks)));
    }
    if let Some(r) = s.redis {
        damaged.push((l(&[("tier", "redis")]), c(r.foreign_values + r.corrupt_values)));
        mismatched.push((l(&[("tier", "redis")]), c(r.mismatched_values)));
        family(
            "xconnector_redis_written_blocks_total",
            "counter",
            "Blocks written to Redis.",
            vec![(l(&[]), c(r.written_blocks))],
        );
        family(
            "xconnector_redis_hit_blocks_total",
            "counter",
            "Blocks read from Redis.",
            vec![(l(&[]), c(r.hit_blocks))],
        );
        family(
            "xconnector_redis_dropped_blocks_total",
            "counter",
            "Blocks not written to Redis: its queue was full, or Redis failed the batch.",
            vec![(l(&[]), c(r.dropped_blocks))],
        );
        family("xconnector_redis_errors_total", "counter", "Failed Redis operations.", vec![(l(&[]), c(r.errors))]);
        family(
            "xconnector_redis_up",
            "gauge",
            "1 while Redis answers.",
            vec![(l(&[]), f64::from(u8::from(r.connected)))],
        );
        family(
            "xconnector_redis_timeouts_total",
            "counter",
            "Redis operations past their deadline (the request's budget) or socket timeout.",
            vec![(l(&[]), c(r.timeouts))],
        );
        family(
            "xconnector_redis_breaker_trips_total",
            "counter",
            "Times the Redis circuit breaker opened (a timeout or failure; requests then skip Redis).",
            vec![(l(&[]), c(r.breaker_trips))],
        );
        family(
            "xconnector_redis_breaker_open",
            "gauge",
            "1 while the Redis circuit breaker is open: requests skip Redis until a PING succeeds.",
            vec![(l(&[]), f64::from(u8::from(r.breaker_open)))],
        );
        family(
            "xconnector_redis_skipped_calls_total",
            "counter",
            "Requests' Redis lookups and reads skipped (a miss) while the breaker was open.",
            vec![(l(&[]), c(r.skipped_calls))],
        );
        family(
            "xconnector_unauthenticated_blocks_total",
            "counter",
            "Values refused for lack of a valid MAC (forged, planted, or written without the shared key), by tier.",
            vec![(l(&[("tier", "redis")]), c(r.unauthenticated_values))],
        );
    }
    family("xconnector_damaged_blocks_total", "counter", "Damaged or foreign blocks refused, by tier.", damaged);
    family(
        "xconnector_mismatched_blocks_total",
        "counter",
        "Intact blocks refused because they are not the KV asked for (wrong key, hash collision), by tier.",
        mismatched,
    );
    if let Some(e) = s.events {
        family(
            "xconnector_peer_events_published_total",
            "counter",
            "XConnector's own block events sent to NATS (for other XConnector workers' overlap scoring).",
            vec![(l(&[]), c(e.published))],
        );
        family(
            "xconnector_peer_events_dropped_total",
            "counter",
            "XConnector's own block events not sent to NATS.",
            vec![(l(&[]), c(e.dropped))],
        );
    }
    if let Some(j) = s.block_events {
        family(
            "xconnector_block_events_reported_total",
            "counter",
            "Blocks reported to the host as stored in or removed from host memory or disk (vLLM KV events, \
             which Dynamo's KV router reads).",
            vec![(l(&[]), c(j.reported_blocks))],
        );
        family(
            "xconnector_block_events_dropped_total",
            "counter",
            "Block changes not reported: the host did not take them fast enough.",
            vec![(l(&[]), c(j.dropped_blocks))],
        );
    }
    for (name, help, h) in hists {
        let mut samples = Vec::new();
        for (bound, n) in &h.buckets {
            let le = if bound.is_infinite() { "+Inf".to_owned() } else { format!("{bound}") };
            samples.push((l(&[("le", le.as_str())]).replace("{", "_bucket{"), c(*n)));
        }
        samples.push((format!("_count{}", l(&[])), c(h.count)));
        samples.push((format!("_sum{}", l(&[])), h.sum_seconds));
        family(name, "histogram", help, samples);
    }
    out
}
