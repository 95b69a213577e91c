//! What a service configures: its name (from which every name that must not
//! collide between two services on one host is derived) and the timings of
//! a handover and a drain.

use std::time::Duration;

use tokio::signal::unix::SignalKind;

/// A service's handover settings. [`Config::new`] takes the service's name;
/// the rest has defaults that suit an HTTP service behind systemd.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) name: String,
    pub(crate) env_prefix: String,
    pub(crate) process_name: String,
    pub(crate) reload_timeout: Duration,
    pub(crate) probation: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) close_spread: Duration,
    pub(crate) idle_grace: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_connections: usize,
    /// Sockets (by name) whose connections have a budget of their own.
    pub(crate) own_budgets: Vec<(String, usize)>,
    pub(crate) move_connections: bool,
    /// Idle connections a stop may leave in systemd's file descriptor
    /// store (0: none).
    pub(crate) fd_store_connections: usize,
    /// Idle connections kept in the store while idle, for a crash (0:
    /// none).
    pub(crate) fd_store_while_idle: usize,
    /// TLS per socket name (`None`: every socket without a name of its
    /// own here).
    pub(crate) tls: Vec<(Option<String>, crate::Tls)>,
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) http2: bool,
    pub(crate) http2_max_concurrent_streams: u32,
    pub(crate) http2_keep_alive: Option<Duration>,
    /// The signals that hand over, stop signals left out.
    pub(crate) reload_signals: Vec<SignalKind>,
    pub(crate) http2_stall_timeout: Duration,
    pub(crate) http2_max_held_per_connection: usize,
    pub(crate) http2_max_held: usize,
}

impl Config {
    /// Settings for the service `name` (say `"myapp"`). From it come:
    /// - the prefix of the environment variables one generation passes to the
    ///   next (`MYAPP_GENERATION`, `MYAPP_HANDOVER_FD`, …): see
    ///   [`Config::env_prefix`];
    /// - the control socket the reload helper talks to:
    ///   `$RUNTIME_DIRECTORY/control.<pid>` and the abstract
    ///   `@myapp/<pid>/control`;
    /// - the process name (`/proc/<pid>/comm`) the reload helper looks for
    ///   when it is not given a PID: see [`Config::process_name`].
    pub fn new(name: &str) -> Config {
        let env_prefix = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        Config {
            name: name.to_string(),
            env_prefix,
            // The kernel keeps 15 bytes of a process name.
            process_name: name.chars().take(15).collect(),
            reload_timeout: Duration::from_secs(30),
            probation: Duration::from_millis(250),
            drain_timeout: Duration::from_secs(30),
            close_spread: Duration::from_secs(5),
            idle_grace: None,
            keep_alive_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            own_budgets: Vec::new(),
            move_connections: true,
            fd_store_connections: 0,
            fd_store_while_idle: 0,
            tls: Vec::new(),
            tls_handshake_timeout: Duration::from_secs(10),
            http2: true,
            http2_max_concurrent_streams: 100,
            http2_keep_alive: Some(Duration::from_secs(30)),
            reload_signals: vec![SignalKind::hangup(), SignalKind::user_defined2()],
            http2_stall_timeout: Duration::from_secs(20),
            http2_max_held_per_connection: 100,
            http2_max_held: 10_000,
        }
    }

    /// The service's name, as given to [`Config::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the environment-variable prefix (default: the name in
    /// capitals, other characters as `_`).
    pub fn env_prefix(mut self, prefix: &str) -> Config {
        self.env_prefix = prefix.to_string();
        self
    }

    /// Replaces the process name the reload helper looks for without a PID
    /// (default: the name, cut to the kernel's 15 bytes).
    pub fn process_name(mut self, name: &str) -> Config {
        self.process_name = name.to_string();
        self
    }

    /// How long a new generation may take to say it is ready before it is
    /// stopped and the reload fails (default 30 s).
    pub fn reload_timeout(mut self, d: Duration) -> Config {
        self.reload_timeout = d;
        self
    }

    /// The first name of [`Config::reload_timeout`], renamed so that the
    /// method and pid-server's `--reload-timeout` say the same.
    #[deprecated(note = "renamed `Config::reload_timeout`")]
    pub fn ready_timeout(self, d: Duration) -> Config {
        self.reload_timeout(d)
    }

