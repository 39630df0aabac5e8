//! `xconnector stats [URL]`: reads a running worker's Prometheus endpoint and prints what
//! XConnector is doing there: hit rate, bytes, tiers, fallbacks. The endpoint is read with a
//! plain HTTP/1.1 GET (metrics ports serve `http://`; there is no TLS client here).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::host::{Host, EXIT_INVALID, EXIT_OK};
use crate::config::secrets::redact_url;

/// The longest a read of the endpoint may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// A metrics page larger than this is not a metrics page.
const MAX_BODY: u64 = 64 << 20;

/// One sample: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);
/// The `xconnector_` samples of an exposition, by metric name.
pub type Samples = BTreeMap<String, Vec<Sample>>;

pub fn run(url: &str, host: &mut dyn Host) -> io::Result<i32> {
    let shown = redact_url(url); // a password in the URL is not printed
    let text = match http_get(url, TIMEOUT) {
        Ok(text) => text,
        Err(e) => {
            host.err(&format!("error: cannot read {shown}: {e}\n"))?;
            return Ok(EXIT_INVALID);
        }
    };
    let samples = parse(&text);
    if samples.is_empty() {
        host.err(&format!("error: {shown} serves no xconnector_ metrics; is XConnector on in that worker?\n"))?;
        return Ok(EXIT_INVALID);
    }
    host.out(&format!("XConnector at {shown}\n{}", report(&samples)))?;
    Ok(EXIT_OK)
}

/// The `xconnector_` samples of a Prometheus text exposition (comments, other metrics and
/// unreadable lines skipped). Label values are kept as written (escapes included).
pub fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines() {
        if let Some((name, labels, value)) = sample(line) {
            if name.starts_with("xconnector_") {
                out.entry(name.to_owned()).or_default().push((labels, value));
            }
        }
    }
    out
}

/// `name{labels} value [timestamp]`.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let end = line.find(|c| !ident(c)).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let (labels, rest) = match line[end..].strip_prefix('{') {
        Some(inner) => {
            let close = inner.rfind('}')?;
            (labels(&inner[..close]), &inner[close + 1..])
        }
        None => (BTreeMap::new(), &line[end..]),
    };
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// `a="x",b="y\"z"` -> {a: x, b: y\"z}.
fn labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let body = &rest[eq + 2..];
        let mut escaped = false;
        let Some(close) = body.char_indices().find_map(|(i, c)| {
            let end = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            end.then_some(i)
        }) else {
            break;
        };
        out.insert(key.to_owned(), body[..close].to_owned());
        rest = &body[close + 1..];
    }
    out
}

fn sum(s: &Samples, name: &str, label: Option<(&str, &str)>) -> f64 {
    let matching = |l: &BTreeMap<String, String>| label.is_none_or(|(k, v)| l.get(k).is_some_and(|x| x == v));
    s.get(name).map_or(0.0, |v| v.iter().filter(|(l, _)| matching(l)).map(|(_, x)| x).sum())
}

fn total(s: &Samples, name: &str) -> f64 {
    sum(s, name, None)
}

/// `1536` -> `1.5 KiB`; bytes under 1 KiB as a whole number.
pub fn human_bytes(n: f64) -> String {
    let mut n = n;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if n < 1024.0 {
            return if unit == "B" { format!("{} B", n as i64) } else { format!("{n:.1} {unit}") };
        }
        n /= 1024.0;
    }
    format!("{n:.1} TiB")
}

/// How long steps of the forward pass waited inside XConnector for `op` (the SDK's
/// `xconnector_step_wait_seconds` histogram): the mean and the bucket bound holding the 99th
/// percentile; empty when no step waited for it.
fn step_wait(s: &Samples, op: &str) -> String {
    let name = "xconnector_step_wait_seconds";
    let n = sum(s, &format!("{name}_count"), Some(("op", op)));
    if n <= 0.0 {
        return String::new();
    }
    let mean = sum(s, &format!("{name}_sum"), Some(("op", op))) / n;
    let mut bounds: Vec<(f64, f64)> = s
        .get(&format!("{name}_bucket"))
        .into_iter()
        .flatten()
        .filter(|(l, _)| l.get("op").is_some_and(|o| o == op))
        .filter_map(|(l, v)| Some((l.get("le")?.parse::<f64>().ok()?, *v)))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p99 = bounds.iter().find(|(_, c)| *c >= 0.99 * n).map_or(f64::INFINITY, |(b, _)| *b);
    let p99 = if p99.is_finite() { format!("{:.3} ms", p99 * 1e3) } else { "over the last bucket".to_owned() };
    format!("  step {op:<7} waited {:.3} ms per step on average, p99 <= {p99} ({} steps)\n", mean * 1e3, n as i64)
}

