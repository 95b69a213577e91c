//! A fleet (#25): three hosts behind HAProxy, a release rolled through them
//! by Ansible (`deploy/ansible/`), under load, with no failed request.
//!
//! The hosts are `systemd-nspawn` containers booted from the cached Debian
//! 13 tree with sshd and python3 added (made once beside it, see
//! [`sshd_tree`]), all in one network namespace the test makes, each on its
//! own loopback address (127.0.0.11-13): sshd and the package's socket (a
//! drop-in the role writes from `pid_server_listen`) listen there.
//! HAProxy (`deploy/haproxy/haproxy.cfg`, its servers pointed at those
//! addresses) runs in the same namespace, and so does `ansible-playbook`,
//! reaching the hosts over ssh with a key the test makes.
//!
//! The roll: the previous release's package on every host
//! (`.ci/previous-release --deb`), then under keep-alive, one-shot and
//! paused load through HAProxy: `rolling-upgrade.yml` to this release's
//! package, the same again (nothing may change), `rolling-restart.yml`,
//! back to the previous package, and up to this one again. Every request must
//! be answered, every host must run the package installed, and HAProxy
//! must never have marked a backend down (`show stat`, `chkdown`).
//!
//! Needs root, what `packaging/ci-deps.sh` installs (haproxy, ssh, the
//! Ansible venv under /opt/pid-server-ansible) and cargo-deb; without them
//! it prints `SKIPPED` (an error under `CI=true`).
//!
//! Environment: `PID_SERVER_TEST_DEB_UPGRADE`, this release's package to
//! roll out instead of building one.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pid_server_test_support::cmd::{tail, text};
use pid_server_test_support::netns::Netns;
use pid_server_test_support::nspawn::{self, Container, TreeOptions};
use pid_server_test_support::{Load, Release, TestCommand, deploy, http, repo, report, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");
const TEST: &str = "fleet_rolls_a_release_through_haproxy_without_a_failed_request";
/// Where `packaging/ci-deps.sh` puts ansible-core.
const ANSIBLE: &str = "/opt/pid-server-ansible/bin/ansible-playbook";
const HOSTS: usize = 3;
/// The package's port, on each host's own address.
const PORT: u16 = 8080;
/// HAProxy's frontend (`deploy/haproxy/haproxy.cfg`).
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
/// The bound on one playbook run (about 10 s a host here).
const PLAY_TIMEOUT: Duration = Duration::from_secs(120);

/// Host `i`'s address (0-based): 127.0.0.11, .12, .13.
fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 11 + i as u8)
}

fn host_name(i: usize) -> String {
    format!("web{}", i + 1)
}

