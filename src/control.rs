//! The control channel between `pid-server reload` and a running server.
//!
//! A signal cannot carry an answer, and a reload helper must learn the
//! outcome without guessing from timing; so each server listens on an
//! abstract Unix socket named after its PID, `@pid-server/<pid>/control`.
//! Knowing the PID (systemd's `$MAINPID`) is enough to find it, nothing is
//! left on disk, and only the server's own user or root may use it
//! (checked with `SO_PEERCRED`).
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

/// Binds this process's control socket. Must happen inside the runtime.
pub fn listen(pid: u32) -> io::Result<UnixListener> {
    let l = StdUnixListener::bind_addr(&address(pid)?)?;
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

/// Accepts helpers and forwards their requests until the listener is
/// dropped (the task is aborted when the drain starts).
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    // SAFETY: geteuid cannot fail.
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
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

/// The helper's side: ask `pid` to upgrade and wait for the answer.
pub fn ask_upgrade(pid: u32, timeout: Duration) -> Result<Answer, AskError> {
    let io_err = |source| AskError::Io { pid, source };
    let stream = address(pid)
        .and_then(|a| StdUnixStream::connect_addr(&a))
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
        let l = listen(pid).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve(l, tx));
        let answer = tokio::spawn(async move {
            let req: Request = rx.recv().await.unwrap();
            req.answer(Answer::Refused("busy".into())).await;
        });
        let got = tokio::task::spawn_blocking(move || ask_upgrade(pid, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, Answer::Refused("busy".into()));
        answer.await.unwrap();
        server.abort();
        assert!(matches!(
            ask_upgrade(pid - 1, Duration::from_secs(1)),
            Err(AskError::NoServer { .. })
        ));
    }
}
