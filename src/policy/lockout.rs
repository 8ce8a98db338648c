//! Failed-login lockout, keyed on (user name, client address) and on the client address alone.
//! Never on the user name alone: that would let anyone lock a clinician out from anywhere.
//!
//! Bounded memory whatever the peers send: a name is keyed by its SHA-256 (32 bytes, however long
//! the name), an IPv6 address by its /64 (one host picks any of 2^64 addresses in its subnet), and
//! each table holds at most [`CAPACITY`] records of a fixed size (two counters, no list of times).
//! A full table never forgets a count: only records with no lock and no failure left in the window
//! are swept, and a failure that finds no room is counted in a coarser record that is judged too
//! (the address's record for names it has no room for, one shared record for addresses): the
//! lockout fails closed.
//!
//! Attempts in flight count as possible failures: a name (or address) may have only as many
//! password checks running as it has failures left before the lock, so a burst of concurrent
//! guesses cannot get more checks than the threshold ([`Lockout::begin`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The most records each table (names at addresses; addresses) holds: 7/8 of 2^16, so a full table
/// fits 2^16 hash buckets of under 100 bytes (about 6.5 MiB per table).
pub const CAPACITY: usize = 57_344;
/// Above this many records, stale ones are swept (at most once a second).
const SWEEP_ABOVE: usize = 4_096;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Attempts that may start at once for a name or an address with no failure in the window.
pub const CLEAN_BURST: u32 = 32;

/// A lock in force, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    /// This user name from this address.
    UserAtAddress { seconds_left: u64 },
    /// Every association from this address.
    Address { seconds_left: u64 },
}

impl Locked {
    pub fn seconds_left(&self) -> u64 {
        match self {
            Locked::UserAtAddress { seconds_left } | Locked::Address { seconds_left } => {
                *seconds_left
            }
        }
    }
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

/// A client address as the lockout counts it: IPv4 whole, IPv6 by its /64. IPv4-mapped IPv6
/// addresses (`::ffff:a.b.c.d`, from a dual-stack listener) are their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> AddressKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                AddressKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

/// A user name as the lockout keys it: a fixed size whatever the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NameKey([u8; 32]);

impl NameKey {
    fn of(name: &str) -> NameKey {
        NameKey(Sha256::digest(name.as_bytes()).into())
    }
}

/// Failures in a sliding window, estimated from two fixed buckets of the window's length (the
/// previous one weighted by how much of it the window still covers), and the lock they started.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// Start of the current bucket.
    since: Instant,
    current: u32,
    previous: u32,
    locked_until: Option<Instant>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            since: now,
            current: 0,
            previous: 0,
            locked_until: None,
        }
    }

    fn roll(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= window.saturating_mul(2) {
            self.previous = 0;
            self.current = 0;
            self.since = now;
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.since += window;
        }
    }

    /// The failures in the window ending now, in units of 1/`w` (exact integers, no rounding).
    fn level(&self, now: Instant, window: Duration) -> (u128, u128) {
        let mut r = *self;
        r.roll(now, window);
        let w = window.as_nanos().max(1);
        let into = now.saturating_duration_since(r.since).as_nanos().min(w);
        (
            u128::from(r.previous) * (w - into) + u128::from(r.current) * w,
            w,
        )
    }

    /// Could `extra` more failures now go over `threshold` (0: no limit)? With the attempts in
    /// flight and this one as `extra`: may this attempt not start yet?
    ///
    /// A record with no failure in the window lets a burst of up to [`CLEAN_BURST`] attempts start at
    /// once (a reading room behind one NAT address, a viewer's prefetch: resetting them is an outage);
    /// once one attempt has failed, every attempt in flight counts against what is left. An attacker's
    /// first burst is bounded by that (and by the password-check queue), then the threshold holds.
    fn exceeds(&self, now: Instant, window: Duration, threshold: u32, extra: u32) -> bool {
        let (level, w) = self.level(now, window);
        let allowance = if level == 0 {
            threshold.max(CLEAN_BURST)
        } else {
            threshold
        };
        threshold > 0 && level + u128::from(extra) * w > u128::from(allowance) * w
    }

    /// Count a failure; true when it starts a lock.
    fn fail(&mut self, now: Instant, window: Duration, threshold: u32, lock: Duration) -> bool {
        self.roll(now, window);
        self.current = self.current.saturating_add(1);
        let (level, w) = self.level(now, window);
        if threshold > 0 && !self.locked(now) && level >= u128::from(threshold) * w {
            self.locked_until = Some(now + lock);
            self.current = 0;
            self.previous = 0;
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

    /// No lock and no failure in the window: forgetting it loses nothing.
    fn stale(&self, now: Instant, window: Duration) -> bool {
        let mut r = *self;
        r.roll(now, window);
        !r.locked(now) && r.current == 0 && r.previous == 0
    }
}

/// An address's own count, and the count of the names from it the name table had no room for.
#[derive(Debug, Clone, Copy)]
struct Address {
    own: Record,
    untracked_names: Record,
}

impl Address {
    fn new(now: Instant) -> Address {
        Address {
            own: Record::new(now),
            untracked_names: Record::new(now),
        }
    }

    fn stale(&self, now: Instant, window: Duration) -> bool {
        self.own.stale(now, window) && self.untracked_names.stale(now, window)
    }
}

/// What a failure led to, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewLock {
    UserAtAddress,
    Address,
}

