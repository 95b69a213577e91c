//! The command line (clap), resolved into [`Args`]: `--quick` changes the
//! defaults of the durations and counts, so those flags are optional here
//! and get their value in [`Flags::resolve`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use pid_server_test_support::deploy::Release;

use crate::load::Mode;
use crate::protocols::{PROTOCOLS, Proto};
use crate::servers::{MANIFEST_DIR, PID_SERVER};
use crate::strategies::STRATEGIES;

/// Failed requests and latency across restarts of pid-server, every
/// strategy side by side, then the steady state against Go and nginx
/// (benches/README.md explains every column).
#[derive(Parser, Debug)]
#[command(
    name = "restarts",
    override_usage = "cargo bench --bench restarts -- [OPTIONS]",
    disable_version_flag = true,
    // As before clap: a flag given twice takes the last value.
    args_override_self = true
)]
struct Flags {
    /// Restarts per strategy and client mode [default: 20; --quick: 3]
    #[arg(long, value_name = "N")]
    restarts: Option<u64>,

    /// Time between the starts of two restarts [default: 500; --quick: 400]
    #[arg(long, value_name = "MS")]
    spacing_ms: Option<u64>,

    /// Load before the first restart; what comes before the first
    /// restart's window is the run's own baseline [default: 2500; --quick:
    /// 1500]
    #[arg(long, value_name = "MS")]
    warmup_ms: Option<u64>,

    /// Load after the last restart [default: 1000; --quick: 500]
    #[arg(long, value_name = "MS")]
    settle_ms: Option<u64>,

    /// Concurrent connections of the load client
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,

    /// Threads of the load client
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    client_threads: u64,

    /// A request (connect, send, whole response) fails after this
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,

    /// "Around restarts": requests started within this of a restart
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    window_ms: u64,

    /// Steady-state load per server and client mode [default: 6; --quick: 1]
    #[arg(long, value_name = "S")]
    steady_secs: Option<u64>,

    /// The same in milliseconds (wins over --steady-secs)
    #[arg(long, value_name = "MS", hide = true)]
    steady_ms: Option<u64>,

    /// Time resolution of the JSON timeline and the picture
    #[arg(long, value_name = "MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    bucket_ms: u64,

    /// Comma-separated subset of naive-kill, naive-term,
    /// reuseport-migrate0, reuseport-migrate1, reload, systemd-restart,
    /// systemd-restart-no-store, systemd-reload, systemd-kill, nginx-reload
    /// [default: all]
    #[arg(long, value_name = "LIST", value_parser = strategy_list)]
    strategies: Option<List<String>>,

    /// Comma-separated client modes: keep-alive, one-shot, paused [default:
    /// all three]
    #[arg(long, value_name = "LIST", value_parser = mode_list)]
    modes: Option<List<Mode>>,

    /// Protocol rows (issue #15), comma-separated: h1, h2c, tls-h1, tls-h2,
    /// or none. Each but h1 runs across reloads (tls-h1 in every client
    /// mode of --modes; --quick without --modes: keep-alive only, and 2
    /// reloads unless --restarts); each runs in the steady state beside
    /// nginx with h2load [default: all four; --quick: h2c,tls-h1]
    #[arg(long, value_name = "LIST", value_parser = protocol_list)]
    protocols: Option<List<Proto>>,

    /// HTTP/2 connections of the protocol rows (h2c, tls-h2)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    h2_connections: u64,

    /// Concurrent streams per HTTP/2 connection
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    h2_streams: u64,

    /// Connections of the paused client mode (each mostly idle)
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    paused_clients: u64,

    /// Shortest idle time of a paused connection between two requests
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pause_min_ms: u64,

    /// Longest idle time of a paused connection between two requests
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pause_max_ms: u64,

    /// Seed of the paused clients' idle times
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Skip the steady-state comparison with Go and nginx
    #[arg(long)]
    no_compare: bool,

    /// Memory per idle keep-alive connection: comma-separated connection
    /// counts, each held by pid-server and nginx (one worker) in turn;
    /// empty for none [default: 1000,10000; --quick: 200, pid-server only]
    #[arg(long, value_name = "LIST", value_parser = count_list)]
    capacity: Option<List<usize>>,

    /// Only the capacity run: no restarts, no steady state
    #[arg(long)]
    capacity_only: bool,

    /// PID 1's cost of the file descriptor store: comma-separated counts of
    /// idle connections held across `systemctl restart` in the container,
    /// store on and off; empty for none [default: 1000,4000; --quick: none]
    #[arg(long, value_name = "LIST", value_parser = count_list)]
    fdstore_cost: Option<List<usize>>,

    /// Only the file descriptor store's cost (and the crash-safe mode's):
    /// no restarts, no steady state, no capacity run
    #[arg(long)]
    fdstore_cost_only: bool,

