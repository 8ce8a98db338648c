//! Failed-login lockout, keyed on (user name, client address) and on the client address alone.
//! Never on the user name alone: that would let anyone lock a clinician out from anywhere.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A lock in force, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    /// This user name from this address.
    UserAtAddress { seconds_left: u64 },
    /// Every association from this address.
    Address { seconds_left: u64 },
}

impl std::fmt::Display for Locked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Locked::UserAtAddress { seconds_left } => write!(
                f,
                "locked out after repeated failed logins for this user from this address ({seconds_left} s left)"
            ),
            Locked::Address { seconds_left } => write!(
                f,
                "address locked out after repeated failed logins ({seconds_left} s left)"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl Record {
    /// Count a failure; return true when it starts a lock.
    fn fail(&mut self, now: Instant, window: Duration, threshold: u32, lock: Duration) -> bool {
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        while self.failures.len() > threshold as usize {
            self.failures.pop_front();
        }
        if threshold > 0 && self.failures.len() >= threshold as usize && !self.locked(now) {
            self.locked_until = Some(now + lock);
            self.failures.clear();
            return true;
        }
        false
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| now < t)
    }

    fn left(&self, now: Instant) -> u64 {
        self.locked_until
            .map(|t| t.saturating_duration_since(now).as_secs().max(1))
            .unwrap_or(0)
    }

    fn stale(&self, now: Instant, window: Duration) -> bool {
        !self.locked(now)
            && self
                .failures
                .back()
                .is_none_or(|t| now.duration_since(*t) > window)
    }
}

/// How many records are kept before stale ones are swept (bounded memory under a spray of names).
const SWEEP_ABOVE: usize = 10_000;
/// Above this many records, new failures from unseen keys only count toward the address.
const MAX_RECORDS: usize = 100_000;

/// Failure counts and locks.
#[derive(Debug)]
pub struct Lockout {
    pub per_user: u32,
    pub per_address: u32,
    pub window: Duration,
    pub lock: Duration,
    pairs: HashMap<(String, IpAddr), Record>,
    addresses: HashMap<IpAddr, Record>,
}

/// What a failure led to, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewLock {
    UserAtAddress,
    Address,
}

impl Lockout {
    pub fn new(per_user: u32, per_address: u32, window: Duration, lock: Duration) -> Lockout {
        Lockout {
            per_user,
            per_address,
            window,
            lock,
            pairs: HashMap::new(),
            addresses: HashMap::new(),
        }
    }

    /// Is this address, or this user at this address, locked now?
    pub fn check(&self, user: Option<&str>, address: IpAddr, now: Instant) -> Result<(), Locked> {
        if let Some(r) = self.addresses.get(&address)
            && r.locked(now)
        {
            return Err(Locked::Address {
                seconds_left: r.left(now),
            });
        }
        if let Some(user) = user
            && let Some(r) = self.pairs.get(&(user.to_string(), address))
            && r.locked(now)
        {
            return Err(Locked::UserAtAddress {
                seconds_left: r.left(now),
            });
        }
        Ok(())
    }

    /// Count a failed login (any kind) from `address`, for `user` when a name was claimed.
    pub fn failure(&mut self, user: Option<&str>, address: IpAddr, now: Instant) -> Vec<NewLock> {
        self.sweep(now);
        let mut locks = Vec::new();
        if let Some(user) = user
            && self.per_user > 0
        {
            let key = (user.to_string(), address);
            if self.pairs.len() < MAX_RECORDS || self.pairs.contains_key(&key) {
                let r = self.pairs.entry(key).or_default();
                if r.fail(now, self.window, self.per_user, self.lock) {
                    locks.push(NewLock::UserAtAddress);
                }
            }
        }
        if self.per_address > 0
            && (self.addresses.len() < MAX_RECORDS || self.addresses.contains_key(&address))
        {
            let r = self.addresses.entry(address).or_default();
            if r.fail(now, self.window, self.per_address, self.lock) {
                locks.push(NewLock::Address);
            }
        }
        locks
    }

    /// A successful login clears the failures of that user at that address.
    pub fn success(&mut self, user: &str, address: IpAddr) {
        self.pairs.remove(&(user.to_string(), address));
    }

    fn sweep(&mut self, now: Instant) {
        let window = self.window;
        if self.pairs.len() > SWEEP_ABOVE {
            self.pairs.retain(|_, r| !r.stale(now, window));
        }
        if self.addresses.len() > SWEEP_ABOVE {
            self.addresses.retain(|_, r| !r.stale(now, window));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_user_is_locked_at_one_address_only_and_unlocked_later() {
        let mut l = Lockout::new(5, 20, Duration::from_secs(300), Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        for i in 0..4 {
            assert!(
                l.failure(Some("alice"), a, t0 + Duration::from_secs(i))
                    .is_empty()
            );
        }
        assert_eq!(
            l.failure(Some("alice"), a, t0 + Duration::from_secs(5)),
            vec![NewLock::UserAtAddress]
        );
        let t1 = t0 + Duration::from_secs(6);
        assert!(matches!(
            l.check(Some("alice"), a, t1),
            Err(Locked::UserAtAddress { .. })
        ));
        assert!(
            l.check(Some("alice"), ip("127.0.0.2"), t1).is_ok(),
            "other address"
        );
        assert!(l.check(Some("bob"), a, t1).is_ok(), "other user");
        assert!(
            l.check(Some("alice"), a, t0 + Duration::from_secs(70))
                .is_ok(),
            "lock expired"
        );
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut l = Lockout::new(3, 0, Duration::from_secs(10), Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("::1");
        for i in 0..10 {
            assert!(
                l.failure(Some("carol"), a, t0 + Duration::from_secs(i * 11))
                    .is_empty()
            );
        }
    }

    #[test]
    fn many_names_from_one_address_lock_the_address() {
        let mut l = Lockout::new(5, 10, Duration::from_secs(300), Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.9");
        let mut locked = false;
        for i in 0..10 {
            let name = format!("user{i}");
            locked |= l.failure(Some(&name), a, t0).contains(&NewLock::Address);
        }
        assert!(locked);
        assert!(matches!(
            l.check(Some("anyone"), a, t0),
            Err(Locked::Address { .. })
        ));
        assert!(matches!(l.check(None, a, t0), Err(Locked::Address { .. })));
    }

    #[test]
    fn success_clears_the_pair() {
        let mut l = Lockout::new(2, 0, Duration::from_secs(300), Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        l.failure(Some("dave"), a, t0);
        l.success("dave", a);
        assert!(l.failure(Some("dave"), a, t0).is_empty());
    }
}
