//! TLS under a real systemd, with the repo's sandboxed unit: the service
//! reads a key only a group of its own may read (`SupplementaryGroups=`
//! beside `DynamicUser=`, as README's TLS section says), `systemctl
//! reload` under TLS load (HTTP/2 and HTTP/1.1 by ALPN) fails no stream and
//! no request and serves the renewed certificate, a TLS session resumes
//! with the new process (the ticket keys travel with the handover), and a
//! broken certificate fails the reload with its path while the old process
//! keeps serving.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pid_server_test_support::cmd::text;
use pid_server_test_support::h2::{H2Conn, H2Load};
use pid_server_test_support::nspawn::Container;
use pid_server_test_support::tls::{ClientConfig, TestCa, TlsConn};
use pid_server_test_support::{Release, each_release, netns, wait};

use super::{SERVICE, WAIT, boot, can_run, reload, reload_ok, say, status, status_line, timer};

const CONFIG: &str = "/etc/pid-server/pid-server.toml";
const CERT: &str = "/etc/pid-server/tls/cert.pem";
const KEY: &str = "/etc/pid-server/tls/key.pem";
/// The group that may read the key; the service gets it with
/// `SupplementaryGroups=`.
const GROUP: &str = "pid-server-tls";
const DROPIN: &str = "[Service]\nSupplementaryGroups=pid-server-tls\n";

/// Installs a certificate and its key the way an operator's deploy hook
/// would: the key `root:pid-server-tls`, mode 0640.
fn install_leaf(c: &Container, ca: &TestCa, cn: &str) {
    let (cert, key) = ca.leaf(cn);
    c.write_file(CERT, cert.as_bytes(), 0o644);
    c.write_file(KEY, key.as_bytes(), 0o640);
    let out = c.exec(&["chgrp", GROUP, KEY]);
    assert!(out.status.success(), "chgrp: {}", text(&out));
}

