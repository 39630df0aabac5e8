//! Scheduler-side lookups across processes (tensor/pipeline parallel > 1).
//!
//! Every worker rank is a process of its own, holding its own part of each block's KV, while the
//! scheduler that asks "how many tokens can you load?" runs elsewhere. Each rank's engine answers
//! on a Unix socket ([`LookupServer`], its own threads, no Python); the scheduler asks every rank
//! at once ([`LookupClient`]) and takes the minimum, so it promises only what every rank can load.
//! Anything short of every rank answering in time is a miss (0): never a partial promise.
//!
//! Trust: the sockets live in a private directory ([`socket_dir`]: `XCONNECTOR_SOCKET_DIR`, else
//! `$XDG_RUNTIME_DIR/xconnector`, else `<tmp>/xconnector-<uid>`), which must be a real directory
//! owned by this user with no group or other permissions; otherwise the server refuses to bind and
//! the client refuses to connect. Both ends also check the peer's uid (`SO_PEERCRED`): a client
//! never sends a prompt to a server of another user, a server drops clients of another user.
//!
//! Wire format (little-endian), version 1; one request at a time per connection:
//! request `b"XCL1", u64 id, u32 n (<= 1<<24), n x u32 tokens, 3 x (u16 len + UTF-8)` for LoRA
//! name, cache salt and LoRA id (empty = none); reply `b"XCL1", u64 id, u64 tokens hit`. The id
//! echoes the request's, and a reply with another magic, another id or more tokens than asked is
//! a mismatch (a miss, connection closed).

mod client;
mod dir;
mod server;
mod sys;
mod wire;

pub use client::{ClientConfig, ClientStats, LookupClient};
pub use dir::{check_private_dir, ensure_private_dir, socket_dir, socket_path, SOCKET_DIR_ENV};
pub use server::{LookupFn, LookupServer, ServerConfig, ServerStats};
pub use wire::{MAX_TEXT_BYTES, MAX_TOKENS};
