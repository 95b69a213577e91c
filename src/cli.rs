//! The command line: `pid-server [serve]`, `pid-server reload`,
//! `pid-server stop`, `pid-server check-config`.
//!
//! Every `serve` flag can also come from the environment, so a unit file or a
//! container can configure the service without editing `ExecStart=`, and
//! from the configuration file (`--config`, see `config_file`), which a
//! reload rereads. A flag beats the environment, which beats the file, which
//! beats the default. A new generation started by a handover gets the same
//! arguments and environment as the old one, so only the file can change
//! what it serves with.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum_handover::{Config, ListenAddr, Tls};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config_file::{self, FileSettings};

/// The handover settings every subcommand shares: the name from which the
/// control socket (`@pid-server/<pid>/control`), the environment prefix
/// (`PID_SERVER_`) and the process name the reload helper looks for derive.
pub fn config() -> Config {
    Config::new("pid-server")
}

/// One error line for `serve`, and its exit code.
pub fn fail(msg: &str, code: u8) -> ExitCode {
    eprintln!("pid-server: error: {msg}");
    ExitCode::from(code)
}

/// A helper's outcome: its error on stderr, its exit code.
pub fn helper_exit(
    verb: &str,
    outcome: Result<(), axum_handover::helper::HelperError>,
) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pid-server {verb}: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses the command line. A bad one is one line on stderr and exit 64
/// (`--help` and `--version` print and exit 0).
pub fn parse() -> Result<Cli, ExitCode> {
    match parse_from(std::env::args_os()) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            // One line, not clap's usage block: operators read this in
            // `systemctl status`.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("pid-server: error: {first} (see --help)");
            Err(ExitCode::from(64))
        }
    }
}

/// Parses `args`, and notes for `serve` which settings a flag or the
/// environment gave (the file may not override those).
fn parse_from(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    match (&mut cli.command, matches.subcommand()) {
        (Some(Command::Serve(args)), Some((_, sub))) => args.given = Given::of(sub),
        (None, _) => cli.serve.given = Given::of(&matches),
        _ => {}
    }
    Ok(cli)
}

#[derive(Debug, Parser)]
#[command(
    name = "pid-server",
    version,
    about = "An HTTP service that answers with the PID that handled the request, \
             and swaps its own binary with zero failed requests.",
    long_about = "An HTTP service that answers with the PID that handled the request, \
             and swaps its own binary with zero failed requests.\n\n\
             Under systemd it takes its listening sockets from pid-server.socket (socket \
             activation). `systemctl reload pid-server` runs `pid-server reload --pid \
             $MAINPID`, which asks the running process to start its binary again on the same \
             sockets; once the new process is ready it owns the unit, idle keep-alive \
             connections move to it, and the old process finishes its requests and exits. \
             No request fails, and a freshly installed binary takes over. When the new \
             process does not come up, the old one keeps serving and the reload fails with \
             the reason.\n\n\
             `systemctl stop pid-server` runs `pid-server stop`, which sends SIGTERM to the \
             main process and waits until every generation has drained and exited.",
    after_help = "Without a subcommand, pid-server runs `serve`.",
    after_long_help = after_long_help(),
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The exit codes and what each means, for `--help` and the man page
/// (the book's exit-codes page says the same, by command).
pub const EXIT_STATUS: &[(u8, &str)] = &[
    (
        0,
        "success: drained and exited, or handed over; reloaded; stopped",
    ),
    (
        1,
        "serve could not start (a port in use, an inherited fd that is not a listening \
         socket); the reload failed, and the old process keeps serving; stop left processes \
         after its timeout",
    ),
    (2, "a second SIGTERM or SIGINT cut the drain short"),
    (3, "reload: no pid-server with that PID"),
    (
        4,
        "reload: the server refused (another reload is under way, it is busy or shutting \
         down, or the request was over its cap)",
    ),
    (
        64,
        "a bad flag or environment value (LISTEN_FDS, LISTEN_PID, a handover variable whose \
         fd is not the parent's channel)",
    ),
    (
        76,
        "reload: another process holds that PID's control socket; nothing was sent to it",
    ),
    (
        77,
        "reload: permission denied (neither the server's user nor root)",
    ),
    (
        78,
        "a bad configuration file, or a TLS certificate or key that is missing, unreadable, \
         not a regular file, over 1 MiB or broken (one line naming the file), or only one of \
         --tls-cert and --tls-key",
    ),
];

