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
        (Some(Command::Serve(args)), Some((_, sub))) => {
            args.given = Given::of(sub);
            args.take_old_spellings(sub)?;
        }
        (None, _) => {
            cli.serve.given = Given::of(&matches);
            cli.serve.take_old_spellings(&matches)?;
        }
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

    /// Seconds a new process may take to become ready during a reload before
    /// it is killed and the old one keeps serving. (Formerly
    /// --upgrade-timeout and PID_SERVER_UPGRADE_TIMEOUT, which still work.)
    #[arg(
        long,
        value_name = "SECS",
        env = "PID_SERVER_RELOAD_TIMEOUT",
        default_value = "30",
        value_parser = parse_secs
    )]
    pub reload_timeout: Duration,

    /// The first spelling of --reload-timeout (see [`RENAMED`]).
    #[arg(
        long = "upgrade-timeout",
        value_name = "SECS",
        env = "PID_SERVER_UPGRADE_TIMEOUT",
        hide = true,
        value_parser = parse_secs
    )]
    upgrade_timeout: Option<Duration>,

    /// During a reload, how long the new process serves beside the old one
    /// before taking over; it must stay alive through it, or the old process
    /// stops it and keeps the unit. (Formerly --upgrade-probation-ms and
    /// PID_SERVER_UPGRADE_PROBATION_MS, which still work.)
    #[arg(
        long = "reload-probation-ms",
        value_name = "MS",
        env = "PID_SERVER_RELOAD_PROBATION_MS",
        default_value = "250",
        value_parser = parse_ms
    )]
    pub reload_probation: Duration,

    /// The first spelling of --reload-probation-ms (see [`RENAMED`]).
    #[arg(
        long = "upgrade-probation-ms",
        value_name = "MS",
        env = "PID_SERVER_UPGRADE_PROBATION_MS",
        hide = true,
        value_parser = parse_ms
    )]
    upgrade_probation: Option<Duration>,

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

    /// One line for each old spelling this command line or environment
    /// used (see [`RENAMED`]), to log once at start.
    #[arg(skip)]
    old_spellings: Vec<String>,
}

/// A setting whose flag, environment variable and file key said `upgrade`
/// before they said `reload`, the word for what an operator asks for.
///
/// The old spellings work forever, hidden: a reload starts the new process
/// with the old one's arguments and environment, so a unit written for an
/// older release must keep working with this one, and one written for this
/// release must keep working when an operator rolls back, which is why a
/// unit should keep the old spelling until no release older than this one
/// can be reloaded into.
pub struct Renamed {
    /// The clap ids (the fields' names) of the new and the old argument.
    pub id: &'static str,
    pub old_id: &'static str,
    pub flag: &'static str,
    pub old_flag: &'static str,
    pub env: &'static str,
    pub old_env: &'static str,
    pub key: &'static str,
    pub old_key: &'static str,
    /// The value of the new argument, and what the old one gave.
    fields: fn(&mut ServeArgs) -> (&mut Duration, &mut Option<Duration>),
}

fn reload_timeout(a: &mut ServeArgs) -> (&mut Duration, &mut Option<Duration>) {
    (&mut a.reload_timeout, &mut a.upgrade_timeout)
}

fn reload_probation(a: &mut ServeArgs) -> (&mut Duration, &mut Option<Duration>) {
    (&mut a.reload_probation, &mut a.upgrade_probation)
}

pub const RENAMED: [Renamed; 2] = [
    Renamed {
        id: "reload_timeout",
        old_id: "upgrade_timeout",
        flag: "--reload-timeout",
        old_flag: "--upgrade-timeout",
        env: "PID_SERVER_RELOAD_TIMEOUT",
        old_env: "PID_SERVER_UPGRADE_TIMEOUT",
        key: "reload_timeout",
        old_key: "upgrade_timeout",
        fields: reload_timeout,
    },
    Renamed {
        id: "reload_probation",
        old_id: "upgrade_probation",
        flag: "--reload-probation-ms",
        old_flag: "--upgrade-probation-ms",
        env: "PID_SERVER_RELOAD_PROBATION_MS",
        old_env: "PID_SERVER_UPGRADE_PROBATION_MS",
        key: "reload_probation_ms",
        old_key: "upgrade_probation_ms",
        fields: reload_probation,
    },
];

/// The warning an old spelling is worth, once per start.
pub fn old_spelling_warning(old: &str, new: &str) -> String {
    format!(
        "`{old}` is now `{new}`; the old name still works (and is the only one a release \
         before the rename knows: keep it while you may roll back to one)"
    )
}

/// What to do with a renamed setting, from where its new and its old
/// spelling came from.
#[derive(Debug, PartialEq, Eq)]
enum Spelling {
    /// The old spelling is absent, or beaten (a flag beats the environment).
    New,
    /// The old spelling gives the value, from the command line or the
    /// environment.
    Old(ValueSource),
    /// Both from the same place: which is meant cannot be told.
    Both(ValueSource),
}

