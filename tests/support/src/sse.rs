//! A Server-Sent Events client for streams whose events say `pid N`, each
//! with an `id:` and a `retry:`: pid-server's `/events`, and the library's
//! `realistic` example. It reads one stream to its end, as an
//! `EventSource` does before it reconnects with `Last-Event-ID`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::ws::pid_of;

/// One exchange on `path`: sends the request (with `Last-Event-ID` when
/// resuming) and reads events until the server ends the body. Returns
/// `(id, pid)` of every event.
pub fn once(addr: SocketAddr, path: &str, last: Option<u64>, bound: Duration) -> Vec<(u64, u32)> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(bound)).unwrap();
    let mut w = s.try_clone().unwrap();
    let resume = last.map_or(String::new(), |l| format!("Last-Event-ID: {l}\r\n"));
    write!(
        w,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{resume}\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // The head; the body is chunked (its length is unknown).
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut events = Vec::new();
    let (mut id, mut pid, mut retry) = (None, None, false);
    loop {
        line.clear();
        r.read_line(&mut line)
            .expect("the stream goes on or ends cleanly");
        let size = u64::from_str_radix(line.trim(), 16).expect("a chunk size");
        if size == 0 {
            // The end of the body: the server ended the stream.
            return events;
        }
        let mut chunk = vec![0u8; size as usize + 2];
        std::io::Read::read_exact(&mut r, &mut chunk).unwrap();
        for l in String::from_utf8_lossy(&chunk[..size as usize]).lines() {
            if let Some(v) = l.strip_prefix("id: ") {
                id = Some(v.parse::<u64>().unwrap());
            } else if let Some(v) = l.strip_prefix("data: ") {
                pid = Some(pid_of(v));
            } else if l.starts_with("retry: ") {
                retry = true;
            } else if l.is_empty()
                && let (Some(i), Some(p)) = (id.take(), pid.take())
            {
                assert!(retry, "each event says retry");
                events.push((i, p));
            }
        }
    }
}
