//! The smallest service with zero-downtime reloads: answers `hello from PID
//! <pid>` and swaps its own binary on SIGHUP, SIGUSR2 or `hello reload`.
//!
//! ```sh
//! cargo run --example hello -- 127.0.0.1:8080      # or a socket from systemd
//! kill -HUP <pid>                                  # or: hello reload --pid <pid>
//! ```
use std::process::ExitCode;

use axum::{Router, routing::get};
use axum_handover::{Config, Generation, helper};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::new("hello");
    // `hello reload` and `hello stop`, for ExecReload= and ExecStop=.
    if let Some(code) = helper::dispatch(&config, std::env::args()) {
        return code.into();
    }
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8080".into());
    let Ok(addr) = addr.parse() else {
        eprintln!("hello: error: {addr:?} is not HOST:PORT");
        return ExitCode::from(64);
    };
    // The sockets systemd (LISTEN_FDS) or the previous generation passed,
    // else `addr` bound here.
    let generation = match Generation::take(&config, &[addr]) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("hello: error: {e}");
            return e.exit_code().into();
        }
    };
    let pid = std::process::id();
    let app = Router::new().route(
        "/",
        get(move || async move { format!("hello from PID {pid}\n") }),
    );
    generation.serve(app, ()).await.exit_code().into()
}
