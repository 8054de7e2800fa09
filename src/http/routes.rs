//! Every path the API serves, what each is for, and the label it has in metrics.

use hyper::Method;

use crate::spec::{CallType, Endpoint};

/// What a request is for.
#[derive(Debug)]
pub enum Route {
    /// `GET /health`: the process answers.
    Health,
    /// `GET /ready`: new calls would be taken now.
    Ready,
    /// `GET /stats`: every call's fate, from the durable counters.
    Stats,
    /// `GET /metrics`: the Prometheus exposition.
    Metrics,
    /// `POST .../v1/{batch,import,identify,track,page,screen,group,alias}`: calls to queue.
    Calls(Endpoint),
    /// `/admin/...`: for the admin commands, local clients only.
    Admin(AdminRoute),
    NotFound,
}

/// The admin endpoints (see [`super::admin`]).
#[derive(Debug, PartialEq, Eq)]
pub enum AdminRoute {
    /// `GET /admin/status`
    Status,
    /// `GET /admin/dead?reason=R&limit=N`
    DeadList,
    /// `GET /admin/dead/ID`, the id as sent.
    DeadShow(String),
    /// `POST /admin/dead/replay` or `POST /admin/dead/purge`
    Dead(DeadAction),
    Unknown,
}

/// What an operator does to dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAction {
    /// Queue them again, same messageId.
    Replay,
    /// Delete them for good.
    Purge,
}

impl DeadAction {
    /// Its name in the path and in the answer: `replay` or `purge`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadAction::Replay => "replay",
            DeadAction::Purge => "purge",
        }
    }
}

impl Route {
    /// The route a request takes. Any prefix before `/v1/` is allowed: Node's client lets
    /// users set one (e.g. `/relay/v1/batch`).
    pub fn of(method: &Method, path: &str) -> Route {
        match path {
            "/health" => return Route::Health,
            "/stats" => return Route::Stats,
            "/ready" => return Route::Ready,
            "/metrics" => return Route::Metrics,
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/admin/") {
            return Route::Admin(AdminRoute::of(method, rest));
        }
        let mut segments = path.trim_end_matches('/').rsplit('/');
        match (segments.next(), segments.next()) {
            (Some(name), Some("v1")) => Endpoint::from_name(name)
                .map(Route::Calls)
                .unwrap_or(Route::NotFound),
            _ => Route::NotFound,
        }
    }

    /// The one method the route takes (the admin routes check their own).
    pub fn method(&self) -> Option<&'static str> {
        match self {
            Route::Health | Route::Ready | Route::Stats | Route::Metrics => Some("GET"),
            Route::Calls(_) => Some("POST"),
            Route::Admin(_) | Route::NotFound => None,
        }
    }

    /// The route as a metric label: a fixed set, whatever paths clients send.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Admin(_) => "/admin",
            Route::Health => "/health",
            Route::Ready => "/ready",
            Route::Stats => "/stats",
            Route::Metrics => "/metrics",
            Route::Calls(Endpoint::Batch) => "/v1/batch",
            Route::Calls(Endpoint::Single(t)) => match t {
                CallType::Identify => "/v1/identify",
                CallType::Track => "/v1/track",
                CallType::Page => "/v1/page",
                CallType::Screen => "/v1/screen",
                CallType::Group => "/v1/group",
                CallType::Alias => "/v1/alias",
            },
            Route::NotFound => "other",
        }
    }
}

impl AdminRoute {
    /// `rest` is the path after `/admin/`.
    fn of(method: &Method, rest: &str) -> AdminRoute {
        let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["status"]) => AdminRoute::Status,
            (&Method::GET, ["dead"]) => AdminRoute::DeadList,
            (&Method::GET, ["dead", id]) => AdminRoute::DeadShow((*id).to_owned()),
            (&Method::POST, ["dead", "replay"]) => AdminRoute::Dead(DeadAction::Replay),
            (&Method::POST, ["dead", "purge"]) => AdminRoute::Dead(DeadAction::Purge),
            _ => AdminRoute::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Route {
        Route::of(&Method::GET, path)
    }

    #[test]
    fn routes_take_any_prefix_before_v1() {
        assert!(matches!(get("/v1/batch"), Route::Calls(Endpoint::Batch)));
        assert!(matches!(
            get("/relay/v1/import"),
            Route::Calls(Endpoint::Batch)
        ));
        assert!(matches!(
            get("/v1/group"),
            Route::Calls(Endpoint::Single(CallType::Group))
        ));
        assert!(matches!(get("/v2/batch"), Route::NotFound));
        assert!(matches!(get("/v1/nope"), Route::NotFound));
        assert!(matches!(get("/health"), Route::Health));
        assert!(matches!(get("/stats"), Route::Stats));
    }

    #[test]
    fn admin_routes_go_by_method_and_path() {
        let admin = |method: Method, path: &str| match Route::of(&method, path) {
            Route::Admin(route) => route,
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(admin(Method::GET, "/admin/status"), AdminRoute::Status);
        assert_eq!(admin(Method::GET, "/admin/dead/"), AdminRoute::DeadList);
        assert_eq!(
            admin(Method::GET, "/admin/dead/7"),
            AdminRoute::DeadShow("7".into())
        );
        assert_eq!(
            admin(Method::POST, "/admin/dead/purge"),
            AdminRoute::Dead(DeadAction::Purge)
        );
        assert_eq!(admin(Method::POST, "/admin/status"), AdminRoute::Unknown);
    }
}
