//! Socket activation: the first request starts the service, whose main process answers it.

use pid_server_test_support::nspawn;

use super::{SERVICE, SOCKET, activate, boot, healthz, status_line, timer, wait_status_line};

#[test]
fn socket_activation_starts_the_service_on_the_first_request() {
    if !nspawn::require_or_skip("socket_activation_starts_the_service_on_the_first_request") {
        return;
    }
    let _timer = timer("1 socket activation");
    let port = nspawn::free_port();
    let c = boot(port, &[]);

    // Only the socket runs; the service waits for a connection.
    assert_eq!(c.unit_state(SOCKET), ("active".into(), "listening".into()));
    assert_eq!(c.unit_state(SERVICE), ("inactive".into(), "dead".into()));
    assert_eq!(c.main_pid(SERVICE), 0);
    assert_eq!(
        c.unit_property(SOCKET, "Listen"),
        format!("127.0.0.1:{port} (Stream)")
    );

    // The first request starts it and is answered by its main process.
    let pid = activate(&c, port);
    assert_ne!(pid, 0);
    assert_eq!(c.unit_state(SERVICE), ("active".into(), "running".into()));
    let h = healthz(port);
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
