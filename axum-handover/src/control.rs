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
//!   Only the unit's user can create files there, so no one else can take
//!   this name.
//! - the abstract socket `@<name>/<pid>/control`, for a person running the
//!   helper by hand (no runtime directory in their environment); nothing
//!   is left on disk. Abstract names have no permissions: any local user
//!   may bind one first. A server whose abstract name is taken still binds
//!   the path socket (one warning, `control_name_taken`), and the helper
//!   checks who answers before it sends anything (below), so a squatter
//!   learns nothing and cannot fake an outcome; the name is kept because
//!   it is the only way in outside the unit.
//!
//! # Who may talk to whom
//!
//! - The server checks the helper's credentials (`SO_PEERCRED`) before it
//!   reads a byte: only its own user or root; anyone else gets
//!   `refused permission denied: ...` and the connection is closed
//!   unread. It serves at most [`MAX_CONNECTIONS`] helpers at once (one
//!   more is answered `refused busy: ...` and closed), reads at most
//!   [`MAX_REQUEST_LINE`] bytes of request line and [`MAX_ENVIRONMENT`]
//!   bytes ([`MAX_VARIABLES`] variables) of environment (over a cap:
//!   `refused request too long: ...`, nothing more read), and waits at most
//!   [`REQUEST_TIMEOUT`] for them. So the descriptors it holds for control
//!   connections are bounded ([`DESCRIPTORS`]), and the fd budget keeps
//!   them apart from the HTTP connections'.
//! - The helper checks the server's credentials (`SO_PEERCRED` on the
//!   connected socket) before it writes a byte: the PID that listens must
//!   be the PID it was asked about (a squatter cannot have that PID), and,
//!   where `/proc` shows that PID's user, run as that user or root (a
//!   squatter whose PID was later reused). Credentials are as seen from the
//!   helper's namespaces; `ExecReload=` runs in the unit's, where
//!   `$MAINPID` and the server's PID agree, and so does a helper run by
//!   hand in the host's namespaces. A server in a PID namespace the helper
//!   cannot see shows PID 0 and is not trusted.
//!
//! # Protocol
//!
//! One line each way:
//! - helper: `upgrade`. The word predates "reload", the name everything
//!   else uses for this request, and stays: the helper of one release asks
//!   the server of another (an older one after a rollback), and a server
//!   answers a word it does not know `refused unknown request "…"`. A server
//!   that also took `reload` would gain nothing while no helper may send
//!   it, so it takes `upgrade` only.
//! - server: `ok <old-pid> <new-pid> <generation> <millis>`, or
//!   `failed <reason>`, or `refused <reason>`.
//! - after `upgrade`, in the same write, a helper that systemd started
//!   (`ExecReload=`, with the unit's current environment) may send
//!   `environment <n>` and `n` lines `KEY=VALUE` (`%`, CR and LF
//!   percent-escaped). A server of the first release reads the first line
//!   only and ignores the rest; a later one starts the next generation with
//!   that environment when the helper belongs to its own unit invocation
//!   (the same `INVOCATION_ID`), so `systemctl edit` then `systemctl
//!   reload` applies a changed `Environment=`. A block that is not of this
//!   form is ignored, as before; one over a cap is refused.
//! - after `ok`, a second line once the old process has let go of its
//!   connections (or after a bound): `moved <moved> <fell-back> <busy>
//!   <millis>`, then a line `note <text>` for each thing the new process
//!   said the operator should hear (a setting it cannot apply). A helper of the first release reads the first line only,
//!   so the second changes nothing for it; a later helper shows it when it
//!   comes.
//!
//! A refusal's reason starts with a fixed phrase the helper maps to its
//! exit code: `permission denied` (every release), `a reload is already
//! under way`, `busy`, `request too long`, `unknown request`, `the server
//! is shutting down`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{
    SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};

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
/// connections. Non-exhaustive: the line may say more in a later release
/// (read one with `Report::parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Connections moved to the new process.
    pub moved: usize,
    /// Connections that were to move but were served by the old process to
    /// the end.
    pub fell_back: usize,
    /// Connections still open in the old process when this was sent
    /// (cut, when the drain timed out).
    pub busy: usize,
    /// Milliseconds from the handover to this report.
    pub millis: u64,
    /// The old process was done (everything moved, closed or cut) when
    /// this was sent. `false` when the report comes at its bound: the old
    /// process still runs, on `busy` connections, or waiting for an older
    /// process still running before it.
    pub done: bool,
}

