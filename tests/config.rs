//! The configuration file with the real binary: precedence (flag, then
//! environment, then file, then default), every kind of bad file (one line
//! `PATH:LINE: what`, exit 78, nothing served), `check-config`, and reloads
//! that apply a changed file or refuse a broken one.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use pid_server_test_support::proc::{self, Notify, Proc, Reaper, WAIT};
use pid_server_test_support::{http, wait};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The variables that would change what these tests check, if the runner's
/// environment had them.
const SETTINGS_VARS: [&str; 13] = [
    "PID_SERVER_CONFIG",
    "PID_SERVER_LISTEN",
    "PID_SERVER_DRAIN_TIMEOUT",
    "PID_SERVER_RELOAD_TIMEOUT",
    "PID_SERVER_RELOAD_PROBATION_MS",
    "PID_SERVER_UPGRADE_TIMEOUT",
    "PID_SERVER_UPGRADE_PROBATION_MS",
    "PID_SERVER_HEADER_TIMEOUT",
    "PID_SERVER_KEEP_ALIVE_TIMEOUT",
    "PID_SERVER_IDLE_GRACE_MS",
    "PID_SERVER_CLOSE_SPREAD_MS",
    "PID_SERVER_MAX_CONNECTIONS",
    "RUST_LOG",
];

fn clean(mut cmd: Command) -> Command {
    for v in SETTINGS_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Replaces `path` atomically, as an editor or a package upgrade does.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Starts `serve ARGS` on a passed [`proc::Socket`] with `env` and waits
/// for `READY=1`.
fn start(args: &[&str], env: &[(&str, &str)]) -> (Proc, Notify, SocketAddr) {
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = clean(proc::serve_socket_cmd(BIN, socket, &notify));
    cmd.args(args).envs(env.iter().copied());
    let p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, notify, addr)
}

