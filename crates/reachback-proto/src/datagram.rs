//! UDP flows over the tunnel, without I/O.
//!
//! A UDP flow is one (server address and port, virtual address and port) pair. It
//! travels as one tunnel stream, opened with a [`crate::FlowOpen`] whose protocol
//! is UDP and answered with a [`crate::FlowReply`] like a TCP flow; after that the
//! stream carries datagrams, each as a 2-byte big-endian length and the payload,
//! so message boundaries survive however the stream's bytes are cut into frames.
//! Each flow has its own stream (and credit window), so a stalled flow holds up no
//! other; a sender that lacks credit for a whole datagram drops it instead of
//! waiting, as a router drops what its queue cannot hold.
//!
//! [`FlowTable`] is the connector's table of live UDP flows: look-up by pair, a cap
//! on the flows held, and idle expiry against a clock passed in.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Size of a datagram's length prefix.
pub const DATAGRAM_HEADER: usize = 2;
/// The largest payload a datagram may carry (what a UDP datagram can hold over IPv4
/// and IPv6 without jumbograms, rounded to what the prefix counts).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Encodes one datagram as it travels on a flow's stream; `None` when the payload
/// is larger than [`MAX_DATAGRAM`].
pub fn encode_datagram(payload: &[u8]) -> Option<Vec<u8>> {
    let length = u16::try_from(payload.len()).ok()?;
    let mut frame = Vec::with_capacity(DATAGRAM_HEADER + payload.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(payload);
    Some(frame)
}

/// Cuts a flow's byte stream back into datagrams. It holds at most one datagram
/// in pieces plus what was pushed last; an empty datagram (a length of 0) is a
/// valid UDP datagram and is handed out as one.
#[derive(Debug, Default)]
pub struct DatagramDecoder {
    buffer: Vec<u8>,
    /// where the next undecoded datagram starts in `buffer`
    start: usize,
}

impl DatagramDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. What was decoded goes first; when that was all,
    /// the buffer's room goes too, so an idle flow holds none.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            if self.start == self.buffer.len() {
                self.buffer = Vec::new();
            } else {
                self.buffer.drain(..self.start);
            }
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Lets the room of a fully decoded buffer go (call when no more datagram is waiting).
    pub fn release(&mut self) {
        if self.start == self.buffer.len() {
            self.buffer = Vec::new();
            self.start = 0;
        }
    }

    /// The next complete datagram, `None` when more bytes are needed.
    pub fn next_datagram(&mut self) -> Option<&[u8]> {
        let rest = &self.buffer[self.start..];
        let header = rest.first_chunk::<DATAGRAM_HEADER>()?;
        let length = u16::from_be_bytes(*header) as usize;
        if rest.len() < DATAGRAM_HEADER + length {
            return None;
        }
        let begin = self.start + DATAGRAM_HEADER;
        self.start = begin + length;
        Some(&self.buffer[begin..begin + length])
    }

    /// Bytes held that do not make a whole datagram yet.
    pub fn pending(&self) -> usize {
        self.buffer.len() - self.start
    }
}

/// Why a new flow was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// the table holds its maximum of flows
    Full,
}

struct Entry<V> {
    value: V,
    last_activity: Instant,
}

/// The live UDP flows of a connector, by key (the flow's pair), each with a value
/// (its handle) and the time of its last datagram. A flow that saw no datagram
/// for the idle timeout expires; no more than `max_flows` are held at once.
pub struct FlowTable<K, V> {
    flows: HashMap<K, Entry<V>>,
    max_flows: usize,
    idle_timeout: Duration,
}

impl<K: Eq + Hash + Clone, V> FlowTable<K, V> {
    pub fn new(max_flows: usize, idle_timeout: Duration) -> Self {
        FlowTable { flows: HashMap::new(), max_flows, idle_timeout }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The flow's value, its activity refreshed (a datagram went through it).
    pub fn touch(&mut self, key: &K, now: Instant) -> Option<&V> {
        let entry = self.flows.get_mut(key)?;
        entry.last_activity = entry.last_activity.max(now);
        Some(&entry.value)
    }

    /// The flow's value without counting it as activity.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.flows.get(key).map(|entry| &entry.value)
    }

    /// Admits a new flow; refused when the table is full. A flow already held
    /// under the key is replaced (its value is returned to be ended).
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Result<Option<V>, Admission> {
        if !self.flows.contains_key(&key) && self.flows.len() >= self.max_flows {
            return Err(Admission::Full);
        }
        Ok(self.flows.insert(key, Entry { value, last_activity: now }).map(|entry| entry.value))
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.flows.remove(key).map(|entry| entry.value)
    }