impl Report {
    /// The line as sent.
    pub fn to_line(&self) -> String {
        format!(
            "moved {} {} {} {} {}\n",
            self.moved,
            self.fell_back,
            self.busy,
            self.millis,
            u8::from(self.done)
        )
    }

    /// Parses a `moved` line. Without its fifth number (a server before
    /// it), done when nothing was busy.
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
                done: busy == 0,
            }),
            [moved, fell_back, busy, millis, done @ (0 | 1)] => Some(Report {
                moved: moved as usize,
                fell_back: fell_back as usize,
                busy: busy as usize,
                millis,
                done: done == 1,
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
pub fn environment_block(vars: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> String {
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
pub const MAX_VARIABLES: usize = 4096;

/// The longest request line the server reads, newline included: the
/// request is `upgrade`; the rest is room for a later one.
pub const MAX_REQUEST_LINE: usize = 64;

/// The most bytes of environment block (`environment <n>` and its lines)
/// the server reads. A unit's environment is a few kB; systemd itself caps
/// a command line with its environment at a few MB.
pub const MAX_ENVIRONMENT: usize = 1 << 20;

/// The most control connections served at once. A reload takes one, and a
/// second is refused as "under way" within moments; 8 leaves room for a
/// few operators' helpers at once without letting the server's own user
/// (nobody else gets this far) hold descriptors the HTTP connections need.
pub(crate) const MAX_CONNECTIONS: usize = 8;

/// Requests read but not yet taken by the generation (the channel's
/// capacity).
pub(crate) const QUEUED: usize = 4;

/// The most descriptors the control sockets hold: the two listening
/// sockets, the connections being read (or waiting for room in the queue),
/// the requests queued, the one the reload under way answers on, and the
/// one a refusal is being written to.
pub(crate) const DESCRIPTORS: usize = 2 + MAX_CONNECTIONS + QUEUED + 1 + 1;

/// How long a helper has to send its request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server would not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The helper is neither the server's user nor root (`None`: its
    /// credentials could not be read).
    #[error("permission denied: uid {} is neither the server's user nor root", .uid.map_or("?".to_string(), |u| u.to_string()))]
    PermissionDenied {
        #[allow(missing_docs)]
        uid: Option<u32>,
    },
    /// As many helpers as the server serves at once are being served.
    #[error("busy: {MAX_CONNECTIONS} control connections are open")]
    Busy,
    /// The request line went past [`MAX_REQUEST_LINE`].
    #[error("request too long: over {MAX_REQUEST_LINE} bytes")]
    LineTooLong,
    /// The environment block went past [`MAX_ENVIRONMENT`].
    #[error("request too long: environment over {MAX_ENVIRONMENT} bytes")]
    EnvironmentTooLong,
    /// The environment block announced more than [`MAX_VARIABLES`].
    #[error("request too long: environment over {MAX_VARIABLES} variables")]
    TooManyVariables,
    /// Not `upgrade`.
    #[error("unknown request {0:?}")]
    Unknown(String),
}

/// A helper's environment: `(KEY, VALUE)` pairs.
pub type Environment = Vec<(Vec<u8>, Vec<u8>)>;

/// Reads one line of at most `cap` bytes (newline included; the last line
/// may lack it). `Ok(None)`: nothing came.
async fn read_capped_line<R: AsyncBufRead + Unpin>(
    read: &mut R,
    cap: usize,
    over: Refusal,
) -> Result<Option<Vec<u8>>, Refusal> {
    let mut line = Vec::new();
    // One byte past the cap tells a line over it from one that ends there.
    match (&mut *read)
        .take(cap as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
    {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    if line.len() > cap {
        return Err(over);
    }
    Ok(Some(line))
}

/// Reads a request from a helper whose credentials passed: the line, then,
/// when `more` says bytes came with it, the environment block. A helper of
/// this release sends both in one write; an older one sends the line only,
/// so the server waits only for what is already here. Reads nothing past a
/// cap. `Ok(None)`: no environment, or one not in the expected form (which
/// an older server ignored too).
pub(crate) async fn read_request<R: AsyncBufRead + Unpin>(
    read: &mut R,
    more: impl FnOnce(&R) -> bool,
) -> Result<Option<Environment>, Refusal> {
    let line = read_capped_line(read, MAX_REQUEST_LINE, Refusal::LineTooLong)
        .await?
        .unwrap_or_default();
    let line = String::from_utf8_lossy(&line);
    if line.trim() != "upgrade" {
        return Err(Refusal::Unknown(line.trim().into()));
    }
    if !more(read) {
        return Ok(None);
    }
    read_environment(read).await
}

/// Reads `environment <n>` and its `n` lines, within [`MAX_ENVIRONMENT`]
/// bytes and [`MAX_VARIABLES`] variables.
async fn read_environment<R: AsyncBufRead + Unpin>(
    read: &mut R,
) -> Result<Option<Environment>, Refusal> {
    let mut left = MAX_ENVIRONMENT;
    let Some(head) = read_capped_line(read, left, Refusal::EnvironmentTooLong).await? else {
        return Ok(None);
    };
    left -= head.len();
    let Some(n) = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.trim_end().strip_prefix("environment "))
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Ok(None);
    };
    if n > MAX_VARIABLES {
        return Err(Refusal::TooManyVariables);
    }
    let mut vars = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(line) = read_capped_line(read, left, Refusal::EnvironmentTooLong).await? else {
            return Ok(None);
        };
        left -= line.len();
        let Some(var) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| parse_variable(l.trim_end_matches('\n')))
        else {
            return Ok(None);
        };
        vars.push(var);
    }
    Ok(Some(vars))
}

/// Reads a request from bytes already in hand, as the server reads a
/// helper that sent `input` in one write (the same code): for fuzzing and
/// tests.
pub fn parse_request(mut input: &[u8]) -> Result<Option<Environment>, Refusal> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut read = std::pin::pin!(read_request(&mut input, |rest| !rest.is_empty()));
    match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        // A slice is never waited for.
        Poll::Pending => unreachable!("reading a slice does not wait"),
    }
}

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

