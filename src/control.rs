//! The control channel between `pid-server reload` and a running server.
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
//! - the abstract socket `@pid-server/<pid>/control` always, for a person
//!   running `pid-server reload` by hand; nothing is left on disk.
//!
//! Only the server's own user or root may use either (`SO_PEERCRED`).
//!
//! The protocol is one line each way:
//! - helper: `upgrade`
//! - server: `ok <old-pid> <new-pid> <generation> <millis>`, or
//!   `failed <reason>`, or `refused <reason>`.

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

fn address(pid: u32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("pid-server/{pid}/control").as_bytes())
}

/// What the server answers to an `upgrade` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok {
        old_pid: u32,
        new_pid: u32,
        generation: u32,
        millis: u64,
    },
    Failed(String),
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

/// An `upgrade` request from a helper, with the connection to answer on.
pub struct Request {
    answer_to: tokio::net::unix::OwnedWriteHalf,
}

impl Request {
    /// Writes the answer (bounded), so it is out before the process goes on
    /// to drain and exit.
    pub async fn answer(mut self, answer: Answer) {
        let line = answer.to_line();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.answer_to.write_all(line.as_bytes()),
        )
        .await;
    }
}

/// The control socket's path in a runtime directory (the first entry of
/// `$RUNTIME_DIRECTORY`, which may list several).
pub fn runtime_path(runtime_directory: Option<&std::ffi::OsStr>, pid: u32) -> Option<PathBuf> {
    let dirs = runtime_directory?.to_str()?;
    let first = dirs.split(':').next().filter(|d| !d.is_empty())?;
    Some(Path::new(first).join(format!("control.{pid}")))
}

/// This process's control sockets. Must be made inside the runtime.
pub struct Listeners {
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
pub fn listen(pid: u32, path: Option<PathBuf>) -> io::Result<Listeners> {
    let bind = |l: StdUnixListener| -> io::Result<UnixListener> {
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    };
    let mut sockets = vec![bind(StdUnixListener::bind_addr(&address(pid)?)?)?];
    if let Some(p) = &path {
        // A file left by a killed process with a reused PID is stale.
        let _ = std::fs::remove_file(p);
        sockets.push(bind(StdUnixListener::bind(p)?)?);
    }
    Ok(Listeners { sockets, path })
}

/// Accepts helpers and forwards their requests until dropped (the task is
/// aborted when the drain starts, which also removes the socket file).
pub async fn serve(listeners: Listeners, requests: mpsc::Sender<Request>) {
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
    let refusal = if !allowed {
        Answer::Refused("permission denied: not the server's user or root".into())
    } else if line.trim() != "upgrade" {
        Answer::Refused(format!("unknown request {:?}", line.trim()))
    } else {
        match requests.send(Request { answer_to: write }).await {
            Ok(()) => return Ok(()),
            Err(mpsc::error::SendError(req)) => {
                write = req.answer_to;
                Answer::Refused("the server is shutting down".into())
            }
        }
    };
    write.write_all(refusal.to_line().as_bytes()).await
}

/// Why the helper could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no pid-server control socket for PID {pid}: {source}")]
    NoServer { pid: u32, source: io::Error },
    #[error("no answer from PID {pid} within {}s", timeout.as_secs())]
    Timeout { pid: u32, timeout: Duration },
    #[error("talking to PID {pid}: {source}")]
    Io { pid: u32, source: io::Error },
    #[error("PID {pid} answered {line:?}, which is not a pid-server answer")]
    Garbled { pid: u32, line: String },
}

/// The helper's side: ask `pid` to upgrade and wait for the answer. Tries
/// the runtime directory's socket first, when given one that exists.
pub fn ask_upgrade(pid: u32, path: Option<&Path>, timeout: Duration) -> Result<Answer, AskError> {
    let io_err = |source| AskError::Io { pid, source };
    let stream = match path.filter(|p| p.exists()) {
        Some(p) => StdUnixStream::connect(p),
        None => address(pid).and_then(|a| StdUnixStream::connect_addr(&a)),
    }
    .map_err(|source| AskError::NoServer { pid, source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    (&stream).write_all(b"upgrade\n").map_err(io_err)?;
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(AskError::Timeout { pid, timeout });
        }
        Err(e) => return Err(io_err(e)),
    }
    if line.is_empty() {
        return Err(AskError::Garbled {
            pid,
            line: "(connection closed)".into(),
        });
    }
    Answer::parse(&line).ok_or(AskError::Garbled { pid, line })
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
    }

    #[tokio::test]
    async fn helper_and_server_talk() {
        // A PID no real process has, so this test cannot collide with one.
        let pid = u32::MAX - std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let path = runtime_path(Some(dir.path().as_os_str()), pid).unwrap();
        let l = listen(pid, Some(path.clone())).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve(l, tx));
        let answer = tokio::spawn(async move {
            let req: Request = rx.recv().await.unwrap();
            req.answer(Answer::Refused("busy".into())).await;
        });
        let p = path.clone();
        let got =
            tokio::task::spawn_blocking(move || ask_upgrade(pid, Some(&p), Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(got, Answer::Refused("busy".into()));
        answer.await.unwrap();
        server.abort();
        let _ = server.await;
        // Dropping the listeners removes the socket file.
        assert!(!path.exists());
        assert!(matches!(
            ask_upgrade(pid - 1, None, Duration::from_secs(1)),
            Err(AskError::NoServer { .. })
        ));
    }
}
