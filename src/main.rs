//! The `pid-server` binary: the reference app of the `axum-handover`
//! library. It parses the command line, reads the configuration file, takes
//! the sockets before the runtime starts, serves its routes, and maps how
//! that ended to the exit codes README.md documents (0, 1, 2, 3, 4, 64, 78).

mod app;
mod cli;
mod config_file;
mod logging;
mod metrics;

use std::process::ExitCode;

use axum_handover::{Generation, helper};
use cli::{Command, ServeArgs};

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Reload(a)) => {
            let reloaded = helper::reload(&cli::config(), a.pid, a.timeout);
            cli::helper_exit("reload", reloaded.map(|r| println!("{r}")))
        }
        Some(Command::Stop(a)) => cli::helper_exit("stop", helper::stop(a.pid, a.timeout)),
        Some(Command::CheckConfig(a)) => config_file::check(&a.config),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn serve(mut args: ServeArgs) -> ExitCode {
    // Before any socket is taken: a new generation with a broken file exits
    // here, and the reload that started it fails.
    let file = match args.read_config_file() {
        Ok(file) => file,
        Err(e) => return config_file::refuse(&e.to_string()),
    };
    let generation = match Generation::take(&args.config(), &args.listen) {
        Ok(g) => g,
        Err(e) => return cli::fail(&e.to_string(), e.exit_code()),
    };
    logging::init(std::process::id(), generation.number(), file.as_ref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return cli::fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    let routes = app::routes(
        generation.info(),
        file.map(Into::into),
        &generation.socket_names(),
    );
    let ended = runtime.block_on(generation.serve_sockets(routes, ()));
    // Do not wait for blocked tasks (a cut /slow request) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(ended.exit_code())
}
