//! Network namespaces the bench makes for a run (`ip netns add`, `lo` up,
//! a sysctl set in it only): the host's settings are never touched.

use std::fs::{self, File};
use std::path::Path;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::procs::run_cmd;

const NETNS_PREFIX: &str = "pidbench-";

/// A network namespace made with `ip netns add`, with `lo` up; `Drop`
/// deletes it. Every process in it must be gone by then (declare it before
/// the servers that run in it).
pub(crate) struct NetNs {
    pub(crate) name: String,
}

impl NetNs {
    pub(crate) fn create(tag: &str, migrate_req: u8) -> Result<NetNs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root (`ip netns add` needs CAP_SYS_ADMIN)".into());
        }
        let name = format!("{NETNS_PREFIX}{}-{tag}", std::process::id());
        let t = Duration::from_secs(10);
        run_cmd("ip", &["netns", "add", &name], t)?;
        let ns = NetNs { name };
        run_cmd("ip", &["-n", &ns.name, "link", "set", "lo", "up"], t)?;
        let setting = format!("net.ipv4.tcp_migrate_req={migrate_req}");
        run_cmd(
            "ip",
            &["netns", "exec", &ns.name, "sysctl", "-q", "-w", &setting],
            t,
        )
        .map_err(|e| format!("{e} (needs Linux 5.14+)"))?;
        let now = run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-n",
                "net.ipv4.tcp_migrate_req",
            ],
            t,
        )?;
        if now.trim() != migrate_req.to_string() {
            return Err(format!(
                "net.ipv4.tcp_migrate_req is {} in {}, not {migrate_req}",
                now.trim(),
                ns.name
            ));
        }
        Ok(ns)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// Processes and threads it starts meanwhile are in the namespace too.
    pub(crate) fn enter(&self) -> Result<InNetNs, String> {
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| format!("open /run/netns/{}: {e}", self.name))?;
        nix::sched::setns(&target, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", self.name))?;
        Ok(InNetNs { home })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name], Duration::from_secs(10)) {
            eprintln!("bench: {e}");
        }
    }
}

pub(crate) struct InNetNs {
    home: File,
}

impl Drop for InNetNs {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.home, CloneFlags::CLONE_NEWNET) {
            // Carrying on in the wrong namespace would measure the wrong thing.
            eprintln!("bench: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Deletes namespaces left by benches that died before their `Drop`.
pub(crate) fn sweep_stale() {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("bench: deleting network namespace {name} (bench {owner} is gone)");
            let _ = run_cmd("ip", &["netns", "del", &name], Duration::from_secs(10));
        }
    }
}
