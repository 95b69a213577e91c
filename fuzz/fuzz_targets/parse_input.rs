//! Everything pid-server parses from outside: `--listen` addresses, the
//! `LISTEN_*` environment, the control socket's answers and reports, and
//! the handover channel's messages in both directions (the new process's
//! `ready` line; connection datagrams with and without their fds). None may
//! panic, and what parses must print back to something that parses the same.
#![no_main]

use axum_handover::ListenAddr;
use axum_handover::fuzzing::{Answer, Inherited, MAX_INHERITED, Report, handover_message, inherited_from};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    handover_message(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addr) = s.parse::<ListenAddr>() {
        let again: ListenAddr = addr.to_string().parse().expect("printed address parses");
        assert_eq!(again, addr);
    }
    // Split the input into the three variables systemd would set.
    let mut parts = s.splitn(3, '\n');
    let (fds, pid, names) = (parts.next(), parts.next(), parts.next());
    if let Ok(Inherited::Sockets { count, names }) = inherited_from(fds, pid, names, 4242) {
        assert_eq!(count as usize, names.len());
        assert!(count >= 1 && count <= MAX_INHERITED);
    }
    if let Some(a) = Answer::parse(s) {
        assert_eq!(Answer::parse(&a.to_line()), Some(a));
    }
    if let Some(r) = Report::parse(s) {
        assert_eq!(Report::parse(&r.to_line()), Some(r));
    }
});
