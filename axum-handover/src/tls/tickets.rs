//! Session tickets whose keys outlive a generation.
//!
//! rustls' own ticketer makes its keys at random and cannot give them
//! away, so a client that resumes after a reload would find the new
//! process unable to read its ticket and fall back to a full handshake.
//! This one can: the old process sends its keys to the new one over the
//! private connection channel (protocol 2, feature `tls-tickets`), and the
//! new one decrypts the old one's tickets and issues its own under the same
//! key. A child that gets no keys (an old process that predates the
//! feature) keeps the fresh key it made.
//!
//! A ticket is `key id (4) | nonce (12) | ChaCha20-Poly1305(state) | tag`,
//! the key id as associated data. Keys are secret: they only travel over
//! the socketpair between two generations, and nothing prints them (the
//! `Debug` impls say how many there are, no more).
//!
//! Not done: rotating keys on a timer. A key lives as long as the chain of
//! generations that passed it on; restarting the service (not reloading)
//! makes a new one.

use std::fmt;
use std::sync::RwLock;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Keys kept: the current one and a few earlier ones (from before a
/// reload), which still decrypt.
const MAX_KEYS: usize = 4;
const ID_LEN: usize = 4;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// What clients are told a ticket is good for.
const LIFETIME_SECS: u32 = 6 * 3600;

/// One key: its id and its bytes.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    id: [u8; ID_LEN],
    secret: [u8; KEY_LEN],
}

impl Key {
    fn fresh() -> Option<Key> {
        let rng = SystemRandom::new();
        let mut k = Key {
            id: [0; ID_LEN],
            secret: [0; KEY_LEN],
        };
        rng.fill(&mut k.id).ok()?;
        rng.fill(&mut k.secret).ok()?;
        Some(k)
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.secret).expect("a 32-byte key"))
    }
}

/// The keys one generation hands the next, newest first.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct TicketKeys(Vec<Key>);

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketKeys({} keys)", self.0.len())
    }
}

const HEADER: &str = "tls-tickets";

impl TicketKeys {
    /// As sent: a datagram `tls-tickets`, then a line `key <id hex> <key
    /// hex>` per key, newest first. Unknown lines are ignored by the
    /// reader.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut s = format!("{HEADER}\n");
        for k in &self.0 {
            s.push_str(&format!("key {} {}\n", hex(&k.id), hex(&k.secret)));
        }
        s.into_bytes()
    }

    /// Parses a `tls-tickets` datagram; `None` if it is not one (or a key
    /// in it is malformed).
    pub(crate) fn decode(datagram: &[u8]) -> Option<TicketKeys> {
        let text = std::str::from_utf8(datagram).ok()?;
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let mut keys = Vec::new();
        for line in lines {
            let w: Vec<&str> = line.split(' ').collect();
            if let ["key", id, secret] = w[..] {
                keys.push(Key {
                    id: unhex(id)?,
                    secret: unhex(secret)?,
                });
            }
        }
        keys.truncate(MAX_KEYS);
        Some(TicketKeys(keys))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The ticketer of one generation (shared by all its TLS sockets).
pub(crate) struct Ticketer {
    /// Newest first; the first encrypts. Empty only if the system's random
    /// source failed, which disables tickets.
    keys: RwLock<Vec<(Key, LessSafeKey)>>,
    rng: SystemRandom,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.keys.read().map(|k| k.len()).unwrap_or(0);
        write!(f, "Ticketer({n} keys)")
    }
}

impl Default for Ticketer {
    fn default() -> Self {
        let keys = Key::fresh().map(|k| (k.clone(), k.aead())).into_iter();
        Ticketer {
            keys: RwLock::new(keys.collect()),
            rng: SystemRandom::new(),
        }
    }
}

impl Ticketer {
    /// The keys, to send to the next generation.
    pub(crate) fn export(&self) -> TicketKeys {
        let keys = self.keys.read().expect("ticket keys lock");
        TicketKeys(keys.iter().map(|(k, _)| k.clone()).collect())
    }

    /// Takes the previous generation's keys: its newest becomes ours for
    /// new tickets, and every key (ours included) still decrypts.
    pub(crate) fn import(&self, from: TicketKeys) {
        let mut keys = self.keys.write().expect("ticket keys lock");
        let mine: Vec<(Key, LessSafeKey)> = keys.drain(..).collect();
        for k in from.0 {
            if !keys.iter().any(|(have, _)| have.id == k.id) {
                let aead = k.aead();
                keys.push((k, aead));
            }
        }
        for (k, aead) in mine {
            if !keys.iter().any(|(have, _)| have.id == k.id) {
                keys.push((k, aead));
            }
        }
        keys.truncate(MAX_KEYS);
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().ok()?;
        let (key, aead) = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key.id),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        // Attacker-controlled: every length is checked, nothing panics.
        let id: [u8; ID_LEN] = cipher.get(..ID_LEN)?.try_into().ok()?;
        let nonce: [u8; NONCE_LEN] = cipher.get(ID_LEN..ID_LEN + NONCE_LEN)?.try_into().ok()?;
        let mut sealed = cipher.get(ID_LEN + NONCE_LEN..)?.to_vec();
        let keys = self.keys.read().ok()?;
        let (_, aead) = keys.iter().find(|(k, _)| k.id == id)?;
        let plain = aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id),
                &mut sealed,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_successor_reads_its_predecessors_tickets() {
        let old = Ticketer::default();
        let ticket = old.encrypt(b"session state").unwrap();
        assert_eq!(old.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let new = Ticketer::default();
        assert_eq!(new.decrypt(&ticket), None, "fresh keys differ");
        let sent = old.export().encode();
        let keys = TicketKeys::decode(&sent).unwrap();
        assert_eq!(keys, old.export());
        assert_eq!(format!("{keys:?}"), "TicketKeys(1 keys)");
        new.import(keys);
        assert_eq!(new.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        // The old key encrypts from now on; the new one's own still decrypts.
        assert_eq!(new.export().len(), 2);
        let again = new.encrypt(b"x").unwrap();
        assert_eq!(old.decrypt(&again).as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn junk_tickets_and_datagrams_are_refused() {
        let t = Ticketer::default();
        let mut ticket = t.encrypt(b"state").unwrap();
        for cut in 0..ticket.len() {
            assert_eq!(t.decrypt(&ticket[..cut]), None);
        }
        *ticket.last_mut().unwrap() ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(TicketKeys::decode(b"counters\n"), None);
        assert_eq!(TicketKeys::decode(b"tls-tickets\nkey 00 11\n"), None);
        assert_eq!(
            TicketKeys::decode(b"tls-tickets\nsomething new\n"),
            Some(TicketKeys::default())
        );
    }
}
