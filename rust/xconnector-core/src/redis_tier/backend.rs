//! One Redis server or a Redis Cluster, behind the few operations the tier uses. A cluster is
//! reached through the `redis` crate's cluster client: it maps keys to slots and slots to nodes,
//! sends each node its part of a pipeline before reading any reply, and follows MOVED/ASK
//! (refreshing its slot map) when slots move or a replica takes over. Keys carry no hash tag, so
//! blocks spread over all slots.
//!
//! One server over plain TCP is reached through our own connection (`resp.rs`), which keeps a
//! pipeline's values in place in a reused buffer; over TLS or a Unix socket, through the crate's.
//!
//! A cluster is named by `redis-cluster://[user:password@]host:port[,host:port...]` (or
//! `rediss-cluster://` for TLS): the seed nodes, tried in order until one answers, sharing
//! credentials.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use redis::cluster::{cluster_pipe, ClusterClient, ClusterClientBuilder, ClusterConfig, ClusterConnection};
use redis::{Cmd, ConnectionAddr, FromRedisValue, RedisResult, Value};

use super::resp::{timed_out, Reply, RespConn};
use super::value::{Block, Format};
use crate::config::secrets::redact_url;
use crate::error::{CoreError, Result};

const CLUSTER: &str = "redis-cluster://";
const CLUSTER_TLS: &str = "rediss-cluster://";
/// Retries of a command the cluster client redirects or finds its node gone, and the wait
/// between them: a request's deadline bounds the whole call anyway, and a failover takes longer
/// than a request waits, so retrying longer only keeps a helper busy.
const CLUSTER_RETRIES: u32 = 2;
const CLUSTER_RETRY_WAIT_MS: u64 = 50;

pub enum Client {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        /// The seeds as one-server clients, to tell seeds without cluster support
        /// (`mode_mismatch`).
        seeds: Vec<redis::Client>,
    },
}

pub enum Conn {
    /// One server over plain TCP.
    Raw(RespConn),
    /// One server over TLS or a Unix socket.
    Single(redis::Connection),
    Cluster(Box<ClusterConnection>),
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster(url: &str) -> bool {
    url.starts_with(CLUSTER) || url.starts_with(CLUSTER_TLS)
}

/// The seed nodes of a cluster URL, each as a node URL with the shared credentials.
pub fn seeds(url: &str) -> Result<Vec<String>> {
    let (scheme, rest) = match url.strip_prefix(CLUSTER) {
        Some(rest) => ("redis", rest),
        None => ("rediss", url.strip_prefix(CLUSTER_TLS).unwrap_or(url)),
    };
    let shown = redact_url(url);
    let bad = |why: &str| {
        CoreError::config(format!(
            "remote_url {shown}: {why}; expected redis-cluster://[:password@]host:port[,host:port...]"
        ))
    };
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let hosts = match hosts.split_once('/') {
        Some((hosts, "" | "0")) => hosts,
        Some(_) => return Err(bad("a Redis Cluster has only database 0")),
        None => hosts,
    };
    let seeds: Vec<String> =
        hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("{scheme}://{auth}{h}")).collect();
    if seeds.is_empty() {
        return Err(bad("no seed node"));
    }
    if let Some(h) = hosts.split(',').map(str::trim).find(|h| !h.is_empty() && !h.contains(':')) {
        return Err(bad(&format!("seed node {h} has no port")));
    }
    Ok(seeds)
}

