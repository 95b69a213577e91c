//! Requests per route, across reloads: `/stats`. Each generation counts the
//! requests its routes answer, and hands its counts to the next one
//! (`Hooks::save_state`), which adds them to its own once they arrive
//! (`Info::state_from_predecessor`).
//!
//! Unlike `/metrics` (the library's own counters, by status), these are the
//! app's: the example of app state that survives a reload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use serde::Serialize;

/// The most routes counted: pid-server has a handful; a state with more is
/// not ours to trust.
const MAX_ROUTES: usize = 64;

/// The longest route pattern kept from an inherited state.
const MAX_ROUTE_LEN: usize = 256;

/// The requests each route answered, this generation's and inherited.
///
/// The routes named at construction are counted on every request without a
/// lock: an atomic add on the route's own counter (a mutex and a map
/// lookup, shared by every core, were a measurable part of a request). Any
/// other pattern, and what a predecessor counted for routes this release
/// does not have, goes to the map behind the mutex.
#[derive(Debug, Default)]
pub struct RouteStats {
    routes: Box<[(&'static str, AtomicU64)]>,
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    other: BTreeMap<String, u64>,
    inherited: Inherited,
}

/// What this generation got from the previous one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inherited {
    /// Not yet known: the previous generation hands its counts over once
    /// this one owns the unit.
    #[default]
    Pending,
    /// Its counts are added in.
    Taken,
    /// None came (the first generation, a previous release, or counts it
    /// could not read).
    None,
}

/// What `/stats` shows.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: BTreeMap<String, u64>,
    pub inherited: Inherited,
}

impl RouteStats {
    /// Counts for `routes` (route patterns, as `/slow`), each with a
    /// counter of its own.
    pub fn new(routes: &[&'static str]) -> RouteStats {
        RouteStats {
            routes: routes.iter().map(|r| (*r, AtomicU64::new(0))).collect(),
            inner: Mutex::default(),
        }
    }

    fn counter(&self, route: &str) -> Option<&AtomicU64> {
        self.routes
            .iter()
            .find(|(r, _)| *r == route)
            .map(|(_, n)| n)
    }

    /// `n` more requests to `route`: its own counter, or the map.
    fn add(&self, c: &mut Counts, route: &str, n: u64) {
        match self.counter(route) {
            Some(own) => {
                own.fetch_add(n, Ordering::Relaxed);
            }
            None => self.add_other(c, route, n),
        }
    }

    /// `n` more requests to a route without a counter of its own.
    fn add_other(&self, c: &mut Counts, route: &str, n: u64) {
        if let Some(other) = c.other.get_mut(route) {
            *other += n;
        } else if self.routes.len() + c.other.len() < MAX_ROUTES {
            c.other.insert(route.to_string(), n);
        }
    }

    /// One request to `route` (a route pattern, as `/slow`). The lock only
    /// for a route without a counter of its own.
    pub fn count(&self, route: &str) {
        match self.counter(route) {
            Some(n) => {
                n.fetch_add(1, Ordering::Relaxed);
            }
            None => self.add_other(&mut self.lock(), route, 1),
        }
    }

    /// The routes that answered at least one request, with their counts.
    pub fn snapshot(&self) -> Snapshot {
        let c = self.lock();
        let mut requests = c.other.clone();
        for (route, n) in self.routes.iter() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                requests.insert(route.to_string(), n);
            }
        }
        Snapshot {
            requests,
            inherited: c.inherited,
        }
    }

    /// The counts, for the next generation: a line `<count> <route>` each.
    pub fn save(&self) -> Vec<u8> {
        let mut out = String::new();
        for (route, n) in self.snapshot().requests {
            out.push_str(&format!("{n} {route}\n"));
        }
        out.into_bytes()
    }

    /// Adds the previous generation's counts (`None`: it had none). Counts
    /// it cannot read are logged and dropped whole: this generation already
    /// serves, and its own counts stand.
    pub fn restore(&self, state: Option<&[u8]>) {
        let parsed = state.map(parse);
        let mut c = self.lock();
        c.inherited = match parsed {
            None => Inherited::None,
            Some(Err(why)) => {
                tracing::warn!(event = "stats_not_restored", reason = %why,
                    "the previous generation's request counts are unreadable ({why}); counting from 0");
                Inherited::None
            }
            Some(Ok(counts)) => {
                for (route, n) in counts {
                    self.add(&mut c, &route, n);
                }
                Inherited::Taken
            }
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse(state: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let text = std::str::from_utf8(state).map_err(|_| "not UTF-8".to_string())?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || format!("line {}: {line:?}", i + 1);
        let (n, route) = line.split_once(' ').ok_or_else(bad)?;
        let n: u64 = n.parse().map_err(|_| bad())?;
        if !route.starts_with('/') || route.len() > MAX_ROUTE_LEN || out.len() >= MAX_ROUTES {
            return Err(bad());
        }
        out.push((route.to_string(), n));
    }
    Ok(out)
}

/// Counts each request by its route's pattern, as a route layer (so only
/// matched routes, and the set of names stays the app's own). A plain
/// tower layer around the route rather than `middleware::from_fn`, which
/// clones the route's boxed service and boxes a future on every request.
#[derive(Clone)]
pub struct CountLayer(pub Arc<RouteStats>);

impl<S> tower_layer::Layer<S> for CountLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            stats: self.0.clone(),
        }
    }
}

/// A route that counts its requests; see [`CountLayer`].
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<RouteStats>,
}

impl<S: tower_service::Service<Request>> tower_service::Service<Request> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> S::Future {
        if let Some(route) = req.extensions().get::<MatchedPath>() {
            self.stats.count(route.as_str());
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_add_up() {
        // The old release declares two of the routes, the new one only
        // `/`: counts reach the other through the map, both ways.
        let old = RouteStats::new(&["/", "/healthz"]);
        for r in ["/", "/", "/healthz", "/slow"] {
            old.count(r);
        }
        let new = RouteStats::new(&["/"]);
        new.count("/");
        assert_eq!(new.snapshot().inherited, Inherited::Pending);
        new.restore(Some(&old.save()));
        let s = new.snapshot();
        assert_eq!(s.inherited, Inherited::Taken);
        assert_eq!(
            s.requests,
            BTreeMap::from([
                ("/".to_string(), 3),
                ("/healthz".to_string(), 1),
                ("/slow".to_string(), 1)
            ])
        );
    }

    #[test]
    fn unreadable_counts_are_dropped_whole() {
        for bad in [&b"x /\n"[..], b"1 nope\n", b"1\n", b"\xff"] {
            let s = RouteStats::default();
            s.count("/");
            s.restore(Some(bad));
            let snap = s.snapshot();
            assert_eq!(snap.inherited, Inherited::None, "{bad:?}");
            assert_eq!(snap.requests, BTreeMap::from([("/".to_string(), 1)]));
        }
        let s = RouteStats::default();
        s.restore(None);
        assert_eq!(s.snapshot().inherited, Inherited::None);
    }
}