    /// The signals that start a reload (default SIGHUP and SIGUSR2; SIGHUP
    /// also tells systemd `RELOADING=1`, as `Type=notify-reload` expects).
    /// A signal left out is not touched: no handler is installed and it is
    /// not unblocked, so the app may handle it itself (say SIGHUP to reread
    /// its configuration in place). SIGTERM and SIGINT always stop the
    /// generation and are ignored here; an empty list leaves the reload
    /// helper (the control socket) as the only way to reload.
    pub fn reload_signals(mut self, signals: &[SignalKind]) -> Config {
        self.reload_signals = crate::signals::reload_kinds(signals);
        self
    }

    /// How long both generations serve before the new one takes the unit
    /// over; it must stay alive through it (default 250 ms).
    pub fn probation(mut self, d: Duration) -> Config {
        self.probation = d;
        self
    }

    /// How long a drain may take; what is still running then is cut
    /// (default 30 s).
    pub fn drain_timeout(mut self, d: Duration) -> Config {
        self.drain_timeout = d;
        self
    }

    /// The window over which a leaving generation asks its long-lived
    /// exchanges (upgraded connections such as WebSockets, responses still
    /// streaming) to end (default 5 s). Each gets its own moment in the
    /// window, at random (HAProxy's `close-spread-time`), so that
    /// thousands of clients do not all reconnect to the new process at
    /// the same instant; see [`crate::Closing`]. Zero: all at once. At most
    /// the drain timeout less two seconds, so that every exchange is asked
    /// before it would be cut.
    pub fn close_spread(mut self, d: Duration) -> Config {
        self.close_spread = d;
        self
    }

    /// How long an idle keep-alive connection is kept, advertised to clients
    /// as `Keep-Alive: timeout=N` (whole seconds; default 5 s). An idle
    /// connection is closed one second after that, so that a client that
    /// honours the hint closes it first; a drain without a successor closes
    /// idle connections no sooner.
    pub fn keep_alive_timeout(mut self, d: Duration) -> Config {
        self.keep_alive_timeout = d;
        self
    }

    /// Overrides how long a drain without a successor lets a connection sit
    /// idle before closing it (default: the keep-alive timeout plus one
    /// second). Shorter stops sooner, but races with clients that reuse the
    /// connection after a pause.
    pub fn idle_grace(mut self, d: Duration) -> Config {
        self.idle_grace = Some(d);
        self
    }

    /// How long a client may take to send a request's headers (default
    /// 10 s).
    pub fn header_read_timeout(mut self, d: Duration) -> Config {
        self.header_read_timeout = d;
        self
    }

    /// Most connections served at once; further ones wait, unserved: one
    /// per socket accepted, the rest in the kernel's accept queue (default
    /// 10 000).
    pub fn max_connections(mut self, n: usize) -> Config {
        self.max_connections = n.max(1);
        self
    }

    /// Gives the socket named `name` (its systemd `FileDescriptorName=`) a
    /// budget of `n` connections of its own, outside
    /// [`Config::max_connections`]: a socket for operators (health,
    /// metrics) then still answers when every client connection slot is
    /// taken. Its connections never take a client's slot either. Past `n`,
    /// its connections wait in the kernel's queue like the clients'.
    pub fn socket_connections(mut self, name: &str, n: usize) -> Config {
        self.own_budgets.retain(|(s, _)| s != name);
        self.own_budgets.push((name.to_string(), n.max(1)));
        self
    }

    /// Whether a handover moves idle keep-alive connections to the new
    /// generation (default) or closes them the way a drain does.
    pub fn move_connections(mut self, on: bool) -> Config {
        self.move_connections = on;
        self
    }

    /// At a stop (`systemctl restart`, `systemctl stop`: SIGTERM), leaves up
    /// to `n` idle keep-alive connections in systemd's file descriptor
    /// store instead of closing them, and the next start serves them: a
    /// restart then closes no idle connection, and a request a client sends
    /// in the gap waits in its socket. A plain stop discards the store, which
    /// closes them then. Default 0: off, idle connections close at a stop.
    ///
    /// They travel in one stored fd (a socket holding them), so the unit
    /// needs `FileDescriptorStoreMax=` of at least 1, whatever `n`; set `n`
    /// to the connection budget. TLS and HTTP/2 connections, those past
    /// `n`, and those with bytes of a request read already are served to
    /// the end as at any stop. Taking stored connections at a start needs
    /// no setting. The store is systemd's: without `NOTIFY_SOCKET` this does
    /// nothing. See docs/src/operator/restart.md.
    pub fn fd_store_connections(mut self, n: usize) -> Config {
        self.fd_store_connections = n;
        self
    }

