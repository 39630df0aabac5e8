//! Peer events on NATS: XConnector's own channel between XConnector workers, telling each
//! other which blocks a worker stored in host memory and which it dropped, for XConnector's
//! overlap scoring (`overlap.rs`, the router's `score`). It is not Dynamo's event plane and no
//! Dynamo router reads it: Dynamo 1.6's router learns about XConnector's blocks from vLLM's KV
//! events (see `block_journal.rs` and the vLLM connector), and reads MessagePack
//! `Vec<RouterEvent>` from publishers bound in its discovery, which this is not.
//!
//! Message on `<subject>` (default `xconnector.kv_events`): one JSON object per batch,
//! `{"worker_id": "...", "events": [{"event_id": n, "data": {"stored": {"parent_hash": h|null,
//! "blocks": [{"block_hash": h, "tokens_hash": t}, ...]}}} | {"event_id": n, "data": {"removed":
//! {"block_hashes": [h, ...]}}}]}`, with Dynamo's hash definitions (sequence hash as
//! `block_hash`, local hash as `tokens_hash`).
//!
//! Publishing never blocks or fails a store: events go through a bounded queue (full = dropped,
//! counted) to a task that batches them; with NATS down the client reconnects in the background
//! and batches that cannot be sent are dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::config::secrets::redact_url;
use crate::error::{CoreError, Result};