/// `--help`'s last part: the default subcommand and the exit codes.
fn after_long_help() -> String {
    let mut s = String::from("Without a subcommand, pid-server runs `serve`.\n\nExit status:\n");
    for (code, meaning) in EXIT_STATUS {
        s.push_str(&format!("  {code:>2}  {meaning}\n"));
    }
    s
}

// Made once per process, at start: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default).
    Serve(ServeArgs),
    /// Ask a running pid-server to hand its sockets to a new process, and wait
    /// for the outcome. This is what `systemctl reload` runs.
    Reload(ReloadArgs),
    /// SIGTERM the main process and wait until every generation has drained
    /// and exited. This is what `ExecStop=` runs.
    Stop(StopArgs),
    /// Check a configuration file without serving: prints `PATH: ok`, or
    /// `PATH:LINE: what is wrong` and exits 78.
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    // (`help =` rather than a doc comment: rustdoc would read `[IPV6]` as a link.)
    #[arg(
        help = "Address to listen on: HOST:PORT, [IPV6]:PORT or unix:/path. Repeat for \
                several. Ignored when systemd passes sockets (LISTEN_FDS).",
        long = "listen",
        value_name = "ADDR",
        env = "PID_SERVER_LISTEN",
        value_delimiter = ',',
        default_value = "0.0.0.0:8080",
        value_parser = parse_listen
    )]
    pub listen: Vec<ListenAddr>,

    /// A TOML file with any of these settings (keys: the long flag names
    /// with `_` for `-`). Read at every start, so a reload applies a
    /// changed file; a flag or an environment variable beats it.
    #[arg(
        long = "config",
        value_name = "PATH",
        env = "PID_SERVER_CONFIG",
        value_parser = clap::value_parser!(PathBuf)
    )]
    pub config_file: Option<PathBuf>,

    /// Seconds to let in-flight requests finish when stopping; what is still
    /// running then is cut.
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_DRAIN_TIMEOUT",
        default_value = "30",
        value_parser = parse_secs
    )]
    pub drain_timeout: Duration,

    /// Seconds a new process may take to become ready during a handover before
    /// it is killed and the old one keeps serving.
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_UPGRADE_TIMEOUT",
        default_value = "30",
        value_parser = parse_secs
    )]
    pub upgrade_timeout: Duration,

    /// During a handover, how long the new process serves beside the old one
    /// before taking over; it must stay alive through it, or the old process
    /// stops it and keeps the unit.
    #[arg(
        long = "upgrade-probation-ms",
        value_name = "MS",
        env = "PID_SERVER_UPGRADE_PROBATION_MS",
        default_value = "250",
        value_parser = parse_ms
    )]
    pub upgrade_probation: Duration,

    /// Seconds an idle keep-alive connection is kept, advertised to clients
    /// as `Keep-Alive: timeout=N` (at most the header timeout less one). An
    /// idle connection is closed a second later; a stop's drain closes none
    /// sooner. A reload closes none: it moves them to the new process.
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_KEEP_ALIVE_TIMEOUT",
        default_value = "5",
        value_parser = parse_secs
    )]
    pub keep_alive_timeout: Duration,

    /// While draining without a successor (a stop, or a reload to a release
    /// that cannot take connections), close a keep-alive connection once it
    /// has been idle this many milliseconds instead of the keep-alive timeout
    /// plus one second. Shorter stops sooner, but races with clients that
    /// reuse a connection after a pause.
    #[arg(
        long = "idle-grace-ms",
        value_name = "MS",
        env = "PID_SERVER_IDLE_GRACE_MS",
        value_parser = parse_ms
    )]
    pub idle_grace: Option<Duration>,

    /// At a reload or a stop, the window (in milliseconds) over which the
    /// old process asks its WebSockets and event streams to end (close
    /// 1012, end of stream), each at its own random moment, so that their
    /// clients do not all reconnect to the new process at once. 0: all at
    /// once. The old process lives up to this long after a handover when it
    /// has such exchanges; at most the drain timeout less two seconds.
    #[arg(
        long = "close-spread-ms",
        value_name = "MS",
        env = "PID_SERVER_CLOSE_SPREAD_MS",
        default_value = "5000",
        value_parser = parse_ms
    )]
    pub close_spread: Duration,

    /// Seconds a client has to send a request's headers; a slower one is
    /// disconnected (slowloris).
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_HEADER_TIMEOUT",
        default_value = "10",
        value_parser = parse_secs
    )]
    pub header_timeout: Duration,

    /// Most connections served at once; further ones wait in the kernel's
    /// accept queue.
    #[arg(
        long,
        value_name = "N",
        env = "PID_SERVER_MAX_CONNECTIONS",
        default_value = "10000",
        value_parser = parse_max_connections
    )]
    pub max_connections: u32,

    /// Seconds an HTTP/2 connection's responses may wait on a client that
    /// does not open its flow-control window (does not read) before the
    /// connection is closed and counted. Any progress starts the wait anew,
    /// so a slow reader is not cut.
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_HTTP2_STALL_TIMEOUT",
        default_value = "20",
        value_parser = parse_secs
    )]
    pub http2_stall_timeout: Duration,

    /// Most HTTP/2 responses held at once (being made, or waiting on a
    /// client's window); past it new HTTP/2 requests get an empty 503.
    #[arg(
        long,
        value_name = "N",
        env = "PID_SERVER_HTTP2_MAX_HELD_RESPONSES",
        default_value = "10000",
        value_parser = parse_max_connections
    )]
    pub http2_max_held_responses: u32,

    /// At a stop, idle keep-alive connections left in systemd's file
    /// descriptor store (at most this many), for the next start to serve:
    /// `systemctl restart` then closes none. 0: off. The unit needs
    /// `FileDescriptorStoreMax=` of at least N.
    #[arg(
        long,
        value_name = "N",
        env = "PID_SERVER_FD_STORE_CONNECTIONS",
        default_value = "0",
        value_parser = parse_count
    )]
    pub fd_store_connections: u32,

    /// The crash-safe mode: also while serving, keep up to N connections
    /// idle for a second in systemd's file descriptor store until their next
    /// request, so a process that dies (SIGKILL, OOM, a panic) leaves its
    /// idle connections to the next start. 0: off. The unit needs
    /// `FileDescriptorStoreMax=` of at least N+1. Costs PID 1 two messages
    /// per idle spell of each connection.
    #[arg(
        long,
        value_name = "N",
        env = "PID_SERVER_FD_STORE_WHILE_IDLE",
        default_value = "0",
        value_parser = parse_count
    )]
    pub fd_store_while_idle: u32,

    /// A PEM certificate chain (certbot's `fullchain.pem`): serve TLS on
    /// every socket, HTTP/2 or HTTP/1.1 by ALPN. Needs --tls-key. Read at
    /// every start, so a reload serves a renewed certificate.
    #[arg(
        long,
        value_name = "PATH",
        env = "PID_SERVER_TLS_CERT",
        value_parser = clap::value_parser!(PathBuf)
    )]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert (certbot's `privkey.pem`).
    #[arg(
        long,
        value_name = "PATH",
        env = "PID_SERVER_TLS_KEY",
        value_parser = clap::value_parser!(PathBuf)
    )]
    pub tls_key: Option<PathBuf>,

    /// The settings a flag or the environment gave.
    #[arg(skip)]
    given: Given,
}

