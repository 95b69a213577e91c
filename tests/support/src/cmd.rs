//! Running a command from a test: stdin closed, output captured, bounded
//! in time (then the command's whole process group is SIGKILLed), and a
//! failure that shows everything needed to see why: the command, the
//! folder it ran in, its status, stdout and stderr.
//!
//! ```ignore
//! let out = TestCommand::new("ip").args(["netns", "add", &name]).stdout();
//! let code = TestCommand::new(BIN).arg("reload").output().status.code();
//! ```

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A command's bound unless [`TestCommand::timeout`] sets another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A [`Command`] with a time bound, run by the test.
pub struct TestCommand {
    cmd: Command,
    timeout: Duration,
}

impl From<Command> for TestCommand {
    fn from(cmd: Command) -> TestCommand {
        TestCommand {
            cmd,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl TestCommand {
    pub fn new(program: impl AsRef<OsStr>) -> TestCommand {
        Command::new(program).into()
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.env_remove(key);
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cmd.current_dir(dir);
        self
    }

    /// The bound (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// The folder the command runs in.
    fn cwd(&self) -> PathBuf {
        self.cmd
            .get_current_dir()
            .map(Path::to_path_buf)
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_default()
    }

    /// `command: ...` and `cwd: ...`, for messages.
    pub fn describe(&self) -> String {
        format!("command: {:?}\ncwd:     {}", self.cmd, self.cwd().display())
    }

    /// Runs it. `Err` (with [`TestCommand::describe`] and what output came)
    /// when it cannot be started or is killed at the bound; any exit status
    /// is `Ok`.
    pub fn try_output(&mut self) -> Result<Output, String> {
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout takes down what it
            // started too (nsenter forks, podman and dpkg run helpers).
            .process_group(0);
        let child = self
            .cmd
            .spawn()
            .map_err(|e| format!("{}\ncannot start: {e}", self.describe()))?;
        let pgid = Pid::from_raw(child.id() as i32);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(|e| format!("{}\nwaiting for it: {e}", self.describe())),
            Err(_) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                // What it wrote before the kill; a descendant that left the
                // group can hold the pipes open, hence the bound.
                let partial = match rx.recv_timeout(Duration::from_secs(2)) {
                    Ok(Ok(out)) => format!("\n{}", streams(&out)),
                    _ => String::new(),
                };
                Err(format!(
                    "{}\nstatus:  timed out after {} s (killed){partial}",
                    self.describe(),
                    self.timeout.as_secs_f32()
                ))
            }
        }
    }

    /// Runs it and returns its output, whatever its exit status; panics if
    /// it cannot be started or times out.
    pub fn output(&mut self) -> Output {
        self.try_output()
            .unwrap_or_else(|e| panic!("{}", banner(&e)))
    }

    /// Runs it, panics (showing everything) unless it exits 0, and returns
    /// its stdout.
    pub fn stdout(&mut self) -> String {
        self.try_stdout().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Its stdout if it exits 0; otherwise what went wrong, everything
    /// shown (for callers that carry on, as the benchmark skips a row).
    pub fn try_stdout(&mut self) -> Result<String, String> {
        let out = self.try_output().map_err(|e| banner(&e))?;
        if !out.status.success() {
            return Err(self.failure(&out, "exit status 0"));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The report of a finished command that did not do what was expected.
    pub fn failure(&self, out: &Output, expected: &str) -> String {
        banner(&format!(
            "{}\nstatus:  {} (expected {expected})\n{}",
            self.describe(),
            out.status,
            streams(out)
        ))
    }
}

fn banner(body: &str) -> String {
    format!(
        "\n==================== command failed ====================\n{body}\n\
         ========================================================\n"
    )
}

/// Both streams, labelled.
fn streams(out: &Output) -> String {
    format!(
        "---- stdout ----\n{}\n---- stderr ----\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// stdout and stderr of a finished command, as one text.
pub fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&err);
    }
    s
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
