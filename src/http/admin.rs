//! The admin endpoints under `/admin/`: the daemon's state and its dead letters, for the
//! `grouprelay status` and `grouprelay dead ...` commands ([`crate::admin`]).
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

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::answer::{json, Answer, ApiError};
use super::body;
use super::routes::{AdminRoute, DeadAction};
use crate::forward::UpstreamHealth;
use crate::queue::{DeadRecord, Queue, QueueError};
use crate::status::Status;

/// Most bytes of a replay or purge request's body.
const MAX_SELECTION_BYTES: usize = 1 << 20;

/// Which listener a request came in on; set by the server.
#[derive(Debug, Clone, Copy)]
pub enum Channel {
    /// A listener for calls: TCP or the calls' Unix socket.
    Calls,
    /// The admin socket; `operator`: the peer's credentials admit it.
    Admin { operator: bool },
}

/// Where the admin API answers, and who may use it: for the refusals to name them.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    pub socket: std::path::PathBuf,
    /// "run as root or as a member of GROUP".
    pub who_may: String,
}

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

/// The admin endpoints' state: the queue, the forwarder's view of upstream, and where they
/// answer.
pub struct Admin {
    queue: Queue,
    health: watch::Receiver<UpstreamHealth>,
    access: AdminAccess,
}

impl Admin {
    pub fn new(
        queue: Queue,
        health: watch::Receiver<UpstreamHealth>,
        access: AdminAccess,
    ) -> Admin {
        Admin {
            queue,
            health,
            access,
        }
    }

    /// Answers an `/admin/` request: only on the admin socket, and only to an operator.
    pub async fn handle(&self, route: AdminRoute, req: Request<Incoming>) -> Answer {
        let channel = req.extensions().get::<Channel>().copied();
        let refusal = match channel {
            Some(Channel::Admin { operator: true }) => None,
            Some(Channel::Admin { operator: false }) => Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_operator",
                format!("{} to use the admin API", self.access.who_may),
            )),
            _ => Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_not_here",
                format!(
                    "the admin API answers only on grouprelay's admin socket, {}",
                    self.access.socket.display()
                ),
            )),
        };
        if let Some(refusal) = refusal {
            body::discard(req).await;
            return refusal.answer();
        }
        let result = match route {
            AdminRoute::Status => {
                let health = self.health.borrow().clone();
                to_json(&Status::read(&self.queue, &health))
            }
            AdminRoute::DeadList => self.dead_list(req.uri().query().unwrap_or("")),
            AdminRoute::DeadShow(id) => self.dead_show(&id),
            AdminRoute::Dead(action) => self.dead_action(action, req).await,
            AdminRoute::Unknown => {
                let refusal = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "no such admin endpoint: {} {}",
                        req.method(),
                        req.uri().path().trim_end_matches('/')
                    ),
                );
                body::discard(req).await;
                Err(refusal)
            }
        };
        match result {
            Ok(body) => json(StatusCode::OK, &body),
            Err(error) => error.answer(),
        }
    }

    fn dead_show(&self, id: &str) -> Result<serde_json::Value, ApiError> {
        let id = parse_id(id)?;
        match self.queue.dead_entry(id).map_err(storage)? {
            Some(record) => to_json(&masked(record)),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter {id}"),
            )),
        }
    }

    /// Replays or purges the dead letters the request's body selects.
    async fn dead_action(
        &self,
        action: DeadAction,
        req: Request<Incoming>,
    ) -> Result<serde_json::Value, ApiError> {
        let selection = read_selection(req).await?;
        let ids = self.select(&selection)?;
        let done = match action {
            DeadAction::Replay => self.queue.replay_dead(&ids).await.map_err(storage)?,
            DeadAction::Purge => self.queue.purge_dead(&ids).map_err(storage)?,
        };
        let action = action.as_str();
        tracing::info!(
            calls = done,
            action,
            "operator request on dead letters done"
        );
        Ok(serde_json::json!({"success": true, action: done}))
    }

    fn dead_list(&self, query: &str) -> Result<serde_json::Value, ApiError> {
        let mut reason = None;
        let mut limit = usize::MAX;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("reason", r)) => reason = Some(r.to_owned()),
                Some(("limit", n)) => {
                    limit = n.parse().map_err(|_| {
                        ApiError::new(
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
    fn select(&self, selection: &Selection) -> Result<Vec<u64>, ApiError> {
        let chosen = usize::from(!selection.ids.is_empty())
            + usize::from(selection.all)
            + usize::from(selection.reason.is_some());
        if chosen != 1 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_selection",
                "name exactly one of: ids, all, reason",
            ));
        }
        if !selection.ids.is_empty() {
            for &id in &selection.ids {
                if self.queue.dead_entry(id).map_err(storage)?.is_none() {
                    return Err(ApiError::new(
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

async fn read_selection(req: Request<Incoming>) -> Result<Selection, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_SELECTION_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body could not be read: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_selection",
            format!("expected {{\"ids\":[..]}}, {{\"all\":true}} or {{\"reason\":\"..\"}}: {e}"),
        )
    })
}

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{text:?} is not a dead letter id"),
        )
    })
}

fn storage(e: QueueError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_error",
        e.to_string(),
    )
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}
