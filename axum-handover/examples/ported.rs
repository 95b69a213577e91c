//! An ordinary `#[tokio::main]` axum service, ported from `axum::serve`
//! (see "Porting from `axum::serve`" in the crate docs): a background task
//! that stops when the generation leaves, a readiness check that pings a
//! database, a hit counter handed to the next generation, and SIGHUP kept
//! for the app itself (SIGUSR2 and `ported reload` swap the binary).
//!
//! ```sh
//! cargo run --example ported -- 127.0.0.1:8080 [DB_HOST:PORT [READY_TIMEOUT_SECS]]
//! ```
//! The "database" answers a connection with one byte; without one, the
//! check passes. `/slow` answers after two seconds; `/hits` says how many
//! times `/` answered, across generations.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::{Router, routing::get};
use axum_handover::{Config, Generation, Hooks, Leaving, ReadyCheck, SignalKind, helper};
use tokio::io::AsyncReadExt;

/// The app's hooks: the readiness check (the database answers), and the
/// hit counter for the next generation.
struct App {
    db: Option<SocketAddr>,
    hits: Arc<Hits>,
}

/// `/` hits: this generation's, and the previous generations' once they
/// arrived.
#[derive(Default)]
struct Hits {
    own: AtomicU64,
    inherited: tokio::sync::OnceCell<u64>,
}

impl Hits {
    /// Every hit so far, once the previous generation's are known.
    async fn total(&self, info: &axum_handover::Info) -> u64 {
        let inherited = self
            .inherited
            .get_or_init(|| async {
                match info.state_from_predecessor().await {
                    None => 0,
                    Some(b) => <[u8; 8]>::try_from(b.as_slice()).map_or_else(
                        |_| {
                            eprintln!("ported: inherited state of {} bytes ignored", b.len());
                            0
                        },
                        u64::from_le_bytes,
                    ),
                }
            })
            .await;
        self.own.load(Ordering::SeqCst) + inherited
    }
}

impl Hooks for App {
    fn save_state(&self) -> Option<Vec<u8>> {
        // Inherited ones that never arrived (the previous generation was
        // still leaving) are not ours to count.
        let inherited = self.hits.inherited.get().copied().unwrap_or(0);
        let total = self.hits.own.load(Ordering::SeqCst) + inherited;
        Some(total.to_le_bytes().to_vec())
    }

    fn check_ready_async(&self) -> ReadyCheck<'_> {
        Box::pin(async move {
            let Some(db) = self.db else { return Ok(()) };
            let fail = |e: std::io::Error| format!("database {db}: {e}");
            let mut s = tokio::net::TcpStream::connect(db).await.map_err(fail)?;
            s.read_exact(&mut [0u8]).await.map_err(fail)?;
            Ok(())
        })
    }
}

/// The app's own background work, until the generation leaves.
async fn ticker(leaving: impl Future<Output = Leaving>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let work = async {
        loop {
            tick.tick().await;
        }
    };
    tokio::select! {
        why = leaving => eprintln!("ported: PID {} ticker ended: {why:?}", std::process::id()),
        _ = work => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (addr, db, secs) = (args.next(), args.next(), args.next());
    let addr: Option<SocketAddr> = addr.unwrap_or("127.0.0.1:8080".into()).parse().ok();
    let db = db.map(|d| d.parse::<SocketAddr>());
    let secs = secs.map_or(Ok(30), |s| s.parse::<u64>());
    let config = Config::new("ported")
        .reload_signals(&[SignalKind::user_defined2()])
        .reload_timeout(Duration::from_secs(*secs.as_ref().unwrap_or(&30)));
    if let Some(code) = helper::dispatch(&config, std::env::args()) {
        return code.into();
    }
    let (Some(addr), Ok(db), Ok(_)) = (addr, db.transpose(), &secs) else {
        eprintln!("ported: error: usage: ported HOST:PORT [DB_HOST:PORT [READY_TIMEOUT_SECS]]");
        return ExitCode::from(64);
    };
    let generation = match Generation::take(&config, &[addr.into()]) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("ported: error ({}): {e}", e.reason());
            return e.exit_code().into();
        }
    };
    let info = generation.info();
    let ticker = tokio::spawn(ticker(info.leaving()));
    // SIGHUP is the app's: the library leaves it alone.
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).expect("a SIGHUP handler");
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            eprintln!(
                "ported: PID {} SIGHUP: rereading my settings",
                std::process::id()
            );
        }
    });
    let pid = info.pid();
    let hits = Arc::new(Hits::default());
    // The previous generation's hits, as soon as they arrive.
    let (h, i) = (hits.clone(), info.clone());
    tokio::spawn(async move { h.total(&i).await });
    let (h, h2) = (hits.clone(), hits.clone());
    let app = Router::new()
        .route(
            "/",
            get(move || {
                h.own.fetch_add(1, Ordering::SeqCst);
                async move { format!("hello from PID {pid}\n") }
            }),
        )
        .route(
            "/hits",
            get(move || {
                let (h, info) = (h2.clone(), info.clone());
                async move { format!("{}\n", h.total(&info).await) }
            }),
        )
        .route(
            "/slow",
            get(move || async move {
                eprintln!("ported: PID {pid} slow request started");
                tokio::time::sleep(Duration::from_secs(2)).await;
                format!("hello from PID {pid}\n")
            }),
        );
    let ended = generation.serve(app, App { db, hits }).await;
    // The app's own task ends as soon as the generation leaves, which it
    // has by now; wait for it: once `main` returns, the runtime drops the
    // tasks it has not run yet (a stop with nothing in flight returns here
    // within a millisecond of SIGTERM).
    let _ = ticker.await;
    eprintln!("ported: PID {pid} ended: {ended:?}");
    ended.exit_code().into()
}
