//! The journal tells the story, with structured fields.

use pid_server_test_support::{Release, each_release, nspawn};

use super::{
    SERVICE, activate, boot, can_run, reload_ok, timer, wait_gone, wait_journal, wait_state,
};

each_release!(the_journal_tells_the_story_with_structured_fields);

fn field<'a>(entry: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    entry.get(name).and_then(|v| v.as_str())
}

/// Start, stop (a drain), start again, two reloads: the text and the
/// structured fields of each step.
fn the_journal_tells_the_story_with_structured_fields(r: Release) {
    if !can_run("the_journal_tells_the_story_with_structured_fields", r) {
        return;
    }
    let _timer = timer(r, "7 journal");
    let c = boot(r, &[]);
    let first = activate(&c);
    c.systemctl_ok(&["stop", SERVICE]);
    wait_state(&c, SERVICE, "inactive", "dead");
    let p0 = activate(&c);
    assert_ne!(p0, first);
    reload_ok(&c);
    let p1 = c.main_pid(SERVICE);
    wait_gone(&c, p0, "generation 0");
    reload_ok(&c);
    let p2 = c.main_pid(SERVICE);
    wait_gone(&c, p1, "generation 1");

    // Plain text: start, the stop's drain, both handovers with old and new
    // PID, the handovers' drains.
    let j = wait_journal(&c, &["-u", "pid-server"], "generation 1's drain", |j| {
        j.lines()
            .any(|l| l.contains(&format!("pid-server[{p1}]: drained in")))
    });
    let has = |pid: u32, needle: &str| {
        j.lines()
            .any(|l| l.contains(&format!("pid-server[{pid}]: ")) && l.contains(needle))
    };
    for (pid, generation) in [(first, 0), (p0, 0), (p1, 1), (p2, 2)] {
        assert!(
            has(
                pid,
                &format!("serving 1 socket (systemd: http) as generation {generation}")
            ),
            "no start of {pid}:\n{j}"
        );
    }
    assert!(has(first, "SIGTERM: draining 0 in-flight requests"), "{j}");
    assert!(has(first, "drained in"), "{j}");
    for (old, new, generation) in [(p0, p1, 1), (p1, p2, 2)] {
        assert!(
            has(
                old,
                &format!("handed over to PID {new} (generation {generation})")
            ),
            "no handover {old} -> {new}:\n{j}"
        );
        assert!(has(old, "drained in"), "no drain of {old}:\n{j}");
        assert!(
            j.contains(&format!(
                "reloaded: {old} -> {new} (generation {generation})"
            )),
            "the helper's outcome {old} -> {new} is missing:\n{j}"
        );
    }

    // JSON: every native-protocol entry of the service carries the fields.
    let raw = c.journal(&["-u", "pid-server", "-o", "json"]);
    let entries: Vec<serde_json::Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ours: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            field(e, "_TRANSPORT") == Some("journal")
                && field(e, "_SYSTEMD_UNIT") == Some(SERVICE)
                && field(e, "_EXE") == Some(nspawn::BINARY_INSIDE)
        })
        .collect();
    assert!(ours.len() >= 10, "{} native entries:\n{raw}", ours.len());
    let generation_of = |pid: &str| -> u32 {
        [(first, 0), (p0, 0), (p1, 1), (p2, 2)]
            .iter()
            .find(|(p, _)| p.to_string() == pid)
            .map(|(_, g)| *g)
            .unwrap_or_else(|| panic!("an entry from an unknown PID {pid}"))
    };
    for e in &ours {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), Some("pid-server"), "{e}");
        assert!(field(e, "EVENT").is_some_and(|v| !v.is_empty()), "{e}");
        let pid = field(e, "PID").unwrap_or_else(|| panic!("no PID in {e}"));
        assert_eq!(Some(pid), field(e, "_PID"), "PID is not the sender's: {e}");
        assert_eq!(
            field(e, "GENERATION"),
            Some(generation_of(pid).to_string().as_str()),
            "{e}"
        );
    }
    for pid in [first, p0, p1, p2] {
        assert!(
            ours.iter()
                .any(|e| field(e, "_PID") == Some(pid.to_string().as_str())),
            "no native entry from PID {pid}"
        );
    }
    let events = |event: &str| -> Vec<&serde_json::Value> {
        ours.iter()
            .copied()
            .filter(|e| field(e, "EVENT") == Some(event))
            .collect()
    };
    let handovers = events("handover");
    assert_eq!(handovers.len(), 2, "{handovers:?}");
    for (h, (old, new)) in handovers.iter().zip([(p0, p1), (p1, p2)]) {
        assert_eq!(field(h, "PID"), Some(old.to_string().as_str()), "{h}");
        assert_eq!(field(h, "OLD_PID"), Some(old.to_string().as_str()), "{h}");
        assert_eq!(field(h, "NEW_PID"), Some(new.to_string().as_str()), "{h}");
    }
    assert_eq!(events("ready").len(), 4);
    let drain = events("drain");
    assert_eq!(drain.len(), 1, "{drain:?}");
    assert_eq!(field(drain[0], "SIGNAL"), Some("SIGTERM"));
    assert_eq!(events("drained").len(), 3, "the stop and both handovers");
    // Filtering on a structured field works.
    let filtered = c.journal(&["-u", "pid-server", "EVENT=handover", "-o", "cat"]);
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    assert!(
        filtered.contains(&format!("handed over to PID {p2}")),
        "{filtered}"
    );
}
