//! `/metrics` in Prometheus' text format, from the library's snapshot
//! ([`axum_handover::Metrics`]). Built with `prometheus-client`, the
//! Prometheus project's own Rust client: its encoder gets the format's
//! escaping, `_total` suffixes and histogram buckets right, and a custom
//! collector lets each scrape encode the snapshot as it is, counters that
//! carried over from earlier generations included.

use std::fmt;

use axum_handover::{Histogram, Metrics};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The text a scrape gets.
pub fn render(m: Metrics) -> String {
    let mut registry = Registry::with_prefix("pid_server");
    registry.register_collector(Box::new(Scrape(m)));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    // Grown by doubling, the page (5 KiB) sat in an 8 KiB block, which the
    // response body keeps as it is: an HTTP/2 client that stops reading
    // holds the whole block for each response the server holds for it.
    out.shrink_to_fit();
    out
}

#[derive(Debug)]
struct Scrape(Metrics);

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let m = &self.0;
        let mut requests = e.encode_descriptor(
            "requests",
            "HTTP requests answered, by status, since the first generation",
            None,
            MetricType::Counter,
        )?;
        for (status, n) in &m.requests {
            let labels = [("status", status.to_string())];
            requests
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        let mut reloads = e.encode_descriptor(
            "reloads",
            "Reloads by result (ok: handed over; failed: the new process failed, the old one \
             kept serving; refused: one was under way)",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("ok", m.reloads_ok),
            ("failed", m.reloads_failed),
            ("refused", m.reloads_refused),
        ] {
            reloads
                .encode_family(&[("result", result)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        for (name, help, n) in counters(m) {
            e.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        for (name, help, v) in gauges(m) {
            e.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)?;
        }
        histogram(
            &mut e,
            "handover_duration_seconds",
            "From a reload request to the new process owning the unit",
            &m.handover_seconds,
        )?;
        histogram(
            &mut e,
            "drain_duration_seconds",
            "How long an old generation took to let go of its connections after a handover, or a stop's drain",
            &m.drain_seconds,
        )
    }
}

/// The counters without labels: name (before the `_total` the encoder
/// adds), help, value since the first generation.
fn counters(m: &Metrics) -> [(&'static str, &'static str, u64); 8] {
    [
        (
            "connections_moved",
            "Keep-alive connections moved to a new generation",
            m.connections_moved,
        ),
        (
            "connections_fell_back",
            "Connections that were to move and were served to the end by the old generation",
            m.connections_fell_back,
        ),
        (
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures,
        ),
        (
            "tls_handshakes_abandoned",
            "TLS handshakes the client closed or reset the connection before they were done",
            m.tls_handshakes_abandoned,
        ),
        (
            "protocol_errors",
            "HTTP/2 connections closed for a protocol error of the client",
            m.protocol_errors,
        ),
        (
            "http2_stalled_connections",
            "HTTP/2 connections closed because their responses waited on a client that did not \
             read them for the stall timeout",
            m.http2_stalled_connections,
        ),
        (
            "http2_refused_streams",
            "HTTP/2 requests answered 503 because the responses held reached their bound",
            m.http2_refused_streams,
        ),
        (
            "connections_restored",
            "Connections taken from systemd's file descriptor store at a start: idle \
             connections a restart kept",
            m.connections_restored,
        ),
    ]
}

/// The gauges: name, help, value in this process now.
fn gauges(m: &Metrics) -> [(&'static str, &'static str, i64); 6] {
    [
        (
            "in_flight",
            "Requests in progress in this process",
            m.in_flight as i64,
        ),
        (
            "open_connections",
            "Connections open in this process",
            m.connections as i64,
        ),
        (
            "upgraded_connections",
            "Connections upgraded to another protocol (WebSockets) open in this process",
            m.upgraded as i64,
        ),
        (
            "http2_held_responses",
            "HTTP/2 responses held in this process: being made, or waiting on a client's window",
            m.http2_held_responses as i64,
        ),
        (
            "connections_in_fd_store",
            "Idle connections in systemd's file descriptor store now, kept for a crash \
             (--fd-store-while-idle)",
            m.connections_in_fd_store as i64,
        ),
        (
            "generation",
            "This process's generation (0 fresh, +1 per reload)",
            i64::from(m.generation),
        ),
    ]
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    // The encoder wants per-bucket counts; the snapshot is cumulative.
    let mut previous = 0;
    let mut buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|(le, n)| {
            let own = n - previous.min(*n);
            previous = *n;
            (*le, own)
        })
        .collect();
    buckets.push((f64::INFINITY, h.count.saturating_sub(previous)));
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
}
