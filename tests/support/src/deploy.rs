//! The Debian tree the package and image tests boot (`systemd-nspawn -D
//! TREE --volatile=overlay`, `podman import`): made once by debootstrap and
//! cached, or named by [`ROOTFS_ENV`]; and where cargo put the binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{TestCommand, tail, text};

/// The cargo target dir the binary at `bin` was built in (`.../target`).
pub fn target_dir(bin: impl AsRef<Path>) -> PathBuf {
    bin.as_ref()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::repo().join("target"))
}

/// The tools a test booting the tree needs besides the container's:
/// debootstrap only when no tree is cached or named.
pub fn tree_tools() -> Vec<(&'static str, &'static str)> {
    if std::env::var_os(ROOTFS_ENV).is_none()
        && !Path::new(CACHE_DIR)
            .join(format!("{TREE_NAME}.recipe"))
            .exists()
    {
        vec![("debootstrap", "apt-get install debootstrap")]
    } else {
        Vec::new()
    }
}

/// Set to a debootstrap tree to use it instead of the cache.
pub const ROOTFS_ENV: &str = "PID_SERVER_TEST_ROOTFS";
/// Set to a Debian mirror for debootstrap (default: Debian's).
pub const MIRROR_ENV: &str = "PID_SERVER_TEST_MIRROR";
/// Where the tree is cached between runs.
pub const CACHE_DIR: &str = "/var/cache/pid-server-tests";
const TREE_NAME: &str = "rootfs-bookworm-minbase";
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,curl,procps";
/// debootstrap takes ~45 s with a fast mirror; allow for a slow one.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(900);

fn tree_looks_complete(root: &Path) -> bool {
    ["usr/bin/dpkg", "usr/bin/curl", "usr/bin/systemctl"]
        .iter()
        .all(|p| root.join(p).is_file())
        && (root.join("lib/systemd/systemd").exists()
            || root.join("usr/lib/systemd/systemd").exists())
}

/// A Debian bookworm tree with systemd, made by
/// `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,procps bookworm`
/// and cached under [`CACHE_DIR`] (made once, ~45 s to a few minutes; later
/// runs take it as it is). [`ROOTFS_ENV`] names a tree to use instead.
/// Containers boot it with `--volatile=overlay`, so it stays pristine.
/// Panics if it cannot be made.
pub fn debian_tree() -> PathBuf {
    if let Some(t) = std::env::var_os(ROOTFS_ENV) {
        let t = PathBuf::from(t);
        assert!(
            tree_looks_complete(&t),
            "{ROOTFS_ENV}={} is not a Debian tree with systemd, dpkg and curl",
            t.display()
        );
        return t;
    }
    let mirror =
        std::env::var(MIRROR_ENV).unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let recipe = format!("debootstrap --variant=minbase --include={INCLUDE} {SUITE}\n");
    let cache = Path::new(CACHE_DIR);
    fs::create_dir_all(cache).unwrap_or_else(|e| panic!("mkdir {CACHE_DIR}: {e}"));
    let tree = cache.join(TREE_NAME);
    let marker = cache.join(format!("{TREE_NAME}.recipe"));

    // One builder at a time, across test binaries.
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("rootfs.lock"))
        .unwrap_or_else(|e| panic!("open {CACHE_DIR}/rootfs.lock: {e}"));
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {CACHE_DIR}/rootfs.lock: {e}"));

    if fs::read_to_string(&marker).ok().as_deref() == Some(recipe.as_str())
        && tree_looks_complete(&tree)
    {
        return tree;
    }
    assert!(
        crate::report::find_in_path("debootstrap").is_some(),
        "no cached Debian tree in {CACHE_DIR} and no `debootstrap` to make one \
         (apt-get install debootstrap)"
    );
    let _ = fs::remove_file(&marker);
    // Partial trees of earlier runs that were killed.
    for e in fs::read_dir(cache).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{TREE_NAME}.partial"))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let partial = cache.join(format!("{TREE_NAME}.partial-{}", std::process::id()));
    let started = Instant::now();
    eprintln!(
        "deploy: making the Debian tree {} with debootstrap (once; cached for later runs)",
        tree.display()
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&partial)
        .arg(&mirror);
    let out = TestCommand::from(cmd)
        .timeout(DEBOOTSTRAP_TIMEOUT)
        .try_output();
    let ok = matches!(&out, Ok(o) if o.status.success());
    if !ok || !tree_looks_complete(&partial) {
        let _ = fs::remove_dir_all(&partial);
        let why = match out {
            Ok(o) => tail(&text(&o), 30),
            Err(e) => e,
        };
        panic!("debootstrap of {SUITE} from {mirror} failed:\n{why}");
    }
    let _ = fs::remove_dir_all(&tree);
    fs::rename(&partial, &tree).unwrap_or_else(|e| panic!("rename to {}: {e}", tree.display()));
    fs::write(&marker, &recipe).expect("write recipe marker");
    eprintln!(
        "deploy: Debian tree made in {:.1} s",
        started.elapsed().as_secs_f32()
    );
    tree
}
