//! A row's probe history: the reasons and finish times of its last [`HISTORY_LEN`] probes,
//! in a fixed ring of 5 bytes a probe (244 bytes a row, whatever the uptime), for the
//! status page's strip and `history` in `/api/v1/status`.

use crate::reason::Reason;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Probes a row's history keeps.
pub const HISTORY_LEN: usize = 48;

/// The last [`HISTORY_LEN`] probes of a row: each its finish time in unix seconds (`u32`,
/// which lasts until 2106; earlier or later times saturate) and its reason as an index into
/// [`Reason::ALL`]. Pushing past the end overwrites the oldest.
#[derive(Debug, Clone)]
pub struct History {
    at: [u32; HISTORY_LEN],
    reason: [u8; HISTORY_LEN],
    /// Where the next probe goes.
    next: u8,
    len: u8,
}

impl Default for History {
    fn default() -> History {
        History {
            at: [0; HISTORY_LEN],
            reason: [0; HISTORY_LEN],
            next: 0,
            len: 0,
        }
    }
}

/// The index of `r` in [`Reason::ALL`], as stored.
fn index(r: Reason) -> u8 {
    // The enum is declared in `ALL`'s order, and has far fewer than 256 variants
    // (`reason_indexes_round_trip` checks both).
    r as u8
}

impl History {
    /// Records a finished probe.
    pub fn push(&mut self, finished_at: SystemTime, reason: Reason) {
        let secs = finished_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let i = usize::from(self.next);
        self.at[i] = secs;
        self.reason[i] = index(reason);
        self.next = ((i + 1) % HISTORY_LEN) as u8;
        if usize::from(self.len) < HISTORY_LEN {
            self.len += 1;
        }
    }

    /// Probes held (at most [`HISTORY_LEN`]).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The probes held, oldest first: finish time (whole seconds) and reason.
    pub fn iter(&self) -> impl Iterator<Item = (SystemTime, Reason)> + '_ {
        let len = self.len();
        let start = (usize::from(self.next) + HISTORY_LEN - len) % HISTORY_LEN;
        (0..len).map(move |k| {
            let i = (start + k) % HISTORY_LEN;
            (
                UNIX_EPOCH + Duration::from_secs(u64::from(self.at[i])),
                Reason::ALL
                    .get(usize::from(self.reason[i]))
                    .copied()
                    .unwrap_or(Reason::Ok),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn reason_indexes_round_trip() {
        assert!(Reason::ALL.len() <= 256);
        for r in Reason::ALL {
            assert_eq!(Reason::ALL[usize::from(index(*r))], *r);
        }
    }

    #[test]
    fn keeps_the_last_48_oldest_first() {
        let mut h = History::default();
        assert!(h.is_empty());
        assert_eq!(h.iter().count(), 0);
        let reasons = Reason::ALL;
        for i in 0..10u64 {
            h.push(at(1_000 + i), reasons[i as usize % reasons.len()]);
        }
        let seen: Vec<_> = h.iter().collect();
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[0], (at(1_000), reasons[0]));
        assert_eq!(seen[9], (at(1_009), reasons[9 % reasons.len()]));
        // Past the end the oldest go, in order, and the length stays bounded.
        for i in 10..(3 * HISTORY_LEN as u64 + 5) {
            h.push(at(1_000 + i), reasons[i as usize % reasons.len()]);
        }
        let seen: Vec<_> = h.iter().collect();
        assert_eq!(seen.len(), HISTORY_LEN);
        let last = 3 * HISTORY_LEN as u64 + 4;
        let first = last + 1 - HISTORY_LEN as u64;
        for (k, (t, r)) in seen.iter().enumerate() {
            let i = first + k as u64;
            assert_eq!(*t, at(1_000 + i));
            assert_eq!(*r, reasons[i as usize % reasons.len()]);
        }
    }

    #[test]
    fn times_out_of_range_saturate_and_the_ring_stays_small() {
        let mut h = History::default();
        h.push(UNIX_EPOCH - Duration::from_secs(5), Reason::Ok);
        h.push(at(u64::from(u32::MAX) + 100), Reason::TokenInvalidGrant);
        let seen: Vec<_> = h.iter().collect();
        assert_eq!(seen[0].0, UNIX_EPOCH);
        assert_eq!(
            seen[1],
            (at(u64::from(u32::MAX)), Reason::TokenInvalidGrant)
        );
        // 5 bytes a probe, the two indexes, padding to the u32 alignment.
        assert_eq!(std::mem::size_of::<History>(), 5 * HISTORY_LEN + 4);
    }
}