/// This process's control sockets (at least one). Must be made inside the
/// runtime.
pub(crate) struct Listeners {
    /// `None` when another process holds the name.
    abstract_socket: Option<UnixListener>,
    path_socket: Option<UnixListener>,
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
/// directory's path for it. An abstract name another process holds is one
/// warning when the path socket can be bound instead, an error otherwise.
pub(crate) fn listen(name: &str, pid: u32, path: Option<PathBuf>) -> io::Result<Listeners> {
    let bind = |l: StdUnixListener| -> io::Result<UnixListener> {
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    };
    let shown = format!("@{}", abstract_name(name, pid));
    let abstract_socket = match StdUnixListener::bind_addr(&address(name, pid)?) {
        Ok(l) => Some(bind(l)?),
        Err(e) => match &path {
            Some(p) => {
                tracing::warn!(event = "control_name_taken", name = %shown, error = %e,
                    "the control socket name {shown} is taken (by another process?): \
                     the reload helper reaches this process through {} only", p.display());
                None
            }
            None => return Err(io::Error::new(e.kind(), format!("{shown}: {e}"))),
        },
    };
    let path_socket = match &path {
        Some(p) => {
            // A file left by a killed process with a reused PID is stale.
            let _ = std::fs::remove_file(p);
            Some(bind(StdUnixListener::bind(p)?)?)
        }
        None => None,
    };
    Ok(Listeners {
        abstract_socket,
        path_socket,
        path,
    })
}

/// Accepts helpers and forwards their requests until dropped (the task is
/// aborted when the drain starts, which also removes the socket file).
pub(crate) async fn serve(listeners: Listeners, requests: mpsc::Sender<Request>) {
    let me = nix::unistd::geteuid().as_raw();
    let (abstract_socket, path_socket) = (&listeners.abstract_socket, &listeners.path_socket);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = async { abstract_socket.as_ref().expect("guarded").accept().await }, if abstract_socket.is_some() => r,
            r = async { path_socket.as_ref().expect("guarded").accept().await }, if path_socket.is_some() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                crate::server::accept_failed("control", &e).await;
                continue;
            }
        };
        // Who is asking, before a byte is read: anyone else is answered
        // at once and costs no task, no buffer and no slot.
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        if !matches!(uid, Some(u) if u == 0 || u == me) {
            refuse_now(stream, Refusal::PermissionDenied { uid });
            continue;
        }
        // A full house is answered rather than closed silently, so a
        // helper can say why.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse_now(stream, Refusal::Busy);
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = handle(stream, requests).await;
            drop(slot);
        });
    }
}

