//! The command line, resolved into [`Args`] (`--quick` changes the
//! defaults).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::load::Mode;
use crate::servers::{MANIFEST_DIR, PID_SERVER};
use crate::strategies::STRATEGIES;

const USAGE: &str = "\
usage: cargo bench --bench restarts -- [OPTIONS]

  --restarts N          restarts per strategy and client mode (20; --quick: 3)
  --spacing-ms MS       time between the starts of two restarts (500; --quick: 400)
  --warmup-ms MS        load before the first restart (2500; --quick: 1500); what comes
                        before the first restart's window is the run's own baseline
  --settle-ms MS        load after the last restart (1000; --quick: 500)
  --concurrency N       concurrent connections of the load client (32)
  --client-threads N    threads of the load client (2)
  --timeout-ms MS       a request (connect, send, whole response) fails after this (5000)
  --window-ms MS        \"around restarts\": requests started within this of a restart (1000)
  --steady-secs S       steady-state load per server and client mode (6; --quick: 1)
  --bucket-ms MS        time resolution of the JSON timeline and the picture (50)
  --strategies LIST     comma-separated subset of naive-kill,naive-term,reuseport-migrate0,
                        reuseport-migrate1,reload,systemd-restart,systemd-reload (all)
  --modes LIST          keep-alive,one-shot (both)
  --no-compare          skip the steady-state comparison with Go and nginx
  --quick               a short smoke run: 3 restarts each, 1 s steady state
  --check               exit 1 if `pid-server reload` failed a request (or could not run)
  --out DIR             where restarts.json, restarts.svg and logs/ go
                        (<target dir>/bench-results)
";

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
    pub(crate) compare: bool,
    pub(crate) quick: bool,
    pub(crate) check: bool,
    pub(crate) out: PathBuf,
}

/// The flags, or exit 64 (`EX_USAGE`) with the usage.
pub(crate) fn parse_or_exit() -> Args {
    match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}\n\n{USAGE}");
            std::process::exit(64);
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut quick = false;
    let mut check = false;
    let mut compare = true;
    let mut nums: HashMap<&'static str, u64> = HashMap::new();
    let mut strategies: Option<Vec<String>> = None;
    let mut modes: Option<Vec<Mode>> = None;
    let mut out: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    const NUMERIC: [&str; 11] = [
        "--restarts",
        "--spacing-ms",
        "--warmup-ms",
        "--settle-ms",
        "--concurrency",
        "--client-threads",
        "--timeout-ms",
        "--window-ms",
        "--steady-secs",
        "--bucket-ms",
        "--steady-ms",
    ];
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            // `cargo bench` passes this to every harness = false target.
            "--bench" => {}
            "--quick" => quick = true,
            "--check" => check = true,
            "--no-compare" => compare = false,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--strategies" => {
                let v = value("--strategies")?;
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for s in &list {
                    if !STRATEGIES.contains(&s.as_str()) {
                        return Err(format!("unknown strategy {s:?}"));
                    }
                }
                strategies = Some(list);
            }
            "--modes" => {
                let v = value("--modes")?;
                let mut list = Vec::new();
                for m in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    list.push(match m {
                        "keep-alive" | "keepalive" => Mode::KeepAlive,
                        "one-shot" | "oneshot" => Mode::OneShot,
                        _ => return Err(format!("unknown client mode {m:?}")),
                    });
                }
                modes = Some(list);
            }
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            f if NUMERIC.contains(&f) => {
                let key = NUMERIC.iter().find(|k| **k == f).unwrap();
                let v = value(f)?;
                let n: u64 = v.parse().map_err(|_| format!("{f}: not a number: {v:?}"))?;
                nums.insert(key, n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let num = |k: &str, normal: u64, quick_v: u64| -> u64 {
        nums.get(k)
            .copied()
            .unwrap_or(if quick { quick_v } else { normal })
    };
    let ms = |k: &str, normal: u64, quick_v: u64| Duration::from_millis(num(k, normal, quick_v));
    let args = Args {
        restarts: num("--restarts", 20, 3) as usize,
        spacing: ms("--spacing-ms", 500, 400),
        warmup: ms("--warmup-ms", 2500, 1500),
        settle: ms("--settle-ms", 1000, 500),
        concurrency: num("--concurrency", 32, 32) as usize,
        client_threads: num("--client-threads", 2, 2) as usize,
        timeout: ms("--timeout-ms", 5000, 5000),
        window: ms("--window-ms", 1000, 1000),
        steady: match nums.get("--steady-ms") {
            Some(&v) => Duration::from_millis(v),
            None => Duration::from_secs(num("--steady-secs", 6, 1)),
        },
        bucket: ms("--bucket-ms", 50, 50),
        strategies: strategies.unwrap_or_else(|| STRATEGIES.map(String::from).to_vec()),
        modes: modes.unwrap_or_else(|| vec![Mode::KeepAlive, Mode::OneShot]),
        compare,
        quick,
        check,
        out: out.unwrap_or_else(|| target_dir().join("bench-results")),
    };
    if args.concurrency == 0 || args.client_threads == 0 {
        return Err("--concurrency and --client-threads must be at least 1".into());
    }
    if args.bucket.is_zero() || args.timeout.is_zero() {
        return Err("--bucket-ms and --timeout-ms must be at least 1".into());
    }
    if args.modes.is_empty() {
        return Err("--modes: no client mode".into());
    }
    Ok(args)
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
