//! Steady state of `GET /`: pid-server against the same route on plain
//! `axum::serve` and on `axum-handover` (the bench binary's own helpers, see
//! `servers::Helper`: what the library costs), a minimal Go net/http server
//! (`benches/go/main.go`) and nginx `return 200`, with the same client.

use std::process::Command;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::cli::Args;
use crate::load::{Kind, Load, Mode, load_cfg};
use crate::nspawn;
use crate::procs::{Procs, TempDir, aborted, sleep_until};
use crate::results::new_hist;
use crate::servers::{
    Helper, NginxSite, NginxWorkers, build_go, nginx_cmd, pid_server_cmd, wait_for_pid,
    wait_serving,
};
use crate::strategies::{Skips, log_path};

pub(crate) struct SteadyResult {
    pub(crate) server: String,
    pub(crate) mode: Mode,
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) failed: u64,
    pub(crate) lat: Histogram<u64>,
}

impl SteadyResult {
    pub(crate) fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

struct Contender {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
}

/// pid-server, Go and nginx (unless `--no-compare`) under the same client,
/// in turns.
pub(crate) fn run(args: &Args, skips: &mut Skips) -> Vec<SteadyResult> {
    let mut results = Vec::new();
    if args.steady.is_zero() || aborted() {
        return results;
    }
    let tmp = match TempDir::new("nginx") {
        Ok(t) => t,
        Err(e) => {
            skips.add("steady state", e);
            return results;
        }
    };
    let mut procs = match Procs::new(&log_path(args, "steady")) {
        Ok(p) => p,
        Err(e) => {
            skips.add("steady state", e);
            return results;
        }
    };
    let mut contenders = Vec::new();
    let port = nspawn::free_port();
    match procs
        .spawn(pid_server_cmd(port), "pid-server")
        .and_then(|pid| wait_for_pid(port, pid, Duration::from_secs(10)))
    {
        Ok(_) => contenders.push(Contender {
            name: "pid-server",
            port,
        }),
        Err(e) => {
            skips.add("steady state", format!("pid-server did not start: {e}"));
            return results;
        }
    }
    if args.compare {
        // What the library costs a service: the same route on plain
        // `axum::serve` and on `axum-handover`, same binary and runtime.
        for helper in [Helper::PlainAxum, Helper::Handover] {
            let port = nspawn::free_port();
            match helper.cmd(port).and_then(|cmd| {
                procs.spawn(cmd, helper.name())?;
                wait_serving(port, Duration::from_secs(10))
            }) {
                Ok(()) => contenders.push(Contender {
                    name: helper.name(),
                    port,
                }),
                Err(e) => skips.add(&format!("{} (steady state)", helper.name()), e),
            }
        }
        eprintln!("bench: building benches/go with `go build`");
        let port = nspawn::free_port();
        match build_go(args).and_then(|bin| {
            let mut cmd = Command::new(bin);
            cmd.args(["-listen", &format!("127.0.0.1:{port}")]);
            procs.spawn(cmd, "go-pid-server")?;
            wait_serving(port, Duration::from_secs(10))
        }) {
            Ok(()) => contenders.push(Contender {
                name: "go net/http",
                port,
            }),
            Err(e) => skips.add("go net/http (steady state)", e),
        }
        let port = nspawn::free_port();
        match nginx_cmd(port, &tmp.0, NginxSite::Return200, NginxWorkers::Auto).and_then(|cmd| {
            procs.spawn(cmd, "nginx")?;
            wait_serving(port, Duration::from_secs(10))
        }) {
            Ok(()) => contenders.push(Contender {
                name: "nginx",
                port,
            }),
            Err(e) => skips.add("nginx (steady state)", e),
        }
    }
    // Each server twice, in the order A B C C B A, half the time each: a
    // drift in the machine's speed affects them alike.
    let half = args.steady / 2;
    let warm = Duration::from_millis(250).min(half / 2);
    let mut order: Vec<usize> = (0..contenders.len()).collect();
    order.extend((0..contenders.len()).rev());
    for &mode in &args.modes {
        // Paused clients send about one request per pause: a turn as long
        // as the longest pause (and a little) has every connection reused
        // at least once after a long idle time.
        let half = match mode {
            Mode::Paused => half.max(args.pause_max + Duration::from_millis(500)),
            _ => half,
        };
        let mut per: Vec<SteadyResult> = contenders
            .iter()
            .map(|c| SteadyResult {
                server: c.name.to_string(),
                mode,
                requests: 0,
                seconds: 0.0,
                failed: 0,
                lat: new_hist(),
            })
            .collect();
        for &i in &order {
            if aborted() {
                break;
            }
            let c = &contenders[i];
            eprintln!(
                "bench: steady state, {} / {}: {:.1} s",
                c.name,
                mode.name(),
                (half + warm).as_secs_f64()
            );
            let load = match Load::start(load_cfg(args, c.port, mode, half + warm)) {
                Ok(l) => l,
                Err(e) => {
                    skips.add("steady state", e);
                    return results;
                }
            };
            sleep_until(load.t0 + warm + half);
            let data = load.finish();
            let from = warm.as_micros() as u64;
            let to = (warm + half).as_micros() as u64;
            let r = &mut per[i];
            for rec in data
                .recs
                .iter()
                .filter(|r| r.start_us >= from && r.start_us < to)
            {
                if rec.kind == Kind::Ok {
                    r.requests += 1;
                    r.lat.saturating_record(rec.lat_us.max(1) as u64);
                } else {
                    r.failed += 1;
                }
            }
            r.seconds += (to - from) as f64 / 1e6;
        }
        results.extend(per);
    }
    drop(procs);
    results
}
