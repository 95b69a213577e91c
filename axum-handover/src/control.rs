//! The control channel between the reload helper (`myapp reload`) and a
//! running generation.
//!
//! A signal cannot carry an answer, and a reload helper must learn the
//! outcome without guessing from timing; so each server listens on a Unix
//! socket named after its PID, found from the PID alone (systemd's
//! `$MAINPID`):
//! - `$RUNTIME_DIRECTORY/control.<pid>` when systemd gives the unit a
//!   runtime directory (`RuntimeDirectory=`; `ExecReload=` gets the same
//!   variable). A path reaches the server whatever network namespace each
//!   of the unit's processes ended up in: in a container without the
//!   privilege to join the unit's `PrivateNetwork=` namespace, they differ.
//! - the abstract socket `@<name>/<pid>/control` always, for a person
//!   running the helper by hand; nothing is left on disk.
//!
//! Only the server's own user or root may use either (`SO_PEERCRED`).
//!
//! The protocol is one line each way:
//! - helper: `upgrade`
//! - server: `ok <old-pid> <new-pid> <generation> <millis>`, or
//!   `failed <reason>`, or `refused <reason>`.
//! - after `upgrade`, in the same write, a helper that systemd started
//!   (`ExecReload=`, with the unit's current environment) may send
//!   `environment <n>` and `n` lines `KEY=VALUE` (`%`, CR and LF
//!   percent-escaped). A server of the first release reads the first line
//!   only and ignores the rest; a later one starts the next generation with
//!   that environment when the helper belongs to its own unit invocation
//!   (the same `INVOCATION_ID`), so `systemctl edit` then `systemctl
//!   reload` applies a changed `Environment=`.
//! - after `ok`, a second line once the old process has let go of its
//!   connections (or after a bound): `moved <moved> <fell-back> <busy>
//!   <millis>`, then a line `note <text>` for each thing the new process
//!   said the operator should hear (a setting it cannot apply). A helper of the first release reads the first line only,
//!   so the second changes nothing for it; a later helper shows it when it
//!   comes.

use std::io::{self, BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{
    SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

fn address(name: &str, pid: u32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(abstract_name(name, pid).as_bytes())
}

/// The abstract socket's name, as `/proc/net/unix` lists it without `@`.
pub(crate) fn abstract_name(name: &str, pid: u32) -> String {
    format!("{name}/{pid}/control")
}

/// What the server answers to an `upgrade` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The new process owns the unit.
    #[allow(missing_docs)]
    Ok {
        old_pid: u32,
        new_pid: u32,
        generation: u32,
        millis: u64,
    },
    /// The reload failed; the old process keeps serving.
    Failed(String),
    /// Not attempted (another reload is under way, or not allowed).
    Refused(String),
}

impl Answer {
    /// The answer as sent: one line.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Ok {
                old_pid,
                new_pid,
                generation,
                millis,
            } => format!("ok {old_pid} {new_pid} {generation} {millis}\n"),
            Answer::Failed(r) => format!("failed {}\n", r.replace('\n', " ")),
            Answer::Refused(r) => format!("refused {}\n", r.replace('\n', " ")),
        }
    }

    /// Parses the first line of `text`.
    pub fn parse(text: &str) -> Option<Answer> {
        let line = text.lines().next().unwrap_or("").trim_end();
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "ok" => {
                let n: Vec<u64> = rest
                    .split(' ')
                    .map(|x| x.parse().ok())
                    .collect::<Option<_>>()?;
                match n[..] {
                    [old, new, g, ms] => Some(Answer::Ok {
                        old_pid: old as u32,
                        new_pid: new as u32,
                        generation: g as u32,
                        millis: ms,
                    }),
                    _ => None,
                }
            }
            "failed" => Some(Answer::Failed(rest.into())),
            "refused" => Some(Answer::Refused(rest.into())),
            _ => None,
        }
    }
}

/// The second line after `ok`: what became of the old process's
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Connections moved to the new process.
    pub moved: usize,
    /// Connections that were to move but were served by the old process to
    /// the end.
    pub fell_back: usize,
    /// Connections still busy with a request in the old process when this
    /// was sent (0: the old process is done).
    pub busy: usize,
    /// Milliseconds from the handover to this report.
    pub millis: u64,
}

