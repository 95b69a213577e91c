//! The app's own state, handed to the successor: the `app-state` feature of
//! the handover channel (see [`super::channel`]).
//!
//! The old process asks the app for it once ([`crate::Hooks::save_state`]),
//! right after the successor took over the unit and this process stopped
//! accepting, and sends it whole or says it has none. The successor hands
//! it to whoever waits on [`crate::Info::state_from_predecessor`].
//!
//! On the wire: one datagram `app-state none` (no state), or the state in
//! chunks of at most [`CHUNK`] bytes, each `app-state <offset> <total>`, a
//! newline, then the bytes, in order (a seqpacket socket keeps both order
//! and boundaries). Chunks because a datagram on a Unix socket cannot be
//! larger than the sender's send buffer (`net.core.wmem_default`, 208 KiB
//! by default), and the receiver reads at most
//! [`super::channel::MAX_DATAGRAM`] at once. Other messages (moved
//! connections) may come between two chunks; they are told apart by their
//! header.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The largest state handed over. A state is copied in full into both
/// processes' memory and crosses the channel while connections move, so it
/// stays small: a few counters or a summary, not a cache.
pub(crate) const MAX_STATE: usize = 1024 * 1024;

/// The most bytes of state in one datagram: with its header, well under the
/// smallest send buffer a seqpacket datagram must fit in.
pub(crate) const CHUNK: usize = 64 * 1024;

const WORD: &str = "app-state";

/// The datagrams that carry `state` (`None`: the app has none).
pub(crate) fn encode(state: Option<&[u8]>) -> Vec<Vec<u8>> {
    let Some(state) = state else {
        return vec![format!("{WORD} none\n").into_bytes()];
    };
    let total = state.len();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let end = (offset + CHUNK).min(total);
        let mut d = format!("{WORD} {offset} {total}\n").into_bytes();
        d.extend_from_slice(&state[offset..end]);
        out.push(d);
        offset = end;
        if offset == total {
            return out;
        }
    }
}

/// One app-state datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk<'a> {
    /// The old process has no state for us.
    None,
    /// `bytes` at `offset` of a state of `total` bytes.
    Part {
        offset: usize,
        total: usize,
        bytes: &'a [u8],
    },
}

/// Parses an app-state datagram; `None` for any other datagram.
pub(crate) fn decode(datagram: &[u8]) -> Option<Chunk<'_>> {
    let nl = datagram.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&datagram[..nl]).ok()?;
    let bytes = &datagram[nl + 1..];
    let mut w = header.split(' ');
    if w.next()? != WORD {
        return None;
    }
    let chunk = match (w.next()?, w.next(), w.next()) {
        ("none", None, None) if bytes.is_empty() => Chunk::None,
        (offset, Some(total), None) => Chunk::Part {
            offset: offset.parse().ok()?,
            total: total.parse().ok()?,
            bytes,
        },
        _ => return None,
    };
    Some(chunk)
}

/// What a successor's reassembly made of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More chunks to come.
    More,
    /// The whole state (`None`: the old process has none).
    Done(Option<Vec<u8>>),
    /// Not a state this process takes: too large, or chunks out of order.
    Bad(String),
}

/// Puts the chunks back together.
#[derive(Debug, Default)]
pub(crate) struct Assembly {
    partial: Option<Vec<u8>>,
    total: usize,
}

impl Assembly {
    pub(crate) fn push(&mut self, chunk: Chunk<'_>) -> Progress {
        let (offset, total, bytes) = match chunk {
            Chunk::None => return Progress::Done(None),
            Chunk::Part {
                offset,
                total,
                bytes,
            } => (offset, total, bytes),
        };
        if total > MAX_STATE {
            return Progress::Bad(format!(
                "{total} bytes, more than the {MAX_STATE} a successor takes"
            ));
        }
        if offset == 0 {
            self.partial = Some(Vec::with_capacity(total));
            self.total = total;
        }
        let Some(buf) = self.partial.as_mut() else {
            return Progress::Bad(format!("a chunk at {offset} without its start"));
        };
        if total != self.total || offset != buf.len() || offset + bytes.len() > total {
            let why = format!(
                "a chunk of {} bytes at {offset} of {total} after {} of {} bytes",
                bytes.len(),
                buf.len(),
                self.total
            );
            self.partial = None;
            return Progress::Bad(why);
        }
        buf.extend_from_slice(bytes);
        if buf.len() == total {
            return Progress::Done(self.partial.take());
        }
        Progress::More
    }

    /// Whether a state was cut short (chunks arrived, not all).
    fn unfinished(&self) -> bool {
        self.partial.is_some()
    }
}

/// Where a successor's inherited state arrives: once, the first answer
/// wins. Shared by every clone of an [`crate::Info`].
#[derive(Debug)]
pub(crate) struct Inbox {
    /// `None` while it may still come.
    arrived: watch::Sender<Option<Option<Arc<[u8]>>>>,
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            arrived: watch::Sender::new(None),
        }
    }
}

