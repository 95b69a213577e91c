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
/// - blocks of 2–12 KiB (hyper's two 8 KiB buffers and its connection
///   state, what a connection holds only while it is active) come from
///   slabs of 8 pages rather than of one to three blocks each: a burst of
///   connections that each took a few left fewer part-used pages behind
///   when they went idle. With [`release_thread_cache`], 1.10–1.21 →
///   0.94–0.96 KB per used idle connection at 5 000; 16 pages, or every
///   size class, did worse.
// SAFETY: jemalloc reads this NUL-terminated string once at its start.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 83] =
    b"background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0,slab_sizes:2049-12288:8\0";

/// Gives this thread's allocator cache back to the shared heap: called by
/// each of the runtime's worker threads when it runs out of work (tokio's
/// `on_thread_park`), at most every [`FLUSH_EVERY_MS`].
///
/// jemalloc keeps freed blocks in a cache per thread, and a thread clears
/// its cache only as it allocates again. An idle server allocates nothing,
/// so the blocks its connections freed when they went idle (hyper's
/// buffers, a request's headers) stayed cached, each pinning a part-used
/// page that the background thread could not give back. Flushed, those
/// pages empty and go back to the system within `dirty_decay_ms`: 1.15 →
/// 1.09 KB per used idle connection at 5 000 alone, 0.99 with the slab
/// setting above (docs/src/operator/capacity.md). Under load a worker parks thousands of times a second;
/// the bound keeps the flushes (and the cache's refills after them) to a
/// hundred a second per thread.
pub(crate) fn release_thread_cache() {
    use std::cell::Cell;
    thread_local! {
        static LAST_MS: Cell<u64> = const { Cell::new(0) };
    }
    // The coarse clock: a read of the vDSO's last tick (1–4 ms).
    let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) else {
        return;
    };
    let now = t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000;
    if now.wrapping_sub(LAST_MS.get()) < FLUSH_EVERY_MS {
        return;
    }
    LAST_MS.set(now);
    // SAFETY: `thread.tcache.flush` takes and returns nothing (null
    // pointers, zero length); the name is NUL-terminated. An error (no
    // cache on this thread) is of no interest.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// See [`release_thread_cache`].
const FLUSH_EVERY_MS: u64 = 10;

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
