//! The HTTP application: what each route answers, and the state it reports.
//!
//! The routes know nothing about sockets or signals; they read what the
//! library says about the generation serving them ([`Info`]), and which
//! configuration file the process read ([`ConfigFileId`]).

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum_handover::{Closing, Info};
use serde::Serialize;
use tokio::net::unix::UCred;

use crate::config_file::ConfigFile;
use crate::stats::{CountLayer, RouteStats};

/// The longest `/slow` sleep; longer asks are a 400, so one request cannot
/// hold a drain for an hour.
pub const SLOW_MAX_MS: u64 = 60_000;

/// What the routes report about the generation serving them: the
/// library's [`Info`] in the binary, a stand-in in tests.
pub trait GenerationView: Clone + Send + Sync + 'static {
    fn pid(&self) -> u32;
    /// 0 for a process started fresh, +1 for each handover.
    fn generation(&self) -> u32;
    fn is_draining(&self) -> bool;
    fn in_flight(&self) -> usize;
    /// What `/metrics` shows.
    fn metrics(&self) -> axum_handover::Metrics;
}

impl GenerationView for Info {
    fn pid(&self) -> u32 {
        Info::pid(self)
    }
    fn generation(&self) -> u32 {
        Info::generation(self)
    }
    fn is_draining(&self) -> bool {
        Info::is_draining(self)
    }
    fn in_flight(&self) -> usize {
        Info::in_flight(self)
    }
    fn metrics(&self) -> axum_handover::Metrics {
        Info::metrics(self)
    }
}

/// The configuration file the process runs with, as `/healthz` shows it:
/// after a reload, the digest tells which version of the file the new
/// process read.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigFileId {
    pub path: String,
    pub sha256: String,
}

impl From<ConfigFile> for ConfigFileId {
    fn from(f: ConfigFile) -> ConfigFileId {
        ConfigFileId {
            path: f.path.display().to_string(),
            sha256: f.sha256,
        }
    }
}

/// What every route may read, behind one `Arc`: axum clones the state for
/// each request (the route's service, then the `State` extractor), and a
/// clone of the fields themselves would be five reference counts, each an
/// atomic add and subtract on a cache line that every worker thread
/// touches.
struct App<G>(Arc<AppData<G>>);

struct AppData<G> {
    generation: G,
    /// `/`'s answer, made once: the PID is this process's for its whole
    /// life, and a `format!` per request was an allocation and ~200 of the
    /// ~17 300 instructions a keep-alive request cost (callgrind).
    root: axum::body::Bytes,
    /// `None` without a configuration file.
    config: Option<ConfigFileId>,
    /// Requests per route, handed from generation to generation.
    stats: Arc<RouteStats>,
}

impl<G> Clone for App<G> {
    fn clone(&self) -> App<G> {
        App(self.0.clone())
    }
}

impl<G> std::ops::Deref for App<G> {
    type Target = AppData<G>;

    fn deref(&self) -> &AppData<G> {
        &self.0
    }
}

/// Every route's pattern, each counted for `/stats` by a counter of its
/// own ([`RouteStats::new`]); a route missing here is still counted, in a
/// map behind a lock.
pub const ROUTES: &[&str] = &[
    "/", "/healthz", "/readyz", "/slow", "/ws", "/events", "/peer", "/metrics", "/stats",
];

/// The routes but `/metrics`.
fn app_routes<G: GenerationView>() -> Router<App<G>> {
    Router::new()
        .route("/", get(root::<G>))
        .route("/healthz", get(healthz::<G>))
        .route("/readyz", get(readyz::<G>))
        .route("/slow", get(slow::<G>))
        .route("/ws", get(ws::<G>))
        .route("/events", get(events::<G>))
        .route("/peer", get(peer))
}

/// `/metrics` and `/stats`: the operator's.
fn with_metrics<G: GenerationView>(r: Router<App<G>>) -> Router<App<G>> {
    r.route("/metrics", get(metrics::<G>))
        .route("/stats", get(stats::<G>))
}

