//! The admin endpoints under `/admin/`: the daemon's state and its dead letters, for the
//! `grouprelay status` and `grouprelay dead ...` commands ([`client`]).
//!
//! sled allows one process per database, so these commands cannot open the queue
//! themselves: they ask the running daemon. The endpoints answer only clients on loopback
//! or the Unix socket, even when `--allow-remote` opens a listener beyond.
//!
//! | request | answer |
//! |---|---|
//! | `GET /admin/status` | queue depth, oldest call's age, delivered, dead letters, upstream state |
//! | `GET /admin/dead?reason=R&limit=N` | dead letters, oldest first: id, messageId, writeKey's first 4 characters, reason, time |
//! | `GET /admin/dead/ID` | one dead letter in full (its writeKey cut to 4 characters) |
//! | `POST /admin/dead/replay` `{"ids":[..]}`, `{"all":true}` or `{"reason":"R"}` | queued again, same messageId |
//! | `POST /admin/dead/purge` (same body) | deleted for good |

pub mod client;

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::forward::UpstreamHealth;
use crate::queue::{DeadRecord, Queue};

/// Whether a request came from this host (loopback or the Unix socket); set by the server.
#[derive(Debug, Clone, Copy)]
pub struct LocalPeer(pub bool);

/// A dead letter as `dead list` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadSummary {
    pub id: u64,
    pub message_id: Option<String>,
    /// The writeKey's first four characters: enough to tell keys apart, not to use one.
    pub write_key: String,
    pub reason: String,
    pub status: Option<u16>,
    pub dead_at_ms: u64,
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<u64>,
    #[serde(default)]
    pub all: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub up: bool,
    pub version: String,
    pub pending: u64,
    pub stored_bytes: u64,
    pub oldest_call_age_seconds: Option<f64>,
    pub accepted: u64,
    pub delivered: u64,
    pub dead: BTreeMap<String, u64>,
    pub rejected: u64,
    pub upstream: UpstreamStatus,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// `healthy` or `backing_off`.
    pub state: String,
    pub backing_off_until_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub last_delivery_at_ms: Option<u64>,
}

pub struct Admin {
    queue: Queue,
    health: tokio::sync::watch::Receiver<UpstreamHealth>,
}

