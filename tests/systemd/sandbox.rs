//! The shipped unit's sandbox, as `systemd-analyze security` rates it.

use pid_server_test_support::cmd::text;
use pid_server_test_support::{Release, each_release};

use super::{SERVICE, boot, can_run, say};

each_release!(the_sandbox_rates_2_or_lower);

/// `systemd-analyze security` inside the container rates the shipped unit at
/// 2.0 or lower (what README states), with every other case of this suite
/// passing under that sandbox.
fn the_sandbox_rates_2_or_lower(r: Release) {
    if !can_run("the_sandbox_rates_2_or_lower", r) {
        return;
    }
    let c = boot(r, &[]);
    let out = c.exec(&["systemd-analyze", "security", "--no-pager", SERVICE]);
    let report = text(&out);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for pid-server.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{report}"));
    say(
        r,
        &format!("systemd-analyze security pid-server.service: {score}"),
    );
    assert!(score <= 2.0, "exposure {score}:\n{report}");
}