/// A client for `url` (with the CA of `ca_file` for TLS); errors never show the password.
pub fn client(url: &str, ca_file: Option<&Path>) -> Result<Client> {
    let shown = redact_url(url);
    if url.starts_with("rediss") {
        // rustls needs a process-wide crypto provider; installing one twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let bad_url = |e: redis::RedisError| {
        CoreError::config(format!(
            "remote_url {shown}: {}; expected redis://[:password@]host:port or \
             redis-cluster://[:password@]host:port[,host:port...]",
            redact_url(&e.to_string())
        ))
    };
    let certs = match ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                CoreError::config(format!("remote_ca_file {}: {e}; give the CA's PEM file", path.display()))
            })?;
            Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
        }
    };
    let one = |url: &str| match &certs {
        None => redis::Client::open(url).map_err(bad_url),
        Some(certs) => redis::Client::build_with_tls(url, certs.clone()).map_err(bad_url),
    };
    if is_cluster(url) {
        let seeds = seeds(url)?;
        let mut b = ClusterClientBuilder::new(seeds.clone())
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_RETRY_WAIT_MS);
        if let Some(certs) = certs.clone() {
            b = b.certs(certs);
        }
        let client = b.build().map_err(bad_url)?;
        let seeds = seeds.iter().map(|s| one(s)).collect::<Result<_>>()?;
        return Ok(Client::Cluster { client, seeds });
    }
    one(url).map(Client::Single)
}

impl Client {
    /// A new connection (for a cluster: to the nodes its seeds name), every step within `timeout`.
    pub fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        let mut con = match self {
            Client::Single(c) => {
                let info = c.get_connection_info();
                match info.addr() {
                    ConnectionAddr::Tcp(host, port) => {
                        let r = info.redis_settings();
                        Conn::Raw(RespConn::connect(host, *port, timeout, r.username(), r.password(), r.db())?)
                    }
                    _ => Conn::Single(c.get_connection_with_timeout(timeout)?),
                }
            }
            Client::Cluster { client, .. } => {
                let cfg = ClusterConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
                Conn::Cluster(Box::new(client.get_connection_with_config(cfg)?))
            }
        };
        con.set_timeouts(timeout)?;
        Ok(con)
    }

    /// What is wrong if the servers are not what the URL says: a one-server URL that reaches a
    /// node of a cluster (most keys would be MOVED), or a cluster URL whose seeds have cluster
    /// support disabled. None when they match, or when the servers do not say (INFO refused).
    pub fn mode_mismatch(&self, shown: &str, timeout: Duration) -> Option<String> {
        let field = |text: &str, name: &str| {
            text.lines().find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        // What one server says of itself, on one connection: whether it has cluster support, and
        // if so whether its cluster has several primaries (then most keys would be MOVED; one
        // that serves every slot works as one server, as a one-shard managed cluster does).
        let cluster = |c: &redis::Client| -> Option<(bool, bool)> {
            let mut con = c.get_connection_with_timeout(timeout).ok()?;
            con.set_read_timeout(Some(timeout)).ok()?;
            let info: String = redis::cmd("INFO").arg("cluster").query(&mut con).ok()?;
            if field(&info, "cluster_enabled:")? != "1" {
                return Some((false, false));
            }
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).ok()?;
            Some((true, field(&info, "cluster_size:")?.parse::<u32>().ok()? > 1))
        };
        match self {
            Client::Single(c) => (cluster(c) == Some((true, true))).then(|| {
                format!(
                    "remote_url {shown} is a node of a Redis Cluster of several primaries; name the cluster as \
                     redis-cluster://[:password@]host:port[,host:port...] so each block goes to the node that \
                     owns its slot"
                )
            }),
            Client::Cluster { seeds, .. } => {
                let mut answers = seeds.iter().map(cluster);
                answers.all(|a| a.is_some_and(|(enabled, _)| !enabled)).then(|| {
                    format!(
                        "remote_url {shown} names a Redis Cluster, but its servers have cluster support disabled; \
                         use redis://[:password@]host:port for one server"
                    )
                })
            }
        }
    }
}