/// May an attempt start?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Yes; it is counted in flight until [`Lockout::end`].
    Go,
    /// Not yet: the attempts in flight could use up what is left before the lock.
    Wait,
    Locked(Locked),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Flight {
    Name(NameKey, AddressKey),
    Address(AddressKey),
}

/// Failure counts, locks, and the attempts in flight.
#[derive(Debug)]
pub struct Lockout {
    pub per_user: u32,
    pub per_address: u32,
    pub window: Duration,
    pub lock: Duration,
    capacity: usize,
    pairs: HashMap<(NameKey, AddressKey), Record>,
    addresses: HashMap<AddressKey, Address>,
    /// Shared by every address the address table had no room for.
    overflow: Address,
    in_flight: HashMap<Flight, u32>,
    next_sweep: Option<Instant>,
}

impl Lockout {
    pub fn new(per_user: u32, per_address: u32, window: Duration, lock: Duration) -> Lockout {
        Lockout::with_capacity(per_user, per_address, window, lock, CAPACITY)
    }

    /// [`Lockout::new`] with another table size (tests).
    pub fn with_capacity(
        per_user: u32,
        per_address: u32,
        window: Duration,
        lock: Duration,
        capacity: usize,
    ) -> Lockout {
        let now = Instant::now();
        Lockout {
            per_user,
            per_address,
            window,
            lock,
            capacity: capacity.max(1),
            pairs: HashMap::new(),
            addresses: HashMap::new(),
            overflow: Address::new(now),
            in_flight: HashMap::new(),
            next_sweep: None,
        }
    }

    /// The records kept, names at addresses plus addresses (for tests and memory checks).
    pub fn records(&self) -> usize {
        self.pairs.len() + self.addresses.len()
    }

    /// The record judging an address: its own, or the shared one when it has none.
    fn address(&self, a: AddressKey) -> &Address {
        self.addresses.get(&a).unwrap_or(&self.overflow)
    }

    /// The record judging a name at an address: its own, or its address's record for untracked names.
    fn pair(&self, n: NameKey, a: AddressKey) -> &Record {
        self.pairs
            .get(&(n, a))
            .unwrap_or(&self.address(a).untracked_names)
    }

    /// Is this address, or this user at this address, locked now?
    pub fn check(&self, user: Option<&str>, address: IpAddr, now: Instant) -> Result<(), Locked> {
        let a = AddressKey::from(address);
        let addr = self.address(a);
        if addr.own.locked(now) {
            return Err(Locked::Address {
                seconds_left: addr.own.left(now),
            });
        }
        if let Some(user) = user {
            let r = self.pair(NameKey::of(user), a);
            if r.locked(now) {
                return Err(Locked::UserAtAddress {
                    seconds_left: r.left(now),
                });
            }
        }
        Ok(())
    }