/// An admin request that cannot be answered as asked.
struct AdminError(StatusCode, &'static str, String);

impl Admin {
    pub fn new(queue: Queue, health: tokio::sync::watch::Receiver<UpstreamHealth>) -> Admin {
        Admin { queue, health }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let local = req.extensions().get::<LocalPeer>().is_some_and(|p| p.0);
        let result = if local {
            self.route(req).await
        } else {
            Err(AdminError(
                StatusCode::FORBIDDEN,
                "admin_local_only",
                "the admin endpoints answer only loopback and Unix socket clients".into(),
            ))
        };
        match result {
            Ok(body) => reply(StatusCode::OK, body),
            Err(AdminError(status, code, message)) => reply(
                status,
                serde_json::json!({"success": false, "code": code, "message": message}),
            ),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<serde_json::Value, AdminError> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let segments: Vec<&str> = path.split('/').skip(2).collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["status"]) => to_json(&self.status()),
            (&Method::GET, ["dead"]) => self.dead_list(&query),
            (&Method::GET, ["dead", id]) => {
                let id = parse_id(id)?;
                match self.queue.dead_entry(id).map_err(storage)? {
                    Some(record) => to_json(&masked(record)),
                    None => Err(AdminError(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no dead letter {id}"),
                    )),
                }
            }
            (&Method::POST, ["dead", action @ ("replay" | "purge")]) => {
                let action = *action;
                let selection = read_selection(req).await?;
                let ids = self.select(&selection)?;
                let done = if action == "replay" {
                    self.queue.replay_dead(&ids).await.map_err(storage)?
                } else {
                    self.queue.purge_dead(&ids).map_err(storage)?
                };
                tracing::info!(
                    calls = done,
                    action,
                    "operator request on dead letters done"
                );
                Ok(serde_json::json!({"success": true, action: done}))
            }
            _ => Err(AdminError(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such admin endpoint: {} {path}", req.method()),
            )),
        }
    }

    fn status(&self) -> Status {
        let counts = self.queue.counts();
        let now = clock::unix_ms(SystemTime::now());
        let oldest = self
            .queue
            .oldest_received_ms()
            .ok()
            .flatten()
            .map(|received| now.saturating_sub(received) as f64 / 1000.0);
        let health = self.health.borrow().clone();
        let backing_off = health.backing_off_until_ms.filter(|&until| until > now);
        Status {
            up: true,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pending: counts.pending,
            stored_bytes: self.queue.stored_bytes(),
            oldest_call_age_seconds: oldest,
            accepted: counts.accepted,
            delivered: counts.delivered,
            dead: counts.dead,
            rejected: counts.rejected,
            upstream: UpstreamStatus {
                state: if backing_off.is_some() {
                    "backing_off"
                } else {
                    "healthy"
                }
                .into(),
                backing_off_until_ms: backing_off,
                last_error: health.last_error,
                last_error_at_ms: health.last_error_at_ms,
                last_delivery_at_ms: health.last_delivery_at_ms,
            },
        }
    }

    fn dead_list(&self, query: &str) -> Result<serde_json::Value, AdminError> {
        let mut reason = None;
        let mut limit = usize::MAX;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("reason", r)) => reason = Some(r.to_owned()),
                Some(("limit", n)) => {
                    limit = n.parse().map_err(|_| {
                        AdminError(
                            StatusCode::BAD_REQUEST,
                            "invalid_limit",
                            format!("limit {n:?} is not a number"),
                        )
                    })?
                }
                _ => {}
            }
        }
        let list: Vec<DeadSummary> = self
            .queue
            .dead_entries()
            .map_err(storage)?
            .into_iter()
            .filter(|(_, r)| reason.as_ref().is_none_or(|reason| r.reason == *reason))
            .take(limit)
            .map(|(id, r)| DeadSummary {
                id,
                message_id: serde_json::from_str::<serde_json::Value>(r.call.get())
                    .ok()
                    .and_then(|c| c["messageId"].as_str().map(str::to_owned)),
                write_key: key_prefix(&r.write_key),
                reason: r.reason,
                status: r.status,
                dead_at_ms: r.dead_at_ms,
            })
            .collect();
        to_json(&list)
    }

    /// The ids a selection names, checked to exist (explicit ids) or found (all, reason).
    fn select(&self, selection: &Selection) -> Result<Vec<u64>, AdminError> {
        let chosen = usize::from(!selection.ids.is_empty())
            + usize::from(selection.all)
            + usize::from(selection.reason.is_some());
        if chosen != 1 {
            return Err(AdminError(
                StatusCode::BAD_REQUEST,
                "invalid_selection",
                "name exactly one of: ids, all, reason".into(),
            ));
        }
        if !selection.ids.is_empty() {
            for &id in &selection.ids {
                if self.queue.dead_entry(id).map_err(storage)?.is_none() {
                    return Err(AdminError(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no dead letter {id}"),
                    ));
                }
            }
            return Ok(selection.ids.clone());
        }
        Ok(self
            .queue
            .dead_entries()
            .map_err(storage)?
            .into_iter()
            .filter(|(_, r)| {
                selection
                    .reason
                    .as_ref()
                    .is_none_or(|reason| r.reason == *reason)
            })
            .map(|(id, _)| id)
            .collect())
    }
}

/// A writeKey as the admin side shows it: its first four characters.
pub fn key_prefix(key: &str) -> String {
    let prefix: String = key.chars().take(4).collect();
    format!("{prefix}…")
}

fn masked(mut record: DeadRecord) -> DeadRecord {
    record.write_key = key_prefix(&record.write_key);
    record
}

async fn read_selection(req: Request<Incoming>) -> Result<Selection, AdminError> {
    let bytes = Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| {
            AdminError(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body could not be read: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        AdminError(
            StatusCode::BAD_REQUEST,
            "invalid_selection",
            format!("expected {{\"ids\":[..]}}, {{\"all\":true}} or {{\"reason\":\"..\"}}: {e}"),
        )
    })
}

fn parse_id(text: &str) -> Result<u64, AdminError> {
    text.parse().map_err(|_| {
        AdminError(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{text:?} is not a dead letter id"),
        )
    })
}

fn storage(e: crate::queue::QueueError) -> AdminError {
    AdminError(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_error",
        e.to_string(),
    )
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, AdminError> {
    serde_json::to_value(value)
        .map_err(|e| AdminError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).expect("JSON serializes"),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
