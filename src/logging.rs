//! Logging: to journald with structured fields when stderr goes to the
//! journal, else human-readable lines on stderr. `RUST_LOG` filters; by
//! default `info`, less the `h2` crate's warnings (see [`DEFAULT_FILTER`]).
//!
//! Under systemd every generation logs through the native journal protocol
//! with `SYSLOG_IDENTIFIER=pid-server` and fields `PID`, `GENERATION` and
//! `EVENT`, so `journalctl -u pid-server EVENT=handover` finds every reload.

use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;

use crate::config_file::ConfigFile;
use tracing_subscriber::prelude::*;

/// Whether stderr is the journal stream systemd connected us to: the
/// `JOURNAL_STREAM` variable names its device and inode (`systemd.exec(5)`).
/// Comparing them, not just checking the variable, catches a stderr that
/// was redirected after systemd set it.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Sets the global subscriber, and logs which configuration file this
/// generation read (after a reload: which version of it, by digest).
pub fn init(pid: u32, generation: u32, file: Option<&ConfigFile>) {
    subscribe(pid, generation);
    if let Some(f) = file {
        tracing::info!(
            event = "config",
            config_path = %f.path.display(),
            config_sha256 = %f.sha256,
            "configuration from {} (sha256 {})",
            f.path.display(),
            f.sha256
        );
    }
}

/// What is logged without `RUST_LOG`. The `h2` crate warns once per
/// connection it closes for too many reset streams (a rapid-reset attack),
/// on top of the library's own line for the same connection, which is
/// rate-limited and counted in `/metrics` (`protocol_errors`): at a
/// thousand connections a second, its lines alone were megabytes.
const DEFAULT_FILTER: &str = "info,h2=error";

/// Sets the global subscriber. Returns where logs go.
fn subscribe(pid: u32, generation: u32) -> &'static str {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    if stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        let layer = layer
            // Field names as operators type them: EVENT=, not F_EVENT=.
            .with_field_prefix(None)
            .with_syslog_identifier("pid-server".into())
            .with_custom_fields([
                ("PID", pid.to_string()),
                ("GENERATION", generation.to_string()),
            ]);
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .init();
        return "journald";
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .init();
    "stderr"
}
