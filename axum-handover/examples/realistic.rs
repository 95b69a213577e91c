//! A service as axum apps are usually written, on axum-handover: state
//! shared by the handlers (`with_state`), the client's address
//! (`ConnectInfo`), a WebSocket, Server-Sent Events, a background task, a
//! middleware layer, and a counter of its own handed to the next process.
//! Each part says what it does at a reload, and why.
//!
//! ```sh
//! cargo run --example realistic -- 127.0.0.1:8080
//! realistic reload --pid <pid>          # or SIGHUP, SIGUSR2
//! ```
//! `/` answers `hello from PID <pid>`, `/you` the client's address,
//! `/stats` the requests served across generations; `/ws` says `pid N`
//! every second and echoes; `/events` streams `pid N` events with ids.
use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get};
use axum_handover::{Closing, Config, Generation, Hooks, Info, helper};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

/// What every handler shares: one `Arc`, cloned per request by axum.
struct Shared {
    pid: u32,
    info: Info,
    /// Requests this process served (counted by the middleware).
    served: AtomicU64,
    /// The previous generations' count, once it arrived.
    inherited: OnceCell<u64>,
}

impl Shared {
    /// Requests served by every generation so far. Waits for the previous
    /// one's count: the new process serves before the old one hands it.
    async fn total(&self) -> u64 {
        let inherited = self.inherited.get_or_init(|| async {
            let bytes = self.info.state_from_predecessor().await;
            // Bad bytes are logged and counted as none: the new process
            // owns the unit by then, and cannot refuse the state.
            bytes.map_or(0, |b| match <[u8; 8]>::try_from(b.as_slice()) {
                Ok(b) => u64::from_le_bytes(b),
                Err(_) => {
                    eprintln!("realistic: inherited state of {} bytes ignored", b.len());
                    0
                }
            })
        });
        inherited.await + self.served.load(Ordering::SeqCst)
    }
}

/// The hooks the library calls: here only the state for the successor.
struct App(Arc<Shared>);

impl Hooks for App {
    /// Taken once the new process owns the unit. An inherited count that
    /// never arrived (the previous process was still leaving) is not
    /// passed on, so that nothing is counted twice.
    fn save_state(&self) -> Option<Vec<u8>> {
        let s = &self.0;
        let total = s.inherited.get().copied().unwrap_or(0) + s.served.load(Ordering::SeqCst);
        Some(total.to_le_bytes().to_vec())
    }
}

/// How often `/ws` and `/events` say their PID.
const TICK: Duration = Duration::from_millis(250);

/// A layer around every route: counts requests and says which process
/// answered. Any tower layer works; connections that move to the next
/// process go through the next process's layers.
async fn count(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    s.served.fetch_add(1, Ordering::SeqCst);
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-pid", s.pid.into());
    resp
}

async fn hello(State(s): State<Arc<Shared>>) -> String {
    format!("hello from PID {}\n", s.pid)
}

/// The same on a connection moved from the previous process: the library
/// reads the peer from the socket.
async fn you(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    format!("{peer}\n")
}

async fn stats(State(s): State<Arc<Shared>>) -> String {
    format!("{}\n", s.total().await)
}

/// A WebSocket cannot move to the next process: at a reload `Closing`
/// resolves (each socket at its own moment within `Config::close_spread`,
/// so the clients do not all reconnect at once), and the socket closes
/// with 1012, Service Restart, which tells the client to reconnect.
async fn ws(State(s): State<Arc<Shared>>, closing: Closing, up: WebSocketUpgrade) -> Response {
    up.on_upgrade(move |socket| ws_session(socket, s.pid, closing))
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
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
            _ = &mut closing => break,
        }
    }
    let frame = CloseFrame {
        code: 1012,
        reason: "service restart".into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_ok() {
        // Wait (bounded: a client that stopped reading must not keep the
        // old process) for the client's answer to the close.
        let answer = async {
            while let Some(Ok(m)) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
    }
}

/// Server-Sent Events, ids counting on from the client's `Last-Event-ID`.
/// At a reload the stream ends cleanly on `Closing` (the server would end
/// it then anyway), and the `EventSource` reconnects, to the new process,
/// with the last id it saw: no event lost or repeated.
async fn events(closing: Closing, headers: HeaderMap) -> impl IntoResponse {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let next = last
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |l| l + 1);
    let pid = std::process::id();
    let stream = futures_util::stream::unfold(
        (next, tokio::time::interval(TICK)),
        move |(id, mut tick)| async move {
            tick.tick().await;
            let event = Event::default()
                .id(id.to_string())
                .retry(TICK)
                .data(format!("pid {pid}"));
            Some((Ok::<_, Infallible>(event), (id + 1, tick)))
        },
    );
    Sse::new(stream.take_until(closing.into_future()))
}

/// Background work (refreshing a cache, say) until the generation leaves:
/// at the handover, not when the old process exits, so that two processes
/// never do it side by side for longer than the probation.
async fn refresher(s: Arc<Shared>) {
    let mut ticks = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let leaving = s.info.leaving();
    tokio::pin!(leaving);
    let why = loop {
        tokio::select! {
            why = &mut leaving => break why,
            _ = tick.tick() => ticks += 1,
        }
    };
    eprintln!(
        "realistic: PID {} refresher stopped after {ticks} ticks: {why:?}",
        s.pid
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::new("realistic");
    // `realistic reload` and `realistic stop`, for ExecReload= and ExecStop=.
    if let Some(code) = helper::dispatch(&config, std::env::args()) {
        return code.into();
    }
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8080".into());
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("realistic: error: {addr:?} is not HOST:PORT");
        return ExitCode::from(64);
    };
    let generation = match Generation::take(&config, &[addr.into()]) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("realistic: error ({}): {e}", e.reason());
            return e.exit_code().into();
        }
    };
    let info = generation.info();
    let shared = Arc::new(Shared {
        pid: info.pid(),
        info: info.clone(),
        served: AtomicU64::new(0),
        inherited: OnceCell::new(),
    });
    let refresher = tokio::spawn(refresher(shared.clone()));
    let app = Router::new()
        .route("/", get(hello))
        .route("/you", get(you))
        .route("/stats", get(stats))
        .route("/ws", get(ws))
        .route("/events", get(events))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .with_state(shared.clone());
    let ended = generation.serve(app, App(shared)).await;
    // The refresher stops as soon as the generation leaves, which it has by
    // now: wait for it, or the runtime drops it unrun when `main` returns.
    let _ = refresher.await;
    eprintln!("realistic: PID {} ended: {ended:?}", info.pid());
    ended.exit_code().into()
}