/// The ids of the settings a flag or an environment variable gave, as
/// opposed to a default.
#[derive(Debug, Clone, Default)]
struct Given(BTreeSet<String>);

impl Given {
    fn of(matches: &ArgMatches) -> Given {
        let given = matches.ids().map(|id| id.as_str()).filter(|id| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        });
        Given(given.map(str::to_string).collect())
    }
}

impl ServeArgs {
    /// What was asked for but cannot apply: `listen` when the sockets are
    /// inherited (from systemd, or from the previous generation on a
    /// reload), which only a restart (or the socket unit) changes.
    pub fn unapplied(
        &self,
        file: Option<&config_file::ConfigFile>,
        sockets_inherited: bool,
        serving: &[String],
    ) -> Option<String> {
        let from = if self.given.0.contains("listen") {
            "--listen or PID_SERVER_LISTEN".to_string()
        } else {
            let f = file.filter(|f| f.settings.listen.is_some())?;
            format!("{}", f.path.display())
        };
        let addrs: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        if !sockets_inherited || addrs == serving {
            return None;
        }
        Some(format!(
            "listen = {} (from {from}) is not applied: the sockets are inherited; \
             change the socket unit, or restart to bind them",
            addrs.join(", ")
        ))
    }

    /// Reads the configuration file, if one is named, and takes from it
    /// every setting that no flag or environment variable gave. Returns the
    /// file as read, for `/healthz`.
    pub fn read_config_file(
        &mut self,
    ) -> Result<Option<config_file::ConfigFile>, config_file::Error> {
        let Some(path) = &self.config_file else {
            return Ok(None);
        };
        let file = config_file::read(path)?;
        self.fill_from(file.settings.clone());
        Ok(Some(file))
    }