    /// Removes the flow under `key` only if `check` says its value is the one
    /// meant (a flow that ended by itself must not take its successor with it).
    pub fn remove_if(&mut self, key: &K, check: impl FnOnce(&V) -> bool) -> Option<V> {
        if self.flows.get(key).is_some_and(|entry| check(&entry.value)) { self.remove(key) } else { None }
    }

    /// Removes the flows idle for the timeout at `now` and returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, V)> {
        let idle_timeout = self.idle_timeout;
        let expired: Vec<K> =
            self.flows.iter().filter(|(_, entry)| now.saturating_duration_since(entry.last_activity) >= idle_timeout).map(|(key, _)| key.clone()).collect();
        expired.into_iter().filter_map(|key| self.flows.remove(&key).map(|entry| (key, entry.value))).collect()
    }

    /// When the next flow expires if nothing goes through it; `None` when empty.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.flows.values().map(|entry| entry.last_activity + self.idle_timeout).min()
    }

    /// When the flow expires if nothing goes through it.
    pub fn expiry_of(&self, key: &K) -> Option<Instant> {
        self.flows.get(key).map(|entry| entry.last_activity + self.idle_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn datagrams_keep_their_boundaries_however_the_bytes_are_cut() {
        let payloads: Vec<Vec<u8>> = vec![b"first".to_vec(), Vec::new(), vec![7u8; 1500], vec![9u8; MAX_DATAGRAM]];
        let bytes: Vec<u8> = payloads.iter().flat_map(|payload| encode_datagram(payload).expect("fits")).collect();
        for cut in [1usize, 2, 3, 1000, 65_536, bytes.len()] {
            let mut decoder = DatagramDecoder::new();
            let mut decoded = Vec::new();
            for piece in bytes.chunks(cut) {
                decoder.push(piece);
                while let Some(datagram) = decoder.next_datagram() {
                    decoded.push(datagram.to_vec());
                }
            }
            assert_eq!(decoded, payloads, "cut in pieces of {cut}");
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn a_payload_larger_than_a_datagram_is_not_encoded() {
        assert!(encode_datagram(&vec![0u8; MAX_DATAGRAM + 1]).is_none());
        assert_eq!(encode_datagram(b"ab"), Some(vec![0, 2, b'a', b'b']));
    }

    #[test]
    fn a_partial_datagram_waits_for_its_bytes() {
        let mut decoder = DatagramDecoder::new();
        decoder.push(&[0, 5, b'h', b'e']);
        assert_eq!(decoder.next_datagram(), None);
        assert_eq!(decoder.pending(), 4);
        decoder.push(b"llo");
        assert_eq!(decoder.next_datagram(), Some(&b"hello"[..]));
        assert_eq!(decoder.next_datagram(), None);
    }

    #[test]
    fn the_table_caps_flows_and_expires_idle_ones_by_the_clock_given() {
        let start = Instant::now();
        let mut table = FlowTable::new(2, 60 * SECOND);
        assert_eq!(table.insert("a", 1, start), Ok(None));
        assert_eq!(table.insert("b", 2, start + 10 * SECOND), Ok(None));
        assert_eq!(table.insert("c", 3, start), Err(Admission::Full), "a third flow is refused");
        assert_eq!(table.insert("a", 4, start), Ok(Some(1)), "a flow under a held key replaces it, full or not");
        assert_eq!(table.next_expiry(), Some(start + 60 * SECOND));
        // traffic keeps a flow alive; an earlier time never moves its activity back
        assert_eq!(table.touch(&"a", start + 30 * SECOND), Some(&4));
        assert_eq!(table.touch(&"a", start + 20 * SECOND), Some(&4));
        assert_eq!(table.expiry_of(&"a"), Some(start + 90 * SECOND));
        assert!(table.expire(start + 69 * SECOND).is_empty());
        assert_eq!(table.expire(start + 70 * SECOND), vec![("b", 2)]);
        assert_eq!(table.insert("c", 3, start + 70 * SECOND), Ok(None), "room again after the expiry");
        assert_eq!(table.expire(start + 90 * SECOND), vec![("a", 4)]);
        assert_eq!(table.remove_if(&"c", |value| *value == 4), None, "another flow under the key stays");
        assert_eq!(table.remove_if(&"c", |value| *value == 3), Some(3));
        assert!(table.is_empty() && table.next_expiry().is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), cut in 1usize..64) {
            let mut decoder = DatagramDecoder::new();
            let mut total = 0;
            for piece in bytes.chunks(cut) {
                decoder.push(piece);
                while let Some(datagram) = decoder.next_datagram() {
                    total += DATAGRAM_HEADER + datagram.len();
                }
            }
            prop_assert_eq!(total + decoder.pending(), bytes.len());
        }
    }
}