#[derive(Clone, Debug)]
pub struct EventsConfig {
    pub url: String,
    pub subject: String,
    pub worker_id: String,
    pub queue_events: usize,
    pub batch_events: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub block_hash: u64,
    pub tokens_hash: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventData {
    Stored { parent_hash: Option<u64>, blocks: Vec<StoredBlock> },
    Removed { block_hashes: Vec<u64> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub data: EventData,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub worker_id: String,
    pub events: Vec<KvEvent>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub published: u64,
    pub dropped: u64,
}

struct Counters {
    next_id: AtomicU64,
    published: AtomicU64,
    dropped: AtomicU64,
    in_flight: AtomicU64,
}

pub struct EventPublisher {
    queue: mpsc::Sender<EventData>,
    counters: Arc<Counters>,
}

/// Credentials taken out of a NATS URL.
enum Login {
    None,
    Token(String),
    UserPassword(String, String),
}

impl Login {
    fn apply(self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match self {
            Login::None => options,
            Login::Token(t) => options.token(t),
            Login::UserPassword(u, p) => options.user_and_password(u, p),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The server address without its user info, and the credentials to log in with: the NATS
/// client logs its server address (at debug level), so it never gets to hold a password.
fn nats_target(url: &str) -> Result<(async_nats::ServerAddr, Login)> {
    let bad =
        |e: String| CoreError::config(format!("events url {:?}: {e}; expected nats://host:port", redact_url(url)));
    let (bare, login) = match url.find("://").map(|s| (s, url[s + 3..].rfind('@'))) {
        Some((s, Some(at))) => {
            let info = &url[s + 3..s + 3 + at];
            let login = match info.split_once(':') {
                Some((u, p)) => Login::UserPassword(percent_decode(u), percent_decode(p)),
                None => Login::Token(percent_decode(info)),
            };
            (format!("{}{}", &url[..s + 3], &url[s + 4 + at..]), login)
        }
        _ => (url.to_owned(), Login::None),
    };
    let addr = bare.parse::<async_nats::ServerAddr>().map_err(|e| bad(redact_url(&e.to_string())))?;
    Ok((addr, login))
}

impl EventPublisher {
    /// Starts the publisher. A malformed URL is an error; NATS being unreachable is not (the
    /// client keeps trying in the background).
    pub fn start(cfg: EventsConfig, rt: &Runtime) -> Result<Self> {
        let (addr, login) = nats_target(&cfg.url)?;
        let (queue, mut rx) = mpsc::channel::<EventData>(cfg.queue_events.max(1));
        let counters = Arc::new(Counters {
            next_id: AtomicU64::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let c = Arc::clone(&counters);
        rt.spawn(async move {
            let options = login
                .apply(async_nats::ConnectOptions::new())
                .retry_on_initial_connect()
                .connection_timeout(Duration::from_secs(2))
                .name("xconnector");
            let client = match options.connect(addr).await {
                Ok(client) => Some(client),
                Err(e) => {
                    let e = redact_url(&e.to_string());
                    tracing::warn!(error = %e, "peer events: cannot connect to NATS; events are dropped");
                    None
                }
            };
            while let Some(first) = rx.recv().await {
                let mut data = vec![first];
                while data.len() < cfg.batch_events.max(1) {
                    match rx.try_recv() {
                        Ok(d) => data.push(d),
                        Err(_) => break,
                    }
                }
                let n = data.len() as u64;
                let events =
                    data.into_iter().map(|data| KvEvent { event_id: c.next_id.fetch_add(1, Relaxed), data }).collect();
                let batch = EventBatch { worker_id: cfg.worker_id.clone(), events };
                // Only while connected: the client would otherwise buffer without bound (and
                // "published" would mean "waiting").
                let is_up = |c: &async_nats::Client| c.connection_state() == async_nats::connection::State::Connected;
                let mut connected = client.as_ref().is_some_and(is_up);
                // Connecting (at start, or after NATS came back): give it a moment.
                for _ in 0..100 {
                    if connected || client.is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    connected = client.as_ref().is_some_and(is_up);
                }
                let sent = match (&client, serde_json::to_vec(&batch)) {
                    (Some(client), Ok(body)) if connected => {
                        tokio::time::timeout(Duration::from_secs(1), client.publish(cfg.subject.clone(), body.into()))
                            .await
                            .is_ok_and(|r| r.is_ok())
                    }
                    _ => false,
                };
                if sent {
                    c.published.fetch_add(n, Relaxed);
                } else {
                    c.dropped.fetch_add(n, Relaxed);
                }
                c.in_flight.fetch_sub(n, Relaxed);
            }
        });
        Ok(Self { queue, counters })
    }

    /// Queues an event; never blocks. False (and counted) when the queue is full.
    pub fn emit(&self, data: EventData) -> bool {
        self.counters.in_flight.fetch_add(1, Relaxed);
        if self.queue.try_send(data).is_err() {
            self.counters.in_flight.fetch_sub(1, Relaxed);
            self.counters.dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    pub fn in_flight(&self) -> u64 {
        self.counters.in_flight.load(Relaxed)
    }

    pub fn stats(&self) -> EventStats {
        EventStats { published: self.counters.published.load(Relaxed), dropped: self.counters.dropped.load(Relaxed) }
    }
}

/// Receives event batches from a subject (for the overlap index of other workers).
pub struct EventSubscriber {
    rx: parking_lot::Mutex<std::sync::mpsc::Receiver<EventBatch>>,
}

impl EventSubscriber {
    /// Subscribes; fails if NATS cannot be reached within `timeout`.
    pub fn start(url: &str, subject: &str, rt: &Runtime, timeout: Duration) -> Result<Self> {
        let (addr, login) = nats_target(url)?;
        let subject = subject.to_owned();
        let shown = redact_url(url);
        let connect = async move {
            let client =
                login.apply(async_nats::ConnectOptions::new()).name("xconnector-subscriber").connect(addr).await?;
            let sub = client.subscribe(subject).await?;
            // Make sure the server has the subscription before anyone publishes.
            client.flush().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((client, sub))
        };
        let (client, mut sub) = rt
            .block_on(async { tokio::time::timeout(timeout, connect).await })
            .map_err(|_| CoreError::Cache(format!("peer events: NATS at {shown} did not answer in {timeout:?}")))?
            .map_err(|e| {
                CoreError::Cache(format!("peer events: cannot subscribe at {shown}: {}", redact_url(&e.to_string())))
            })?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _keep = client;
            use futures_util::StreamExt;
            while let Some(msg) = sub.next().await {
                match serde_json::from_slice::<EventBatch>(&msg.payload) {
                    Ok(batch) => {
                        if tx.send(batch).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "peer events: ignoring a message that is not an event batch"),
                }
            }
        });
        Ok(Self { rx: parking_lot::Mutex::new(rx) })
    }

    /// The next batch, waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<EventBatch> {
        self.rx.lock().recv_timeout(timeout).ok()
    }
}