/// One TLS HTTP/1.1 request on a new connection, in the container's
/// namespace: (PID that answered, the certificate's common name, whether
/// the session was resumed). A resumed session shows the certificate of
/// the session it resumes, so to see the certificate served now, pass a
/// configuration that has not connected before.
fn tls_get(c: &Container, cfg: &Arc<ClientConfig>) -> (u32, String, bool) {
    let (addr, cfg) = (c.addr(), cfg.clone());
    c.in_netns(move || {
        let mut conn = TlsConn::open(addr, cfg).unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
        let r = conn
            .get("/")
            .unwrap_or_else(|e| panic!("GET / over TLS: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(conn.alpn().as_deref(), Some(&b"http/1.1"[..]));
        (
            r.pid().expect("a pid-server answer"),
            conn.server_cn().expect("a CN"),
            conn.is_resumed(),
        )
    })
}

/// The PID and certificate a client that never connected before sees.
fn served_now(c: &Container, ca: &TestCa) -> (u32, String) {
    let (pid, cn, resumed) = tls_get(c, &ca.client(&[b"http/1.1"]));
    assert!(
        !resumed,
        "a new client configuration has no session to resume"
    );
    (pid, cn)
}

/// What the HTTP/1.1-over-TLS clients saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
    by_pid: BTreeMap<u32, u64>,
}

/// Keep-alive HTTP/1.1 clients over TLS, in the container's namespace:
/// each keeps its connection until the server says `Connection: close`,
/// counts every error as a failure and never retries; bounded in requests
/// and time.
struct TlsLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl TlsLoad {
    fn start(c: &Container, cfg: &Arc<ClientConfig>, clients: usize) -> TlsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let nsp: PathBuf = c.netns_path().expect("the container's network namespace");
        let threads = (0..clients)
            .map(|_| {
                let (stop, nsp, cfg, addr) = (stop.clone(), nsp.clone(), cfg.clone(), c.addr());
                thread::spawn(move || {
                    netns::enter(&nsp);
                    let deadline = Instant::now() + Duration::from_secs(90);
                    let mut t = Tally::default();
                    let mut conn: Option<TlsConn> = None;
                    while !stop.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                        && t.ok < 50_000
                        && t.failed.len() < 100
                    {
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => match TlsConn::open(addr, cfg.clone()) {
                                Ok(c) => conn.insert(c),
                                Err(e) => {
                                    t.failed.push(format!("connect: {e}"));
                                    continue;
                                }
                            },
                        };
                        match c.get("/") {
                            Ok(r) if r.status == 200 => {
                                t.ok += 1;
                                *t.by_pid.entry(r.pid().unwrap_or(0)).or_default() += 1;
                                if r.close {
                                    conn = None;
                                }
                            }
                            Ok(r) => {
                                t.failed.push(format!("status {}: {:?}", r.status, r.body));
                                conn = None;
                            }
                            Err(e) => {
                                t.failed.push(e.to_string());
                                conn = None;
                            }
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                    t
                })
            })
            .collect();
        TlsLoad { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for h in self.threads {
            let t = h.join().expect("a TLS client thread");
            all.ok += t.ok;
            all.failed.extend(t.failed);
            for (pid, n) in t.by_pid {
                *all.by_pid.entry(pid).or_default() += n;
            }
        }
        all
    }
}

each_release!(a_reload_renews_the_certificate_under_tls_load_and_refuses_a_broken_one);

fn a_reload_renews_the_certificate_under_tls_load_and_refuses_a_broken_one(r: Release) {
    if !can_run(
        "a_reload_renews_the_certificate_under_tls_load_and_refuses_a_broken_one",
        r,
    ) {
        return;
    }
    let _timer = timer(
        r,
        "T TLS: a reload renews the certificate under load, refuses a broken one",
    );
    let c = boot(r, &[("tls.conf", DROPIN)]);
    let out = c.exec(&["groupadd", "--system", GROUP]);
    assert!(out.status.success(), "groupadd: {}", text(&out));
    let ca = TestCa::new();
    install_leaf(&c, &ca, "first certificate");
    c.write_file(
        CONFIG,
        format!("tls_cert = \"{CERT}\"\ntls_key = \"{KEY}\"\n").as_bytes(),
        0o644,
    );
    let h1 = ca.client(&[b"http/1.1"]);
    let h2 = ca.client(&[b"h2"]);

    // The first TLS connection starts the service (socket activation).
    let (first, cn) = served_now(&c, &ca);
    assert_eq!(cn, "first certificate");
    assert_eq!(c.main_pid(SERVICE), first);
    // A client that will resume its session after the reload.
    let resuming = ca.client(&[b"http/1.1"]);
    assert_eq!(tls_get(&c, &resuming), (first, cn, false));

    // Load over TLS, both ALPN protocols, then a renewed certificate and
    // a reload.
    let nsp = c.netns_path().unwrap();
    let (addr, cfg) = (c.addr(), h2.clone());
    let h2_load = H2Load::start(
        move || {
            netns::enter(&nsp);
            H2Conn::connect_tls(addr, cfg.clone())
        },
        "/",
        4,
        Duration::from_secs(90),
    );
    let h1_load = TlsLoad::start(&c, &h1, 2);
    h2_load.wait_answers_from(first, 50, WAIT);
    install_leaf(&c, &ca, "renewed certificate");
    let took = reload_ok(&c);
    let second = c.main_pid(SERVICE);
    assert_ne!(second, first, "MainPID did not change");
    assert_eq!(
        served_now(&c, &ca),
        (second, "renewed certificate".to_string())
    );
    // The session-ticket keys came with the handover: the session made
    // with the first process resumes with the second.
    let (pid, _, resumed) = tls_get(&c, &resuming);
    assert_eq!((pid, resumed), (second, true), "resumed across the reload");
    h2_load.wait_answers_from(second, 50, WAIT);
    // The old process lets its TLS connections go (GOAWAY, `Connection:
    // close`) and exits; by then the HTTP/1.1 clients are on the new one.
    c.wait_gone(first, "the old generation", WAIT);
    let (h2t, h1t) = (h2_load.finish(), h1_load.finish());
    say(
        r,
        &format!(
            "TLS reload in {} ms: h2 {} ok, {} failed, by PID {:?}; http/1.1 {} ok, {} failed, by PID {:?}",
            took.as_millis(),
            h2t.ok,
            h2t.failed.len(),
            h2t.by_pid,
            h1t.ok,
            h1t.failed.len(),
            h1t.by_pid
        ),
    );
    assert!(h2t.failed.is_empty(), "failed h2 streams: {:?}", h2t.failed);
    assert_eq!(
        h2t.unprocessed, 0,
        "h2 streams refused by a GOAWAY: {h2t:?}"
    );
    assert!(
        h1t.failed.is_empty(),
        "failed TLS requests: {:?}",
        h1t.failed
    );
    for (what, by_pid) in [("h2", &h2t.by_pid), ("http/1.1", &h1t.by_pid)] {
        assert!(
            by_pid.contains_key(&first) && by_pid.contains_key(&second),
            "{what}: both generations should have answered: {by_pid:?}"
        );
    }

    // A broken certificate: the reload fails naming the file, the renewed
    // one stays served by the same process.
    c.write_file(CERT, b"not a certificate\n", 0o644);
    let (out, _) = reload(&c);
    assert!(
        !out.status.success(),
        "a reload to a broken certificate succeeded"
    );
    assert_eq!(c.main_pid(SERVICE), second);
    let journal = wait::until("the certificate's path in the journal", WAIT, || {
        let j = c.journal(&["-u", SERVICE, "-o", "cat"]);
        j.contains(&format!("could not start: {CERT}")).then_some(j)
    });
    assert!(journal.contains(CERT), "{journal}");
    assert_eq!(
        served_now(&c, &ca),
        (second, "renewed certificate".to_string())
    );
    let s = status(&c);
    assert!(
        status_line(&s).is_some_and(|l| l.contains("last reload failed")),
        "{s}"
    );
}