impl Conn {
    /// Bounds every socket read and write (of every node's connection) by `timeout`.
    pub fn set_timeouts(&mut self, timeout: Duration) -> RedisResult<()> {
        match self {
            Conn::Raw(c) => Ok(c.set_timeouts(timeout)?),
            Conn::Single(c) => {
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))
            }
            Conn::Cluster(c) => {
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))
            }
        }
    }

    /// The replies of `cmds`, pipelined, read by `deadline`. On one server each reply is waited
    /// for only as long as is left: the crate's pipeline gives every reply a full socket
    /// timeout, so a server that stalls a pipeline of 63 GETs would hold its helper for 63
    /// timeouts. (A cluster's pipeline is the crate's: it may hold a helper past the deadline.)
    pub fn pipeline_until<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>, deadline: Instant) -> RedisResult<Vec<T>> {
        let mut packed = Vec::new();
        for cmd in &cmds {
            cmd.write_packed_command(&mut packed);
        }
        let values = match self {
            Conn::Raw(c) => {
                c.send(&packed)?;
                c.read_values(cmds.len(), deadline)?
            }
            Conn::Single(c) => {
                c.send_packed_command(&packed)?;
                let mut values = Vec::with_capacity(cmds.len());
                for _ in &cmds {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    c.set_read_timeout(Some(left))?;
                    values.push(c.recv_response()?.extract_error()?);
                }
                values
            }
            Conn::Cluster(c) => return cluster_pipeline(c, cmds),
        };
        values.into_iter().map(|v| Ok(redis::from_redis_value(v)?)).collect()
    }

    /// GETs of `keys`, pipelined, read by `deadline` into `buf` (reused; `value_len`: the size
    /// expected of each value): each value's range of `buf`, None for a missing key. On one
    /// server over TCP the values are read in place; else they are copied from the crate's
    /// replies.
    pub fn get_all(
        &mut self,
        keys: &[String],
        value_len: usize,
        deadline: Instant,
        buf: &mut Vec<u8>,
    ) -> RedisResult<Vec<Option<Range<usize>>>> {
        let c = match self {
            Conn::Raw(c) => c,
            _ => {
                let cmds = keys.iter().map(|k| redis::cmd("GET").arg(k).clone()).collect();
                let values: Vec<Option<Vec<u8>>> = self.pipeline_until(cmds, deadline)?;
                buf.clear();
                let mut ranges = Vec::with_capacity(values.len());
                for v in values {
                    ranges.push(v.map(|v| {
                        buf.extend_from_slice(&v);
                        buf.len() - v.len()..buf.len()
                    }));
                }
                return Ok(ranges);
            }
        };
        let mut packed = Vec::with_capacity(keys.len() * 64);
        for key in keys {
            packed.extend_from_slice(b"*2\r\n$3\r\nGET\r\n");
            bulk(&mut packed, key.as_bytes());
        }
        c.send(&packed)?;
        let expected = keys.len() * (value_len + 32);
        let replies = c.read_replies(keys.len(), buf, expected, deadline)?;
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Bulk(range) => Ok(Some(range)),
                Reply::Nil => Ok(None),
                _ => Err((redis::ErrorKind::UnexpectedReturnType, "GET answered with a non-string").into()),
            })
            .collect()
    }

    /// SETs of `blocks` under their keys, encoded in `format`, with `PX ttl_ms` when given. On
    /// one server the pipeline is packed by hand into `packed` (the writer's, reused: a fresh
    /// 4 MiB buffer per batch cost a page fault per 4 KiB), each value encoded straight into it;
    /// the crate's commands copied every value twice more (into the command, then the pipeline).
    pub fn set_all<'b>(
        &mut self,
        format: &Format,
        blocks: impl Iterator<Item = (String, Block<'b>)>,
        ttl_ms: Option<u64>,
        packed: &mut Vec<u8>,
        allowance: impl FnOnce(usize) -> Duration,
    ) -> RedisResult<()> {
        let ttl = ttl_ms.map(|ms| ms.to_string());
        match self {
            Conn::Raw(c) => {
                let n = pack_sets(format, blocks, ttl.as_deref(), packed);
                c.send(packed)?;
                // A refused SET is the batch's error (the connection is then dropped).
                c.read_values(n, Instant::now() + allowance(packed.len()))?;
                Ok(())
            }
            Conn::Single(c) => {
                let n = pack_sets(format, blocks, ttl.as_deref(), packed);
                c.send_packed_command(packed)?;
                // Every reply is read, so the connection stays in step after a refused SET.
                let mut refused = None;
                for _ in 0..n {
                    match c.recv_response().and_then(Value::extract_error) {
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_) | redis::ErrorKind::Extension) => {
                            refused = refused.or(Some(e));
                        }
                        Err(e) => return Err(e),
                    }
                }
                refused.map_or(Ok(()), Err)
            }
            Conn::Cluster(c) => cluster_pipeline(
                c,
                blocks.map(|(key, block)| {
                    let value = format.encode(&key, &block);
                    let mut set = redis::cmd("SET");
                    set.arg(key).arg(value);
                    if let Some(ttl) = &ttl {
                        set.arg("PX").arg(ttl);
                    }
                    set
                }),
            ),
        }
    }

    /// Whether the connection may go back to the pool after a call that succeeded.
    pub fn reusable(&self) -> bool {
        match self {
            Conn::Raw(c) => c.reusable(),
            _ => true,
        }
    }

    /// One command, routed by its key (PING, DEL).
    pub fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Raw(c) => c.query(cmd),
            Conn::Single(c) => cmd.query(c),
            Conn::Cluster(c) => cmd.query(c),
        }
    }

    /// `INFO memory` of the server, or of each primary of a cluster.
    pub fn memory_info(&mut self) -> RedisResult<Vec<String>> {
        let value: Value = self.query(redis::cmd("INFO").arg("memory"))?;
        Ok(texts(value))
    }
}