    /// Takes each setting of `file` that no flag or environment variable
    /// gave.
    fn fill_from(&mut self, file: FileSettings) {
        // Destructured, so that a new setting cannot be forgotten here.
        let FileSettings {
            listen,
            drain_timeout,
            upgrade_timeout,
            upgrade_probation,
            header_timeout,
            keep_alive_timeout,
            idle_grace,
            close_spread,
            max_connections,
            http2_stall_timeout,
            http2_max_held_responses,
            fd_store_connections,
            fd_store_while_idle,
            tls_cert,
            tls_key,
        } = file;
        let given = &self.given.0;
        // A setting's clap id is its field's name.
        macro_rules! fill {
            ($($field:ident),*) => {$(
                if let Some(v) = $field
                    && !given.contains(stringify!($field))
                {
                    self.$field = v;
                }
            )*};
        }
        fill!(
            listen,
            drain_timeout,
            upgrade_timeout,
            upgrade_probation,
            header_timeout,
            keep_alive_timeout,
            close_spread,
            max_connections,
            http2_stall_timeout,
            http2_max_held_responses,
            fd_store_connections,
            fd_store_while_idle
        );
        let idle_grace = idle_grace.map(Some);
        let tls_cert = tls_cert.map(Some);
        let tls_key = tls_key.map(Some);
        fill!(idle_grace, tls_cert, tls_key);
    }

    /// The certificate and key, read now (each generation reads them anew
    /// when it starts). `Err`: the one line to print, naming the file; a
    /// configuration error (exit 78).
    pub fn tls(&self) -> Result<Option<Tls>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Tls::from_pem_files(cert, key)
                .map(Some)
                .map_err(|e| e.to_string()),
            (Some(_), None) => Err(
                "tls_cert (--tls-cert) is set without tls_key (--tls-key): set both or neither"
                    .into(),
            ),
            (None, Some(_)) => Err(
                "tls_key (--tls-key) is set without tls_cert (--tls-cert): set both or neither"
                    .into(),
            ),
        }
    }

    /// The handover settings these flags ask for, serving `tls` when given.
    pub fn config(&self, tls: Option<Tls>) -> Config {
        let mut c = config()
            .drain_timeout(self.drain_timeout)
            .ready_timeout(self.upgrade_timeout)
            .probation(self.upgrade_probation)
            .keep_alive_timeout(self.keep_alive_timeout)
            .close_spread(self.close_spread)
            .header_read_timeout(self.header_timeout)
            .max_connections(self.max_connections as usize)
            .http2_stall_timeout(self.http2_stall_timeout)
            .http2_max_held_responses(self.http2_max_held_responses as usize)
            .fd_store_connections(self.fd_store_connections as usize)
            .fd_store_while_idle(self.fd_store_while_idle as usize);
        if let Some(tls) = tls {
            c = c.tls(tls);
        }
        match self.idle_grace {
            Some(g) => c.idle_grace(g),
            None => c,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    /// The running pid-server to replace. systemd passes it as $MAINPID.
    /// Without it, the only pid-server of this user is used. The outcome is
    /// one line: `reloaded: OLD -> NEW (generation G) in MS ms; N
    /// connections moved, F fell back; old process done D ms after the
    /// handover`.
    #[arg(long, value_name = "PID", env = "MAINPID")]
    pub pid: Option<u32>,

    /// Seconds to wait for the outcome.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// The main process; systemd sets $MAINPID for `ExecStop=`. Without it
    /// (the main process already gone), only wait for the rest of the unit.
    #[arg(long, value_name = "PID", env = "MAINPID")]
    pub pid: Option<u32>,

    /// Seconds to wait; keep it below the unit's TimeoutStopSec=.
    #[arg(long, value_name = "SECS", default_value = "40", value_parser = parse_secs)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct CheckConfigArgs {
    /// The file to check.
    #[arg(
        long,
        value_name = "PATH",
        env = "PID_SERVER_CONFIG",
        default_value = config_file::PACKAGED_PATH
    )]
    pub config: PathBuf,
}

