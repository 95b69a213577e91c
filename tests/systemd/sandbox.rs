//! The shipped unit's sandbox, as `systemd-analyze security` rates it.

use pid_server_test_support::cmd::text;
use pid_server_test_support::nspawn;

use super::{SERVICE, boot, say};

/// `systemd-analyze security` inside the container rates the shipped unit at
/// 2.0 or lower (what README states), with every other case of this suite
/// passing under that sandbox.
#[test]
fn the_sandbox_rates_2_or_lower() {
    if !nspawn::require_or_skip("the_sandbox_rates_2_or_lower") {
        return;
    }
    let port = nspawn::free_port();
    let c = boot(port, &[]);
    let out = c.exec(&["systemd-analyze", "security", "--no-pager", SERVICE]);
    let report = text(&out);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for pid-server.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{report}"));
    say(&format!(
        "systemd-analyze security pid-server.service: {score}"
    ));
    assert!(score <= 2.0, "exposure {score}:\n{report}");
}
