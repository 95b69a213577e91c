//! Everything pid-server parses from outside: `--listen` addresses, the
//! `LISTEN_*` environment, the control socket's requests (as the server
//! reads them, within their caps), answers and reports, and
//! the handover channel's messages in both directions (the new process's
//! `ready` line; connection datagrams with and without their fds). None may
//! panic, and what parses must print back to something that parses the same.
#![no_main]

use axum_handover::ListenAddr;
use axum_handover::fuzzing::{
    Answer, Inherited, MAX_ENVIRONMENT, MAX_INHERITED, MAX_REQUEST_LINE, MAX_VARIABLES, Refusal,
    Report, environment_block, handover_message, inherited_from, parse_request,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    handover_message(data);
    // The server's read of a request, from any bytes: within the caps, or
    // refused for the cap it passed.
    match parse_request(data) {
        Ok(Some(vars)) => {
            assert!(vars.len() <= MAX_VARIABLES);
            let bytes: usize = vars.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(bytes <= MAX_ENVIRONMENT);
            assert!(vars.iter().all(|(k, _)| !k.is_empty()));
            // What a helper would send for them reads back the same.
            let again = format!("upgrade\n{}", environment_block(vars.clone().into_iter()));
            if again.len() <= MAX_ENVIRONMENT {
                assert_eq!(parse_request(again.as_bytes()), Ok(Some(vars)));
            }
        }
        Ok(None) => {}
        Err(Refusal::LineTooLong) => assert!(data.len() > MAX_REQUEST_LINE),
        Err(Refusal::EnvironmentTooLong) => assert!(data.len() > MAX_ENVIRONMENT),
        Err(_) => {}
    }
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
