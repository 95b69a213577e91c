//! The servers the bench starts (pid-server, the Go server, nginx), and
//! the blocking probes the controller asks them with.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::Args;
use crate::nspawn;
use crate::procs::aborted;

/// The pid-server under test: built by `cargo bench` itself with the
/// `bench` profile (release settings), i.e. `target/release/pid-server`.
pub(crate) const PID_SERVER: &str = env!("CARGO_BIN_EXE_pid-server");
pub(crate) const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) fn pid_server_cmd(port: u16) -> Command {
    let mut cmd = Command::new(PID_SERVER);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM");
    cmd
}

/// The PID `/healthz` reports, on a fresh connection.
fn healthz_pid(port: u16) -> Option<u32> {
    let (status, body) =
        nspawn::try_http_get_timeout(port, "/healthz", Duration::from_secs(1)).ok()?;
    if status != 200 {
        return None;
    }
    pid_server_test_support::http::healthz_pid(&body)
}

/// Polls `/healthz` (new connection each time) until it reports `pid`.
pub(crate) fn wait_for_pid(port: u16, pid: u32, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if healthz_pid(port) == Some(pid) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "PID {pid} did not answer /healthz on port {port} within {timeout:?}"
            ));
        }
        if aborted() {
            return Err("interrupted".into());
        }
        thread::sleep(Duration::from_millis(3));
    }
}

