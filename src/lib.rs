//! grouprelay: a sidecar that takes Segment calls on a localhost socket, holds every one
//! durably on disk before answering 200, and forwards them upstream.
//!
//! # Map
//! | module | what it is |
//! |---|---|
//! | [`config`] | the one typed [`config::Config`]: flags > env > file > defaults |
//! | [`daemon`] | start-up and shutdown order: queue, forwarder, listeners, systemd's READY; then stop, drain, close |
//! | [`server`] | listeners (TCP and Unix) and the HTTP/1.1 connections on them |
//! | [`ingest`] | the HTTP API: routes, writeKey, body limits, gzip, JSON answers; `/health`, `/ready`, `/stats`, `/metrics` |
//! | [`spec`] | the Segment call: parse, normalise, validate; error codes |
//! | [`queue`] | the sled database: calls in chunks, appended together and made durable by group commit, read in order, settled (delivered or dead) with durable counters; free-space floor |
//! | [`admin`] | `/admin/` endpoints (status, dead letters) and the client the admin commands use |
//! | [`forward`] | lanes per writeKey, batches upstream, retry with backoff, bisecting refusals |
//! | [`shutdown`] | the signal every task listens to |
//! | [`metrics`] | the counters and histograms `GET /metrics` serves |
//! | [`notify`] | systemd's `Type=notify` protocol: ready, status, watchdog, stopping |
//! | [`clock`] | timestamps as Segment writes them |
//! | [`dirsync`] | directory fsyncs: a file's name survives power loss only once its directory is synced |
//! | [`failpoint`] | test hooks: abort at a named point to prove a crash there loses nothing |
//!
//! # A call's way through
//! ```text
//! client ─HTTP─▶ server ─▶ ingest ─▶ spec (normalise, validate)
//!                             │
//!                             ▼
//!                           queue.append ─▶ appender (the waiting requests' calls packed
//!                             │                into chunks, a sled insert each) ─▶ committer
//!                             │                (flush + fdatasync, then answers them) ─▶ 200
//!                             ▼
//! upstream ◀─HTTP── forward (2xx: queue.remove; 4xx: queue.dead_letter; else retry)
//! ```
//! Operators look in through `/stats`, `/metrics` and `admin` (`grouprelay status`,
//! `grouprelay dead ...`), which read the queue and the forwarder's upstream health.
//! A call moves in one direction only; the queue is the single hand-off point between the
//! request side and the delivery side.

pub mod admin;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dirsync;
pub mod failpoint;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod spec;
pub mod status;
