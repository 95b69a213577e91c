//! Socket activation: the first request starts the service, whose main process answers it.

use pid_server_test_support::{Release, each_release};

use super::{
    PORT, SERVICE, SOCKET, activate, boot, can_run, healthz, status_line, timer, wait_status_line,
};

each_release!(socket_activation_starts_the_service_on_the_first_request);

fn socket_activation_starts_the_service_on_the_first_request(r: Release) {
    if !can_run(
        "socket_activation_starts_the_service_on_the_first_request",
        r,
    ) {
        return;
    }
    let _timer = timer(r, "1 socket activation");
    let c = boot(r, &[]);

    // Only the socket runs; the service waits for a connection.
    assert_eq!(c.unit_state(SOCKET), ("active".into(), "listening".into()));
    assert_eq!(c.unit_state(SERVICE), ("inactive".into(), "dead".into()));
    assert_eq!(c.main_pid(SERVICE), 0);
    assert_eq!(
        c.unit_property(SOCKET, "Listen"),
        format!("127.0.0.1:{PORT} (Stream)")
    );

    // The first request starts it and is answered by its main process.
    let pid = activate(&c);
    assert_ne!(pid, 0);
    assert_eq!(c.unit_state(SERVICE), ("active".into(), "running".into()));
    let h = healthz(&c);
    assert_eq!(h["pid"], pid);
    assert_eq!(h["generation"], 0);
    assert_eq!(h["state"], "serving");
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");

    let st = wait_status_line(&c, "from the service", |l| {
        l.starts_with("serving 1 socket (systemd: http)")
    });
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with("Active: active (running)")),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with(&format!("Main PID: {pid} "))),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with("TriggeredBy:") && l.contains(SOCKET)),
        "{st}"
    );
    let line = status_line(&st).unwrap();
    assert!(line.contains("generation 0"), "{line}");
    assert!(
        c.unit_property(SERVICE, "StatusText")
            .starts_with("serving 1 socket (systemd: http)")
    );
}