/// Polls `GET /` until it answers 200.
pub(crate) fn wait_serving(port: u16, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let last = match nspawn::try_http_get_timeout(port, "/", Duration::from_secs(1)) {
            Ok((200, _)) => return Ok(()),
            Ok((s, b)) => format!("{s} {b}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= timeout || aborted() {
            return Err(format!(
                "port {port} not serving within {timeout:?}: {last}"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn build_go(args: &Args) -> Result<PathBuf, String> {
    let go = find_program("go")
        .ok_or("`go` not found (apt-get install golang-go; see .ci/bench-deps)")?;
    let dir = Path::new(MANIFEST_DIR).join("benches/go");
    let bin_dir = args.out.join("bin");
    fs::create_dir_all(&bin_dir).map_err(|e| format!("mkdir {}: {e}", bin_dir.display()))?;
    let bin = bin_dir.join("go-pid-server");
    let cache = args.out.join("go").join("cache");
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&dir)
        .env("GOCACHE", &cache)
        .env("GOPATH", args.out.join("go").join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("go build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "go build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bin)
}

pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/lib/go/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn go_version() -> String {
    find_program("go")
        .and_then(|g| Command::new(g).arg("version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn nginx_version() -> String {
    find_program("nginx")
        .and_then(|n| Command::new(n).arg("-v").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

/// What the bench's nginx does with a request.
pub(crate) enum NginxSite {
    /// `return 200 "OK. Handled by PID: $pid"` (its own worker's PID).
    Return200,
    /// Reverse proxy to a pid-server on `127.0.0.1:port`, with a pool of
    /// kept upstream connections; nginx's defaults otherwise (a request
    /// that fails on a kept upstream connection with an error is tried
    /// again on a new one: `proxy_next_upstream error timeout`).
    ProxyTo(u16),
    /// `server` blocks as the caller wrote them, ports included (the
    /// protocol rows' nginx listens on three).
    Servers(String),
}

impl NginxSite {
    fn config(&self) -> String {
        match self {
            NginxSite::Return200 => "\
                 \x20   server {\n\
                 \x20       listen 127.0.0.1:PORT reuseport;\n\
                 \x20       location / {\n\
                 \x20           default_type text/plain;\n\
                 \x20           return 200 \"OK. Handled by PID: $pid\\n\";\n\
                 \x20       }\n\
                 \x20   }\n"
                .to_string(),
            NginxSite::ProxyTo(backend) => format!(
                "\
                 \x20   upstream pid_server {{\n\
                 \x20       server 127.0.0.1:{backend};\n\
                 \x20       # idle kept connections per worker, never retired by count\n\
                 \x20       keepalive 64;\n\
                 \x20       keepalive_requests 100000000;\n\
                 \x20       keepalive_timeout 60s;\n\
                 \x20   }}\n\
                 \x20   server {{\n\
                 \x20       listen 127.0.0.1:PORT reuseport;\n\
                 \x20       location / {{\n\
                 \x20           proxy_pass http://pid_server;\n\
                 \x20           proxy_http_version 1.1;\n\
                 \x20           proxy_set_header Connection \"\";\n\
                 \x20       }}\n\
                 \x20   }}\n"
            ),
            NginxSite::Servers(blocks) => blocks.clone(),
        }
    }
}

/// How many nginx workers, and how many connections each takes.
#[derive(Clone, Copy)]
pub(crate) enum NginxWorkers {
    /// One per core, 4096 connections each.
    Auto,
    /// One, 4096 connections.
    Single,
    /// One worker taking up to this many connections (its open-files limit
    /// raised to fit): the capacity run measures that worker's memory.
    One(usize),
}

impl NginxWorkers {
    fn config(self) -> String {
        match self {
            NginxWorkers::Auto => {
                "worker_processes auto;\nevents { worker_connections 4096; }\n".into()
            }
            NginxWorkers::Single => {
                "worker_processes 1;\nevents { worker_connections 4096; }\n".into()
            }
            // Twice the connections: with less than 1/16 of its connection
            // slots free, nginx starts closing idle keep-alive connections
            // to make room (`ngx_drain_connections`).
            NginxWorkers::One(n) => format!(
                "worker_processes 1;\nworker_rlimit_nofile {};\nevents {{ worker_connections {}; }}\n",
                2 * n + 128,
                2 * n + 64
            ),
        }
    }
}

/// nginx as its own master with a config, prefix and temp paths in `dir`.
pub(crate) fn nginx_cmd(
    port: u16,
    dir: &Path,
    site: NginxSite,
    workers: NginxWorkers,
) -> Result<Command, String> {
    let nginx = find_program("nginx")
        .ok_or("`nginx` not found (apt-get install nginx; see .ci/bench-deps)")?;
    let d = dir.display();
    let site = site.config().replace("PORT", &port.to_string());
    let workers = workers.config();
    let conf = format!(
        "# Written by benches/restarts/servers.rs\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         {workers}\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   # like pid-server and Go: no cap on requests per connection (HTTP/2 too)\n\
         \x20   keepalive_requests 100000000;\n\
         \x20   keepalive_timeout 75s;\n\
         {site}\
         }}\n"
    );
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {d}: {e}"))?;
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).map_err(|e| format!("write {}: {e}", conf_path.display()))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

/// The environment variable that makes the bench's own binary one of the
/// [`Helper`] servers (`NAME:PORT`) instead of the bench: the steady-state
/// table's pair for what the library costs, built with the same compiler
/// flags, allocator and runtime as each other.
const HELPER_ENV: &str = "RESTARTS_HELPER";

/// A server the bench binary itself runs (see [`HELPER_ENV`]): `GET /` with
/// pid-server's body, on `#[tokio::main]`'s runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Helper {
    /// `axum::serve`, nothing else.
    PlainAxum,
    /// The same router served by `axum-handover` (`Generation::serve`).
    Handover,
}

impl Helper {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Helper::PlainAxum => "axum::serve",
            Helper::Handover => "axum-handover",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Helper::PlainAxum => "plain-axum",
            Helper::Handover => "handover",
        }
    }

    /// The bench binary, asked to be this server on `port`.
    pub(crate) fn cmd(self, port: u16) -> Result<Command, String> {
        let exe = std::env::current_exe().map_err(|e| format!("the bench's own path: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.env(HELPER_ENV, format!("{}:{port}", self.key()))
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        Ok(cmd)
    }
}

/// When the bench was started as a [`Helper`], serves until killed and
/// exits; otherwise returns at once.
pub(crate) fn serve_helper_if_asked() {
    let Ok(what) = std::env::var(HELPER_ENV) else {
        return;
    };
    let parsed = what.split_once(':').and_then(|(key, port)| {
        let helper = [Helper::PlainAxum, Helper::Handover]
            .into_iter()
            .find(|h| h.key() == key)?;
        Some((helper, port.parse::<u16>().ok()?))
    });
    let Some((helper, port)) = parsed else {
        eprintln!("bench: error: {HELPER_ENV}={what:?} is not plain-axum:PORT or handover:PORT");
        std::process::exit(64);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("bench: error: runtime: {e}");
            std::process::exit(1)
        });
    let code = rt.block_on(serve_helper(helper, port));
    std::process::exit(code);
}

async fn serve_helper(helper: Helper, port: u16) -> i32 {
    use axum::{Router, routing::get};
    let pid = std::process::id();
    let app = Router::new().route(
        "/",
        get(move || async move { format!("OK. Handled by PID: {pid}\n") }),
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    match helper {
        Helper::PlainAxum => {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bench: error: {addr}: {e}");
                    return 1;
                }
            };
            match axum::serve(listener, app).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("bench: error: {e}");
                    1
                }
            }
        }
        Helper::Handover => {
            let config = axum_handover::Config::new("bench-handover");
            match axum_handover::Generation::take(&config, &[axum_handover::ListenAddr::Tcp(addr)])
            {
                Ok(g) => i32::from(g.serve(app, ()).await.exit_code()),
                Err(e) => {
                    eprintln!("bench: error: {e}");
                    i32::from(e.exit_code())
                }
            }
        }
    }
}