/// What a finished command said.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `pid-server ARGS` with `env` to its end (bounded; killed past it).
fn run(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = clean(Command::new(BIN));
    cmd.args(args)
        .envs(env.iter().copied())
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let status = wait::within(WAIT, || child.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("pid-server {args:?} still running after {WAIT:?}");
    });
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Out {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

/// The `Keep-Alive: timeout=N` that a response on a new connection
/// advertises: the keep-alive timeout in force.
fn advertised_keep_alive(addr: SocketAddr) -> u64 {
    let r = http::get(addr, "/").expect("GET /");
    r.keep_alive
        .unwrap_or_else(|| panic!("no Keep-Alive: timeout=N in {r:?}"))
}

fn health(addr: SocketAddr) -> serde_json::Value {
    let r = http::get(addr, "/healthz").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    // The file's listen is an address nothing can bind: the --listen flag
    // of every start below must win over it.
    write(
        &conf,
        "listen = \"unix:/nonexistent/pid-server.sock\"\nkeep_alive_timeout = 3\n",
    );
    let c = conf.to_str().unwrap();

    let (_p, _n, addr) = start(&[], &[]);
    assert_eq!(advertised_keep_alive(addr), 5, "the default");
    assert!(health(addr)["config"].is_null());

    let (_p, _n, addr) = start(&["--config", c], &[]);
    assert_eq!(advertised_keep_alive(addr), 3, "the file");

    let env = [("PID_SERVER_KEEP_ALIVE_TIMEOUT", "4")];
    let (_p, _n, addr) = start(&["--config", c], &env);
    assert_eq!(advertised_keep_alive(addr), 4, "the environment");

    let (_p, _n, addr) = start(&["--config", c, "--keep-alive-timeout", "2"], &env);
    assert_eq!(advertised_keep_alive(addr), 2, "the flag");

    // The file named in the environment; a --config flag beats that too.
    let (_p, _n, addr) = start(&[], &[("PID_SERVER_CONFIG", c)]);
    assert_eq!(advertised_keep_alive(addr), 3);
    assert_eq!(health(addr)["config"]["path"], c);
    let bogus = [("PID_SERVER_CONFIG", "/nonexistent/pid-server.toml")];
    let (_p, _n, addr) = start(&["--config", c], &bogus);
    assert_eq!(health(addr)["config"]["path"], c);
}

#[test]
fn listen_comes_from_the_file_without_a_flag_as_a_string_or_an_array() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    for form in ["\"{a}\"", "[\"{a}\", \"{b}\"]"] {
        // Addresses for the file: the process binds them itself, which is
        // the point.
        let (a, b) = (proc::free_addr(), proc::free_addr());
        let value = form
            .replace("{a}", &a.to_string())
            .replace("{b}", &b.to_string());
        write(&conf, &format!("listen = {value}\n"));
        let notify = Notify::new();
        let mut cmd = clean(Command::new(BIN));
        cmd.args(["serve", "--config", conf.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify.path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        let p = Proc::spawn(cmd);
        notify.wait_for("READY=1", |m| m.contains("READY=1"));
        assert_eq!(proc::health_pid(a), p.pid, "{value}");
        if form.starts_with('[') {
            assert_eq!(proc::health_pid(b), p.pid, "{value}");
        }
    }
}

/// One bad file of each kind: its text, the line it is wrong on (none when
/// it cannot be read) and what the message says.
const BAD: &[(&str, Option<&str>, Option<usize>, &str)] = &[
    (
        "unknown key",
        Some("drain_timeout = 5\nkeep_alive = 3\n"),
        Some(2),
        "unknown key `keep_alive`",
    ),
    (
        "wrong type",
        Some("\nkeep_alive_timeout = \"3\"\n"),
        Some(2),
        "`keep_alive_timeout`: expected a whole number of seconds, found a string",
    ),
    (
        "bad value",
        Some("max_connections = 0\n"),
        Some(1),
        "`max_connections`: must be at least 1",
    ),
    (
        "bad address",
        Some("listen = [\"127.0.0.1:80\",\n  \"localhost:80\"]\n"),
        Some(1),
        "`listen`: `localhost:80` is not HOST:PORT",
    ),
    (
        "duplicate key",
        Some("drain_timeout = 5\ndrain_timeout = 6\n"),
        Some(2),
        "duplicate key `drain_timeout`",
    ),
    (
        "not TOML",
        Some("drain_timeout: 5\n"),
        Some(1),
        "not valid TOML: ",
    ),
    ("missing file", None, None, "cannot read it: "),
];

/// The one line that names `path` and the problem.
fn assert_one_line(stderr: &str, prefix: &str, path: &Path, line: Option<usize>, what: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
    let at = match line {
        Some(n) => format!("{prefix}{}:{n}: {what}", path.display()),
        None => format!("{prefix}{}: {what}", path.display()),
    };
    assert!(
        lines[0].starts_with(&at),
        "{:?} does not start with {at:?}",
        lines[0]
    );
}

fn bad_file(dir: &Path, kind: &str, text: Option<&str>) -> PathBuf {
    let path = dir.join(format!("{}.toml", kind.replace(' ', "-")));
    if let Some(text) = text {
        write(&path, text);
    }
    path
}

#[test]
fn check_config_names_the_path_and_line_of_each_kind_of_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, text, line, what) in BAD {
        let path = bad_file(dir.path(), kind, *text);
        let out = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(out.code, 78, "{kind}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{kind}");
        assert_one_line(&out.stderr, "", &path, *line, what);
    }
}

#[test]
fn serve_with_a_bad_file_exits_78_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, text, line, what) in BAD {
        let path = bad_file(dir.path(), kind, *text);
        let notify = Notify::new();
        // `--listen` on a port nobody holds: that nothing listens on it
        // after the failed start is asserted (a socket the test held
        // would queue the connection).
        let addr = proc::free_addr();
        let mut cmd = clean(proc::serve_cmd(BIN, addr, &notify));
        cmd.args(["--config", path.to_str().unwrap()]);
        let mut p = Proc::spawn(cmd);
        let st = p.wait_exit(WAIT);
        assert_eq!(st.code(), Some(78), "{kind}: {}", p.log());
        assert_one_line(&p.log(), "pid-server: error: ", &path, *line, what);
        // Nothing was said to systemd, and nothing listens.
        assert_eq!(notify.messages(), Vec::<String>::new(), "{kind}");
        assert!(
            TcpStream::connect_timeout(&addr, WAIT).is_err(),
            "{kind}: {addr} answers"
        );
    }
}

