//! The library reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`
//! itself, without changing the environment (listenfd clears the first
//! two, which is undefined behaviour once other threads run, as under
//! `#[tokio::main]`). It must still find the sockets wherever listenfd
//! finds them: each case runs in a child (this test binary again), where
//! listenfd may change the environment.

use axum_handover::fuzzing::{Inherited, inherited_from};
use pid_server_test_support::cmd::TestCommand;

const CHILD: &str = "AXUM_HANDOVER_INHERIT_CHILD";
const VARS: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// The cases both accept (ours are stricter on garbage, on purpose).
const CASES: &[[Option<&str>; 3]] = &[
    [None, None, None],
    [Some("2"), None, None],
    [Some("3"), Some(""), None],
    // PID 1 is never this test's child: the sockets are not for it.
    [Some("1"), Some("1"), None],
    [Some("2"), None, Some("http:admin")],
];

#[test]
fn finds_the_sockets_listenfd_finds() {
    if std::env::var_os(CHILD).is_some() {
        return in_child();
    }
    for case in CASES {
        let mut cmd = TestCommand::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "finds_the_sockets_listenfd_finds",
            "--test-threads=1",
        ])
        .env(CHILD, "1");
        for (var, value) in VARS.iter().zip(case) {
            match value {
                Some(v) => cmd.env(var, v),
                None => cmd.env_remove(var),
            };
        }
        let out = cmd.output();
        assert!(
            out.status.success(),
            "{case:?}: {}",
            cmd.failure(&out, "success")
        );
    }
}

fn in_child() {
    let env = |k: &str| std::env::var(k).ok();
    let ours = match inherited_from(
        env("LISTEN_FDS").as_deref(),
        env("LISTEN_PID").as_deref(),
        env("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )
    .unwrap()
    {
        Inherited::Sockets { count, .. } => count as usize,
        Inherited::None | Inherited::ForOtherPid(_) => 0,
    };
    // Last: it clears LISTEN_FDS and LISTEN_PID.
    let theirs = listenfd::ListenFd::from_env().len();
    assert_eq!(
        ours, theirs,
        "sockets found: ours {ours}, listenfd's {theirs}"
    );
}