    /// PID 1 while serving in the crash-safe mode: comma-separated counts of
    /// paused keep-alive connections to pid-server in the container, mode
    /// off and on (PID_SERVER_FD_STORE_WHILE_IDLE=256, or N with
    /// FileDescriptorStoreMax=N+1 above 256); empty for none [default:
    /// 64,256; --quick: none]
    #[arg(long, value_name = "LIST", value_parser = count_list)]
    crash_safe_cost: Option<List<usize>>,

    /// The measured window of each --crash-safe-cost row
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    crash_safe_secs: u64,

    /// Boot the containers (the systemd strategies, the store's and the
    /// crash-safe mode's cost) from Debian N's debootstrap tree, the systemd
    /// suite's (12: systemd 252, 13: 257; made on first use), instead of
    /// the host's /usr [default: the host's /usr]
    #[arg(long, value_name = "N", value_parser = debian_release)]
    debian: Option<Release>,

    /// A short smoke run: 3 restarts each, 1 s steady state
    #[arg(long)]
    quick: bool,

    /// Exit 1 if `pid-server reload` failed a request of the keep-alive or
    /// one-shot clients (or ran with neither); paused clients are reported,
    /// not checked
    #[arg(long)]
    check: bool,

    /// Where restarts.json, restarts.svg and logs/ go [default: <target
    /// dir>/bench-results]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Instead of the strategies: N reloads under load with a census every
    /// 100, then --endurance-connections held across 20 reloads (see
    /// benches/restarts/endurance.rs)
    #[arg(long)]
    endurance: bool,

    /// Reloads of --endurance's first part
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    endurance_reloads: u64,

    /// Connections --endurance holds across 20 reloads
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    endurance_connections: u64,

    /// Passed by `cargo bench` to every `harness = false` target; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A comma-separated list, parsed as one value (blanks around the commas
/// and empty items are ignored).
#[derive(Debug, Clone)]
struct List<T>(Vec<T>);

fn strategy_list(v: &str) -> Result<List<String>, String> {
    items(v)
        .map(|s| {
            if STRATEGIES.contains(&s) {
                Ok(s.to_string())
            } else {
                Err(format!("unknown strategy {s:?}"))
            }
        })
        .collect::<Result<_, _>>()
        .map(List)
}

fn mode_list(v: &str) -> Result<List<Mode>, String> {
    items(v)
        .map(|m| match m {
            "keep-alive" | "keepalive" => Ok(Mode::KeepAlive),
            "one-shot" | "oneshot" => Ok(Mode::OneShot),
            "paused" => Ok(Mode::Paused),
            _ => Err(format!("unknown client mode {m:?}")),
        })
        .collect::<Result<_, _>>()
        .map(List)
}

fn count_list(v: &str) -> Result<List<usize>, String> {
    items(v)
        .map(|n| match n.parse::<usize>() {
            Ok(c) if (1..=100_000).contains(&c) => Ok(c),
            _ => Err(format!("{n:?} is not a connection count (1..=100000)")),
        })
        .collect::<Result<_, _>>()
        .map(List)
}

fn debian_release(v: &str) -> Result<Release, String> {
    Release::ALL
        .into_iter()
        .find(|r| r.debian().to_string() == v)
        .ok_or_else(|| format!("{v:?} is not a Debian release the tests know (12 or 13)"))
}

fn protocol_list(v: &str) -> Result<List<Proto>, String> {
    if v.trim() == "none" {
        return Ok(List(Vec::new()));
    }
    items(v)
        .map(|p| Proto::parse(p).ok_or_else(|| format!("unknown protocol {p:?}")))
        .collect::<Result<_, _>>()
        .map(List)
}

fn items(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Every setting of a bench run, defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) restarts: usize,
    pub(crate) spacing: Duration,
    pub(crate) warmup: Duration,
    pub(crate) settle: Duration,
    pub(crate) concurrency: usize,
    pub(crate) client_threads: usize,
    pub(crate) timeout: Duration,
    pub(crate) window: Duration,
    pub(crate) steady: Duration,
    pub(crate) bucket: Duration,
    pub(crate) strategies: Vec<String>,
    pub(crate) modes: Vec<Mode>,
    pub(crate) protocols: Vec<Proto>,
    /// Reloads per protocol row.
    pub(crate) protocol_reloads: usize,
    /// The client modes of the tls-h1 rows.
    pub(crate) protocol_modes: Vec<Mode>,
    pub(crate) h2_connections: usize,
    pub(crate) h2_streams: usize,
    pub(crate) paused_clients: usize,
    pub(crate) pause_min: Duration,
    pub(crate) pause_max: Duration,
    pub(crate) seed: u64,
    pub(crate) compare: bool,
    /// Connection counts of the capacity run (empty: none).
    pub(crate) capacity: Vec<usize>,
    /// Skip the restarts and the steady state.
    pub(crate) capacity_only: bool,
    /// Connection counts of the file descriptor store's cost (empty: none).
    pub(crate) fdstore_cost: Vec<usize>,
    /// Skip everything but the file descriptor store's cost.
    pub(crate) fdstore_cost_only: bool,
    /// Connection counts of the crash-safe mode's cost (empty: none).
    pub(crate) crash_safe_cost: Vec<usize>,
    /// The measured window of each of those rows.
    pub(crate) crash_safe_window: Duration,
    /// The containers' Debian tree (`None`: the host's `/usr`).
    pub(crate) debian: Option<Release>,
    pub(crate) quick: bool,
    pub(crate) check: bool,
    pub(crate) out: PathBuf,
    pub(crate) endurance: bool,
    pub(crate) endurance_reloads: usize,
    pub(crate) endurance_connections: usize,
}