/// `cmds` pipelined on a cluster: each node gets the commands for its keys.
fn cluster_pipeline<T: FromRedisValue>(
    c: &mut ClusterConnection,
    cmds: impl IntoIterator<Item = Cmd>,
) -> RedisResult<T> {
    let mut p = cluster_pipe();
    for cmd in cmds {
        p.add_command(cmd);
    }
    p.query(c)
}

/// Packs SETs of `blocks` (with `PX ttl` when given) into `packed`, each value encoded straight
/// into it; how many.
fn pack_sets<'b>(
    format: &Format,
    blocks: impl Iterator<Item = (String, Block<'b>)>,
    ttl: Option<&str>,
    packed: &mut Vec<u8>,
) -> usize {
    packed.clear();
    let mut n = 0;
    for (key, block) in blocks {
        let len = format.header() + block.data.len();
        let args = if ttl.is_some() { 5 } else { 3 };
        packed.reserve(len + key.len() + 64);
        packed.extend_from_slice(format!("*{args}\r\n$3\r\nSET\r\n").as_bytes());
        bulk(packed, key.as_bytes());
        packed.extend_from_slice(format!("${len}\r\n").as_bytes());
        format.encode_into(&key, &block, packed);
        packed.extend_from_slice(b"\r\n");
        if let Some(ttl) = ttl {
            bulk(packed, b"PX");
            bulk(packed, ttl.as_bytes());
        }
        n += 1;
    }
    n
}

/// Appends `data` as a RESP bulk string.
fn bulk(packed: &mut Vec<u8>, data: &[u8]) {
    packed.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    packed.extend_from_slice(data);
    packed.extend_from_slice(b"\r\n");
}

/// The text replies in `value`: one (a server), or one per node (a map or array of them).
fn texts(value: Value) -> Vec<String> {
    match value {
        Value::BulkString(b) => vec![String::from_utf8_lossy(&b).into_owned()],
        Value::SimpleString(s) => vec![s],
        Value::VerbatimString { text, .. } => vec![text],
        Value::Map(pairs) => pairs.into_iter().flat_map(|(_, v)| texts(v)).collect(),
        Value::Array(items) => items.into_iter().flat_map(texts).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_names_its_seeds_with_shared_credentials() {
        assert_eq!(
            seeds("redis-cluster://:pw@127.0.0.1:7000,127.0.0.1:7001/").unwrap(),
            ["redis://:pw@127.0.0.1:7000", "redis://:pw@127.0.0.1:7001"]
        );
        assert_eq!(seeds("rediss-cluster://h:1").unwrap(), ["rediss://h:1"]);
        for bad in ["redis-cluster://", "redis-cluster://:pw@", "redis-cluster://h:1/3", "redis-cluster://h"] {
            let e = seeds(bad).unwrap_err().to_string();
            assert!(e.contains("expected redis-cluster://") && !e.contains("pw"), "{e}");
        }
        assert!(is_cluster("rediss-cluster://h:1") && !is_cluster("redis://h:1"));
    }
}
