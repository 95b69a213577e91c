//! An ordinary `#[tokio::main]` axum service, ported from `axum::serve`
//! (see "Porting from `axum::serve`" in the crate docs): a background task
//! that stops when the generation leaves, a readiness check that pings a
//! database, and SIGHUP kept for the app itself (SIGUSR2 and
//! `ported reload` swap the binary).
//!
//! ```sh
//! cargo run --example ported -- 127.0.0.1:8080 [DB_HOST:PORT [READY_TIMEOUT_SECS]]
//! ```
//! The "database" answers a connection with one byte; without one, the
//! check passes. `/slow` answers after two seconds.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::{Router, routing::get};
use axum_handover::{Config, Generation, Hooks, Leaving, ReadyCheck, SignalKind, helper};
use tokio::io::AsyncReadExt;

/// The app's readiness check: the database answers.
struct Db(Option<SocketAddr>);

impl Hooks for Db {
    fn check_ready_async(&self) -> ReadyCheck<'_> {
        Box::pin(async move {
            let Some(db) = self.0 else { return Ok(()) };
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
        .ready_timeout(Duration::from_secs(*secs.as_ref().unwrap_or(&30)));
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
    tokio::spawn(ticker(info.leaving()));
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
    let app = Router::new()
        .route(
            "/",
            get(move || async move { format!("hello from PID {pid}\n") }),
        )
        .route(
            "/slow",
            get(move || async move {
                eprintln!("ported: PID {pid} slow request started");
                tokio::time::sleep(Duration::from_secs(2)).await;
                format!("hello from PID {pid}\n")
            }),
        );
    let ended = generation.serve(app, Db(db)).await;
    eprintln!("ported: PID {pid} ended: {ended:?}");
    ended.exit_code().into()
}