impl Report {
    /// The line as sent.
    pub fn to_line(&self) -> String {
        format!(
            "moved {} {} {} {}\n",
            self.moved, self.fell_back, self.busy, self.millis
        )
    }

    /// Parses a `moved` line.
    pub fn parse(line: &str) -> Option<Report> {
        let rest = line.trim_end().strip_prefix("moved ")?;
        let n: Vec<u64> = rest
            .split(' ')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        match n[..] {
            [moved, fell_back, busy, millis] => Some(Report {
                moved: moved as usize,
                fell_back: fell_back as usize,
                busy: busy as usize,
                millis,
            }),
            _ => None,
        }
    }
}

/// An `upgrade` request from a helper, with the connection to answer on.
pub(crate) struct Request {
    answer_to: tokio::net::unix::OwnedWriteHalf,
    /// The helper's environment, when it sent one.
    pub(crate) environment: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// One variable as sent: `KEY=VALUE`, escaped.
fn escape(kv: &[u8]) -> String {
    let mut out = String::with_capacity(kv.len());
    for &b in kv {
        match b {
            b'%' | b'\n' | b'\r' => out.push_str(&format!("%{b:02X}")),
            // Non-UTF-8 bytes too, so the line is text.
            0x80.. => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The environment block a helper sends after `upgrade`.
pub(crate) fn environment_block(vars: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> String {
    let lines: Vec<String> = vars
        .map(|(k, v)| {
            let mut kv = k;
            kv.push(b'=');
            kv.extend_from_slice(&v);
            escape(&kv)
        })
        .collect();
    let mut out = format!("environment {}\n", lines.len());
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Parses one escaped `KEY=VALUE` line.
pub(crate) fn parse_variable(line: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let kv = unescape(line)?;
    let eq = kv.iter().position(|b| *b == b'=').filter(|i| *i > 0)?;
    Some((kv[..eq].to_vec(), kv[eq + 1..].to_vec()))
}

/// The most variables a helper may send.
const MAX_VARIABLES: usize = 4096;

impl Request {
    /// Writes the answer (bounded), so it is out before the process goes on
    /// to drain and exit.
    pub(crate) async fn answer(self, answer: Answer) {
        let _ = self.accept(answer).await;
    }

    /// Writes the answer and keeps the connection for the [`Report`].
    pub(crate) async fn accept(mut self, answer: Answer) -> Reporter {
        let line = answer.to_line();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.answer_to.write_all(line.as_bytes()),
        )
        .await;
        Reporter {
            to: self.answer_to,
            notes: Vec::new(),
        }
    }
}

/// Where the second line goes, and the notes after it.
pub(crate) struct Reporter {
    to: tokio::net::unix::OwnedWriteHalf,
    notes: Vec<String>,
}

impl Reporter {
    /// Notes from the new process, sent after the report.
    pub(crate) fn with_notes(mut self, notes: Vec<String>) -> Reporter {
        self.notes = notes;
        self
    }

    pub(crate) async fn report(mut self, report: Report) {
        let mut text = report.to_line();
        for n in &self.notes {
            text.push_str(&format!("note {}\n", n.replace('\n', " ")));
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.to.write_all(text.as_bytes())).await;
    }
}

/// The control socket's path in a runtime directory (the first entry of
/// `$RUNTIME_DIRECTORY`, which may list several).
pub(crate) fn runtime_path(
    runtime_directory: Option<&std::ffi::OsStr>,
    pid: u32,
) -> Option<PathBuf> {
    let dirs = runtime_directory?.to_str()?;
    let first = dirs.split(':').next().filter(|d| !d.is_empty())?;
    Some(Path::new(first).join(format!("control.{pid}")))
}

/// This process's control sockets. Must be made inside the runtime.
pub(crate) struct Listeners {
    sockets: Vec<UnixListener>,
    /// Removed when the listeners are dropped.
    path: Option<PathBuf>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds the abstract socket, and the path one when given a runtime
/// directory's path for it.
pub(crate) fn listen(name: &str, pid: u32, path: Option<PathBuf>) -> io::Result<Listeners> {
    let bind = |l: StdUnixListener| -> io::Result<UnixListener> {
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    };
    let mut sockets = vec![bind(StdUnixListener::bind_addr(&address(name, pid)?)?)?];
    if let Some(p) = &path {
        // A file left by a killed process with a reused PID is stale.
        let _ = std::fs::remove_file(p);
        sockets.push(bind(StdUnixListener::bind(p)?)?);
    }
    Ok(Listeners { sockets, path })
}

/// Accepts helpers and forwards their requests until dropped (the task is
/// aborted when the drain starts, which also removes the socket file).
pub(crate) async fn serve(listeners: Listeners, requests: mpsc::Sender<Request>) {
    let me = nix::unistd::geteuid().as_raw();
    let (abstract_socket, path_socket) = (&listeners.sockets[0], listeners.sockets.get(1));
    loop {
        let accepted = tokio::select! {
            r = abstract_socket.accept() => r,
            r = async { path_socket.expect("guarded").accept().await }, if path_socket.is_some() => r,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == me)
            .unwrap_or(false);
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = handle(stream, allowed, requests).await;
        });
    }
}

async fn handle(
    stream: UnixStream,
    allowed: bool,
    requests: mpsc::Sender<Request>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = tokio::io::BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    // A helper of this release sends its environment in the same write; an
    // older one sends nothing more, so wait only for what is already here.
    let environment = if read.buffer().is_empty() {
        None
    } else {
        tokio::time::timeout(Duration::from_secs(1), read_environment(&mut read))
            .await
            .ok()
            .flatten()
    };
    let refusal = if !allowed {
        Answer::Refused("permission denied: not the server's user or root".into())
    } else if line.trim() != "upgrade" {
        Answer::Refused(format!("unknown request {:?}", line.trim()))
    } else {
        let req = Request {
            answer_to: write,
            environment,
        };
        match requests.send(req).await {
            Ok(()) => return Ok(()),
            Err(mpsc::error::SendError(req)) => {
                write = req.answer_to;
                Answer::Refused("the server is shutting down".into())
            }
        }
    };
    write.write_all(refusal.to_line().as_bytes()).await
}

/// Reads `environment <n>` and its `n` lines; `None` for anything else.
async fn read_environment(
    read: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut line = String::new();
    read.read_line(&mut line).await.ok()?;
    let n: usize = line.trim_end().strip_prefix("environment ")?.parse().ok()?;
    if n > MAX_VARIABLES {
        return None;
    }
    let mut vars = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        read.read_line(&mut line).await.ok()?;
        vars.push(parse_variable(line.trim_end_matches('\n'))?);
    }
    Some(vars)
}

/// Why the helper could not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    #[error("no {name} control socket for PID {pid}: {source}")]
    NoServer {
        name: String,
        pid: u32,
        source: io::Error,
    },
    #[error("no answer from PID {pid} within {}s", timeout.as_secs())]
    Timeout { pid: u32, timeout: Duration },
    #[error("talking to PID {pid}: {source}")]
    Io { pid: u32, source: io::Error },
    #[error("PID {pid} answered {line:?}, which is not a {name} answer")]
    Garbled {
        name: String,
        pid: u32,
        line: String,
    },
}

/// The helper's side: ask `pid` to upgrade and wait for the answer, and
/// after `ok` for the report on its connections (which a server of the
/// first release does not send). Tries the runtime directory's socket
/// first, when given one that exists.
pub(crate) fn ask_upgrade(
    name: &str,
    pid: u32,
    path: Option<&Path>,
    timeout: Duration,
    environment: Option<String>,
) -> Result<(Answer, Option<Report>, Vec<String>), AskError> {
    let io_err = |source| AskError::Io { pid, source };
    let stream = match path.filter(|p| p.exists()) {
        Some(p) => StdUnixStream::connect(p),
        None => address(name, pid).and_then(|a| StdUnixStream::connect_addr(&a)),
    }
    .map_err(|source| AskError::NoServer {
        name: name.into(),
        pid,
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    // One write, so the server finds the environment with the request.
    let mut request = String::from("upgrade\n");
    request.push_str(environment.as_deref().unwrap_or(""));
    (&stream).write_all(request.as_bytes()).map_err(io_err)?;
    let mut read = BufReader::new(&stream);
    let mut line = String::new();
    match read.read_line(&mut line) {
        Ok(_) => {}
        Err(e) if timed_out(&e) => return Err(AskError::Timeout { pid, timeout }),
        Err(e) => return Err(io_err(e)),
    }
    if line.is_empty() {
        return Err(AskError::Garbled {
            name: name.into(),
            pid,
            line: "(connection closed)".into(),
        });
    }
    let answer = Answer::parse(&line).ok_or_else(|| AskError::Garbled {
        name: name.into(),
        pid,
        line: line.clone(),
    })?;
    if !matches!(answer, Answer::Ok { .. }) {
        return Ok((answer, None, Vec::new()));
    }
    // The report follows within a few seconds (the server bounds it); an
    // older server closes the connection instead.
    let mut second = String::new();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let report = match read.read_line(&mut second) {
        Ok(_) => Report::parse(&second),
        Err(_) => None,
    };
    let mut notes = Vec::new();
    if report.is_some() {
        let mut line = String::new();
        while notes.len() < 16 && matches!(read.read_line(&mut line), Ok(n) if n > 0) {
            if let Some(n) = line.trim_end().strip_prefix("note ") {
                notes.push(n.to_string());
            }
            line.clear();
        }
    }
    Ok((answer, report, notes))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        for a in [
            Answer::Ok {
                old_pid: 1,
                new_pid: 2,
                generation: 3,
                millis: 41,
            },
            Answer::Failed("new process 5 exited with status 1 before it was ready".into()),
            Answer::Refused("a reload is already under way".into()),
        ] {
            assert_eq!(Answer::parse(&a.to_line()), Some(a));
        }
        assert_eq!(Answer::parse("ok 1 2"), None);
        assert_eq!(Answer::parse("HTTP/1.1 200 OK"), None);
        let r = Report {
            moved: 20,
            fell_back: 1,
            busy: 0,
            millis: 4,
        };
        assert_eq!(Report::parse(&r.to_line()), Some(r));
        assert_eq!(Report::parse("moved 1 2 3"), None);
        let block = environment_block(
            [
                (b"A".to_vec(), b"x=y%\nz".to_vec()),
                (b"B".to_vec(), vec![0xff]),
            ]
            .into_iter(),
        );
        assert_eq!(block, "environment 2\nA=x=y%25%0Az\nB=%FF\n");
        let vars: Vec<_> = block
            .lines()
            .skip(1)
            .map(|l| parse_variable(l).unwrap())
            .collect();
        assert_eq!(vars[0], (b"A".to_vec(), b"x=y%\nz".to_vec()));
        assert_eq!(vars[1], (b"B".to_vec(), vec![0xff]));
        assert_eq!(parse_variable("=x"), None);
        assert_eq!(parse_variable("A=%zz"), None);
    }

    #[tokio::test]
    async fn helper_and_server_talk() {
        // A PID no real process has, so this test cannot collide with one.
        let pid = u32::MAX - std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let path = runtime_path(Some(dir.path().as_os_str()), pid).unwrap();
        let l = listen("pid-server", pid, Some(path.clone())).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve(l, tx));
        let answer = tokio::spawn(async move {
            let req: Request = rx.recv().await.unwrap();
            req.answer(Answer::Refused("busy".into())).await;
        });
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || {
            ask_upgrade("pid-server", pid, Some(&p), Duration::from_secs(5), None)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, (Answer::Refused("busy".into()), None, vec![]));
        answer.await.unwrap();
        server.abort();
        let _ = server.await;
        // Dropping the listeners removes the socket file.
        assert!(!path.exists());
        assert!(matches!(
            ask_upgrade("pid-server", pid - 1, None, Duration::from_secs(1), None),
            Err(AskError::NoServer { .. })
        ));
    }
}
