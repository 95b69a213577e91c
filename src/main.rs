//! The `pid-server` binary: the reference app of the `axum-handover`
//! library. It parses the command line, reads the configuration file, takes
//! the sockets before the runtime starts, serves its routes, and maps how
//! that ended to the exit codes docs/src/operator/exit-codes.md documents (0, 1, 2, 3, 4, 64, 76, 77, 78).

mod app;
mod logging;
#[cfg(test)]
mod man;
mod metrics;
mod serve;
mod stats;

use std::process::ExitCode;

use axum_handover::helper;
// The flags and the configuration file are the library's (`src/lib.rs`),
// which the fuzz targets share; the modules here name them `crate::cli`
// and `crate::config_file` as before.
use pid_server::{cli, config_file};

use cli::Command;

/// jemalloc rather than glibc's malloc: it gives freed memory back to the
/// system soon, so the buffers of connections that went idle (see
/// docs/src/operator/capacity.md) do not stay resident.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (docs/src/operator/capacity.md):
/// - a background thread returns pages unused for half a second. With a
///   second, the buffers of 1 000 connections parked at once were not all
///   back 2 s later (2.0–2.5 KB per idle connection against 1.5–1.6 KB);
///   throughput did not change measurably.
/// - each thread's cache holds 4–8 blocks of a size rather than 20–200. A
///   thread clears its cache only as it allocates again, and an idle
///   server allocates nothing: the blocks its connections freed as they
///   went idle (hyper's buffers, a request's headers) stayed cached, each
///   pinning a part-used page the background thread could not give back.
///   5 000 used idle connections: 1.03–1.07 KB each with the default
///   lengths, 0.88–0.91 with 4–8; instructions per request +1 % (2–4 did
///   a little better for memory but cost 14 % more instructions per
///   connection-per-request). Flushing each worker's cache whenever it ran
///   out of work did better still for idle connections (0.80 KB), but the
///   memory a round of stalled HTTP/2 streams then took was all new, past
///   the bound `protocols::streams_stalled_on_a_zero_window_…` sets.
// SAFETY: jemalloc reads this NUL-terminated string once at its start.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 111] =
    b"background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0,tcache_nslots_small_min:4,tcache_nslots_small_max:8\0";

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Reload(a)) => {
            let reloaded = helper::reload(&cli::config(), a.pid, a.timeout);
            cli::helper_exit("reload", reloaded.map(|r| println!("{r}")))
        }
        Some(Command::Stop(a)) => cli::helper_exit("stop", helper::stop(a.pid, a.timeout)),
        Some(Command::CheckConfig(a)) => config_file::check(&a.config),
        Some(Command::Serve(args)) => serve::main(args),
        None => serve::main(cli.serve),
    }
}