/// The report `stats` prints under its first line.
pub fn report(s: &Samples) -> String {
    let count = |name: &str| total(s, name) as i64;
    let (hit, miss) = (total(s, "xconnector_hit_tokens_total"), total(s, "xconnector_miss_tokens_total"));
    let asked = hit + miss;
    let rate = if asked > 0.0 {
        format!("{:.1}% of {} looked-up tokens", hit / asked * 100.0, asked as i64)
    } else {
        "no lookups yet".to_owned()
    };
    let mut out = format!("  lookups      {}\n  hit rate     {rate}\n", count("xconnector_lookup_total"));
    out += &format!("  served       {} prompt tokens\n", count("xconnector_served_tokens_total"));
    for (what, blocks, bytes) in [
        ("stored", "xconnector_blocks_stored_total", "xconnector_bytes_stored_total"),
        ("loaded", "xconnector_blocks_loaded_total", "xconnector_bytes_loaded_total"),
    ] {
        out += &format!("  {what:<12} {} blocks, {}\n", count(blocks), human_bytes(total(s, bytes)));
    }
    for (op, name) in [("store", "stored"), ("load", "loaded")] {
        let seconds = total(s, &format!("xconnector_{op}_duration_seconds_sum"));
        if seconds > 0.0 {
            let gbs = total(s, &format!("xconnector_bytes_{name}_total")) / seconds / 1e9;
            out += &format!("  {op} speed  {gbs:.2} GB/s (bytes over time spent in {op}s)\n");
        }
    }
    for op in ["load", "save"] {
        out += &step_wait(s, op);
    }
    let tiers: BTreeSet<&String> =
        s.get("xconnector_tier_bytes").into_iter().flatten().filter_map(|(l, _)| l.get("tier")).collect();
    for tier in tiers {
        let of = |name: &str| sum(s, name, Some(("tier", tier)));
        out += &format!(
            "  tier {tier:<7} {} of {}, {} blocks, {} evicted\n",
            human_bytes(of("xconnector_tier_bytes")),
            human_bytes(of("xconnector_tier_capacity_bytes")),
            of("xconnector_tier_entries") as i64,
            of("xconnector_evictions_total") as i64
        );
    }
    if s.contains_key("xconnector_redis_up") {
        let up = if total(s, "xconnector_redis_up") != 0.0 { "up" } else { "DOWN" };
        out += &format!("  redis        {up}, errors {}\n", count("xconnector_redis_errors_total"));
    }
    let mut fallbacks = BTreeMap::new();
    for (labels, v) in s.get("xconnector_fallbacks_total").into_iter().flatten() {
        let reason = labels.get("reason").map_or("?", String::as_str);
        if *v != 0.0 {
            fallbacks.insert(reason, *v as i64);
        }
    }
    let shown: Vec<String> = fallbacks.iter().map(|(r, n)| format!("{r} {n}")).collect();
    out += &format!("  fallbacks    {}\n", if shown.is_empty() { "none".to_owned() } else { shown.join(", ") });
    out
}

/// The body of `http://HOST[:PORT]/PATH`, read with one HTTP/1.1 GET; an error says why not in
/// words (refused, timed out, an HTTP status other than 200, not an `http://` URL).
pub fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!("{scheme}:// is not supported; give the http:// URL of the metrics port"))
        }
        None => return Err("not a URL; give one like http://127.0.0.1:9400/metrics".to_owned()),
    };
    // User info (up to the last `@`, whatever it holds) is neither sent nor used: metrics
    // ports take no credentials in the URL.
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let (authority, path) = rest.find(['/', '?']).map_or((rest, "/"), |at| rest.split_at(at));
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| "the port is not a number".to_owned())?),
        _ => (authority, 80),
    };
    let addrs =
        (host.trim_start_matches('[').trim_end_matches(']'), port).to_socket_addrs().map_err(|e| e.to_string())?;
    let mut last = "no address".to_owned();
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let deadline = Instant::now() + timeout;
    let fetch = |stream: &mut TcpStream| -> io::Result<Vec<u8>> {
        stream.set_write_timeout(Some(timeout))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        // Read until the response is complete (by its length, its last chunk, or the server
        // closing), under one deadline for the whole response however slowly it trickles in.
        let mut raw = Vec::new();
        let mut buf = [0u8; 64 << 10];
        let late = || io::Error::new(io::ErrorKind::TimedOut, "no complete response in time");
        while !response_complete(&raw) {
            let left = deadline.saturating_duration_since(Instant::now());
            if raw.len() as u64 > MAX_BODY {
                return Err(io::Error::other("the page is over 64 MiB: not a metrics page"));
            }
            if left.is_zero() {
                return Err(late());
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Err(late()),
                Err(e) => return Err(e),
            }
        }
        Ok(raw)
    };
    let raw = fetch(&mut stream).map_err(|e| e.to_string())?;
    response_body(&raw)
}