/// The Debian tree with sshd and python3 (Ansible's modules run in it),
/// made once beside the cached tree by copying it and installing them with
/// apt in a chroot (about 30 s), then reused.
fn sshd_tree(release: Release) -> PathBuf {
    let base = deploy::debian_tree(release);
    let tree = base.with_file_name(format!("rootfs-{}-sshd", release.suite()));
    if tree.join("usr/sbin/sshd").is_file() && tree.join("usr/bin/python3").exists() {
        return tree;
    }
    let tmp = tree.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    let started = Instant::now();
    let out = TestCommand::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&tmp)
        .timeout(Duration::from_secs(300))
        .output();
    assert!(
        out.status.success(),
        "cp -a {}: {}",
        base.display(),
        text(&out)
    );
    let out = TestCommand::new("chroot")
        .arg(&tmp)
        .args([
            "sh",
            "-c",
            "mount -t proc proc /proc && apt-get update -q \
             && apt-get install -y -q --no-install-recommends openssh-server python3; \
             rc=$?; umount /proc; apt-get clean; exit $rc",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .timeout(Duration::from_secs(600))
        .output();
    assert!(
        out.status.success(),
        "installing openssh-server and python3 in {}:\n{}",
        tmp.display(),
        tail(&text(&out), 30)
    );
    fs::write(
        tmp.join("pid-server-tests.recipe"),
        format!("{} + openssh-server python3\n", base.display()),
    )
    .expect("write recipe");
    fs::rename(&tmp, &tree).unwrap_or_else(|e| panic!("rename to {}: {e}", tree.display()));
    report::say(&format!(
        "fleet: made {} in {:.1} s",
        tree.display(),
        started.elapsed().as_secs_f32()
    ));
    tree
}

/// This release's package ([`deploy::build_deb`]), or the one
/// `PID_SERVER_TEST_DEB_UPGRADE` names.
fn this_deb() -> PathBuf {
    if let Some(p) = std::env::var_os("PID_SERVER_TEST_DEB_UPGRADE") {
        return PathBuf::from(p);
    }
    deploy::build_deb(BIN, &format!("{}-1~pst2", env!("CARGO_PKG_VERSION")))
}

/// A folder for the run's files (key, inventory, HAProxy's configuration
/// and socket), removed when the test ends, passed or not.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// HAProxy in the test's namespace, killed when the test ends.
struct Haproxy {
    child: Child,
    log: PathBuf,
    admin: PathBuf,
}

impl Haproxy {
    fn start(ns: &Netns, dir: &Path) -> Haproxy {
        let shipped = fs::read_to_string(repo().join("deploy/haproxy/haproxy.cfg"))
            .expect("read deploy/haproxy/haproxy.cfg");
        let admin = dir.join("admin.sock");
        // The shipped file as is, but for the servers' addresses (the
        // example inventory's 10.0.0.x) and the admin socket's path.
        let mut cfg = String::new();
        for line in shipped.lines() {
            let line = match line.trim_start().strip_prefix("server web") {
                Some(rest) => {
                    let n: usize = rest[..1].parse().expect("server webN");
                    format!("    server web{n} {}:{PORT}", host_ip(n - 1))
                }
                None => line.replace("/run/haproxy/admin.sock", &admin.display().to_string()),
            };
            cfg.push_str(&line);
            cfg.push('\n');
        }
        let path = dir.join("haproxy.cfg");
        fs::write(&path, cfg).expect("write haproxy.cfg");
        let log = dir.join("haproxy.log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "haproxy", "-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).expect("create haproxy.log"))
            .stderr(Stdio::from(
                fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("open haproxy.log"),
            ))
            .spawn()
            .expect("start haproxy");
        Haproxy { child, log, admin }
    }

    /// A command on the admin socket (the socket is a file, reachable from
    /// any network namespace).
    fn admin(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(&self.admin)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.admin.display()));
        s.write_all(format!("{cmd}\n").as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    /// `(server, status, chkdown)` for each server of the backend.
    fn servers(&self) -> Vec<(String, String, u64)> {
        let stat = self.admin("show stat");
        let mut lines = stat.lines();
        let head: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| head.iter().position(|h| *h == name).expect(name);
        let (sv, status, chkdown) = (col("svname"), col("status"), col("chkdown"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > chkdown && f[sv].starts_with("web"))
            .map(|f| {
                (
                    f[sv].to_string(),
                    f[status].to_string(),
                    f[chkdown].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    fn wait_all_up(&self, bound: Duration) {
        // The servers as last seen, once HAProxy answers on its socket.
        let mut seen = None;
        wait::within(bound, || {
            if !self.admin.exists() {
                return None;
            }
            let s = self.servers();
            let up = s.len() == HOSTS && s.iter().all(|(_, st, _)| st == "UP");
            seen = Some(s);
            up.then_some(())
        })
        .unwrap_or_else(|| match seen {
            Some(s) => panic!("HAProxy: not all servers up: {s:?}"),
            None => panic!(
                "HAProxy did not start:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            ),
        });
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `ansible-playbook` run, in the namespace; its output and the
/// "changed" count summed over the hosts of PLAY RECAP.
struct Play {
    out: String,
    changed: u64,
    elapsed: Duration,
}

fn play(ns: &Netns, dir: &Path, playbook: &str, extra: &[String]) -> Play {
    let ansible = repo().join("deploy/ansible");
    let started = Instant::now();
    let out = TestCommand::new("ip")
        .args(["netns", "exec", ns.name(), ANSIBLE, "-i"])
        .arg(dir.join("inventory.ini"))
        .arg(playbook)
        .args(extra.iter().flat_map(|e| ["-e".to_string(), e.clone()]))
        .env("ANSIBLE_CONFIG", ansible.join("ansible.cfg"))
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .current_dir(&ansible)
        .timeout(PLAY_TIMEOUT)
        .output();
    let elapsed = started.elapsed();
    let out_text = text(&out);
    assert!(
        out.status.success(),
        "{playbook} {extra:?} failed:\n{}",
        tail(&out_text, 60)
    );
    let changed = out_text
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("changed="))
        })
        .map(|n| n.parse::<u64>().expect("changed=N"))
        .sum();
    Play {
        out: out_text,
        changed,
        elapsed,
    }
}

/// The version of the package installed on a host.
fn installed(c: &Container) -> String {
    let out = c.exec(&["dpkg-query", "-W", "-f", "${Version}", "pid-server"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn can_run() -> bool {
    nspawn::require_or_skip_release(TEST, Release::Trixie)
        && report::require_tools(
            TEST,
            &[
                ("haproxy", "apt-get install haproxy"),
                ("ssh", "apt-get install openssh-client"),
                ("ssh-keygen", "apt-get install openssh-client"),
                ("dpkg-deb", "dpkg"),
                ("chroot", "coreutils"),
            ],
        )
        && (Path::new(ANSIBLE).is_file() || {
            report::cannot_run(TEST, &format!("no {ANSIBLE} (packaging/ci-deps.sh)"));
            false
        })
        && (std::env::var_os("PID_SERVER_TEST_DEB_UPGRADE").is_some()
            || report::require_tools(TEST, &[("cargo-deb", "cargo install cargo-deb --locked")]))
}

#[test]
fn fleet_rolls_a_release_through_haproxy_without_a_failed_request() {
    if !can_run() {
        return;
    }
    let release = Release::Trixie;
    let previous = match deploy::previous_deb() {
        Ok(p) => p,
        Err(e) => {
            report::cannot_run(
                TEST,
                &format!("cannot build the previous release's package: {e}"),
            );
            return;
        }
    };
    let this = this_deb();
    let (previous_version, this_version) =
        (deploy::deb_version(&previous), deploy::deb_version(&this));
    let tree = sshd_tree(release);
    let started = Instant::now();

    let dir = WorkDir(deploy::target_dir(BIN).join(format!("fleet-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(&dir.0).expect("mkdir");
    let key = dir.0.join("key");
    let out = TestCommand::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .timeout(Duration::from_secs(30))
        .output();
    assert!(out.status.success(), "ssh-keygen: {}", text(&out));
    let authorized = dir.0.join("authorized_keys");
    fs::copy(key.with_extension("pub"), &authorized).expect("copy the public key");
    let mut inventory = String::from("[pid_server]\n");
    for i in 0..HOSTS {
        let ip = host_ip(i);
        inventory.push_str(&format!(
            "{} ansible_host={ip} pid_server_listen={ip}:{PORT}\n",
            host_name(i)
        ));
        fs::write(
            dir.0.join(format!("sshd-{i}.conf")),
            format!("ListenAddress {ip}\n"),
        )
        .expect("write sshd conf");
    }
    inventory.push_str(&format!(
        "[pid_server:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args=-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\n",
        key.display()
    ));
    fs::write(dir.0.join("inventory.ini"), inventory).expect("write inventory");

    // Declared before the containers and HAProxy, so they drop after them.
    let ns = Netns::new();
    let hosts: Vec<Container> = (0..HOSTS)
        .map(|i| {
            Container::boot_tree(&TreeOptions {
                rootfs: tree.clone(),
                netns: Some(ns.path()),
                bind_ro: vec![
                    (
                        dir.0.join(format!("sshd-{i}.conf")),
                        "/etc/ssh/sshd_config.d/listen.conf".into(),
                    ),
                    (authorized.clone(), "/root/.ssh/authorized_keys".into()),
                ],
            })
        })
        .collect();
    ns.run(|| {
        for i in 0..HOSTS {
            let ssh = SocketAddr::from((host_ip(i), 22));
            wait::until(
                &format!("sshd on {ssh} to listen"),
                Duration::from_secs(30),
                || TcpStream::connect_timeout(&ssh, Duration::from_secs(1)).ok(),
            );
        }
    });
    let booted = started.elapsed();

    let deb_arg = |deb: &Path| format!("pid_server_deb={}", deb.display());
    // The first install and the rerun that must change nothing go to every
    // host at once (the play's `pid_server_serial`): nothing serves through
    // HAProxy yet, or nothing changes, so one at a time proves nothing
    // there, and it is a third of the test's time, which must stay within
    // its bound on a slow machine. Every roll under load is one at a time.
    let all_at_once = format!("pid_server_serial={HOSTS}");
    let install = play(
        &ns,
        &dir.0,
        "rolling-upgrade.yml",
        &[deb_arg(&previous), all_at_once.clone()],
    );
    for c in &hosts {
        assert_eq!(installed(c), previous_version, "{}", tail(&install.out, 40));
    }
    let haproxy = Haproxy::start(&ns, &dir.0);
    haproxy.wait_all_up(Duration::from_secs(20));

    let load = Load::to(FRONTEND)
        .keep_alive(4)
        .one_shot(2)
        .paused(4)
        .pace(Duration::from_millis(2))
        // The plays under load take about 70 s on an idle machine and
        // could take four times that on a busy one (a clean clone's CI
        // run once had them at 270 s, one host at a time throughout): the
        // bound must outlast the roll, since the load is asked for answers
        // after it. 2 ms paced clients send ~3 700 requests a second.
        .max_time(Duration::from_secs(480))
        .max_requests(2_000_000)
        .netns(ns.path())
        .start();
    load.wait_for("answers through HAProxy", Duration::from_secs(10), |t| {
        t.ok >= 300
    });

    let upgrade = play(&ns, &dir.0, "rolling-upgrade.yml", &[deb_arg(&this)]);
    for c in &hosts {
        assert_eq!(
            installed(c),
            this_version,
            "{}: {}",
            c.name(),
            tail(&upgrade.out, 40)
        );
    }
    // This release serves /metrics, the previous one does not: each host
    // serves the package just installed.
    ns.run(|| {
        for i in 0..HOSTS {
            let r = http::get(SocketAddr::from((host_ip(i), PORT)), "/metrics")
                .unwrap_or_else(|e| panic!("{}: /metrics: {e}", host_name(i)));
            assert_eq!(r.status, 200, "{} is not on this release", host_name(i));
        }
    });
    let again = play(
        &ns,
        &dir.0,
        "rolling-upgrade.yml",
        &[deb_arg(&this), all_at_once],
    );
    // The rolling restart on this release (a restart keeps connections from
    // this release on), then the rollback from the processes the restarts
    // started: they run the unit's own command line, which the previous
    // release must accept (its configuration file is named by a variable,
    // not a flag it predates).
    let restart = play(&ns, &dir.0, "rolling-restart.yml", &[]);
    for c in &hosts {
        assert_eq!(installed(c), this_version, "{}", tail(&restart.out, 40));
    }
    let rollback = play(&ns, &dir.0, "rolling-upgrade.yml", &[deb_arg(&previous)]);
    for c in &hosts {
        assert_eq!(
            installed(c),
            previous_version,
            "{}",
            tail(&rollback.out, 40)
        );
    }
    let up_again = play(&ns, &dir.0, "rolling-upgrade.yml", &[deb_arg(&this)]);
    for c in &hosts {
        assert_eq!(installed(c), this_version, "{}", tail(&up_again.out, 40));
    }
    let after = load.snapshot();
    load.wait_more(&after, 300, Duration::from_secs(10));
    let tally = load.finish();
    let servers = haproxy.servers();
    let total = started.elapsed();

    let per_host = |p: &Play| p.elapsed.as_secs_f32() / HOSTS as f32;
    report::say(&format!(
        "fleet: {HOSTS} Debian {} hosts booted with sshd in {:.1} s",
        release.debian(),
        booted.as_secs_f32()
    ));
    report::say(&format!(
        "fleet: through HAProxy during the roll: {} requests, {} failed ({})",
        tally.sent,
        tally.failed(),
        tally.summary()
    ));
    report::say(&format!(
        "fleet: per host: upgrade {previous_version} -> {this_version} {:.1} s, \
         restart {:.1} s, rollback {:.1} s, upgrade again {:.1} s; all {HOSTS} at once: \
         first install {:.1} s, second run {:.1} s",
        per_host(&upgrade),
        per_host(&restart),
        per_host(&rollback),
        per_host(&up_again),
        install.elapsed.as_secs_f32(),
        again.elapsed.as_secs_f32()
    ));
    report::say(&format!(
        "fleet: the second run's changed count: {}; HAProxy's servers (name, status, \
         times down): {servers:?}; {:.1} s in all",
        again.changed,
        total.as_secs_f32()
    ));
    assert_eq!(
        tally.failed(),
        0,
        "requests failed through HAProxy: {}\n{:#?}\n--- haproxy ---\n{}",
        tally.summary(),
        tally.examples,
        tail(&fs::read_to_string(&haproxy.log).unwrap_or_default(), 40)
    );
    assert!(upgrade.changed > 0, "the upgrade changed nothing");
    assert_eq!(
        again.changed,
        0,
        "the second run changed something:\n{}",
        tail(&again.out, 60)
    );
    assert_eq!(servers.len(), HOSTS, "{servers:?}");
    assert!(
        servers.iter().all(|(_, st, down)| st == "UP" && *down == 0),
        "HAProxy marked a backend down: {servers:?}\n{}",
        tail(&fs::read_to_string(&haproxy.log).unwrap_or_default(), 40)
    );
    assert!(
        total < Duration::from_secs(300),
        "the fleet test took {:.0} s, over its 5 minutes",
        total.as_secs_f32()
    );
}
