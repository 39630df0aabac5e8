//! The SDK's own counters (receives, hit tokens, stores, ...) and its fallbacks by reason, with
//! their Prometheus families (DESIGN section 8), beside the engines' native statistics.
//!
//! Invariants: a count only grows; `count`/`fallback` return the total after the call, so a
//! caller logs the first occurrence of a kind (total 1) exactly once however many threads race;
//! the exposition lists names in sorted order and always has the `xconnector_fallbacks_total`
//! family and the three plain families, even at zero, so their names are known up front.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;

use crate::histogram::{Histogram, HistogramSnapshot};

/// What a step of the host's forward pass waits for inside XConnector, one histogram each
/// (`xconnector_step_wait_seconds{op=...}`): loading KV before it, saving KV after it.
pub const STEP_WAITS: [&str; 2] = ["load", "save"];

/// Counters exported as plain families: (metric name without `_total`, help, counter key).
pub const PLAIN_FAMILIES: [(&str, &str, &str); 3] = [
    ("receives", "KV receive calls (vLLM v0 shaped).", "receives"),
    ("prompt_tokens", "Prompt tokens of fresh prefills on receive.", "prompt_tokens"),
    ("served_tokens", "Prompt tokens served from the cache on receive.", "hit_tokens"),
];

#[derive(Default)]
struct Inner {
    counters: BTreeMap<String, u64>,
    fallbacks: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct SdkStats {
    inner: Mutex<Inner>,
    waits: [Histogram; STEP_WAITS.len()],
}

fn bump(map: &mut BTreeMap<String, u64>, name: &str, n: u64) -> u64 {
    let total = map.entry(name.to_owned()).or_default();
    *total = total.saturating_add(n);
    *total
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl SdkStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to counter `name`; the total after it.
    pub fn count(&self, name: &str, n: u64) -> u64 {
        bump(&mut self.inner.lock().counters, name, n)
    }

    /// A call fell back to the worker's own path for `reason`; how many times it has so far.
    pub fn fallback(&self, reason: &str) -> u64 {
        bump(&mut self.inner.lock().fallbacks, reason, 1)
    }

    /// A step waited `d` inside XConnector for `op` (one of [`STEP_WAITS`]; others are ignored).
    pub fn step_wait(&self, op: &str, d: Duration) {
        if let Some(i) = STEP_WAITS.iter().position(|&o| o == op) {
            self.waits[i].observe(d);
        }
    }

    /// `(op, histogram)` for each of [`STEP_WAITS`].
    pub fn step_waits(&self) -> Vec<(&'static str, HistogramSnapshot)> {
        STEP_WAITS.iter().zip(&self.waits).map(|(&op, h)| (op, h.snapshot())).collect()
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.inner.lock().counters.clone()
    }

    pub fn fallbacks(&self) -> BTreeMap<String, u64> {
        self.inner.lock().fallbacks.clone()
    }

    /// Share of looked-up prompt tokens served from the cache (0 before any).
    pub fn hit_rate(&self) -> f64 {
        let inner = self.inner.lock();
        let get = |k: &str| inner.counters.get(k).copied().unwrap_or(0);
        match get("prompt_tokens") {
            0 => 0.0,
            total => get("hit_tokens") as f64 / total as f64,
        }
    }

    /// The SDK's families in Prometheus' text format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let inner = self.inner.lock();
        let mut out = String::new();
        let name = "xconnector_fallbacks_total";
        let _ = writeln!(out, "# HELP {name} Calls that fell back to the worker's own path.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (reason, n) in &inner.fallbacks {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", escape(reason));
        }
        for (family, help, key) in PLAIN_FAMILIES {
            let n = inner.counters.get(key).copied().unwrap_or(0);
            let _ = writeln!(out, "# HELP xconnector_{family}_total {help}");
            let _ = writeln!(out, "# TYPE xconnector_{family}_total counter");
            let _ = writeln!(out, "xconnector_{family}_total {n}");
        }
        let name = "xconnector_step_wait_seconds";
        let _ = writeln!(out, "# HELP {name} Time a step of the forward pass waited inside XConnector, by op.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (op, h) in self.step_waits() {
            for (bound, n) in &h.buckets {
                let le = if bound.is_infinite() { "+Inf".to_owned() } else { format!("{bound}") };
                let _ = writeln!(out, "{name}_bucket{{op=\"{op}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_count{{op=\"{op}\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{op=\"{op}\"}} {}", h.sum_seconds);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_grow_and_the_first_occurrence_is_reported_once() {
        let s = SdkStats::new();
        assert_eq!(s.count("receives", 1), 1);
        assert_eq!(s.count("receives", 2), 3);
        assert_eq!(s.fallback("cache_backoff"), 1);
        assert_eq!(s.fallback("cache_backoff"), 2);
        assert_eq!(s.counters().get("receives"), Some(&3));
        assert_eq!(s.fallbacks().into_iter().collect::<Vec<_>>(), vec![("cache_backoff".to_owned(), 2)]);
    }

    #[test]
    fn racing_threads_see_exactly_one_first() {
        let s = SdkStats::new();
        let firsts: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| (s.fallback("x") == 1) as usize)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(firsts, 1);
        assert_eq!(s.fallbacks()["x"], 8);
    }

    #[test]
    fn step_waits_are_histograms_by_op_and_always_exported() {
        let s = SdkStats::new();
        assert!(s.prometheus().contains("xconnector_step_wait_seconds_count{op=\"save\"} 0\n"));
        s.step_wait("load", Duration::from_millis(3));
        s.step_wait("load", Duration::from_micros(40));
        s.step_wait("bogus", Duration::from_secs(1));
        let waits = s.step_waits();
        assert_eq!((waits[0].0, waits[0].1.count, waits[1].1.count), ("load", 2, 0));
        assert!((waits[0].1.sum_seconds - 0.00304).abs() < 1e-9);
        let text = s.prometheus();
        assert!(text.contains("xconnector_step_wait_seconds_bucket{op=\"load\",le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("xconnector_step_wait_seconds_bucket{op=\"load\",le=\"+Inf\"} 2\n"));
    }

    #[test]
    fn hit_rate_is_hits_over_prompt_tokens() {
        let s = SdkStats::new();
        assert_eq!(s.hit_rate(), 0.0);
        s.count("prompt_tokens", 40);
        s.count("hit_tokens", 10);
        assert_eq!(s.hit_rate(), 0.25);
    }

    #[test]
    fn exposition_has_every_family_even_at_zero_and_escapes_labels() {
        let s = SdkStats::new();
        let empty = s.prometheus();
        assert!(empty.contains("# TYPE xconnector_fallbacks_total counter\n"));
        assert!(empty.contains("xconnector_served_tokens_total 0\n"));
        s.fallback("b\"ad");
        s.fallback("a");
        s.count("hit_tokens", 48);
        let text = s.prometheus();
        let a = text.find("{reason=\"a\"} 1").unwrap();
        let b = text.find("{reason=\"b\\\"ad\"} 1").unwrap();
        assert!(a < b, "sorted by reason");
        assert!(text.contains("xconnector_served_tokens_total 48\n"));
        assert!(text.contains("xconnector_receives_total 0\n"));
    }
}
