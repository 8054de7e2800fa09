//! The HTTP API, as Segment's Tracking API looks to its clients, plus the operators'
//! endpoints: one [`Api`] answers every request on every listener.
//!
//! | file | what it is |
//! |---|---|
//! | `routes.rs` | every path, what it is for, the method it takes, its metric label |
//! | `ingest.rs` | the call path: writeKey, body, [`crate::spec`], the queue, then 200 |
//! | `body.rs` | a body read within its limit; gzip decoded without inflating past it |
//! | `observe.rs` | `/health`, `/ready`, `/stats`, `/metrics` |
//! | `admin.rs` | `/admin/`: status and dead letters, on the admin socket only, for operators |
//! | `answer.rs` | every JSON answer, and the one shape of an error |
//!
//! A request's way: [`Api::handle`] refuses oversized headers, finds the [`Route`], checks
//! its method, hands it to the part that serves it, and counts the answer in `/metrics`.
//! Every refusal, wherever it is made, is an [`answer::ApiError`]: a JSON body
//! `{"success":false,"code":...,"message":...}` with the status the official clients treat
//! correctly (`docs/http-api.md`, "Responses").

pub mod admin;
pub mod answer;
pub mod body;
pub mod ingest;
pub mod observe;
pub mod routes;

use std::convert::Infallible;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tokio::sync::watch;

use crate::forward::UpstreamHealth;
use crate::metrics::{metrics, RequestLabels};
use crate::queue::Queue;
use crate::status::Status;
use admin::Admin;
pub use admin::{AdminAccess, Channel};
use answer::{method_not_allowed, Answer, ApiError};
use ingest::{Ingest, IngestSettings};
pub use routes::Route;

/// Most bytes of request headers (names and values); real clients send well under 1 KiB.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The request handler, shared by every connection.
pub struct Api {
    queue: Queue,
    health: watch::Receiver<UpstreamHealth>,
    ingest: Ingest,
    admin: Admin,
}

impl Api {
    pub fn new(
        queue: Queue,
        settings: IngestSettings,
        health: watch::Receiver<UpstreamHealth>,
        admin: AdminAccess,
    ) -> Api {
        Api {
            ingest: Ingest::new(queue.clone(), settings),
            admin: Admin::new(queue.clone(), health.clone(), admin),
            queue,
            health,
        }
    }

    /// Answers one request. Never fails: every error becomes a JSON answer.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Answer, Infallible> {
        let started = Instant::now();
        let route = Route::of(req.method(), req.uri().path());
        let label = route.label();
        let is_call = matches!(route, Route::Calls(_));
        let answer = self.answer(route, req).await;
        let metrics = metrics();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                path: label,
                status: answer.status().as_u16(),
            })
            .inc();
        if is_call {
            metrics
                .ingest_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(answer)
    }

    async fn answer(&self, route: Route, req: Request<Incoming>) -> Answer {
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            return ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request headers take {header_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"),
            )
            .answer();
        }
        if let Some(allowed) = route.method() {
            // HEAD is GET without the body (hyper leaves the body out).
            let method = req.method().as_str();
            if method != allowed && !(allowed == "GET" && method == "HEAD") {
                body::discard(req).await;
                return method_not_allowed(allowed);
            }
        }
        match route {
            Route::Health => observe::health(),
            Route::Ready => observe::ready(&self.queue),
            Route::Stats => observe::stats(&self.status()),
            Route::Metrics => observe::metrics_exposition(&self.status()),
            Route::Calls(endpoint) => self.ingest.handle(endpoint, req).await,
            Route::Admin(route) => self.admin.handle(route, req).await,
            Route::NotFound => {
                let refusal = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no such endpoint: {}", req.uri().path()),
                );
                body::discard(req).await;
                refusal.answer()
            }
        }
    }

    fn status(&self) -> Status {
        let health = self.health.borrow().clone();
        Status::read(&self.queue, &health)
    }
}