    /// The lock check before a credential is verified, and the reservation of one attempt: it may
    /// start when, even if it and every attempt in flight fail, the count stays within the threshold.
    pub fn begin(&mut self, user: Option<&str>, address: IpAddr, now: Instant) -> Turn {
        if let Err(locked) = self.check(user, address, now) {
            return Turn::Locked(locked);
        }
        let a = AddressKey::from(address);
        let flights = |f: &Flight| self.in_flight.get(f).copied().unwrap_or(0);
        let mut keys = vec![Flight::Address(a)];
        if self
            .address(a)
            .own
            .exceeds(now, self.window, self.per_address, flights(&keys[0]) + 1)
        {
            return Turn::Wait;
        }
        if let Some(user) = user {
            let n = NameKey::of(user);
            let key = Flight::Name(n, a);
            if self
                .pair(n, a)
                .exceeds(now, self.window, self.per_user, flights(&key) + 1)
            {
                return Turn::Wait;
            }
            keys.push(key);
        }
        for key in keys {
            *self.in_flight.entry(key).or_insert(0) += 1;
        }
        Turn::Go
    }

    /// An attempt [`Lockout::begin`] let start is over (after its failure, if any, was counted).
    pub fn end(&mut self, user: Option<&str>, address: IpAddr) {
        let a = AddressKey::from(address);
        let mut keys = vec![Flight::Address(a)];
        if let Some(user) = user {
            keys.push(Flight::Name(NameKey::of(user), a));
        }
        for key in keys {
            if let Some(n) = self.in_flight.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.in_flight.remove(&key);
                }
            }
        }
    }

    /// Count a failed login (any kind) from `address`, for `user` when a login name was claimed.
    pub fn failure(&mut self, user: Option<&str>, address: IpAddr, now: Instant) -> Vec<NewLock> {
        let a = AddressKey::from(address);
        let (window, lock) = (self.window, self.lock);
        let pair_key = user
            .filter(|_| self.per_user > 0)
            .map(|u| (NameKey::of(u), a));
        let no_room = (!self.addresses.contains_key(&a) && self.addresses.len() >= self.capacity)
            || pair_key
                .is_some_and(|k| !self.pairs.contains_key(&k) && self.pairs.len() >= self.capacity);
        self.sweep(now, no_room);
        let addr = if self.addresses.contains_key(&a) || self.addresses.len() < self.capacity {
            self.addresses.entry(a).or_insert_with(|| Address::new(now))
        } else {
            &mut self.overflow
        };
        let mut locks = Vec::new();
        if let Some(key) = pair_key {
            let r = if self.pairs.contains_key(&key) || self.pairs.len() < self.capacity {
                self.pairs.entry(key).or_insert_with(|| Record::new(now))
            } else {
                &mut addr.untracked_names
            };
            if r.fail(now, window, self.per_user, lock) {
                locks.push(NewLock::UserAtAddress);
            }
        }
        if addr.own.fail(now, window, self.per_address, lock) {
            locks.push(NewLock::Address);
        }
        locks
    }

    /// A successful login clears the failures of that user at that address, unless a lock is in
    /// force (an attempt that began before a concurrent failure locked the pair does not lift it).
    pub fn success(&mut self, user: &str, address: IpAddr, now: Instant) {
        let key = (NameKey::of(user), AddressKey::from(address));
        if self.pairs.get(&key).is_some_and(|r| !r.locked(now)) {
            self.pairs.remove(&key);
        }
    }

    /// Forget stale records: when the tables are large, at most once a second, or when `full`.
    fn sweep(&mut self, now: Instant, full: bool) {
        let large = self.pairs.len().max(self.addresses.len()) > SWEEP_ABOVE.min(self.capacity);
        let due = self.next_sweep.is_none_or(|t| now >= t);
        if !(full || large) || !due {
            return;
        }
        self.next_sweep = Some(now + SWEEP_EVERY);
        let window = self.window;
        self.pairs.retain(|_, r| !r.stale(now, window));
        self.addresses.retain(|_, r| !r.stale(now, window));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_user_is_locked_at_one_address_only_and_unlocked_later() {
        let mut l = Lockout::new(5, 20, secs(300), secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        for i in 0..4 {
            assert!(l.failure(Some("alice"), a, t0 + secs(i)).is_empty());
        }
        assert_eq!(
            l.failure(Some("alice"), a, t0 + secs(5)),
            vec![NewLock::UserAtAddress]
        );
        let t1 = t0 + secs(6);
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
            l.check(Some("alice"), a, t0 + secs(70)).is_ok(),
            "lock expired"
        );
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut l = Lockout::new(3, 0, secs(10), secs(60));
        let t0 = Instant::now();
        let a = ip("::1");
        for i in 0..10 {
            assert!(
                l.failure(Some("carol"), a, t0 + secs(i * 11)).is_empty(),
                "failure {i}"
            );
        }
    }

    #[test]
    fn failures_across_a_bucket_boundary_still_add_up() {
        let mut l = Lockout::new(4, 0, secs(100), secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        // Two at the end of one bucket, two at the start of the next: four within 20 s.
        assert!(l.failure(Some("erin"), a, t0).is_empty());
        assert!(l.failure(Some("erin"), a, t0 + secs(95)).is_empty());
        assert!(l.failure(Some("erin"), a, t0 + secs(99)).is_empty());
        assert!(l.failure(Some("erin"), a, t0 + secs(101)).is_empty());
        assert_eq!(
            l.failure(Some("erin"), a, t0 + secs(105)),
            vec![NewLock::UserAtAddress]
        );
    }

    #[test]
    fn many_names_from_one_address_lock_the_address() {
        let mut l = Lockout::new(5, 10, secs(300), secs(60));
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
    fn success_clears_the_pair_but_not_a_lock() {
        let mut l = Lockout::new(2, 0, secs(300), secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        l.failure(Some("dave"), a, t0);
        l.success("dave", a, t0);
        assert!(l.failure(Some("dave"), a, t0).is_empty(), "cleared");
        assert_eq!(l.failure(Some("dave"), a, t0), vec![NewLock::UserAtAddress]);
        // An attempt that began before the lock and succeeds after it does not lift it.
        l.success("dave", a, t0 + secs(1));
        assert!(l.check(Some("dave"), a, t0 + secs(1)).is_err());
    }

    #[test]
    fn ipv6_addresses_in_one_64_are_one_address_and_mapped_ipv4_is_ipv4() {
        let mut l = Lockout::new(2, 3, secs(300), secs(60));
        let t0 = Instant::now();
        l.failure(Some("frank"), ip("2001:db8:1:2::1"), t0);
        l.failure(Some("frank"), ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), t0);
        assert!(matches!(
            l.check(Some("frank"), ip("2001:db8:1:2:abcd::9"), t0),
            Err(Locked::UserAtAddress { .. })
        ));
        assert!(l.check(Some("frank"), ip("2001:db8:1:3::1"), t0).is_ok());
        l.failure(None, ip("2001:db8:1:2::77"), t0);
        assert!(matches!(
            l.check(None, ip("2001:db8:1:2::1234"), t0),
            Err(Locked::Address { .. })
        ));
        // ::ffff:a.b.c.d is a.b.c.d, not one /64 holding every IPv4 client.
        for _ in 0..3 {
            l.failure(None, ip("::ffff:192.0.2.1"), t0);
        }
        assert!(l.check(None, ip("192.0.2.1"), t0).is_err());
        assert!(l.check(None, ip("192.0.2.2"), t0).is_ok());
        assert!(l.check(None, ip("::ffff:192.0.2.2"), t0).is_ok());
    }

    #[test]
    fn long_names_take_no_more_room_than_short_ones() {
        let mut l = Lockout::new(5, 0, secs(300), secs(60));
        let t0 = Instant::now();
        let long = "x".repeat(1 << 20);
        l.failure(Some(&long), ip("127.0.0.1"), t0);
        assert_eq!(l.records(), 2);
        let pair = std::mem::size_of::<((NameKey, AddressKey), Record)>();
        let address = std::mem::size_of::<(AddressKey, Address)>();
        assert!(pair <= 96 && address <= 96, "{pair} {address}");
        let mut full = Lockout::with_capacity(5, 20, secs(300), secs(60), CAPACITY);
        for i in 0..CAPACITY as u32 + 10 {
            full.failure(Some(&i.to_string()), IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(full.records(), 2 * CAPACITY);
        assert!(
            full.pairs.capacity() < 2 * CAPACITY,
            "{}",
            full.pairs.capacity()
        );
        assert!(full.addresses.capacity() < 2 * CAPACITY);
    }

    #[test]
    fn a_full_table_never_unlocks_anyone_nor_stops_counting() {
        let cap = 4;
        let mut l = Lockout::with_capacity(3, 10, secs(300), secs(600), cap);
        let t0 = Instant::now();
        let victim = ip("127.0.0.1");
        // alice is locked at the victim address; bob has two failures there.
        for _ in 0..3 {
            l.failure(Some("alice"), victim, t0);
        }
        l.failure(Some("bob"), victim, t0);
        l.failure(Some("bob"), victim, t0);
        // An attacker sprays names from many addresses to fill both tables.
        for i in 0..50u32 {
            let from = IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]);
            l.failure(Some(&format!("spray{i}")), from, t0 + secs(1));
        }
        assert!(l.records() <= 2 * cap, "{}", l.records());
        let t1 = t0 + secs(2);
        assert!(
            matches!(
                l.check(Some("alice"), victim, t1),
                Err(Locked::UserAtAddress { .. })
            ),
            "the lock survived the spray"
        );
        assert_eq!(
            l.failure(Some("bob"), victim, t1),
            vec![NewLock::UserAtAddress],
            "bob's count survived the spray"
        );
        // A new name at a full table is still counted: names share their address's record.
        let attacker = ip("10.0.0.1");
        let mut locks = Vec::new();
        for _ in 0..3 {
            locks.extend(l.failure(Some("carol"), attacker, t1));
        }
        assert!(locks.contains(&NewLock::UserAtAddress), "{locks:?}");
        assert!(l.check(Some("carol"), attacker, t1).is_err());
        // The spray's addresses beyond the table were counted in the shared record, which locked:
        // it judges every address without a record of its own (fail closed, never uncounted),
        // while the addresses with a record keep their own count.
        assert!(matches!(
            l.check(None, ip("172.16.9.9"), t1),
            Err(Locked::Address { .. })
        ));
        assert!(l.check(Some("alice"), ip("127.0.0.2"), t1).is_err());
        assert!(l.check(None, ip("10.0.0.2"), t1).is_ok());
        // Once the window and the locks are over, stale records are swept and room comes back.
        let later = t0 + secs(2000);
        l.failure(Some("dave"), ip("192.0.2.7"), later);
        assert!(l.records() <= 4, "{}", l.records());
        assert!(l.check(Some("dave"), ip("192.0.2.7"), later).is_ok());
        assert!(l.check(None, ip("172.16.9.9"), later).is_ok());
    }

    #[test]
    fn attempts_in_flight_count_against_what_is_left() {
        let mut l = Lockout::new(3, 100, secs(300), secs(60));
        let t0 = Instant::now();
        let a = ip("127.0.0.1");
        l.failure(Some("gina"), a, t0);
        assert_eq!(l.begin(Some("gina"), a, t0), Turn::Go);
        assert_eq!(l.begin(Some("gina"), a, t0), Turn::Go);
        assert_eq!(
            l.begin(Some("gina"), a, t0),
            Turn::Wait,
            "two in flight and one failure could make three"
        );
        assert_eq!(l.begin(Some("hank"), a, t0), Turn::Go, "another name");
        l.end(Some("hank"), a);
        // Both in flight fail: the lock, and nobody else got a check.
        l.failure(Some("gina"), a, t0);
        l.end(Some("gina"), a);
        let locks = l.failure(Some("gina"), a, t0);
        l.end(Some("gina"), a);
        assert_eq!(locks, vec![NewLock::UserAtAddress]);
        assert!(matches!(l.begin(Some("gina"), a, t0), Turn::Locked(_)));
        assert!(l.in_flight.is_empty());
        // The address threshold too, once the address has failed.
        let mut l = Lockout::new(0, 3, secs(300), secs(60));
        l.failure(None, a, t0);
        assert_eq!(l.begin(None, a, t0), Turn::Go);
        assert_eq!(l.begin(Some("x"), a, t0), Turn::Go);
        assert_eq!(l.begin(Some("y"), a, t0), Turn::Wait);
        l.end(None, a);
        assert_eq!(l.begin(Some("y"), a, t0), Turn::Go);
        // A clean record lets a burst start (one NAT address, many correct logins at once).
        let mut l = Lockout::new(5, 50, secs(300), secs(60));
        let started = (0..CLEAN_BURST)
            .filter(|_| l.begin(Some("ida"), a, t0) == Turn::Go)
            .count();
        assert_eq!(started, CLEAN_BURST as usize);
        assert_eq!(l.begin(Some("ida"), a, t0), Turn::Wait);
    }
}
