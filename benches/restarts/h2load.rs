//! The protocol rows' steady state: pid-server beside nginx, the same
//! certificate, both measured by `h2load` (nghttp2's load generator, the
//! usual tool for HTTP/2 servers; one client for both servers) in the same
//! run, taking turns in the order pid-server, nginx, nginx, pid-server.
//!
//! nginx: Debian 12's 1.22, `worker_processes 1`, `return 200 "OK. Handled
//! by PID: $pid\n"` (pid-server's body), TLS 1.3 only with ALPN h2 and
//! http/1.1 (`listen ... ssl http2`: nginx 1.22 has no `http2 on;`, which
//! came in 1.25.1), h2c on a listener of its own (`listen ... http2`
//! without `ssl` speaks HTTP/2 with prior knowledge only), plain HTTP/1.1
//! on a third. pid-server serves h1 and h2c on one plain socket, h1 and h2
//! over TLS on another.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use pid_server_test_support::h2load::Summary;
use serde_json::{Value, json};

use crate::cli::Args;
use crate::nspawn;
use crate::procs::{Procs, TempDir, aborted, run_cmd};
use crate::protocols::{Proto, server_cmd};
use crate::servers::{
    NginxSite, NginxWorkers, find_program, nginx_cmd, pid_server_cmd, wait_for_pid, wait_serving,
};
use crate::strategies::{Skips, log_path};
use crate::tls::{self, Certs};

/// One server × protocol, over its turns.
pub(crate) struct SteadyRow {
    pub(crate) proto: Proto,
    pub(crate) server: &'static str,
    /// h2load's client settings, as given.
    pub(crate) client: String,
    /// 2xx responses, summed over the turns.
    pub(crate) ok: u64,
    /// Requests h2load counted as failed, errored or timed out.
    pub(crate) failed: u64,
    pub(crate) seconds: f64,
    /// h2load's "time for request" mean and max, µs, of the last turn.
    pub(crate) mean_us: f64,
    pub(crate) max_us: f64,
    /// What h2load negotiated (TLS version, cipher, ALPN), as it says.
    pub(crate) negotiated: String,
}