    /// The crash-safe mode: also while serving, up to `n` plain HTTP/1.1
    /// connections idle for a second are kept in systemd's file descriptor
    /// store (a copy each; this process serves on) until their next request
    /// arrives, so when the process dies (SIGKILL, the OOM killer, a panic)
    /// and systemd restarts it (`Restart=on-failure`), the next process
    /// serves the connections that were idle; what a crash loses is what
    /// was in progress, and connections idle for less than a second or past
    /// `n`. The unit's `FileDescriptorStoreMax=` must be at least `n + 1`.
    /// Default 0, off: it costs PID 1 two messages per idle spell of each
    /// connection, and PID 1 compares each fd stored with every one it
    /// holds (about 1 µs each), so keep `n` in the hundreds;
    /// docs/src/operator/restart.md has the figures.
    pub fn fd_store_while_idle(mut self, n: usize) -> Config {
        self.fd_store_while_idle = n;
        self
    }

    /// Serves TLS on every listening socket (except those given a
    /// certificate of their own with [`Config::tls_socket`]). Clients
    /// choose HTTP/2 or HTTP/1.1 by ALPN (`h2`, `http/1.1`; none means
    /// HTTP/1.1). Build `tls` in `main` with [`crate::Tls::from_pem_files`]
    /// so that every generation reads the files anew: a reload then serves
    /// renewed certificates. TLS connections drain at a handover instead of
    /// moving (their session state lives in the process).
    pub fn tls(mut self, tls: crate::Tls) -> Config {
        self.tls.retain(|(name, _)| name.is_some());
        self.tls.push((None, tls));
        self
    }

    /// Serves TLS with `tls` on the listening socket named `socket` (its
    /// `FileDescriptorName=`, or `listen` for sockets bound here) only.
    pub fn tls_socket(mut self, socket: &str, tls: crate::Tls) -> Config {
        self.tls.retain(|(name, _)| name.as_deref() != Some(socket));
        self.tls.push((Some(socket.to_string()), tls));
        self
    }

    /// How long a client may take to finish the TLS handshake (default
    /// 10 s); a slower one is disconnected and counted as a failed
    /// handshake.
    pub fn tls_handshake_timeout(mut self, d: Duration) -> Config {
        self.tls_handshake_timeout = d;
        self
    }

    /// Whether HTTP/2 is served (default): with prior knowledge on plain
    /// sockets (a connection that starts with the HTTP/2 preface, `h2c`),
    /// and by ALPN on TLS ones. Off, plain sockets speak HTTP/1.1 only and
    /// TLS ones offer only `http/1.1`.
    ///
    /// An HTTP/2 connection cannot move to the next generation: at a
    /// handover (and a stop) it gets a graceful GOAWAY at once (hyper sends
    /// GOAWAY with the highest stream id, then, after a PING round trip,
    /// the last stream it took), so the client opens its next connection to
    /// the new process; the streams it had open finish here, within the
    /// drain timeout. No stream is refused or reset, except those of a
    /// client that does not read its responses: see
    /// [`Config::http2_stall_timeout`].
    pub fn http2(mut self, on: bool) -> Config {
        self.http2 = on;
        self
    }

    /// Most streams (requests) a client may have open at once on one
    /// HTTP/2 connection (default 100); the header list of each is bounded
    /// like an HTTP/1.1 request head (16 KiB).
    pub fn http2_max_concurrent_streams(mut self, n: u32) -> Config {
        self.http2_max_concurrent_streams = n.max(1);
        self
    }

    /// How often an idle HTTP/2 connection is pinged (default 30 s; `None`:
    /// never). A peer that does not answer within 20 s is disconnected, so
    /// dead clients do not hold connections for ever.
    pub fn http2_keep_alive(mut self, interval: Option<Duration>) -> Config {
        self.http2_keep_alive = interval;
        self
    }