#[test]
fn a_config_that_is_not_a_regular_file_is_refused_at_once_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let cases = [
        (fifo.as_path(), "cannot read it: a FIFO, not a regular file"),
        (
            Path::new("/dev/zero"),
            "cannot read it: a character device, not a regular file",
        ),
        (
            dir.path(),
            "cannot read it: a directory, not a regular file",
        ),
    ];
    for (path, what) in cases {
        // `run` and `wait_exit` are bounded: a hang fails the test.
        let out = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(out.code, 78, "{path:?}: {}", out.stderr);
        assert_one_line(&out.stderr, "", path, None, what);

        let notify = Notify::new();
        let socket = proc::Socket::new();
        let mut cmd = clean(proc::serve_socket_cmd(BIN, socket, &notify));
        cmd.args(["--config", path.to_str().unwrap()]);
        let mut p = Proc::spawn(cmd);
        let started = Instant::now();
        let st = p.wait_exit(WAIT);
        eprintln!("{path:?}: serve exited in {:?}", started.elapsed());
        assert_eq!(st.code(), Some(78), "{path:?}: {}", p.log());
        assert_one_line(&p.log(), "pid-server: error: ", path, None, what);
        assert_eq!(notify.messages(), Vec::<String>::new(), "{path:?}");
    }
}