/// Answers `refusal` without waiting (a new connection's send buffer has
/// room for one line) and closes the connection unread.
fn refuse_now(stream: UnixStream, refusal: Refusal) {
    // Straight to the socket: tokio's `try_write` declines until the
    // reactor has seen the new socket writable, which it may not have yet.
    if let Ok(stream) = stream.into_std() {
        let _ = (&stream).write(Answer::Refused(refusal.to_string()).to_line().as_bytes());
    }
}

async fn handle(stream: UnixStream, requests: mpsc::Sender<Request>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_request(&mut read, |r| !r.buffer().is_empty()),
    )
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
    let refusal = match read {
        Err(refusal) => refusal.to_string(),
        Ok(environment) => {
            let req = Request {
                answer_to: write,
                environment,
            };
            match requests.send(req).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(req)) => {
                    write = req.answer_to;
                    "the server is shutting down".into()
                }
            }
        }
    };
    write
        .write_all(Answer::Refused(refusal).to_line().as_bytes())
        .await
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
    /// Another process holds the control socket's name; nothing was sent.
    #[error(
        "the control socket {socket} is held by PID {holder_pid} (uid {holder_uid}){why}; sent nothing"
    )]
    NotTheServer {
        socket: String,
        pid: u32,
        holder_pid: u32,
        holder_uid: u32,
        /// How that differs from `pid`.
        why: String,
    },
}

