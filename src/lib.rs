//! grouprelay: a sidecar that takes Segment calls on a localhost socket, holds every one
//! durably on disk before answering 200, and forwards them upstream.
//!
//! # Map
//! | module | what it is |
//! |---|---|
//! | [`config`] | every setting defined once; the one typed [`config::Config`], in sections: flags > env > file > defaults |
//! | [`daemon`] | start-up and shutdown order: queue, forwarder, listeners, systemd's READY; then stop, drain, close |
//! | [`server`] | where to listen, the listeners (TCP and Unix, bound or passed by systemd), the admin socket and who may use it, the HTTP/1.1 connections on them |
//! | [`http`] | the API: routes, the call path (writeKey, body limits, gzip, the queue, 200), `/health` `/ready` `/stats` `/metrics`, `/admin/` (on the admin socket only), JSON answers |
//! | [`spec`] | the Segment call: parse, normalise, validate; error codes |
//! | [`queue`] | the sled database: calls in chunks, appended together and made durable by group commit, read in order, settled (delivered or dead) with durable counters; free-space floor; rebuilt into a fresh copy to give disk back |
//! | [`forward`] | on a thread of its own: lanes per writeKey, batches upstream (directly or through an egress proxy), retry with backoff, bisecting refusals; upstream health on a `watch` channel |
//! | [`status`] | the daemon's numbers (queue, deliveries, dead letters, upstream), read once for every view |
//! | [`admin`] | the admin commands (`grouprelay status`, `grouprelay dead ...`) and their client |
//! | [`shutdown`] | the signal every task listens to |
//! | [`memory`] | the allocator's tunables: a small footprint, or less CPU per call for more RSS (`--memory-profile`) |
//! | [`metrics`] | the counters and histograms `GET /metrics` serves |
//! | [`notify`] | systemd's `Type=notify` protocol: ready, status, watchdog, stopping |
//! | [`clock`] | timestamps as Segment writes them |
//! | [`human`] | counts and sizes as an operator reads them ("1 call", "1.4 MB") |
//! | [`dirsync`] | directory fsyncs: a file's name survives power loss only once its directory is synced |
//! | [`failpoint`] | test hooks: abort at a named point to prove a crash there loses nothing |
//!
//! # A call's way through
//! ```text
//! client ─HTTP─▶ server ─▶ http (route) ─▶ http::ingest ─▶ spec (normalise, validate)
//!                                              │
//!                                              ▼
//!                        queue.append ─▶ appender (the waiting requests' calls packed
//!                             │             into chunks, a sled insert each) ─▶ committer
//!                             │             (flush + fdatasync, then answers them) ─▶ 200
//!                             ▼
//! upstream ◀─HTTP── forward (2xx: queue.remove; 4xx: queue.dead_letter; else retry)
//! ```
//! Operators look in through `/stats`, `/metrics` and, on the admin socket only, `/admin/`
//! (`grouprelay status`, `grouprelay dead ...`), which read one [`status::Status`]: the
//! queue's counters and the forwarder's published upstream health. A call moves in one direction only; the queue is
//! the single hand-off point between the request side and the delivery side.

pub mod admin;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dirsync;
pub mod failpoint;
pub mod forward;
pub mod http;
pub mod human;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod spec;
pub mod status;