fn spelling(new: Option<ValueSource>, old: Option<ValueSource>) -> Spelling {
    use ValueSource::{CommandLine, EnvVariable};
    match (new, old) {
        (_, None) => Spelling::New,
        (Some(CommandLine), Some(CommandLine)) => Spelling::Both(CommandLine),
        (Some(EnvVariable), Some(EnvVariable)) => Spelling::Both(EnvVariable),
        (Some(CommandLine), Some(EnvVariable)) => Spelling::New,
        (_, Some(old)) => Spelling::Old(old),
    }
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
    /// Takes each renamed setting's value from its old spelling where that
    /// gave it, noting a warning; both spellings from the same place are a
    /// bad command line.
    fn take_old_spellings(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for r in &RENAMED {
            let (value, old_value) = (r.fields)(self);
            let old_value = old_value.take();
            let value = *value;
            // The spellings as the operator wrote them: flags or variables.
            let names = |source| match source {
                ValueSource::CommandLine => (r.old_flag, r.flag),
                _ => (r.old_env, r.env),
            };
            match spelling(matches.value_source(r.id), matches.value_source(r.old_id)) {
                Spelling::New => {}
                Spelling::Both(source) => {
                    let (old, new) = names(source);
                    return Err(clap::Error::raw(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("`{old}` and `{new}` are one setting: give only `{new}`\n"),
                    ));
                }
                Spelling::Old(source) => {
                    let (old, new) = names(source);
                    self.old_spellings.push(old_spelling_warning(old, new));
                    // Given, so the file does not override it.
                    self.given.0.insert(r.id.to_string());
                    *(r.fields)(self).0 = old_value.unwrap_or(value);
                }
            }
        }
        Ok(())
    }

    /// The warnings for the old spellings the command line or the
    /// environment used, one line each.
    pub fn old_spellings(&self) -> &[String] {
        &self.old_spellings
    }

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
            reload_timeout,
            reload_probation,
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
            reload_timeout,
            reload_probation,
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
            .reload_timeout(self.reload_timeout)
            .probation(self.reload_probation)
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

    fn serve_args(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = parse_from(argv)?;
        Ok(match cli.command {
            Some(Command::Serve(args)) => args,
            _ => cli.serve,
        })
    }

    #[test]
    fn an_old_flag_still_sets_its_setting_and_warns_once() {
        for argv in [
            &["pid-server", "--upgrade-timeout", "7"][..],
            &["pid-server", "serve", "--upgrade-timeout", "7"][..],
        ] {
            let mut args = serve_args(argv).unwrap();
            assert_eq!(args.reload_timeout, Duration::from_secs(7), "{argv:?}");
            assert_eq!(args.old_spellings().len(), 1, "{:?}", args.old_spellings());
            assert!(
                args.old_spellings()[0].starts_with(
                    "`--upgrade-timeout` is now `--reload-timeout`; the old name still works"
                ),
                "{:?}",
                args.old_spellings()
            );
            // Given on the command line: the file does not override it.
            args.fill_from(FileSettings {
                reload_timeout: Some(Duration::from_secs(9)),
                ..FileSettings::default()
            });
            assert_eq!(args.reload_timeout, Duration::from_secs(7));
        }
        let args = serve_args(&["pid-server", "--upgrade-probation-ms", "0"]).unwrap();
        assert_eq!(args.reload_probation, Duration::ZERO);
        assert_eq!(args.old_spellings().len(), 1);
        // The new spelling is not warned about; the old one's value is
        // checked as the new one's is.
        let args = serve_args(&["pid-server", "--reload-timeout", "7"]).unwrap();
        assert_eq!(args.reload_timeout, Duration::from_secs(7));
        assert!(args.old_spellings().is_empty());
        assert!(serve_args(&["pid-server", "--upgrade-timeout", "0"]).is_err());
    }

    #[test]
    fn both_spellings_at_once_is_a_bad_command_line() {
        let e = serve_args(&[
            "pid-server",
            "--upgrade-timeout",
            "7",
            "--reload-timeout",
            "8",
        ])
        .unwrap_err();
        let text = e.render().to_string();
        assert_eq!(
            text.lines().next(),
            Some(
                "error: `--upgrade-timeout` and `--reload-timeout` are one setting: give only \
                 `--reload-timeout`"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_flag_beats_the_environment_whichever_spelling_each_has() {
        use ValueSource::{CommandLine, DefaultValue, EnvVariable};
        let cases = [
            ((Some(DefaultValue), None), Spelling::New),
            ((Some(CommandLine), None), Spelling::New),
            (
                (Some(DefaultValue), Some(CommandLine)),
                Spelling::Old(CommandLine),
            ),
            (
                (Some(DefaultValue), Some(EnvVariable)),
                Spelling::Old(EnvVariable),
            ),
            (
                (Some(EnvVariable), Some(CommandLine)),
                Spelling::Old(CommandLine),
            ),
            ((Some(CommandLine), Some(EnvVariable)), Spelling::New),
            (
                (Some(CommandLine), Some(CommandLine)),
                Spelling::Both(CommandLine),
            ),
            (
                (Some(EnvVariable), Some(EnvVariable)),
                Spelling::Both(EnvVariable),
            ),
        ];
        for ((new, old), expected) in cases {
            assert_eq!(spelling(new, old), expected, "{new:?} {old:?}");
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
