//! The HTTP application: what each route answers, and the state it reports.
//!
//! The routes know nothing about sockets or signals; they read [`Shared`],
//! which the server and the lifecycle update.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;

/// The longest `/slow` sleep; longer asks are a 400, so one request cannot
/// hold a drain for an hour.
pub const SLOW_MAX_MS: u64 = 60_000;

/// State shared by the routes, the server and the lifecycle.
#[derive(Debug)]
pub struct Shared {
    pub pid: u32,
    /// 0 for a process started fresh, +1 for each handover.
    pub generation: u32,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    connections: AtomicUsize,
}

impl Shared {
    pub fn new(pid: u32, generation: u32) -> Arc<Shared> {
        Arc::new(Shared {
            pid,
            generation,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Readiness turns 503 and every later response says `Connection: close`.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Counts one request until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> Counted {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Counted {
            shared: self.clone(),
            which: Which::Request,
        }
    }

    /// Counts one connection until the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> Counted {
        self.connections.fetch_add(1, Ordering::SeqCst);
        Counted {
            shared: self.clone(),
            which: Which::Connection,
        }
    }
}

#[derive(Debug)]
enum Which {
    Request,
    Connection,
}

/// Decrements its counter on drop, also when a request is cut.
#[derive(Debug)]
pub struct Counted {
    shared: Arc<Shared>,
    which: Which,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let c = match self.which {
            Which::Request => &self.shared.in_flight,
            Which::Connection => &self.shared.connections,
        };
        c.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/slow", get(slow))
        .with_state(shared)
}

fn handled_by(pid: u32) -> String {
    format!("OK. Handled by PID: {pid}\n")
}

async fn root(State(s): State<Arc<Shared>>) -> String {
    handled_by(s.pid)
}

#[derive(Serialize)]
struct Health {
    pid: u32,
    generation: u32,
    state: &'static str,
    in_flight: usize,
}

async fn healthz(State(s): State<Arc<Shared>>) -> Json<Health> {
    Json(Health {
        pid: s.pid,
        generation: s.generation,
        state: if s.is_draining() {
            "draining"
        } else {
            "serving"
        },
        in_flight: s.in_flight(),
    })
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn slow(State(s): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let ms = match q.get("ms").map(|v| v.parse::<u64>()) {
        Some(Ok(ms)) if ms <= SLOW_MAX_MS => ms,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                format!("ms must be a whole number from 0 to {SLOW_MAX_MS}\n"),
            )
                .into_response();
        }
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    handled_by(s.pid).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(shared: &Arc<Shared>, uri: &str) -> (StatusCode, String) {
        let resp = router(shared.clone())
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn root_names_the_pid() {
        let s = Shared::new(4242, 0);
        assert_eq!(
            get(&s, "/").await,
            (StatusCode::OK, "OK. Handled by PID: 4242\n".into())
        );
    }

    #[tokio::test]
    async fn readiness_follows_draining_and_health_stays_up() {
        let s = Shared::new(1, 3);
        assert_eq!(get(&s, "/readyz").await.0, StatusCode::OK);
        s.set_draining();
        assert_eq!(get(&s, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let (status, body) = get(&s, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["pid"], 1);
        assert_eq!(v["generation"], 3);
        assert_eq!(v["state"], "draining");
        assert_eq!(v["in_flight"], 0);
    }

    #[tokio::test]
    async fn slow_validates_its_parameter() {
        let s = Shared::new(9, 0);
        for bad in ["/slow", "/slow?ms=x", "/slow?ms=-1", "/slow?ms=60001"] {
            assert_eq!(get(&s, bad).await.0, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            get(&s, "/slow?ms=1").await,
            (StatusCode::OK, "OK. Handled by PID: 9\n".into())
        );
    }

    #[test]
    fn guards_count_down_on_drop() {
        let s = Shared::new(1, 0);
        let a = s.request_started();
        let b = s.connection_opened();
        assert_eq!((s.in_flight(), s.connections()), (1, 1));
        drop(a);
        drop(b);
        assert_eq!((s.in_flight(), s.connections()), (0, 0));
    }
}