impl Inbox {
    /// Delivers the state, or that none will come; later calls change
    /// nothing.
    pub(crate) fn deliver(&self, state: Option<Vec<u8>>) {
        let state: Option<Arc<[u8]>> = state.map(Into::into);
        self.arrived.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            *now = Some(state);
            true
        });
    }

    /// Waits until it arrived, or none will.
    pub(crate) fn wait(self: &Arc<Self>) -> impl Future<Output = Option<Vec<u8>>> + Send + 'static {
        let inbox = self.clone();
        async move {
            let mut rx = inbox.arrived.subscribe();
            match rx.wait_for(Option::is_some).await {
                Ok(got) => got.as_ref().and_then(|s| s.as_deref().map(<[u8]>::to_vec)),
                // Cannot happen (`inbox` holds the sender).
                Err(_) => None,
            }
        }
    }
}

/// A successor's receiving end: reassembles chunks into the inbox, and
/// delivers "none" when it is dropped first (the channel closed, the
/// adoption ended), so that no waiter waits forever.
#[derive(Debug)]
pub(crate) struct Receiving {
    inbox: Arc<Inbox>,
    assembly: Mutex<Assembly>,
}

impl Receiving {
    pub(crate) fn new(inbox: Arc<Inbox>) -> Receiving {
        Receiving {
            inbox,
            assembly: Mutex::default(),
        }
    }

    /// Takes one chunk.
    pub(crate) fn take(&self, chunk: Chunk<'_>) {
        let progress = self
            .assembly
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chunk);
        match progress {
            Progress::More => {}
            Progress::Done(state) => {
                tracing::info!(
                    event = "app_state_taken",
                    bytes = state.as_ref().map_or(0, Vec::len),
                    "took the previous generation's app state ({})",
                    describe(state.as_deref())
                );
                self.inbox.deliver(state);
            }
            Progress::Bad(why) => {
                tracing::warn!(event = "app_state_refused", reason = %why,
                    "refused the previous generation's app state ({why}); starting without it");
                self.inbox.deliver(None);
            }
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let assembly = self.assembly.get_mut().unwrap_or_else(|p| p.into_inner());
        if assembly.unfinished() {
            tracing::warn!(
                event = "app_state_refused",
                reason = "cut short",
                "the previous generation's app state was cut short; starting without it"
            );
        }
        self.inbox.deliver(None);
    }
}

/// `12 bytes` or `none`, for logs.
pub(crate) fn describe(state: Option<&[u8]>) -> String {
    state.map_or("none".into(), |s| format!("{} bytes", s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(datagrams: &[Vec<u8>]) -> Vec<Progress> {
        let mut a = Assembly::default();
        datagrams
            .iter()
            .map(|d| a.push(decode(d).expect("an app-state datagram")))
            .collect()
    }

    #[test]
    fn states_of_every_size_round_trip_in_chunks() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, MAX_STATE] {
            let state: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let datagrams = encode(Some(&state));
            assert_eq!(datagrams.len(), len.div_ceil(CHUNK).max(1), "{len}");
            assert!(datagrams.iter().all(|d| d.len() <= CHUNK + 64));
            let progress = assemble(&datagrams);
            let (last, rest) = progress.split_last().unwrap();
            assert!(rest.iter().all(|p| *p == Progress::More), "{len}");
            assert_eq!(*last, Progress::Done(Some(state)), "{len}");
        }
        assert_eq!(assemble(&encode(None)), [Progress::Done(None)]);
    }

    #[test]
    fn too_large_or_out_of_order_is_refused_and_other_datagrams_are_not_state() {
        let big = format!("app-state 0 {}\nx", MAX_STATE + 1).into_bytes();
        assert!(matches!(assemble(&[big])[0], Progress::Bad(_)));
        let state = vec![1u8; 2 * CHUNK + 1];
        let d = encode(Some(&state));
        // A chunk missing, or one without its start.
        assert!(matches!(
            assemble(&[d[0].clone(), d[2].clone()])[1],
            Progress::Bad(_)
        ));
        assert!(matches!(assemble(&[d[1].clone()])[0], Progress::Bad(_)));
        // More bytes than the total said.
        assert!(matches!(
            assemble(&[b"app-state 0 1\nab".to_vec()])[0],
            Progress::Bad(_)
        ));
        for other in [
            &b"conn tcp 0 http\n"[..],
            b"counters\n",
            b"app-state\n",
            b"app-state none\nx",
            b"app-state 1\n",
            b"app-state x 1\n",
            b"app-state 0 1 2\n",
            b"",
        ] {
            assert_eq!(decode(other), None, "{other:?}");
        }
    }

    #[tokio::test]
    async fn the_first_answer_wins_and_a_dropped_receiver_says_none() {
        let inbox = Arc::new(Inbox::default());
        let waiting = tokio::spawn(inbox.wait());
        let r = Receiving::new(inbox.clone());
        for d in encode(Some(b"hello")) {
            r.take(decode(&d).unwrap());
        }
        drop(r);
        inbox.deliver(Some(b"later".to_vec()));
        assert_eq!(waiting.await.unwrap(), Some(b"hello".to_vec()));
        assert_eq!(inbox.wait().await, Some(b"hello".to_vec()));

        // Cut short: the channel closed between two chunks.
        let inbox = Arc::new(Inbox::default());
        let r = Receiving::new(inbox.clone());
        r.take(decode(&encode(Some(&vec![0; CHUNK + 1]))[0]).unwrap());
        drop(r);
        assert_eq!(inbox.wait().await, None);
    }
}
