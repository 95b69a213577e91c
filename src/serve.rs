//! `pid-server serve`: the configuration file, then the sockets (before
//! the runtime starts threads), logging, the runtime, and the library's
//! generation with pid-server's routes.

use std::process::ExitCode;

use std::sync::Arc;

use axum_handover::{Generation, Hooks};

use crate::cli::{self, ServeArgs};
use crate::stats::RouteStats;
use crate::{app, config_file, logging};

/// What pid-server adds to a generation's life: its request counts go to
/// the next generation.
struct AppHooks {
    stats: Arc<RouteStats>,
}

impl Hooks for AppHooks {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.stats.save())
    }
}

pub fn main(mut args: ServeArgs) -> ExitCode {
    // Before any socket is taken: a new generation with a broken file exits
    // here, and the reload that started it fails.
    let file = match args.read_config_file() {
        Ok(file) => file,
        Err(e) => return config_file::cannot_start(&e.to_string()),
    };
    // The certificate too: a renewed one is served from this generation on;
    // a broken one fails the reload that started us, with its path.
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(e) => return config_file::cannot_start(&e),
    };
    // The metrics socket's own slots, outside --max-connections: health
    // answers also when every client slot is taken.
    let config = args
        .config(tls)
        .socket_connections(app::METRICS_SOCKET, app::METRICS_CONNECTIONS);
    let mut generation = match Generation::take(&config, &args.listen) {
        Ok(g) => g,
        Err(e) => return cli::fail(&e.to_string(), e.exit_code()),
    };
    let serving = generation.local_addrs();
    if let Some(note) = args.unapplied(file.as_ref(), generation.sockets_inherited(), &serving) {
        generation.note(note);
    }
    logging::init(std::process::id(), generation.number(), file.as_ref());
    // Once per start, so that each generation of a unit still written with
    // the old words says so, but a long-lived process does not repeat it.
    let old_keys = file.iter().flat_map(|f| &f.old_keys);
    for warning in args.old_spellings().iter().chain(old_keys) {
        tracing::warn!(event = "old_spelling", "{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return cli::fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    let stats = Arc::new(RouteStats::new(app::ROUTES));
    let routes = app::routes(
        generation.info(),
        file.map(Into::into),
        stats.clone(),
        &generation.socket_names(),
    );
    // The previous generation's counts, added once they arrive (right
    // after this one takes over the unit).
    let inherited = generation.info().state_from_predecessor();
    let restoring = stats.clone();
    runtime.spawn(async move { restoring.restore(inherited.await.as_deref()) });
    let hooks = AppHooks { stats };
    let ended = runtime.block_on(generation.serve_sockets(routes, hooks));
    // Do not wait for blocked tasks (a cut /slow request) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(ended.exit_code())
}