    /// How long an HTTP/2 connection's responses may wait on a client that
    /// does not open its flow-control window before the connection is
    /// closed (default 20 s, the time a peer has to answer a PING, and
    /// below the drain timeout, so a stalled client does not hold a
    /// leaving process until then). Any progress (a DATA frame goes out, or
    /// the next chunk of a response is taken) starts the wait anew: a slow
    /// reader is not cut. The connection is closed within a quarter of the
    /// timeout after it ran out; its streams end with the connection (no
    /// RST_STREAM or GOAWAY: hyper can send neither for a stream it is
    /// waiting to write). Counted in
    /// [`crate::Metrics::http2_stalled_connections`].
    pub fn http2_stall_timeout(mut self, d: Duration) -> Config {
        self.http2_stall_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Most HTTP/2 responses the process holds at once, over every
    /// connection (default 10 000): a response is held from its request
    /// until its last chunk is taken by the connection, except while its
    /// body waits on the app. What one holds is its stream and the chunk
    /// waiting for the client's window (its body, for a small response; a
    /// few KB for pid-server's `/metrics`). Past the bound, new requests
    /// are answered 503 with an empty body, which needs no window, and
    /// counted in [`crate::Metrics::http2_refused_streams`].
    pub fn http2_max_held_responses(mut self, n: usize) -> Config {
        self.http2_max_held = n.max(1);
        self
    }

    /// Most HTTP/2 responses one connection holds at once (default 100,
    /// the default [`Config::http2_max_concurrent_streams`]): a bound on
    /// one client's share of [`Config::http2_max_held_responses`] that
    /// holds when the streams per connection are raised. Past it, that
    /// connection's new requests are answered 503 with an empty body.
    pub fn http2_max_held_responses_per_connection(mut self, n: usize) -> Config {
        self.http2_max_held_per_connection = n.max(1);
        self
    }

    /// The TLS configuration of the socket named `socket`, if any.
    pub(crate) fn tls_for(&self, socket: &str) -> Option<&crate::Tls> {
        self.tls
            .iter()
            .find(|(n, _)| n.as_deref() == Some(socket))
            .or_else(|| self.tls.iter().find(|(n, _)| n.is_none()))
            .map(|(_, t)| t)
    }

    /// The keep-alive timeout in force: hyper closes a connection that sends
    /// no request head within the header timeout, idle or not, so the
    /// advertised timeout stays a second below it.
    pub(crate) fn keep_alive(&self) -> Duration {
        let secs = self
            .keep_alive_timeout
            .as_secs()
            .min(self.header_read_timeout.as_secs().saturating_sub(1))
            .max(1);
        Duration::from_secs(secs)
    }

    /// The connections of the sockets with a budget of their own, among
    /// `sockets` (the names of the sockets this process has).
    pub(crate) fn own_budget_total<'a>(&self, sockets: impl Iterator<Item = &'a str>) -> usize {
        let names: Vec<&str> = sockets.collect();
        self.own_budgets
            .iter()
            .filter(|(s, _)| names.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// How long a drain without a successor waits on an idle connection.
    pub(crate) fn drain_idle(&self) -> Duration {
        self.idle_grace
            .unwrap_or(self.keep_alive() + Duration::from_secs(1))
    }

    /// The full name of one of the handover's environment variables.
    pub(crate) fn var(&self, v: crate::env::Var) -> String {
        format!("{}_{}", self.env_prefix, v.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_service_name() {
        let c = Config::new("pid-server");
        assert_eq!(c.env_prefix, "PID_SERVER");
        assert_eq!(c.var(crate::env::Var::Generation), "PID_SERVER_GENERATION");
        assert_eq!(c.process_name, "pid-server");
        let c = Config::new("a-very-long-service-name");
        assert_eq!(c.process_name.len(), 15);
    }

    #[test]
    fn own_budgets_count_only_for_sockets_the_process_has() {
        let c = Config::new("x")
            .socket_connections("metrics", 8)
            .socket_connections("admin", 4)
            .socket_connections("metrics", 16);
        assert_eq!(c.own_budgets.len(), 2, "the last budget of a name wins");
        assert_eq!(c.own_budget_total(["http", "metrics"].into_iter()), 16);
        assert_eq!(c.own_budget_total(["http"].into_iter()), 0);
        assert_eq!(c.own_budget_total(["admin", "metrics"].into_iter()), 20);
    }

    #[test]
    fn drain_idle_follows_the_keep_alive_timeout_unless_overridden() {
        let c = Config::new("x").keep_alive_timeout(Duration::from_secs(3));
        assert_eq!(c.drain_idle(), Duration::from_secs(4));
        let c = c.idle_grace(Duration::from_millis(200));
        assert_eq!(c.drain_idle(), Duration::from_millis(200));
        // Never past the header timeout, which closes idle connections too.
        let c = Config::new("x").header_read_timeout(Duration::from_secs(2));
        assert_eq!(c.keep_alive(), Duration::from_secs(1));
    }
}