fn counted<G: GenerationView>(r: Router<App<G>>, state: &App<G>) -> Router {
    r.route_layer(CountLayer(state.stats.clone()))
        .with_state(state.clone())
}

/// The name of the socket that, when systemd passes one
/// (`FileDescriptorName=metrics`), serves `/metrics` and the health routes
/// (`/healthz`, `/readyz`) and nothing else; the other sockets then do not
/// serve `/metrics`. It has connection slots of its own
/// ([`METRICS_CONNECTIONS`]), so operators see health also when every
/// client slot is taken.
pub const METRICS_SOCKET: &str = "metrics";

/// The metrics socket's own connections, outside `--max-connections`: a
/// few scrapers and probes, each on a kept connection or a new one per
/// probe.
pub const METRICS_CONNECTIONS: usize = 16;

/// What an operator's socket serves: metrics and health.
fn operator_routes<G: GenerationView>() -> Router<App<G>> {
    with_metrics(Router::new())
        .route("/healthz", get(healthz::<G>))
        .route("/readyz", get(readyz::<G>))
}

/// What a socket serves, by its name: everything, or with a socket of its
/// own for `/metrics`, that and the health routes there and the rest
/// elsewhere.
pub fn routes<G: GenerationView>(
    generation: G,
    config: Option<ConfigFileId>,
    stats: Arc<RouteStats>,
    sockets: &[String],
) -> impl Fn(&str) -> Router + Send + use<G> {
    let split = sockets.iter().any(|s| s == METRICS_SOCKET);
    let state = App::new(generation, config, stats);
    let all = counted(with_metrics(app_routes()), &state);
    let app = counted(app_routes(), &state);
    let metrics_only = counted(operator_routes(), &state);
    move |socket: &str| match (split, socket == METRICS_SOCKET) {
        (false, _) => all.clone(),
        (true, true) => metrics_only.clone(),
        (true, false) => app.clone(),
    }
}

impl<G: GenerationView> App<G> {
    fn new(generation: G, config: Option<ConfigFileId>, stats: Arc<RouteStats>) -> App<G> {
        App(Arc::new(AppData {
            root: handled_by(generation.pid()).into(),
            generation,
            config,
            stats,
        }))
    }
}

