//! Running or skipping, and telling the person at the terminal.
//!
//! The test harness captures `eprintln!` and shows it for failing tests
//! only; what must show anyway (`SKIPPED …`, a case's wall time) is written
//! straight to fd 2, in one write so it does not interleave with the
//! harness's lines.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::thread;
use std::time::Instant;

/// Writes `msg` and a newline to fd 2 in one go.
pub fn say(msg: &str) {
    let _ = io::stderr().lock().write_all(format!("{msg}\n").as_bytes());
}

/// Whether `CI` is set (`true`, `1`, `yes`): then a test that cannot run
/// fails instead of skipping.
pub fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

/// Prints a loud `SKIPPED <test>: <reason>`.
pub fn skip(test: &str, reason: &str) {
    say(&format!(
        "\n****************************************************************\n\
         *** SKIPPED {test}: {reason}\n\
         ****************************************************************"
    ));
}

/// A test that cannot run here: under CI panics with `reason`, elsewhere
/// prints a loud `SKIPPED`.
pub fn cannot_run(test: &str, reason: &str) {
    if is_ci() {
        panic!(
            "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! {test}: CANNOT RUN UNDER CI: {reason}\n\
             !!! (see packaging/ci-deps.sh; CI is set, so this is an error, not a skip)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
    }
    skip(test, reason);
}

/// An executable `tool` in PATH (or the usual sbin and bin folders).
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `true` when every tool is in PATH; otherwise [`cannot_run`] and `false`.
/// `tools` are (name, how to install it).
pub fn require_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(tool, install)| format!("`{tool}` ({install})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    cannot_run(test, &format!("missing {}", missing.join(", ")));
    false
}

/// Prints a case's wall time when it is dropped, passed or not.
pub struct CaseTimer {
    tag: String,
    name: String,
    started: Instant,
}

impl CaseTimer {
    /// `tag` starts the line (`[systemd 257]`), `name` names the case.
    pub fn start(tag: impl Into<String>, name: impl Into<String>) -> CaseTimer {
        CaseTimer {
            tag: tag.into(),
            name: name.into(),
            started: Instant::now(),
        }
    }
}

impl Drop for CaseTimer {
    fn drop(&mut self) {
        let outcome = if thread::panicking() {
            "FAILED"
        } else {
            "passed"
        };
        say(&format!(
            "{} {}: {outcome} in {:.2} s (wall, boot and teardown included)",
            self.tag,
            self.name,
            self.started.elapsed().as_secs_f64()
        ));
    }
}

/// Checks that are all run, then reported together: a test that checks
/// five things about a failure tells all five that went wrong.
pub struct Checks {
    case: String,
    failed: Vec<String>,
}

impl Checks {
    pub fn new(case: impl Into<String>) -> Checks {
        Checks {
            case: case.into(),
            failed: Vec::new(),
        }
    }

    /// Records `what()` as failed unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            say(&format!("{}: check failed: {w}", self.case));
            self.failed.push(w);
        }
    }

    /// Panics listing every failed check, if any.
    pub fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{}: {} check(s) failed:\n- {}",
            self.case,
            self.failed.len(),
            self.failed.join("\n- ")
        );
    }
}