impl Args {
    /// The load client's connections in `mode`.
    pub(crate) fn connections(&self, mode: Mode) -> usize {
        match mode {
            Mode::Paused => self.paused_clients,
            Mode::KeepAlive | Mode::OneShot => self.concurrency,
        }
    }
}

/// The flags, or exit 64 (`EX_USAGE`) with clap's message (`--help`: 0).
pub(crate) fn parse_or_exit() -> Args {
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 64 } else { 0 });
        }
    };
    match flags.resolve() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(64);
        }
    }
}

impl Flags {
    fn resolve(self) -> Result<Args, String> {
        let quick = self.quick;
        let pick = |v: Option<u64>, normal: u64, quick_v: u64| {
            v.unwrap_or(if quick { quick_v } else { normal })
        };
        let ms = |v: Option<u64>, normal: u64, quick_v: u64| {
            Duration::from_millis(pick(v, normal, quick_v))
        };
        // The tls-h1 rows: those of --modes, keep-alive alone in a quick run.
        let protocol_modes = match (&self.modes, quick) {
            (Some(l), _) => l.0.clone(),
            (None, true) => vec![Mode::KeepAlive],
            (None, false) => vec![Mode::KeepAlive, Mode::OneShot, Mode::Paused],
        };
        let args = Args {
            restarts: pick(self.restarts, 20, 3) as usize,
            spacing: ms(self.spacing_ms, 500, 400),
            warmup: ms(self.warmup_ms, 2500, 1500),
            settle: ms(self.settle_ms, 1000, 500),
            concurrency: self.concurrency as usize,
            client_threads: self.client_threads as usize,
            timeout: Duration::from_millis(self.timeout_ms),
            window: Duration::from_millis(self.window_ms),
            steady: match self.steady_ms {
                Some(v) => Duration::from_millis(v),
                None => Duration::from_secs(pick(self.steady_secs, 6, 1)),
            },
            bucket: Duration::from_millis(self.bucket_ms),
            strategies: self
                .strategies
                .map(|l| l.0)
                .unwrap_or_else(|| STRATEGIES.map(String::from).to_vec()),
            modes: self
                .modes
                .map(|l| l.0)
                .unwrap_or_else(|| vec![Mode::KeepAlive, Mode::OneShot, Mode::Paused]),
            protocols: self.protocols.map(|l| l.0).unwrap_or_else(|| {
                if quick {
                    vec![Proto::H2c, Proto::TlsH1]
                } else {
                    PROTOCOLS.to_vec()
                }
            }),
            protocol_reloads: pick(self.restarts, 20, 2) as usize,
            protocol_modes,
            h2_connections: self.h2_connections as usize,
            h2_streams: self.h2_streams as usize,
            paused_clients: self.paused_clients as usize,
            pause_min: Duration::from_millis(self.pause_min_ms),
            pause_max: Duration::from_millis(self.pause_max_ms),
            seed: self.seed,
            compare: !self.no_compare,
            capacity: self
                .capacity
                .map(|l| l.0)
                .unwrap_or_else(|| if quick { vec![200] } else { vec![1000, 10_000] }),
            capacity_only: self.capacity_only,
            fdstore_cost: self
                .fdstore_cost
                .map(|l| l.0)
                .unwrap_or_else(|| if quick { Vec::new() } else { vec![1000, 4000] }),
            fdstore_cost_only: self.fdstore_cost_only,
            crash_safe_cost: self
                .crash_safe_cost
                .map(|l| l.0)
                .unwrap_or_else(|| if quick { Vec::new() } else { vec![64, 256] }),
            crash_safe_window: Duration::from_secs(self.crash_safe_secs),
            debian: self.debian,
            quick,
            check: self.check,
            out: self
                .out
                .unwrap_or_else(|| target_dir().join("bench-results")),
            endurance: self.endurance,
            endurance_reloads: self.endurance_reloads as usize,
            endurance_connections: self.endurance_connections as usize,
        };
        if args.capacity_only && args.fdstore_cost_only {
            return Err("--capacity-only and --fdstore-cost-only: choose one".into());
        }
        if args.modes.is_empty() {
            return Err("--modes: no client mode".into());
        }
        if args.pause_min > args.pause_max {
            return Err("--pause-min-ms is above --pause-max-ms".into());
        }
        Ok(args)
    }
}

/// The target dir this bench was built in (`target/` by default): the
/// pid-server binary is `<target>/release/pid-server`.
fn target_dir() -> PathBuf {
    Path::new(PID_SERVER)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(MANIFEST_DIR).join("target"))
}
