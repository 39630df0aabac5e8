//! `xconnector bench`: the replay of seeded chat, RAG and agent traffic (`crate::replay` says what
//! each figure means), with a progress bar on standard error, the summary, and the plot the host
//! draws.

use std::io;
use std::ops::ControlFlow;

use super::args::BenchArgs;
use super::host::{Host, EXIT_OK, EXIT_USAGE};
use crate::replay::{replay, Copies, ReplayConfig, Report};

/// An eighth of this machine's memory, at most 512 MiB: under the default workload's working
/// set, so eviction shows. 512 where /proc/meminfo cannot be read.
pub fn default_cache_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    mem_total_kib(&meminfo).map_or(512, |kib| (kib >> 13).min(512))
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `\r[####......] done/total`, and a newline after the last.
fn bar(done: usize, total: usize) -> String {
    const WIDTH: usize = 30;
    let filled = WIDTH * done / total.max(1);
    let end = if done == total { "\n" } else { "" };
    format!("\r[{}{}] {done}/{total}{end}", "#".repeat(filled), ".".repeat(WIDTH - filled))
}

fn gbps(c: &Copies) -> String {
    format!("{:.2} GB/s", c.bytes as f64 / c.time.as_secs_f64() / 1e9)
}

pub fn run(a: &BenchArgs, host: &mut dyn Host) -> io::Result<i32> {
    let cfg = ReplayConfig::new(a.requests, a.seed as u64, a.cache_mib << 20, a.block_kib << 10);
    let mut failed = None;
    let report = replay(&cfg, |p| match host.err(&bar(p.done, p.total)) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    });
    let r = match (report, failed) {
        (_, Some(e)) => return Err(e),
        (Ok(Some(r)), None) => r,
        (Ok(None), None) => return Err(io::Error::other("the replay stopped without a reason")),
        (Err(e), None) => {
            host.err(&format!("error: {e}\n"))?;
            return Ok(EXIT_USAGE);
        }
    };
    let mut text = summary(a, &r);
    if let Some(path) = &a.plot {
        host.plot(path, &r)?;
        text += &format!("plot          {path}\n");
    }
    host.out(&text)?;
    Ok(EXIT_OK)
}

fn summary(a: &BenchArgs, r: &Report) -> String {
    let (prompt, saved) = (r.prompt_tokens, r.saved_tokens);
    let pct = |n: u64| format!("{:.1}%", n as f64 / prompt.max(1) as f64 * 100.0);
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    let mut lines = vec![
        format!("workload      {} requests (seed {}), {prompt} prompt tokens", r.samples.len(), a.seed),
        format!("cache         {} MiB, {} KiB per 16-token block", a.cache_mib, a.block_kib),
        format!("hit rate      {}", pct(r.hit_tokens)),
        format!(
            "tokens saved  {saved} ({} of prompt tokens; the block holding each prompt's last token is recomputed)",
            pct(saved)
        ),
        format!("lookup        p50 {:.1} us, p99 {:.1} us", us(r.lookup_p50), us(r.lookup_p99)),
    ];
    let (fill, full) = (&r.store_filling, &r.store_full);
    let store = fill.plus(*full);
    if !store.time.is_zero() {
        lines.push(format!(
            "store         {}: {:.2} GB copied into the cache, over the time of the {} stores that copied",
            gbps(&store),
            store.bytes as f64 / 1e9,
            store.count
        ));
    }
    if !fill.time.is_zero() && !full.time.is_zero() {
        lines.push(format!(
            "              {} while the cache filled (first touch of its memory, {} stores), {} once full ({} stores)",
            gbps(fill),
            fill.count,
            gbps(full),
            full.count
        ));
    }
    if !r.load.time.is_zero() {
        lines.push(format!(
            "load          {}: {:.2} GB reloaded for {} earlier requests after the run, CPU caches swept before each",
            gbps(&r.load),
            r.load.bytes as f64 / 1e9,
            r.load.count
        ));
    }
    lines.push(format!("evicted       {} blocks", r.evicted_blocks));
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::super::host::Captured;
    use super::*;

    #[test]
    fn the_default_budget_is_an_eighth_of_memory_up_to_512_mib() {
        assert_eq!(mem_total_kib("MemFree: 1 kB\nMemTotal:       16318376 kB\n"), Some(16318376));
        assert_eq!(mem_total_kib("nothing"), None);
        let mib = default_cache_mib();
        assert!((1..=512).contains(&mib), "{mib}");
    }

    #[test]
    fn the_bar_fills_and_ends_its_line() {
        assert_eq!(bar(0, 200), format!("\r[{}] 0/200", ".".repeat(30)));
        assert_eq!(bar(100, 200), format!("\r[{}{}] 100/200", "#".repeat(15), ".".repeat(15)));
        assert_eq!(bar(200, 200), format!("\r[{}] 200/200\n", "#".repeat(30)));
    }

    #[test]
    fn bench_reports_every_figure_and_plots_when_asked() {
        let mut h = Captured::default();
        let args = ["bench", "--requests", "120", "--cache-mib", "2", "--block-kib", "1", "--plot", "p.png"];
        assert_eq!(h.run(&args), EXIT_OK, "{}", h.err);
        let keys: Vec<&str> = h.out.lines().filter_map(|l| l.split_whitespace().next()).collect();
        for key in ["workload", "cache", "hit", "tokens", "lookup", "store", "load", "evicted", "plot"] {
            assert!(keys.contains(&key), "{key}: {}", h.out);
        }
        assert!(h.out.starts_with("workload      120 requests (seed 0), "), "{}", h.out);
        assert!(h.out.contains("\ncache         2 MiB, 1 KiB per 16-token block\n"));
        assert_eq!(h.plots, [("p.png".to_owned(), 120)]);
        assert!(h.err.contains("\r[") && h.err.ends_with("] 120/120\n"), "{:?}", h.err);
        // Seeded: the same run, the same hit rate.
        let mut again = Captured::default();
        assert_eq!(again.run(&args[..7]), EXIT_OK);
        let hit = |out: &str| out.lines().find(|l| l.starts_with("hit rate")).unwrap().to_owned();
        assert_eq!(hit(&h.out), hit(&again.out));
        assert!(again.plots.is_empty() && !again.out.contains("plot"));
    }

    #[test]
    fn what_the_engine_refuses_is_an_error_not_a_crash() {
        let mut h = Captured::default();
        assert_eq!(h.run(&["bench", "--requests", "0"]), EXIT_USAGE);
        assert!(h.err.starts_with("error: requests must be at least 1"), "{}", h.err);
    }
}