#[test]
fn check_config_says_ok_for_a_good_file_given_by_flag_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    write(
        &conf,
        "listen = [\"127.0.0.1:8080\", \"[::1]:8080\"]\nkeep_alive_timeout = 3\n",
    );
    let c = conf.to_str().unwrap();
    for out in [
        run(&["check-config", "--config", c], &[]),
        run(&["check-config"], &[("PID_SERVER_CONFIG", c)]),
    ] {
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (0, &*format!("{c}: ok\n"), "")
        );
    }
    // The packaged file checks too.
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pid-server.toml");
    let out = run(
        &["check-config", "--config", packaged.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// `pid-server reload --pid PID`: (exit code, the new PID if it reloaded,
/// stderr).
fn reload(pid: u32) -> (i32, Option<u32>, String) {
    let (code, out, err) = proc::reload(BIN, &["--pid", &pid.to_string()]);
    let new = out
        .strip_prefix("reloaded: ")
        .and_then(|r| r.split(" -> ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok());
    (code, new, err)
}

#[test]
fn a_reload_applies_a_changed_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    write(&conf, "keep_alive_timeout = 3\n");
    let c = conf.to_str().unwrap();
    let reaper = Reaper::default();
    let (old, _notify, addr) = start(&["--config", c], &[]);
    assert_eq!(advertised_keep_alive(addr), 3);
    let h = health(addr);
    assert_eq!(h["config"]["path"], c);
    assert_eq!(h["config"]["sha256"], sha256(&conf));

    write(&conf, "keep_alive_timeout = 2\n");
    let (code, new, err) = reload(old.pid);
    assert_eq!(code, 0, "{err}");
    let new = new.expect("the new PID");
    reaper.watch(new);
    proc::wait_gone(old.pid, WAIT);
    let h = health(addr);
    assert_eq!(
        (h["pid"].as_u64(), h["generation"].as_u64()),
        (Some(new as u64), Some(1))
    );
    assert_eq!(h["config"]["sha256"], sha256(&conf));
    assert_eq!(advertised_keep_alive(addr), 2);
}

#[test]
fn a_reload_to_a_broken_file_fails_and_the_old_process_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    write(&conf, "keep_alive_timeout = 3\n");
    let c = conf.to_str().unwrap();
    let good = sha256(&conf);
    let reaper = Reaper::default();
    let (old, notify, addr) = start(&["--config", c], &[]);

    write(&conf, "keep_alive_timeout = 3\nkeep_alive_timeout = 2\n");
    let (code, new, err) = reload(old.pid);
    assert_eq!((code, new), (1, None), "{err}");
    // The helper prints the new process's reason, not only its status.
    let why = format!("could not start: {c}:2: duplicate key `keep_alive_timeout`");
    assert!(err.contains(&why), "{err}");
    // The new process said why on the stderr it shares with the old one.
    let at = format!("pid-server: error: {c}:2: duplicate key `keep_alive_timeout`");
    assert!(old.log().contains(&at), "{}", old.log());
    notify.wait_for("last reload failed", |m| m.contains("last reload failed"));
    let h = health(addr);
    assert_eq!(
        (h["pid"].as_u64(), h["generation"].as_u64()),
        (Some(old.pid as u64), Some(0))
    );
    assert_eq!(h["config"]["sha256"], good.as_str());
    assert_eq!(advertised_keep_alive(addr), 3);

    // Fixed, the next reload goes through.
    write(&conf, "keep_alive_timeout = 2\n");
    let (code, new, err) = reload(old.pid);
    assert_eq!(code, 0, "{err}");
    reaper.watch(new.unwrap());
    proc::wait_gone(old.pid, WAIT);
    assert_eq!(advertised_keep_alive(addr), 2);
}

#[test]
fn a_listen_a_reload_cannot_apply_is_said_not_ignored() {
    // The successor inherits the sockets; a changed `listen` needs a
    // restart. The new process says so in its log, and the helper prints it.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    // Addresses for the file: the first process binds `first` itself;
    // `other` is never bound (a reload cannot apply it).
    let (first, other) = (proc::free_addr(), proc::free_addr());
    write(&conf, &format!("listen = \"{first}\"\n"));
    let notify = Notify::new();
    let mut cmd = clean(Command::new(BIN));
    cmd.args(["serve", "--config"])
        .arg(&conf)
        .env("NOTIFY_SOCKET", &notify.path);
    let old = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    write(&conf, &format!("listen = \"{other}\"\n"));
    let (code, out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let why = format!(
        "note: listen = {other} (from {}) is not applied: the sockets are inherited",
        conf.display()
    );
    assert!(out.contains(&why), "{out}");
    let new = proc::health_pid(first);
    reaper.watch(new);
    assert_ne!(new, old.pid, "the new process serves the inherited socket");
    assert!(
        old.log()
            .contains("is not applied: the sockets are inherited"),
        "{}",
        old.log()
    );
}

#[test]
fn the_old_upgrade_spellings_still_work_warn_once_each_and_clash_with_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pid-server.toml");
    write(&conf, "drain_timeout = 5\nupgrade_probation_ms = 0\n");
    let c = conf.to_str().unwrap();

    // An older release's unit: the old flag, variable and key, all taken.
    let env = [("PID_SERVER_UPGRADE_PROBATION_MS", "100")];
    let (p, _n, _addr) = start(&["--config", c, "--upgrade-timeout", "7"], &env);
    let log = p.log();
    for warning in [
        "`--upgrade-timeout` is now `--reload-timeout`; the old name still works".to_string(),
        "`PID_SERVER_UPGRADE_PROBATION_MS` is now `PID_SERVER_RELOAD_PROBATION_MS`; the old \
         name still works"
            .to_string(),
        format!(
            "{c}:2: `upgrade_probation_ms` is now `reload_probation_ms`; the old name still works"
        ),
    ] {
        assert_eq!(log.matches(&warning).count(), 1, "{warning}\n{log}");
    }
    assert_eq!(log.matches("is now").count(), 3, "{log}");

    // Both spellings from the same place: one line, exit 64.
    let both_flags = ["--upgrade-timeout", "7", "--reload-timeout", "8"];
    let out = run(&both_flags, &[]);
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        "pid-server: error: `--upgrade-timeout` and `--reload-timeout` are one setting: give \
         only `--reload-timeout` (see --help)\n"
    );
    let both_vars = [
        ("PID_SERVER_UPGRADE_TIMEOUT", "7"),
        ("PID_SERVER_RELOAD_TIMEOUT", "8"),
    ];
    let out = run(&["serve"], &both_vars);
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        "pid-server: error: `PID_SERVER_UPGRADE_TIMEOUT` and `PID_SERVER_RELOAD_TIMEOUT` are \
         one setting: give only `PID_SERVER_RELOAD_TIMEOUT` (see --help)\n"
    );

    // An old key checks, with its warning; beside its new one it is a
    // problem (exit 78).
    let out = run(&["check-config", "--config", c], &[]);
    assert_eq!((out.code, out.stdout), (0, format!("{c}: ok\n")));
    assert!(
        out.stderr.contains("`upgrade_probation_ms` is now"),
        "{}",
        out.stderr
    );
    write(&conf, "reload_probation_ms = 0\nupgrade_probation_ms = 0\n");
    let out = run(&["check-config", "--config", c], &[]);
    assert_eq!(out.code, 78, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        format!(
            "{c}:2: `upgrade_probation_ms` and `reload_probation_ms` are one setting: keep \
             only `reload_probation_ms`\n"
        )
    );
}