/// Prometheus' text format (version 0.0.4).
async fn metrics<G: GenerationView>(State(s): State<App<G>>) -> Response {
    let body = crate::metrics::render(s.generation.metrics());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
struct Stats {
    pid: u32,
    generation: u32,
    #[serde(flatten)]
    stats: crate::stats::Snapshot,
}

/// Requests per route since the first generation (this request included),
/// and whether the previous generation's counts are in yet.
async fn stats<G: GenerationView>(State(s): State<App<G>>) -> Json<Stats> {
    Json(Stats {
        pid: s.generation.pid(),
        generation: s.generation.generation(),
        stats: s.stats.snapshot(),
    })
}

fn handled_by(pid: u32) -> String {
    format!("OK. Handled by PID: {pid}\n")
}

impl<G> AppData<G> {
    /// "Handled by PID", `/`'s answer and `/slow`'s: the same type as a
    /// `String` answer gets, and no copy of the body.
    fn handled(&self) -> Response {
        let text = axum::http::HeaderValue::from_static("text/plain; charset=utf-8");
        (
            [(axum::http::header::CONTENT_TYPE, text)],
            self.root.clone(),
        )
            .into_response()
    }
}

async fn root<G: GenerationView>(State(s): State<App<G>>) -> Response {
    s.handled()
}

#[derive(Serialize)]
struct Health {
    pid: u32,
    generation: u32,
    state: &'static str,
    in_flight: usize,
    config: Option<ConfigFileId>,
}

async fn healthz<G: GenerationView>(State(s): State<App<G>>) -> Json<Health> {
    let g = &s.generation;
    Json(Health {
        pid: g.pid(),
        generation: g.generation(),
        state: if g.is_draining() {
            "draining"
        } else {
            "serving"
        },
        in_flight: g.in_flight(),
        config: s.config.clone(),
    })
}

async fn readyz<G: GenerationView>(State(s): State<App<G>>) -> Response {
    if s.generation.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn slow<G: GenerationView>(
    State(s): State<App<G>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
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
    s.handled()
}

/// The client's address as the server sees it (`ConnectInfo`): the same on
/// a connection kept across a reload. On a Unix socket, the client
/// process's credentials instead.
async fn peer(req: axum::extract::Request) -> Response {
    let ext = req.extensions();
    if let Some(ConnectInfo(addr)) = ext.get::<ConnectInfo<SocketAddr>>() {
        return format!("{addr}\n").into_response();
    }
    if let Some(ConnectInfo(cred)) = ext.get::<ConnectInfo<UCred>>() {
        let pid = cred.pid().map_or("?".to_string(), |p| p.to_string());
        return format!("pid {pid} uid {} gid {}\n", cred.uid(), cred.gid()).into_response();
    }
    (StatusCode::NOT_FOUND, "peer unknown\n").into_response()
}

/// How often `/ws` and `/events` say their PID.
const TICK: Duration = Duration::from_secs(1);

/// How long `/ws` waits for the client's answer to its close.
const CLOSE_ANSWER: Duration = Duration::from_secs(2);

/// WebSocket close code 1012: the service restarts; the client may
/// reconnect (to the new process).
const SERVICE_RESTART: u16 = 1012;

/// A WebSocket that says `pid N` every second and echoes what it gets.
/// When the server asks it to end (a reload or a stop), it closes with
/// 1012 (Service Restart), and the client reconnects to the new process.
async fn ws<G: GenerationView>(
    State(s): State<App<G>>,
    closing: Closing,
    upgrade: WebSocketUpgrade,
) -> Response {
    let pid = s.generation.pid();
    upgrade.on_upgrade(move |socket| ws_session(socket, pid, closing))
}

async fn ws_session(mut socket: WebSocket, pid: u32, closing: Closing) {
    let mut tick = tokio::time::interval(TICK);
    let closing = closing.into_future();
    tokio::pin!(closing);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if socket.send(Message::Text(format!("pid {pid}").into())).await.is_err() {
                    return;
                }
            }
            got = socket.recv() => match got {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    if socket.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Closed by the client (the library answers its close), or gone.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
            _ = &mut closing => break,
        }
    }
    let frame = CloseFrame {
        code: SERVICE_RESTART,
        reason: "service restart".into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    // The client's close answer ends the session, or two seconds without
    // one (a client that stopped reading must not hold the old process).
    let answer = async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_ANSWER, answer).await;
}

