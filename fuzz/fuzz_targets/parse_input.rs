//! Everything pid-server parses from outside: `--listen` addresses, the
//! `LISTEN_*` environment, and the control socket's answers. None may
//! panic, and what parses must print back to something that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pid_server::control::Answer;
use pid_server::listeners::{ListenAddr, inherited_from};

fuzz_target!(|data: &[u8]| {
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
    if let Ok(pid_server::listeners::Inherited::Sockets { count, names }) =
        inherited_from(fds, pid, names, 4242)
    {
        assert_eq!(count as usize, names.len());
        assert!(count >= 1 && count <= pid_server::listeners::MAX_INHERITED);
    }
    if let Some(a) = Answer::parse(s) {
        assert_eq!(Answer::parse(&a.to_line()), Some(a));
    }
});