/// The user `pid` runs as (effective uid), where `/proc` shows it.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Checks that the process listening on `stream` is `pid` (and, where
/// `/proc` shows `pid`'s user, that it runs as that user or root).
fn check_listener(stream: &StdUnixStream, socket: String, pid: u32) -> Result<(), AskError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| AskError::Io {
        pid,
        source: e.into(),
    })?;
    let (holder_pid, holder_uid) = (cred.pid().max(0) as u32, cred.uid());
    let why = match uid_of(pid) {
        _ if holder_pid != pid => format!(", not by PID {pid}"),
        Some(uid) if holder_uid != 0 && holder_uid != uid => {
            format!(", but PID {pid} runs as uid {uid}")
        }
        _ => return Ok(()),
    };
    Err(AskError::NotTheServer {
        socket,
        pid,
        holder_pid,
        holder_uid,
        why,
    })
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
    let (stream, socket) = match path.filter(|p| p.exists()) {
        Some(p) => (StdUnixStream::connect(p), p.display().to_string()),
        None => (
            address(name, pid).and_then(|a| StdUnixStream::connect_addr(&a)),
            format!("@{}", abstract_name(name, pid)),
        ),
    };
    let stream = stream.map_err(|source| AskError::NoServer {
        name: name.into(),
        pid,
        source,
    })?;
    // Before a byte goes out: the environment may hold secrets.
    check_listener(&stream, socket, pid)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    // One write, so the server finds the environment with the request.
    let mut request = String::from("upgrade\n");
    request.push_str(environment.as_deref().unwrap_or(""));
    // A server that refuses without reading (another user, too many
    // helpers) may have answered and closed before this write: its answer
    // is still there to read.
    let wrote = (&stream).write_all(request.as_bytes());
    let mut read = BufReader::new(&stream);
    let mut line = String::new();
    match read.read_line(&mut line) {
        Ok(_) => {}
        Err(e) if timed_out(&e) => return Err(AskError::Timeout { pid, timeout }),
        Err(e) => return Err(io_err(wrote.err().unwrap_or(e))),
    }
    if line.is_empty() {
        if let Err(e) = wrote {
            return Err(io_err(e));
        }
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
            done: false,
        };
        assert_eq!(Report::parse(&r.to_line()), Some(r));
        let old = Report::parse("moved 20 1 0 4").unwrap();
        assert!(old.done, "a server before the fifth number: done when idle");
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
        // This process's PID: the helper checks that the listener is the
        // PID it asks.
        let pid = std::process::id();
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

    #[tokio::test]
    async fn a_taken_abstract_name_leaves_the_path_socket() {
        // This process's PID (the helper checks that the listener is the
        // PID it asks), under a name of this test's own.
        let (name, pid) = ("taken-test", std::process::id());
        // Another socket holds the abstract name.
        let squatter = StdUnixListener::bind_addr(&address(name, pid).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = runtime_path(Some(dir.path().as_os_str()), pid).unwrap();
        let l = listen(name, pid, Some(path.clone())).unwrap();
        assert!(l.abstract_socket.is_none());
        assert!(l.path_socket.is_some() && path.exists());
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve(l, tx));
        let answer = tokio::spawn(async move {
            let req: Request = rx.recv().await.unwrap();
            req.answer(Answer::Refused("busy".into())).await;
        });
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || {
            ask_upgrade(name, pid, Some(&p), Duration::from_secs(5), None)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, (Answer::Refused("busy".into()), None, vec![]));
        answer.await.unwrap();
        server.abort();
        let _ = server.await;
        // Without a path socket, a taken name is an error naming it.
        let err = listen(name, pid, None).err().unwrap();
        assert!(
            err.to_string()
                .starts_with(&format!("@{name}/{pid}/control: ")),
            "{err}"
        );
        drop(squatter);
    }

    #[test]
    fn requests_are_read_within_their_caps() {
        assert_eq!(parse_request(b"upgrade\n"), Ok(None));
        assert_eq!(parse_request(b"upgrade"), Ok(None));
        let block = environment_block([(b"A".to_vec(), b"1".to_vec())].into_iter());
        assert_eq!(
            parse_request(format!("upgrade\n{block}").as_bytes()),
            Ok(Some(vec![(b"A".to_vec(), b"1".to_vec())]))
        );
        // Not an environment block: ignored, as by every release.
        assert_eq!(parse_request(b"upgrade\nsomething else\n"), Ok(None));
        assert_eq!(parse_request(b"upgrade\nenvironment 2\nA=1\n"), Ok(None));
        assert_eq!(
            parse_request(b"stop\n"),
            Err(Refusal::Unknown("stop".into()))
        );
        let long = format!("upgrade{}\n", " ".repeat(MAX_REQUEST_LINE));
        assert_eq!(parse_request(long.as_bytes()), Err(Refusal::LineTooLong));
        // A line of exactly the cap is read.
        let exact = format!("upgrade{}\n", " ".repeat(MAX_REQUEST_LINE - 8));
        assert_eq!(parse_request(exact.as_bytes()), Ok(None));
        let big = format!(
            "upgrade\nenvironment 1\nA={}\n",
            "x".repeat(MAX_ENVIRONMENT)
        );
        assert_eq!(
            parse_request(big.as_bytes()),
            Err(Refusal::EnvironmentTooLong)
        );
        let many = format!("upgrade\nenvironment {}\n", MAX_VARIABLES + 1);
        assert_eq!(
            parse_request(many.as_bytes()),
            Err(Refusal::TooManyVariables)
        );
        // The fixed phrases helpers of every release match on.
        assert!(
            Refusal::PermissionDenied { uid: Some(65534) }
                .to_string()
                .starts_with("permission denied")
        );
        assert!(Refusal::Busy.to_string().starts_with("busy"));
    }
}
