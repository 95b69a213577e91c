//! Requests per route, across reloads: `/stats`. Each generation counts the
//! requests its routes answer, and hands its counts to the next one
//! (`Hooks::save_state`), which adds them to its own once they arrive
//! (`Info::state_from_predecessor`).
//!
//! Unlike `/metrics` (the library's own counters, by status), these are the
//! app's: the example of app state that survives a reload.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// The most routes counted: pid-server has a handful; a state with more is
/// not ours to trust.
const MAX_ROUTES: usize = 64;

/// The longest route pattern kept from an inherited state.
const MAX_ROUTE_LEN: usize = 256;

/// The requests each route answered, this generation's and inherited.
#[derive(Debug, Default)]
pub struct RouteStats {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    by_route: BTreeMap<String, u64>,
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
    /// One request to `route` (a route pattern, as `/slow`).
    pub fn count(&self, route: &str) {
        let mut c = self.lock();
        if let Some(n) = c.by_route.get_mut(route) {
            *n += 1;
        } else if c.by_route.len() < MAX_ROUTES {
            c.by_route.insert(route.to_string(), 1);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = self.lock();
        Snapshot {
            requests: c.by_route.clone(),
            inherited: c.inherited,
        }
    }

    /// The counts, for the next generation: a line `<count> <route>` each.
    pub fn save(&self) -> Vec<u8> {
        let c = self.lock();
        let mut out = String::new();
        for (route, n) in &c.by_route {
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
                    if let Some(own) = c.by_route.get_mut(&route) {
                        *own += n;
                    } else if c.by_route.len() < MAX_ROUTES {
                        c.by_route.insert(route, n);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_add_up() {
        let old = RouteStats::default();
        for r in ["/", "/", "/healthz", "/slow"] {
            old.count(r);
        }
        let new = RouteStats::default();
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