/// Server-Sent Events: `pid N` every second, each with its `id:` (counting
/// on from the client's `Last-Event-ID`) and a `retry:` of a second. At a
/// reload the server ends the stream, and the `EventSource` resumes from
/// the new process with no event lost or repeated.
async fn events<G: GenerationView>(State(s): State<App<G>>, headers: HeaderMap) -> Response {
    let next = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |last| last + 1);
    let pid = s.generation.pid();
    let stream = futures_util::stream::unfold(
        (next, tokio::time::interval(TICK)),
        move |(id, mut tick)| async move {
            tick.tick().await;
            let event = Event::default()
                .id(id.to_string())
                .retry(TICK)
                .data(format!("pid {pid}"));
            Some((Ok::<_, std::convert::Infallible>(event), (id + 1, tick)))
        },
    );
    Sse::new(stream).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower::ServiceExt;

    /// A generation that is not serving anything.
    #[derive(Clone)]
    struct Shared {
        pid: u32,
        generation: u32,
        draining: Arc<AtomicBool>,
    }

    impl Shared {
        fn new(pid: u32, generation: u32) -> Shared {
            Shared {
                pid,
                generation,
                draining: Arc::default(),
            }
        }
        fn set_draining(&self) {
            self.draining.store(true, Ordering::SeqCst);
        }
    }

    impl GenerationView for Shared {
        fn pid(&self) -> u32 {
            self.pid
        }
        fn generation(&self) -> u32 {
            self.generation
        }
        fn is_draining(&self) -> bool {
            self.draining.load(Ordering::SeqCst)
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn metrics(&self) -> axum_handover::Metrics {
            // Non-exhaustive: built from the default, what is checked set.
            let mut handover = axum_handover::Histogram::default();
            handover.buckets = vec![(0.1, 0), (0.5, 2)];
            handover.sum = 0.5;
            handover.count = 2;
            let mut m = axum_handover::Metrics::default();
            m.generation = self.generation;
            m.requests = vec![(200, 7), (404, 1)];
            m.connections = 1;
            m.reloads_ok = 2;
            m.reloads_failed = 1;
            m.handover_seconds = handover;
            m.connections_moved = 20;
            m.tls_handshake_failures = 3;
            m.http2_held_responses = 4;
            m.http2_stalled_connections = 5;
            m.http2_refused_streams = 6;
            m
        }
    }

    async fn get(shared: &Shared, uri: &str) -> (StatusCode, String) {
        get_with(shared, None, uri).await
    }

    async fn get_with(
        shared: &Shared,
        config: Option<ConfigFileId>,
        uri: &str,
    ) -> (StatusCode, String) {
        let resp = routes(shared.clone(), config, Arc::default(), &[])("http")
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Each pattern in `ROUTES` is one the app serves (a missing one would
    /// be counted behind a lock, a stale one never), and each request is
    /// counted once, by its route's own counter.
    #[tokio::test]
    async fn every_listed_route_is_served_and_counted() {
        let stats = Arc::new(RouteStats::new(ROUTES));
        let app = routes(Shared::new(1, 0), None, stats.clone(), &[])("http");
        for route in ROUTES {
            let uri = if *route == "/slow" {
                "/slow?ms=0"
            } else {
                route
            };
            // `/peer` answers 404 to a request without its peer.
            let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1)));
            let req = Request::get(uri).extension(peer).body(Body::empty());
            let resp = app.clone().oneshot(req.unwrap()).await.unwrap();
            assert_ne!(resp.status(), StatusCode::NOT_FOUND, "{route}");
        }
        let want: std::collections::BTreeMap<String, u64> =
            ROUTES.iter().map(|r| (r.to_string(), 1)).collect();
        assert_eq!(stats.snapshot().requests, want);
        // An unknown path matches no route and is not counted.
        let req = Request::get("/nowhere").body(Body::empty()).unwrap();
        assert_eq!(
            app.oneshot(req).await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(stats.snapshot().requests, want);
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
        assert!(v["config"].is_null(), "{v}");
    }

    #[tokio::test]
    async fn health_names_the_configuration_file() {
        let id = ConfigFileId {
            path: "/etc/pid-server/pid-server.toml".into(),
            sha256: "ab".repeat(32),
        };
        let (_, body) = get_with(&Shared::new(1, 0), Some(id), "/healthz").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["config"],
            serde_json::json!({"path": "/etc/pid-server/pid-server.toml", "sha256": "ab".repeat(32)})
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let (status, body) = get(&Shared::new(1, 3), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for line in [
            "# TYPE pid_server_requests_total counter",
            "pid_server_requests_total{status=\"200\"} 7",
            "pid_server_reloads_total{result=\"ok\"} 2",
            "pid_server_reloads_total{result=\"failed\"} 1",
            "pid_server_connections_moved_total 20",
            "pid_server_generation 3",
            "pid_server_http2_held_responses 4",
            "pid_server_http2_stalled_connections_total 5",
            "pid_server_http2_refused_streams_total 6",
            "pid_server_handover_duration_seconds_bucket{le=\"0.1\"} 0",
            "pid_server_handover_duration_seconds_bucket{le=\"0.5\"} 2",
            "pid_server_handover_duration_seconds_bucket{le=\"+Inf\"} 2",
            "pid_server_handover_duration_seconds_count 2",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
        }
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
}
