//! The `pid-server` binary: parse the command line, run, map to an exit code.
//! Everything else lives in the library (see its `# Layout`).

use clap::Parser;
use pid_server::cli::{Cli, Command};
use pid_server::{ExitCode, reload, serve_main, stop};

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::Ok.into();
        }
        Err(e) => {
            // One line, not clap's usage block: operators read this in
            // `systemctl status`.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("pid-server: error: {first} (see --help)");
            return ExitCode::Usage.into();
        }
    };
    match cli.command {
        Some(Command::Reload(args)) => reload::main(&args),
        Some(Command::Stop(args)) => stop::main(&args),
        Some(Command::Serve(args)) => serve_main(&args),
        None => serve_main(&cli.serve),
    }
    .into()
}
