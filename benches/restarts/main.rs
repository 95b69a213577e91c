//! `cargo bench --bench restarts`: failed requests and latency across
//! restarts, every strategy side by side (see `benches/README.md`).
//!
//! A load client of its own (tokio, fixed concurrency, real TCP on
//! loopback; its connections and response rules are the test support's)
//! drives a pid-server in three modes, keep-alive connections in a closed
//! loop, one request per new connection, and kept connections that
//! idle 0.3–3 s between requests ("paused"), and records every request's
//! outcome, latency, answering PID and connection, while a strategy
//! restarts the server N times:
//!
//! - `naive-kill`, `naive-term`: SIGKILL (or SIGTERM and wait for the exit),
//!   then start a new process;
//! - `reuseport-migrate0`, `reuseport-migrate1`: the seed's way (a second
//!   process beside the old one on its own `SO_REUSEPORT` socket, wait until
//!   the new PID answers `/healthz`, SIGTERM the old one), in a network
//!   namespace of the bench's own with `net.ipv4.tcp_migrate_req` 0 and 1;
//! - `reload`: `pid-server reload --pid <current>`;
//! - `systemd-restart`, `systemd-reload`: `systemctl restart` (the socket
//!   unit holds the queue, idle connections wait in systemd's file
//!   descriptor store) and `systemctl reload` in a container booted by
//!   `tests/support/nspawn.rs`; `systemd-restart-no-store` with the store
//!   off; `systemd-kill`, a crash (SIGKILL, `Restart=on-failure`);
//! - `nginx-reload`: nginx in front (kept upstream connections), `pid-server
//!   reload` behind it.
//!
//! Then the steady state of `GET /`: pid-server against a minimal Go
//! net/http server (`benches/go/main.go`) and nginx `return 200`, with the
//! same client; then the memory per idle keep-alive connection of
//! pid-server and nginx (`--capacity`), and what the file descriptor
//! store costs the container's PID 1 at a restart (`--fdstore-cost`) and
//! while serving in the crash-safe mode (`--crash-safe-cost`). Tables go to stdout (Markdown),
//! progress to stderr, raw results to `<target>/bench-results/restarts.json`
//! and a picture to `<target>/bench-results/restarts.svg`.
//!
//! Everything the bench starts (servers, network namespaces, the container)
//! is owned by a guard whose `Drop` stops and reaps it, also on a panic; a
//! SIGINT/SIGTERM makes the bench stop early and clean up.
//!
//! # Layout
//!
//! - [`cli`]: the flags, resolved into [`cli::Args`];
//! - [`endurance`]: `--endurance`, 1 000 reloads and 10 000 held
//!   connections, instead of the strategies;
//! - [`load`]: the load client (connections, requests, outcomes);
//! - [`strategies`]: a restart strategy per kind of restart, and the run
//!   that restarts a server under load;
//! - [`steady`]: the steady-state comparison;
//! - [`capacity`]: memory per idle keep-alive connection;
//! - [`fdstore`]: PID 1's CPU time for idle connections kept across
//!   `systemctl restart` in systemd's file descriptor store, and
//!   [`crashsafe`]: the same while serving in the crash-safe mode;
//! - [`results`]: one run's records turned into counts, percentiles and a
//!   timeline;
//! - [`report`]: tables, verdict, JSON and the picture;
//! - [`protocols`]: the HTTP/2 and TLS rows (issue #15) across reloads,
//!   with their clients in [`h2`] and [`tls`], and their steady state beside
//!   nginx in [`h2load`];
//! - [`procs`], [`servers`]: processes and the servers the bench starts,
//!   and how it probes them; network namespaces, the CA, the PID parser
//!   and the paused clients' pauses come from the tests' support crate.

use pid_server_test_support::nspawn;

mod capacity;
mod cli;
mod crashsafe;
mod endurance;
mod fdstore;
mod h2;
mod h2load;
mod load;
mod procs;
mod protocols;
mod report;
mod results;
mod servers;
mod steady;
mod strategies;
mod tls;

use std::fs;
use std::time::Instant;

use crate::procs::aborted;
use crate::servers::PID_SERVER;

fn main() {
    // The bench's own helper servers (steady state) are this binary too.
    servers::serve_helper_if_asked();
    let args = cli::parse_or_exit();
    procs::catch_signals();
    procs::become_subreaper();
    let started = Instant::now();
    if let Err(e) = fs::create_dir_all(args.out.join("logs")) {
        eprintln!("bench: mkdir {}: {e}", args.out.display());
        std::process::exit(1);
    }
    eprintln!(
        "bench: pid-server binary {PID_SERVER} (built by cargo bench, bench profile = release)"
    );
    if args.endurance {
        let clean = endurance::run(&args);
        std::process::exit(if aborted() {
            130
        } else if args.check && !clean {
            1
        } else {
            0
        });
    }
    let mut skips = strategies::Skips::default();
    let (runs, steady, protos) = if args.capacity_only || args.fdstore_cost_only {
        (Vec::new(), Vec::new(), protocols::Results::default())
    } else {
        let runs = strategies::run_all(&args, &mut skips);
        let steady = steady::run(&args, &mut skips);
        (runs, steady, protocols::run(&args, &mut skips))
    };
    let capacity = if args.fdstore_cost_only {
        Vec::new()
    } else {
        capacity::run(&args, &mut skips)
    };
    let fd_cost = if args.capacity_only {
        fdstore::FdStoreResults::default()
    } else {
        fdstore::run(&args, &mut skips)
    };
    let reload_clean = report::publish(
        &args,
        &runs,
        &steady,
        &capacity,
        &fd_cost,
        &skips,
        started.elapsed(),
    );
    // (No protocol rows ran: nothing to print, and protocols.json stays.)
    let protocols_clean =
        args.capacity_only || args.fdstore_cost_only || protocols::publish(&args, &protos);
    if aborted() {
        std::process::exit(130);
    }
    if args.check && !reload_clean {
        eprintln!("bench: --check: `pid-server reload` failed requests or did not run");
        std::process::exit(1);
    }
    if args.check && !protocols_clean {
        eprintln!("bench: --check: a protocol row failed requests or streams, or did not run");
        std::process::exit(1);
    }
}
