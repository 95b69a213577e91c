//! The configuration file's parser (`serve --config`, `check-config`), with
//! the flag parsers it checks each value with. No input may panic; a
//! problem is one line, on a line the input has; and what the file accepts,
//! the flag accepts too, as the same value.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pid_server::{cli, config_file};

fuzz_target!(|data: &[u8]| {
    let lines = data.iter().filter(|b| **b == b'\n').count() + 1;
    let s = match config_file::parse(data) {
        Ok(s) => s,
        Err(p) => {
            assert!(
                (1..=lines).contains(&p.line),
                "line {} of {lines}: {}",
                p.line,
                p.what
            );
            assert!(!p.what.is_empty() && !p.what.contains('\n'), "{:?}", p.what);
            return;
        }
    };
    for addr in s.listen.iter().flatten() {
        assert_eq!(cli::parse_listen(&addr.to_string()).as_ref(), Ok(addr));
    }
    let secs = |d: Duration| cli::parse_secs(&d.as_secs().to_string());
    let ms = |d: Duration| cli::parse_ms(&d.as_millis().to_string());
    for d in [
        s.drain_timeout,
        s.reload_timeout,
        s.header_timeout,
        s.keep_alive_timeout,
        s.http2_stall_timeout,
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(secs(d), Ok(d));
    }
    for d in [s.reload_probation, s.idle_grace, s.close_spread]
        .into_iter()
        .flatten()
    {
        assert_eq!(ms(d), Ok(d));
    }
    if let Some(n) = s.max_connections {
        assert_eq!(cli::parse_max_connections(&n.to_string()), Ok(n));
    }
});
