//! The Debian trees the tests boot (`systemd-nspawn -D TREE --volatile=overlay`,
//! `podman import`), one per [`Release`]: made once by debootstrap and
//! cached, or named by the release's [`Release::rootfs_env`]; and where
//! cargo put the binary.

use std::fmt;
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

/// A Debian release the tests boot, and with it a systemd version: the
/// systemd suite, the package and the image run on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Release {
    /// Debian 12, systemd 252.
    Bookworm,
    /// Debian 13, systemd 257.
    Trixie,
}

impl Release {
    /// Every release the tests run on, oldest first.
    pub const ALL: [Release; 2] = [Release::Bookworm, Release::Trixie];

    /// The Debian suite name (`bookworm`).
    pub fn suite(self) -> &'static str {
        match self {
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
        }
    }

    /// The Debian version number (12).
    pub fn debian(self) -> u32 {
        match self {
            Release::Bookworm => 12,
            Release::Trixie => 13,
        }
    }

    /// The major version of the release's systemd (252); a container
    /// checks it at boot ([`crate::nspawn::Container::systemd_version`]).
    pub fn systemd(self) -> u32 {
        match self {
            Release::Bookworm => 252,
            Release::Trixie => 257,
        }
    }

    /// `Type=notify-reload` exists from systemd 253 on.
    pub fn has_notify_reload(self) -> bool {
        self.systemd() >= 253
    }

    /// Set to a debootstrap tree of this release to use it instead of the
    /// cache. (For bookworm, the older [`ROOTFS_ENV`] works too.)
    pub fn rootfs_env(self) -> &'static str {
        match self {
            Release::Bookworm => "PID_SERVER_TEST_ROOTFS_BOOKWORM",
            Release::Trixie => "PID_SERVER_TEST_ROOTFS_TRIXIE",
        }
    }

    /// debootstrap's `--include=`. trixie's adds iproute2 (`ip`, to look
    /// at network namespaces from inside); bookworm's stays as it was, so
    /// trees cached by earlier runs stay valid.
    fn include(self) -> &'static str {
        match self {
            Release::Bookworm => "systemd,systemd-sysv,dbus,curl,procps",
            Release::Trixie => "systemd,systemd-sysv,dbus,curl,procps,iproute2",
        }
    }

    fn tree_name(self) -> String {
        format!("rootfs-{}-minbase", self.suite())
    }

    /// One builder per tree, across test binaries; the trees are built
    /// side by side. bookworm keeps the lock file older checkouts use, so
    /// they and this one never build it at the same time.
    fn lock_name(self) -> &'static str {
        match self {
            Release::Bookworm => "rootfs.lock",
            Release::Trixie => "rootfs-trixie.lock",
        }
    }

    fn recipe(self) -> String {
        format!(
            "debootstrap --variant=minbase --include={} {}\n",
            self.include(),
            self.suite()
        )
    }

    fn named_tree(self) -> Option<PathBuf> {
        std::env::var_os(self.rootfs_env())
            .or_else(|| (self == Release::Bookworm).then(|| std::env::var_os(ROOTFS_ENV))?)
            .map(PathBuf::from)
    }

    fn looks_complete(self, root: &Path) -> bool {
        let mut files = vec!["usr/bin/dpkg", "usr/bin/curl", "usr/bin/systemctl"];
        if self.include().contains("iproute2") {
            files.push("usr/bin/ip");
        }
        files.iter().all(|p| root.join(p).is_file())
            && (root.join("lib/systemd/systemd").exists()
                || root.join("usr/lib/systemd/systemd").exists())
    }
}

/// `Debian 13 (systemd 257)`.
impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Debian {} (systemd {})", self.debian(), self.systemd())
    }
}

/// The tools a test booting `release`'s tree needs besides the container's:
/// debootstrap only when no tree is cached or named.
pub fn tree_tools(release: Release) -> Vec<(&'static str, &'static str)> {
    if release.named_tree().is_none()
        && !Path::new(CACHE_DIR)
            .join(format!("{}.recipe", release.tree_name()))
            .exists()
    {
        vec![("debootstrap", "apt-get install debootstrap")]
    } else {
        Vec::new()
    }
}

/// Set to a bookworm debootstrap tree to use it instead of the cache (the
/// name from before there were two releases; see [`Release::rootfs_env`]).
pub const ROOTFS_ENV: &str = "PID_SERVER_TEST_ROOTFS";
/// Set to a Debian mirror for debootstrap (default: Debian's).
pub const MIRROR_ENV: &str = "PID_SERVER_TEST_MIRROR";
/// Where the trees are cached between runs.
pub const CACHE_DIR: &str = "/var/cache/pid-server-tests";
/// debootstrap takes 35–75 s with a fast mirror; allow for a slow one.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(900);