// The parsers of the values, shared by the flags, the environment and the
// configuration file, so that each is checked the same way wherever it
// comes from.

pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    s.parse()
}

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".into()),
        Ok(n) if n <= 24 * 3600 => Ok(Duration::from_secs(n)),
        Ok(_) => Err("must be at most 86400 seconds".into()),
        Err(_) => Err(format!("`{s}` is not a whole number of seconds")),
    }
}

pub fn parse_ms(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n <= 60_000 => Ok(Duration::from_millis(n)),
        Ok(_) => Err("must be at most 60000 ms".into()),
        Err(_) => Err(format!("`{s}` is not a whole number of milliseconds")),
    }
}

/// A number of things, 0 included.
pub fn parse_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) => Ok(n),
        Err(_) if s.trim().parse::<u64>().is_ok() => Err(format!("must be at most {}", u32::MAX)),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

pub fn parse_max_connections(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) if s.trim().parse::<u64>().is_ok() => Err(format!("must be at most {}", u32::MAX)),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_means_serve_with_defaults() {
        let cli = Cli::try_parse_from(["pid-server"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.drain_timeout, Duration::from_secs(30));
        assert_eq!(cli.serve.listen.len(), 1);
        assert_eq!(cli.serve.listen[0].to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn serve_takes_repeated_listen_flags() {
        let cli = Cli::try_parse_from([
            "pid-server",
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "unix:/tmp/x.sock",
            "--drain-timeout",
            "5",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.listen.len(), 2);
        assert_eq!(args.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn drain_timeout_must_be_positive() {
        for bad in ["0", "-1", "abc", "1.5"] {
            assert!(
                Cli::try_parse_from(["pid-server", "--drain-timeout", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn the_file_fills_only_what_no_flag_gave() {
        let file = FileSettings {
            listen: Some(vec!["127.0.0.1:2".parse().unwrap()]),
            drain_timeout: Some(Duration::from_secs(7)),
            keep_alive_timeout: Some(Duration::from_secs(3)),
            idle_grace: Some(Duration::from_millis(9)),
            close_spread: Some(Duration::from_millis(700)),
            ..FileSettings::default()
        };
        for argv in [
            &["pid-server", "--drain-timeout", "5"][..],
            &["pid-server", "serve", "--drain-timeout", "5"][..],
        ] {
            let cli = parse_from(argv).unwrap();
            let mut args = match cli.command {
                Some(Command::Serve(args)) => args,
                _ => cli.serve,
            };
            args.fill_from(file.clone());
            // The flag wins; the file beats the defaults.
            assert_eq!(args.drain_timeout, Duration::from_secs(5), "{argv:?}");
            assert_eq!(args.keep_alive_timeout, Duration::from_secs(3));
            assert_eq!(args.idle_grace, Some(Duration::from_millis(9)));
            assert_eq!(args.close_spread, Duration::from_millis(700));
            assert_eq!(args.listen, file.listen.clone().unwrap());
            // What neither sets keeps its default.
            assert_eq!(args.header_timeout, Duration::from_secs(10));
        }
    }
}