/// Whether `raw` holds a whole response: its headers and a body of the `Content-Length` they
/// give, or a chunked body up to its last chunk (without either, only the server closing ends it).
fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    let header = |name: &str| {
        head.split("\r\n")
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_owned()))
    };
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= len;
    }
    header("transfer-encoding").is_some_and(|v| v.contains("chunked")) && dechunk(body).is_ok()
}

/// The body of a whole HTTP/1.x response, when its status is 200.
fn response_body(raw: &[u8]) -> Result<String, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the server sent no complete HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/") {
        return Err(format!("not an HTTP response ({status:?})"));
    }
    let (code, reason) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if code != "200" {
        return Err(format!("HTTP {code} {reason}").trim_end().to_owned());
    }
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A `Transfer-Encoding: chunked` body, joined.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let broken = || "a broken chunked response".to_owned();
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n").ok_or_else(broken)?;
        let size = String::from_utf8_lossy(&body[..eol]);
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16).map_err(|_| broken())?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or_else(broken)?);
        body = body.get(size + 2..).ok_or_else(broken)?;
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    const EXPOSITION: &str = r#"# HELP xconnector_lookup_total Lookups.
# TYPE xconnector_lookup_total counter
xconnector_lookup_total 2.0
xconnector_hit_tokens_total 48.0
xconnector_miss_tokens_total 50.0
xconnector_served_tokens_total 48.0
xconnector_blocks_stored_total 3.0
xconnector_bytes_stored_total 9216.0
xconnector_blocks_loaded_total 3.0
xconnector_bytes_loaded_total 9216.0
xconnector_store_duration_seconds_sum 1e-6
xconnector_tier_bytes{tier="memory"} 9216.0
xconnector_tier_capacity_bytes{tier="memory"} 2.147483648e+09
xconnector_tier_entries{tier="memory"} 3.0
xconnector_evictions_total{tier="memory"} 0.0
xconnector_fallbacks_total{reason="lookup_error"} 0.0
xconnector_fallbacks_total{reason="store_error",note="a \"quoted\" {x}"} 2.0 1700000000
process_cpu_seconds_total 1.5
xconnector_broken
"#;

    #[test]
    fn parses_only_xconnector_samples_with_their_labels() {
        let s = parse(EXPOSITION);
        assert!(!s.contains_key("process_cpu_seconds_total") && !s.contains_key("xconnector_broken"));
        assert_eq!(s["xconnector_lookup_total"], vec![(BTreeMap::new(), 2.0)]);
        let (labels, value) = &s["xconnector_fallbacks_total"][1];
        assert_eq!(labels["reason"], "store_error");
        assert_eq!(labels["note"], r#"a \"quoted\" {x}"#);
        assert_eq!(*value, 2.0);
        assert_eq!(s["xconnector_tier_capacity_bytes"][0].1, 2147483648.0);
    }

    #[test]
    fn the_report_says_hit_rate_bytes_speed_tiers_and_fallbacks() {
        let r = report(&parse(EXPOSITION));
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "  lookups      2");
        assert_eq!(lines[1], "  hit rate     49.0% of 98 looked-up tokens");
        assert_eq!(lines[2], "  served       48 prompt tokens");
        assert_eq!(lines[3], "  stored       3 blocks, 9.0 KiB");
        assert_eq!(lines[4], "  loaded       3 blocks, 9.0 KiB");
        assert_eq!(lines[5], "  store speed  9.22 GB/s (bytes over time spent in stores)");
        assert_eq!(lines[6], "  tier memory  9.0 KiB of 2.0 GiB, 3 blocks, 0 evicted");
        assert_eq!(lines[7], "  fallbacks    store_error 2");
        assert_eq!(lines.len(), 8, "{r}");
        let idle = report(&parse("xconnector_redis_up 0\nxconnector_redis_errors_total 4\n"));
        assert!(idle.contains("hit rate     no lookups yet\n") && idle.contains("redis        DOWN, errors 4\n"));
        assert!(idle.ends_with("fallbacks    none\n"), "{idle}");
    }

    #[test]
    fn the_report_says_how_long_steps_waited() {
        let sdk = crate::sdk_stats::SdkStats::new();
        for ms in [1, 1, 2, 40] {
            sdk.step_wait("save", std::time::Duration::from_millis(ms));
        }
        let r = report(&parse(&sdk.prometheus()));
        assert!(r.contains("  step save    waited 11.000 ms per step on average, p99 <= 50.000 ms (4 steps)\n"), "{r}");
        assert!(!r.contains("step load"), "no step waited for a load: {r}");
    }

    #[test]
    fn human_bytes_as_python_printed_them() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.9), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * (1u64 << 40) as f64), "3.0 TiB");
        assert_eq!(human_bytes(5000.0 * (1u64 << 40) as f64), "5000.0 TiB");
    }

    /// Serves one connection with `response` and returns its URL.
    fn serve(response: &'static [u8]) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).unwrap();
            conn.write_all(response).unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        (url, server)
    }

    #[test]
    fn reads_plain_and_chunked_responses() {
        let (url, server) = serve(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nxconnector_lookup_total 1.0\n");
        assert_eq!(http_get(&url, TIMEOUT).unwrap(), "xconnector_lookup_total 1.0\n");
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:"), "{request}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nxconn\r\n6;x=y\r\nector_\r\n0\r\n\r\n";
        let (url, server) = serve(chunked);
        assert_eq!(http_get(&url, TIMEOUT).unwrap(), "xconnector_");
        server.join().unwrap();
    }

    #[test]
    fn errors_say_why_in_words() {
        let (url, server) = serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(http_get(&url, TIMEOUT).unwrap_err(), "HTTP 404 Not Found");
        server.join().unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let refused = http_get(&format!("http://{closed}/metrics"), TIMEOUT).unwrap_err();
        assert!(refused.contains("refused"), "{refused}");
        assert!(http_get("https://h/metrics", TIMEOUT).unwrap_err().starts_with("https:// is not supported"));
        assert!(http_get("127.0.0.1:9400", TIMEOUT).unwrap_err().starts_with("not a URL"));
        let mut h = super::super::host::Captured::default();
        assert_eq!(h.run(&["stats", &format!("http://{closed}/metrics")]), EXIT_INVALID);
        assert!(h.err.starts_with(&format!("error: cannot read http://{closed}/metrics: ")), "{}", h.err);
    }

    /// A server that answers with `head`, then trickles `drip` one byte at a time, and keeps the
    /// connection open until the client goes.
    fn keep_open(head: &'static [u8], drip: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://user:s3cret@{}/metrics", listener.local_addr().unwrap());
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.read(&mut [0u8; 1024]);
            conn.write_all(head).unwrap();
            for b in drip.iter().cycle() {
                if conn.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        url
    }

    #[test]
    fn a_complete_response_is_read_without_waiting_for_the_server_to_close() {
        // Keep-alive servers ignore `Connection: close`: the Content-Length says it is all there.
        let url = keep_open(b"HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\nxconnector_lookup_total 1\n", b"");
        assert_eq!(http_get(&url, TIMEOUT).unwrap(), "xconnector_lookup_total 1\n");
    }

    #[test]
    fn a_trickling_server_cannot_hold_the_command_past_its_deadline() {
        let url = keep_open(b"HTTP/1.1 200 OK\r\n\r\n", b"x");
        let err = http_get(&url, Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("no complete response in time"), "{err}");
        // The URL's password is neither shown nor sent.
        let mut h = super::super::host::Captured::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(h.run(&["stats", &format!("http://admin:hunter2@{addr}/metrics")]), EXIT_INVALID);
        assert!(!h.err.contains("hunter2") && h.err.contains(&addr.to_string()), "{}", h.err);
        // Not even part of it, whatever the password holds.
        for url in [format!("http://admin:hun/ter2@{addr}/metrics"), format!("http://u:s3cr?et@{addr}/m")] {
            let mut h = super::super::host::Captured::default();
            assert_eq!(h.run(&["stats", &url]), EXIT_INVALID);
            assert!(!h.err.contains("hun") && !h.err.contains("s3cr") && h.err.contains("refused"), "{}", h.err);
        }
    }

    #[test]
    fn a_page_without_xconnector_metrics_is_an_error() {
        let (url, server) = serve(b"HTTP/1.0 200 OK\r\n\r\nprocess_cpu_seconds_total 1.5\n");
        let mut h = super::super::host::Captured::default();
        assert_eq!(h.run(&["stats", &url]), EXIT_INVALID);
        assert!(h.err.contains("serves no xconnector_ metrics"), "{}", h.err);
        server.join().unwrap();
        let (url, server) = serve(b"HTTP/1.0 200 OK\r\n\r\nxconnector_lookup_total 7\n");
        let mut h = super::super::host::Captured::default();
        assert_eq!(h.run(&["stats", &url]), EXIT_OK);
        assert!(h.out.starts_with(&format!("XConnector at {url}\n  lookups      7\n")), "{}", h.out);
        server.join().unwrap();
    }
}
