//! `pid-server reload`: what `ExecReload=` runs, and what a person runs by
//! hand. Asks the running server to hand over to a new process and waits
//! for the outcome; prints one line; the exit code says how it went.

use std::time::Duration;

use crate::ExitCode;
use crate::cli::ReloadArgs;
use crate::control::{self, Answer, AskError};

/// Runs the helper. Prints the outcome (stdout on success, stderr on
/// failure) and returns the exit code.
pub fn main(args: &ReloadArgs) -> ExitCode {
    let pid = match args.pid {
        Some(pid) => pid,
        None => match find_the_server() {
            Ok(pid) => pid,
            Err(e) => {
                eprintln!("pid-server reload: error: {e}");
                return ExitCode::NoServer;
            }
        },
    };
    match reload(pid, args.timeout) {
        Ok(line) => {
            println!("{line}");
            ExitCode::Ok
        }
        Err((code, msg)) => {
            eprintln!("pid-server reload: error: {msg}");
            code
        }
    }
}

fn reload(pid: u32, timeout: Duration) -> Result<String, (ExitCode, String)> {
    // Ask first, look in /proc only to word an error: under the unit's
    // ProtectProc=invisible and PrivateUsers=yes, ExecReload= cannot see
    // $MAINPID in /proc, but it shares the network namespace where the
    // control socket lives.
    let path = control::runtime_path(std::env::var_os("RUNTIME_DIRECTORY").as_deref(), pid);
    match control::ask_upgrade(pid, path.as_deref(), timeout) {
        Ok(Answer::Ok {
            old_pid,
            new_pid,
            generation,
            millis,
        }) => Ok(format!(
            "reloaded: {old_pid} -> {new_pid} (generation {generation}) in {millis} ms"
        )),
        Ok(Answer::Failed(why)) => Err((
            ExitCode::Failure,
            format!("reload of PID {pid} failed: {why}; PID {pid} keeps serving"),
        )),
        Ok(Answer::Refused(why)) => Err((
            ExitCode::Refused,
            format!("PID {pid} refused the reload: {why}"),
        )),
        Err(AskError::NoServer { .. }) if !process_exists(pid) => {
            Err((ExitCode::NoServer, format!("no process with PID {pid}")))
        }
        Err(e @ AskError::NoServer { .. }) => Err((
            ExitCode::NoServer,
            format!("PID {pid} ({}) is not a running pid-server: {e}", comm(pid)),
        )),
        Err(e) => Err((ExitCode::Failure, e.to_string())),
    }
}

fn process_exists(pid: u32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Without `--pid`: the one pid-server process of this user that is serving
/// (has a control socket). Zero or several is an error naming them.
fn find_the_server() -> Result<u32, String> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))? {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        else {
            continue;
        };
        if pid != me && comm(pid) == "pid-server" && control_socket_exists(pid) {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => Err("no running pid-server found; name one with --pid".into()),
        _ => Err(format!(
            "several pid-servers are running ({}); name one with --pid",
            found
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn control_socket_exists(pid: u32) -> bool {
    // Abstract sockets are listed in /proc/net/unix with a leading '@'.
    std::fs::read_to_string("/proc/net/unix")
        .map(|t| t.contains(&format!("@pid-server/{pid}/control")))
        .unwrap_or(false)
}
