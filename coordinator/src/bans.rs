//! Bans: a failing peer is avoided for a time that doubles with each failure in a row.

use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    failures: u32,
    until: Duration,
}

/// Which peers to avoid, and until when. Time is whatever monotonic clock the caller
/// uses, as a [`Duration`] since its origin, so the simulator can use virtual time.
#[derive(Clone, Debug)]
pub struct Bans {
    base: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

impl Default for Bans {
    /// 2 s after a first failure (a hiccup), doubling up to 10 minutes (a peer that
    /// keeps failing is as good as gone, but may come back).
    fn default() -> Self {
        Bans::new(Duration::from_secs(2), Duration::from_secs(600))
    }
}

impl Bans {
    /// Bans of `base` after a first failure, doubling per failure, at most `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Bans {
            base,
            max,
            entries: HashMap::new(),
        }
    }

    /// Records a failure of `peer` at `now`; returns how long it is banned.
    pub fn fail(&mut self, peer: &str, now: Duration) -> Duration {
        let e = self.entries.entry(peer.to_string()).or_insert(Entry {
            failures: 0,
            until: now,
        });
        e.failures = e.failures.saturating_add(1);
        let len = self
            .base
            .checked_mul(1u32 << (e.failures - 1).min(20))
            .unwrap_or(self.max)
            .min(self.max);
        e.until = now + len;
        len
    }

    /// Records that `peer` worked: its next failure starts from the base ban again.
    pub fn succeed(&mut self, peer: &str) {
        self.entries.remove(peer);
    }

    /// The peers banned at `now`.
    pub fn banned(&self, now: Duration) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(move |(_, e)| now < e.until)
            .map(|(p, _)| p.as_str())
    }

    /// True while `peer` is banned.
    pub fn is_banned(&self, peer: &str, now: Duration) -> bool {
        self.entries.get(peer).is_some_and(|e| now < e.until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_grow_with_repeated_failures_and_reset_on_success() {
        let s = Duration::from_secs;
        let mut bans = Bans::new(s(2), s(30));
        assert!(!bans.is_banned("p", s(0)));
        assert_eq!(bans.fail("p", s(0)), s(2));
        assert!(bans.is_banned("p", s(1)));
        assert!(!bans.is_banned("p", s(2)));
        assert_eq!(bans.fail("p", s(10)), s(4));
        assert_eq!(bans.fail("p", s(20)), s(8));
        assert_eq!(bans.fail("p", s(30)), s(16));
        assert_eq!(bans.fail("p", s(50)), s(30), "capped");
        assert!(bans.is_banned("p", s(79)));
        assert!(!bans.is_banned("other", s(79)));
        assert_eq!(bans.banned(s(79)).collect::<Vec<_>>(), vec!["p"]);
        bans.succeed("p");
        assert!(!bans.is_banned("p", s(60)));
        assert_eq!(bans.fail("p", s(100)), s(2));
        for i in 0..100 {
            bans.fail("q", s(i));
        }
        assert!(bans.is_banned("q", s(120)));
    }
}