/// A Debian tree of `release` with systemd, made by
/// `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,procps[,iproute2] SUITE`
/// and cached under [`CACHE_DIR`] as `rootfs-SUITE-minbase` (made once,
/// 35 s to a few minutes; later runs take it as it is).
/// [`Release::rootfs_env`] names a tree to use instead. Containers boot it
/// with `--volatile=overlay`, so it stays pristine. Panics if it cannot be
/// made.
pub fn debian_tree(release: Release) -> PathBuf {
    if let Some(t) = release.named_tree() {
        assert!(
            release.looks_complete(&t),
            "{} is not a Debian {} tree with systemd, dpkg and curl",
            t.display(),
            release.suite()
        );
        return t;
    }
    let mirror =
        std::env::var(MIRROR_ENV).unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let recipe = release.recipe();
    let name = release.tree_name();
    let cache = Path::new(CACHE_DIR);
    fs::create_dir_all(cache).unwrap_or_else(|e| panic!("mkdir {CACHE_DIR}: {e}"));
    let tree = cache.join(&name);
    let marker = cache.join(format!("{name}.recipe"));

    let lock_path = cache.join(release.lock_name());
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", lock_path.display()));

    if fs::read_to_string(&marker).ok().as_deref() == Some(recipe.as_str())
        && release.looks_complete(&tree)
    {
        return tree;
    }
    assert!(
        crate::report::find_in_path("debootstrap").is_some(),
        "no cached Debian {} tree in {CACHE_DIR} and no `debootstrap` to make one \
         (apt-get install debootstrap)",
        release.suite()
    );
    let _ = fs::remove_file(&marker);
    // Partial trees of earlier runs that were killed.
    for e in fs::read_dir(cache).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{name}.partial"))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let partial = cache.join(format!("{name}.partial-{}", std::process::id()));
    let started = Instant::now();
    eprintln!(
        "deploy: making the Debian {} tree {} with debootstrap (once; cached for later runs)",
        release.suite(),
        tree.display()
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        &format!("--include={}", release.include()),
        release.suite(),
    ])
    .arg(&partial)
    .arg(&mirror);
    let out = TestCommand::from(cmd)
        .timeout(DEBOOTSTRAP_TIMEOUT)
        .try_output();
    let ok = matches!(&out, Ok(o) if o.status.success());
    if !ok || !release.looks_complete(&partial) {
        let _ = fs::remove_dir_all(&partial);
        let why = match out {
            Ok(o) => tail(&text(&o), 30),
            Err(e) => e,
        };
        panic!(
            "debootstrap of {} from {mirror} failed:\n{why}",
            release.suite()
        );
    }
    let _ = fs::remove_dir_all(&tree);
    fs::rename(&partial, &tree).unwrap_or_else(|e| panic!("rename to {}: {e}", tree.display()));
    fs::write(&marker, &recipe).expect("write recipe marker");
    eprintln!(
        "deploy: Debian {} tree made in {:.1} s",
        release.suite(),
        started.elapsed().as_secs_f32()
    );
    tree
}

/// Two `#[test]`s per case, one per [`Release`]: `each_release!(case, ..)`
/// turns `fn case(release: Release)` into `case::debian12_systemd252` and
/// `case::debian13_systemd257`, so `cargo test 257` runs one version and
/// the two of one case sit side by side in the test order (run in
/// parallel, they build the two trees at the same time on a fresh
/// machine). The case checks whether it can run, with its own name.
#[macro_export]
macro_rules! each_release {
    ($($case:ident),+ $(,)?) => {
        $(
            mod $case {
                #[test]
                fn debian12_systemd252() {
                    super::$case($crate::deploy::Release::Bookworm)
                }
                #[test]
                fn debian13_systemd257() {
                    super::$case($crate::deploy::Release::Trixie)
                }
            }
        )+
    };
}

/// How long a package build may take (a release build from scratch).
const DEB_BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// Runs `packaging/build-deb.sh VERSION` in the target dir of the binary at
/// `bin` and copies the package out of `target/debian/` into
/// `pid-server-test-debs/` there (cargo-deb deletes the older versions it
/// finds in `target/debian/`). The package test and the fleet test build
/// this way.
pub fn build_deb(bin: impl AsRef<Path>, version: &str) -> PathBuf {
    let started = Instant::now();
    let target = target_dir(bin);
    let out = TestCommand::new(crate::repo().join("packaging/build-deb.sh"))
        .arg(version)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(crate::repo())
        .timeout(DEB_BUILD_TIMEOUT)
        .output();
    assert!(
        out.status.success(),
        "packaging/build-deb.sh {version} failed:\n{}",
        tail(&text(&out), 40)
    );
    let built = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    let dir = target.join("pid-server-test-debs");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let copy = dir.join(built.file_name().expect("a .deb file name"));
    fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    eprintln!(
        "built {} in {:.1} s",
        copy.display(),
        started.elapsed().as_secs_f32()
    );
    copy
}

/// The previous release's package (`.ci/previous-release --deb`, built
/// once and cached there), or why it cannot be had.
pub fn previous_deb() -> Result<PathBuf, String> {
    let out = TestCommand::new("bash")
        .arg(crate::repo().join(".ci/previous-release"))
        .arg("--deb")
        .timeout(DEB_BUILD_TIMEOUT)
        .try_output()?;
    if !out.status.success() {
        return Err(text(&out));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    path.is_file()
        .then_some(path)
        .ok_or_else(|| "previous-release printed no package".to_string())
}

/// A package's `Version` field.
pub fn deb_version(deb: &Path) -> String {
    TestCommand::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg("Version")
        .timeout(Duration::from_secs(30))
        .stdout()
        .trim()
        .to_string()
}