impl SteadyRow {
    pub(crate) fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The protocol rows' nginx: `return 200` on plain HTTP/1.1, h2c and (with
/// certificates) TLS with HTTP/2, one port each.
fn nginx_servers(ports: [u16; 3], certs: Option<&Certs>) -> String {
    let site =
        "location / { default_type text/plain; return 200 \"OK. Handled by PID: $pid\\n\"; }";
    let tls = match certs {
        Some(c) => format!(
            "    server {{\n\
             \x20       listen 127.0.0.1:{} ssl http2;\n\
             \x20       ssl_certificate {};\n\
             \x20       ssl_certificate_key {};\n\
             \x20       ssl_protocols TLSv1.3;\n\
             \x20       {site}\n\
             \x20   }}\n",
            ports[2],
            c.cert.display(),
            c.key.display()
        ),
        None => String::new(),
    };
    format!(
        "\x20   server {{ listen 127.0.0.1:{}; {site} }}\n\
         \x20   server {{ listen 127.0.0.1:{} http2; {site} }}\n\
         {tls}",
        ports[0], ports[1]
    )
}

/// What one h2load run printed.
struct Turn {
    ok: u64,
    failed: u64,
    seconds: f64,
    mean_us: f64,
    max_us: f64,
    negotiated: String,
}

fn parse(out: &str) -> Result<Turn, String> {
    let s = Summary::parse(out)?;
    if s.status_2xx == 0 {
        // (h2load counts connections it could not make apart from
        // requests: a server that does not speak the protocol ends here.)
        return Err(format!(
            "h2load got no 2xx response: {}",
            out.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
        ));
    }
    Ok(Turn {
        ok: s.status_2xx,
        failed: s.failed + s.errored + s.timeout,
        seconds: s.seconds,
        mean_us: s.request_mean_us,
        max_us: s.request_max_us,
        negotiated: s.negotiated,
    })
}

/// `h2load` for `secs` against `uri`, one of `proto`'s clients.
fn h2load(
    bin: &Path,
    args: &Args,
    proto: Proto,
    uri: &str,
    turn: Duration,
) -> Result<Turn, String> {
    let mut a: Vec<String> = vec!["-t".into(), args.client_threads.to_string()];
    if proto.h2() {
        a.extend([
            "-c".into(),
            args.h2_connections.to_string(),
            "-m".into(),
            args.h2_streams.to_string(),
        ]);
    } else {
        a.extend(["--h1".into(), "-c".into(), args.concurrency.to_string()]);
    }
    a.extend([
        "-D".into(),
        format!("{}ms", turn.as_millis().max(1)),
        "--warm-up-time".into(),
        "250ms".into(),
        uri.to_string(),
    ]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let prog = bin.to_string_lossy();
    let out = run_cmd(&prog, &refs, turn + Duration::from_secs(30))?;
    parse(&out)
}

fn client_of(args: &Args, proto: Proto) -> String {
    if proto.h2() {
        format!("-c {} -m {}", args.h2_connections, args.h2_streams)
    } else {
        format!("--h1 -c {}", args.concurrency)
    }
}

/// The steady-state rows, and a note on the settings. Every server or row
/// that cannot run is a SKIPPED line.
pub(crate) fn run(
    args: &Args,
    certs: Option<&Certs>,
    has_tls: bool,
    skips: &mut Skips,
) -> (Vec<SteadyRow>, String) {
    let mut rows = Vec::new();
    let Some(bin) = find_program("h2load") else {
        skips.add(
            "protocols, steady state",
            "`h2load` not found (apt-get install nghttp2-client; see .ci/bench-deps)",
        );
        return (rows, String::new());
    };
    let version = run_cmd(
        &bin.to_string_lossy(),
        &["--version"],
        Duration::from_secs(5),
    )
    .map(|v| v.trim().to_string())
    .unwrap_or_default();
    let mut procs = match Procs::new(&log_path(args, "protocols-steady")) {
        Ok(p) => p,
        Err(e) => {
            skips.add("protocols, steady state", e);
            return (rows, String::new());
        }
    };
    let want_tls = args.protocols.iter().any(|p| p.tls());
    // pid-server: the plain socket (h1, h2c) and, with TLS, another.
    let plain = nspawn::free_port();
    let plain_ok = procs
        .spawn(pid_server_cmd(plain), "pid-server")
        .and_then(|pid| wait_for_pid(plain, pid, Duration::from_secs(10)).map(|_| ()));
    if let Err(e) = &plain_ok {
        skips.add("protocols, steady state, pid-server plain", e.clone());
    }
    let tls_port = nspawn::free_port();
    let tls_ok = match (want_tls, has_tls, certs) {
        (false, _, _) => Err("not asked for".to_string()),
        (true, false, _) => Err("the pid-server under test has no --tls-cert".to_string()),
        (true, true, None) => Err("no certificates".to_string()),
        (true, true, Some(c)) => {
            let probe = c.client(&[b"http/1.1"]);
            procs
                .spawn(server_cmd(tls_port, Some(c)), "pid-server")
                .and_then(|pid| {
                    tls::wait_for_pid(tls_port, pid, &probe, Duration::from_secs(10)).map(|_| ())
                })
        }
    };
    if want_tls && let Err(e) = &tls_ok {
        skips.add("protocols, steady state, pid-server TLS", e.clone());
    }
    // nginx, one worker, three listeners.
    let nginx_ports = [
        nspawn::free_port(),
        nspawn::free_port(),
        nspawn::free_port(),
    ];
    let dir = TempDir::new("nginx-protocols");
    let nginx_ok = dir.as_ref().map_err(Clone::clone).and_then(|dir| {
        let tls_certs = if want_tls { certs } else { None };
        let site = NginxSite::Servers(nginx_servers(nginx_ports, tls_certs));
        let cmd = nginx_cmd(nginx_ports[0], &dir.0, site, NginxWorkers::Single)?;
        procs.spawn(cmd, "nginx")?;
        wait_serving(nginx_ports[0], Duration::from_secs(10))
    });
    if let Err(e) = &nginx_ok {
        skips.add("protocols, steady state, nginx", e.clone());
    }
    let turn = (args.steady / 2).max(Duration::from_millis(500));
    for &proto in &args.protocols {
        if aborted() {
            break;
        }
        let (pid_ok, pid_uri, ng_uri) = match proto {
            Proto::H1 => (
                plain_ok.is_ok(),
                format!("http://127.0.0.1:{plain}/"),
                format!("http://127.0.0.1:{}/", nginx_ports[0]),
            ),
            Proto::H2c => (
                plain_ok.is_ok(),
                format!("http://127.0.0.1:{plain}/"),
                format!("http://127.0.0.1:{}/", nginx_ports[1]),
            ),
            Proto::TlsH1 | Proto::TlsH2 => (
                tls_ok.is_ok(),
                format!("https://127.0.0.1:{tls_port}/"),
                format!("https://127.0.0.1:{}/", nginx_ports[2]),
            ),
        };
        let mut contenders = Vec::new();
        if pid_ok {
            contenders.push(("pid-server", pid_uri));
        }
        if nginx_ok.is_ok() {
            contenders.push(("nginx", ng_uri));
        }
        let mut per: Vec<SteadyRow> = contenders
            .iter()
            .map(|(server, _)| SteadyRow {
                proto,
                server,
                client: client_of(args, proto),
                ok: 0,
                failed: 0,
                seconds: 0.0,
                mean_us: 0.0,
                max_us: 0.0,
                negotiated: String::new(),
            })
            .collect();
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        order.extend((0..contenders.len()).rev());
        let mut broken = vec![None; contenders.len()];
        for i in order {
            if aborted() || broken[i].is_some() {
                continue;
            }
            let (server, uri) = &contenders[i];
            eprintln!(
                "bench: protocols, steady state, {server} / {}: h2load {} for {:.1} s",
                proto.name(),
                client_of(args, proto),
                turn.as_secs_f64()
            );
            match h2load(&bin, args, proto, uri, turn) {
                Ok(t) => {
                    let r = &mut per[i];
                    r.ok += t.ok;
                    r.failed += t.failed;
                    r.seconds += t.seconds;
                    r.mean_us = t.mean_us;
                    r.max_us = t.max_us;
                    r.negotiated = t.negotiated;
                }
                Err(e) => broken[i] = Some(e),
            }
        }
        for (i, r) in per.into_iter().enumerate() {
            match &broken[i] {
                Some(e) => skips.add(
                    &format!("protocols, steady state, {} / {}", r.server, proto.name()),
                    e.clone(),
                ),
                None => rows.push(r),
            }
        }
    }
    drop(procs);
    let nginx = crate::servers::nginx_version();
    let nginx = match nginx.trim_start_matches("nginx version: ") {
        "" => "no nginx".to_string(),
        v => format!("nginx {v} with worker_processes 1"),
    };
    let note = format!(
        "{version}, {} client threads, {:.1} s per turn (after 250 ms warm-up), 2 turns per server; \
         {nginx}",
        args.client_threads,
        turn.as_secs_f64(),
    );
    (rows, note)
}

pub(crate) fn table(_args: &Args, rows: &[SteadyRow], note: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Protocols, steady state beside nginx (h2load)\n\n{note}. Same certificate for \
         both; pid-server / nginx above 1 = pid-server faster.\n"
    );
    s.push_str("| protocol | h2load | server | 2xx | req/s | pid-server / nginx | mean ms | max ms | failed | negotiated |\n");
    s.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|---|\n");
    for r in rows {
        let ratio = ratio_of(rows, r.proto)
            .filter(|_| r.server == "pid-server")
            .map(|x| format!("{x:.2}×"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            r.proto.name(),
            r.client,
            r.server,
            r.ok,
            r.rps(),
            ratio,
            crate::report::ms(r.mean_us as u64),
            crate::report::ms(r.max_us as u64),
            r.failed,
            if r.negotiated.is_empty() {
                "–"
            } else {
                &r.negotiated
            },
        );
    }
    s
}

fn ratio_of(rows: &[SteadyRow], proto: Proto) -> Option<f64> {
    let find = |server: &str| {
        rows.iter()
            .find(|r| r.proto == proto && r.server == server)
            .map(SteadyRow::rps)
    };
    match (find("pid-server"), find("nginx")) {
        (Some(p), Some(n)) if n > 0.0 => Some(p / n),
        _ => None,
    }
}

/// "throughput, h2c: pid-server 12345 req/s, nginx 23456 req/s → 0.53×".
pub(crate) fn ratios(rows: &[SteadyRow]) -> Vec<String> {
    let mut v = Vec::new();
    let mut seen = Vec::new();
    for r in rows {
        if seen.contains(&r.proto) {
            continue;
        }
        seen.push(r.proto);
        let find = |server: &str| {
            rows.iter()
                .find(|x| x.proto == r.proto && x.server == server)
                .map(SteadyRow::rps)
        };
        if let (Some(p), Some(n), Some(x)) =
            (find("pid-server"), find("nginx"), ratio_of(rows, r.proto))
        {
            v.push(format!(
                "throughput (h2load), {}: pid-server {p:.0} req/s, nginx {n:.0} req/s → pid-server = {x:.2}× nginx",
                r.proto.name()
            ));
        }
    }
    v
}

pub(crate) fn json(rows: &[SteadyRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "protocol": r.proto.name(),
                    "server": r.server,
                    "h2load": r.client,
                    "ok_2xx": r.ok,
                    "failed": r.failed,
                    "seconds": r.seconds,
                    "rps": r.rps(),
                    "ratio_pid_server_to_nginx": if r.server == "pid-server" { ratio_of(rows, r.proto) } else { None },
                    "mean_us": r.mean_us,
                    "max_us": r.max_us,
                    "negotiated": r.negotiated,
                })
            })
            .collect(),
    )
}
