//! Rate limits (governor, keyed by client address or user), association occupancy (global, per user),
//! and admission to the handshake: the pending-connection pools with their per-address share and queue.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Rate;

type Keyed<K, C> = RateLimiter<
    K,
    DashMapStateStore<K>,
    C,
    governor::middleware::NoOpMiddleware<<C as Clock>::Instant>,
>;

/// One keyed limit. Its quota can change on reload without handing anyone a fresh burst: the
/// buckets of the previous quota stay in force beside the new ones until they would all have
/// refilled (burst x period), so a request must then fit both. A lowered quota applies at once; a
/// raised one fully once the old buckets have refilled; a limit turned off (0) is off at once.
pub struct KeyedRate<K: std::hash::Hash + Eq + Clone, C: Clock = DefaultClock> {
    clock: C,
    inner: RwLock<Generations<K, C>>,
}

struct Generations<K: std::hash::Hash + Eq + Clone, C: Clock> {
    rate: Rate,
    /// `None`: no limit.
    current: Option<Keyed<K, C>>,
    /// The buckets of the quota before the last change, and when they have all refilled.
    previous: Option<(Keyed<K, C>, C::Instant)>,
}

fn limiter<K: std::hash::Hash + Eq + Clone, C: Clock>(rate: Rate, clock: C) -> Option<Keyed<K, C>> {
    NonZeroU32::new(rate.per_minute).and_then(|per_minute| {
        let period = Duration::from_secs(60) / per_minute.get();
        let burst = NonZeroU32::new(rate.burst).unwrap_or(per_minute);
        Quota::with_period(period)
            .map(|q| RateLimiter::dashmap_with_clock(q.allow_burst(burst), clock))
    })
}

/// How long an emptied bucket of `rate` takes to fill again (at most a day).
fn refill_time(rate: Rate) -> Duration {
    match NonZeroU32::new(rate.per_minute) {
        None => Duration::ZERO,
        Some(per_minute) => {
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_minute).get();
            (Duration::from_secs(60) / per_minute.get())
                .saturating_mul(burst)
                .min(Duration::from_secs(86_400))
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, C: Clock + Clone> KeyedRate<K, C> {
    pub fn new(rate: Rate, clock: C) -> KeyedRate<K, C> {
        KeyedRate {
            inner: RwLock::new(Generations {
                rate,
                current: limiter(rate, clock.clone()),
                previous: None,
            }),
            clock,
        }
    }

    /// Take one cell for `key`; false when over the limit.
    pub fn allow(&self, key: &K) -> bool {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(current) = &g.current else {
            return true;
        };
        // A refusal by the new quota leaves the old buckets alone; during the changeover a request
        // the old quota refuses has still cost a cell of the new one.
        if current.check_key(key).is_err() {
            return false;
        }
        match &g.previous {
            Some((old, until)) if self.clock.now() < *until => old.check_key(key).is_ok(),
            _ => true,
        }
    }

    /// Apply a new quota (on reload); the same quota changes nothing.
    pub fn reconfigure(&self, rate: Rate) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if g.rate == rate {
            return;
        }
        let old_rate = g.rate;
        let old = std::mem::replace(&mut g.current, limiter(rate, self.clock.clone()));
        g.rate = rate;
        g.previous = match (old, &g.current) {
            // Turned off: nothing to carry over.
            (_, None) | (None, _) => None,
            (Some(old), Some(_)) => {
                Some((old, self.clock.now() + Nanos::from(refill_time(old_rate))))
            }
        };
    }

    /// Forget keys whose buckets are full again (bounded memory), and old-quota buckets that have refilled.
    pub fn sweep(&self) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, until)) = &g.previous
            && self.clock.now() >= *until
        {
            g.previous = None;
        }
        if let Some(l) = &g.current {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some((l, _)) = &g.previous {
            l.retain_recent();
        }
    }
}

/// Associations open now: at most `max` in all and `max_per_user` per user. The maxima can change
/// on reload; the associations open stay counted (a lowered maximum refuses new ones until enough
/// have ended, it closes none).
#[derive(Debug)]
pub struct Occupancy {
    open: Mutex<Open>,
}

#[derive(Debug)]
struct Open {
    max: usize,
    max_per_user: usize,
    total: usize,
    per_user: HashMap<String, usize>,
}

/// Why an association could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Gateway(usize),
    User(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Gateway(n) => write!(f, "gateway at capacity ({n} associations)"),
            Full::User(n) => write!(f, "user at their limit of {n} associations"),
        }
    }
}

/// A held association slot; released on drop.
#[derive(Debug)]
pub struct Slot {
    occupancy: Arc<Occupancy>,
    user: String,
}

impl Occupancy {
    pub fn new(max: usize, max_per_user: usize) -> Arc<Occupancy> {
        Arc::new(Occupancy {
            open: Mutex::new(Open {
                max,
                max_per_user,
                total: 0,
                per_user: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn admit(self: &Arc<Self>, user: &str) -> Result<Slot, Full> {
        let mut open = self.lock();
        if open.total >= open.max {
            return Err(Full::Gateway(open.max));
        }
        let n = open.per_user.get(user).copied().unwrap_or(0);
        if n >= open.max_per_user {
            return Err(Full::User(open.max_per_user));
        }
        open.total += 1;
        open.per_user.insert(user.to_string(), n + 1);
        Ok(Slot {
            occupancy: self.clone(),
            user: user.to_string(),
        })
    }

    /// New maxima (on reload); the open associations stay counted.
    pub fn reconfigure(&self, max: usize, max_per_user: usize) {
        let mut open = self.lock();
        open.max = max;
        open.max_per_user = max_per_user;
    }

    /// Associations open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.occupancy.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.per_user.remove(&self.user);
            }
        }
    }
}

/// The bounds of a pending-connection pool, read from `[limits]` at each connection (a reload
/// changes them without forgetting who holds or waits for a slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Connections in their handshake at once, in all (`max_pending_connections`).
    pub max_total: usize,
    /// Of those, from one client address (`max_pending_per_address`).
    pub max_per_address: usize,
    /// Connections waiting for a slot, in all: each holds a descriptor and nothing else.
    pub max_queued: usize,
}

impl Bounds {
    /// A pool's bounds from `[limits]`: a queue four times the size of the pool.
    pub fn from_limits(limits: &crate::config::Limits) -> Bounds {
        Bounds {
            max_total: limits.max_pending_connections,
            max_per_address: limits.max_pending_per_address,
            max_queued: limits.max_pending_connections.saturating_mul(QUEUE_FACTOR),
        }
    }
}

/// How many connections may wait for a slot, per slot of `max_pending_connections`.
pub const QUEUE_FACTOR: usize = 4;

/// Why a connection was not admitted to its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// The queue was full and this address already had the longest queue.
    QueueFull,
    /// The queue was full: this connection, the newest of the address with the longest queue, made room
    /// for a connection from an address with fewer waiting.
    Evicted,
    /// No slot came free within the admission wait.
    Timeout,
}

impl Cap {
    /// The `rule` label of `pacsgate_refusals_total`.
    pub fn rule(self) -> &'static str {
        match self {
            Cap::QueueFull => "pending_queue_full",
            Cap::Evicted => "pending_queue_evicted",
            Cap::Timeout => "pending_timeout",
        }
    }
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cap::QueueFull => {
                "too many connections waiting for admission, the most of them from this address \
                 (limits.max_pending_connections x 4)"
            }
            Cap::Evicted => {
                "closed to make room in the admission queue: this address had the most connections waiting"
            }
            Cap::Timeout => {
                "no handshake slot came free in time (limits.max_pending_connections, \
                 limits.max_pending_per_address; phase admission)"
            }
        })
    }
}

/// What a waiting connection is told.
#[derive(Debug)]
enum Grant {
    Slot,
    Evicted,
}

#[derive(Debug, Default)]
struct Address {
    /// Slots held by this address.
    active: usize,
    /// Connections of this address waiting for a slot, oldest first.
    waiting: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<Grant>)>,
}

#[derive(Debug)]
struct Pool {
    bounds: Bounds,
    active: usize,
    queued: usize,
    next_id: u64,
    addresses: HashMap<IpAddr, Address>,
}

/// The connections of one listener pool that are in their handshake (TLS, association request,
/// authentication, the archive's answer), and those waiting to start it.
///
/// A slot is taken at once when the address's share has room, or, beyond its share, when nobody
/// else waits and more than a share of the pool stays free (see `Pool::may_take`); otherwise the
/// connection waits its turn (phase `admission`, bounded) in a queue, first come first served per
/// address, and a freed slot goes to the waiting address that holds the fewest. So a burst from one
/// address uses the idle pool, and an address holding slots with handshakes that never finish
/// delays only its own further connections: the others keep at least a share. The queue is bounded; when it
/// is full, the newest waiting connection of the address with the most waiting makes room.
#[derive(Debug)]
pub struct PendingConnections {
    pool: Mutex<Pool>,
}

impl Default for PendingConnections {
    fn default() -> Self {
        PendingConnections {
            pool: Mutex::new(Pool {
                bounds: Bounds {
                    max_total: 1,
                    max_per_address: 1,
                    max_queued: 0,
                },
                active: 0,
                queued: 0,
                next_id: 0,
                addresses: HashMap::new(),
            }),
        }
    }
}

impl Pool {
    /// Whether an address holding `active` slots, with `waiting` of its connections queued, may take
    /// one more. Within its share, whenever the pool has room. Beyond its share (a burst), only while
    /// no other address is waiting, and never the last share's worth of the pool: those slots stay
    /// free for another address, so an address whose handshakes never finish cannot starve the others.
    fn may_take(&self, active: usize, waiting: usize) -> bool {
        let b = self.bounds;
        if self.active >= b.max_total {
            return false;
        }
        if active < b.max_per_address {
            return true;
        }
        let others_waiting = self.queued.saturating_sub(waiting);
        others_waiting == 0 && self.active + b.max_per_address < b.max_total
    }

    /// Hand freed slots to waiting connections: the eligible address holding the fewest first.
    fn dispatch(&mut self) {
        while self.active < self.bounds.max_total {
            let Some(address) = self
                .addresses
                .iter()
                .filter(|(_, a)| !a.waiting.is_empty() && self.may_take(a.active, a.waiting.len()))
                .min_by_key(|(_, a)| a.active)
                .map(|(ip, _)| *ip)
            else {
                break;
            };
            let Some(a) = self.addresses.get_mut(&address) else {
                break;
            };
            let Some((_, tx)) = a.waiting.pop_front() else {
                break;
            };
            self.queued -= 1;
            // A waiter that is gone (its connection dropped) takes nothing.
            if tx.send(Grant::Slot).is_ok() {
                a.active += 1;
                self.active += 1;
            }
        }
    }

    fn forget_if_idle(&mut self, address: IpAddr) {
        if self
            .addresses
            .get(&address)
            .is_some_and(|a| a.active == 0 && a.waiting.is_empty())
        {
            self.addresses.remove(&address);
        }
    }

    fn release(&mut self, address: IpAddr) {
        self.active = self.active.saturating_sub(1);
        if let Some(a) = self.addresses.get_mut(&address) {
            a.active = a.active.saturating_sub(1);
        }
        self.dispatch();
        self.forget_if_idle(address);
    }
}

/// A connection waiting for a slot; on drop (timeout, or its task ended) it leaves the queue, or gives
/// back a slot granted in the meantime.
struct Waiting {
    pool: Arc<PendingConnections>,
    address: IpAddr,
    id: u64,
    rx: tokio::sync::oneshot::Receiver<Grant>,
    settled: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut p = self.pool.lock();
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Slot) => p.release(self.address),
            Ok(Grant::Evicted) => {}
            Err(_) => {
                if let Some(a) = p.addresses.get_mut(&self.address)
                    && let Some(i) = a.waiting.iter().position(|(id, _)| *id == self.id)
                {
                    a.waiting.remove(i);
                    p.queued -= 1;
                }
                p.forget_if_idle(self.address);
            }
        }
    }
}

impl PendingConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Phase `admission`: a slot now, or after waiting at most `within` in the queue, or the reason why not.
    pub async fn admit(
        self: &Arc<Self>,
        address: IpAddr,
        bounds: Bounds,
        within: Duration,
    ) -> Result<PendingSlot, Cap> {
        let mut waiting = {
            let mut p = self.lock();
            p.bounds = bounds;
            // A reload may have raised the bounds: hand out what is free now.
            p.dispatch();
            let (active, queued_here) = p
                .addresses
                .get(&address)
                .map_or((0, 0), |a| (a.active, a.waiting.len()));
            if queued_here == 0 && p.may_take(active, 0) {
                p.active += 1;
                p.addresses.entry(address).or_default().active += 1;
                return Ok(PendingSlot {
                    pool: self.clone(),
                    address,
                });
            }
            if p.queued >= bounds.max_queued {
                // Room for this one only at the expense of an address with more connections waiting.
                let longest = p
                    .addresses
                    .iter()
                    .filter(|(ip, _)| **ip != address)
                    .max_by_key(|(_, a)| a.waiting.len())
                    .filter(|(_, a)| a.waiting.len() > queued_here + 1)
                    .map(|(ip, _)| *ip);
                let Some(victim) = longest else {
                    return Err(Cap::QueueFull);
                };
                if let Some(a) = p.addresses.get_mut(&victim)
                    && let Some((_, tx)) = a.waiting.pop_back()
                {
                    let _ = tx.send(Grant::Evicted);
                    p.queued -= 1;
                }
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let id = p.next_id;
            p.next_id += 1;
            p.addresses
                .entry(address)
                .or_default()
                .waiting
                .push_back((id, tx));
            p.queued += 1;
            Waiting {
                pool: self.clone(),
                address,
                id,
                rx,
                settled: false,
            }
        };
        match tokio::time::timeout(within, &mut waiting.rx).await {
            Ok(Ok(Grant::Slot)) => {
                waiting.settled = true;
                Ok(PendingSlot {
                    pool: self.clone(),
                    address,
                })
            }
            Ok(Ok(Grant::Evicted)) => {
                waiting.settled = true;
                Err(Cap::Evicted)
            }
            // The sender went without a word: only if the pool itself is gone; fail closed.
            Ok(Err(_)) | Err(_) => Err(Cap::Timeout),
        }
    }

    /// Slots held, and connections waiting (for tests and the log).
    pub fn counts(&self) -> (usize, usize) {
        let p = self.lock();
        (p.active, p.queued)
    }
}

/// A connection in its handshake holds one of these until it has been admitted (or has gone).
#[derive(Debug)]
pub struct PendingSlot {
    pool: Arc<PendingConnections>,
    address: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.pool.lock().release(self.address);
    }
}

/// The rate limits of one configuration.
pub struct Rates<C: Clock = DefaultClock> {
    /// Associations per client address.
    pub associations: KeyedRate<IpAddr, C>,
    /// C-FIND per user.
    pub queries: KeyedRate<String, C>,
    /// C-MOVE + C-GET per user.
    pub retrievals: KeyedRate<String, C>,
}

impl<C: Clock + Clone> Rates<C> {
    pub fn new(limits: &crate::config::Limits, clock: C) -> Rates<C> {
        Rates {
            associations: KeyedRate::new(limits.associations, clock.clone()),
            queries: KeyedRate::new(limits.queries, clock.clone()),
            retrievals: KeyedRate::new(limits.retrievals, clock),
        }
    }

    /// New quotas (on reload), keeping the buckets as [`KeyedRate::reconfigure`] describes.
    pub fn reconfigure(&self, limits: &crate::config::Limits) {
        self.associations.reconfigure(limits.associations);
        self.queries.reconfigure(limits.queries);
        self.retrievals.reconfigure(limits.retrievals);
    }

    pub fn sweep(&self) {
        self.associations.sweep();
        self.queries.sweep();
        self.retrievals.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn a_user_over_the_rate_waits_for_the_window_and_others_are_unaffected() {
        let clock = FakeRelativeClock::default();
        let rate: KeyedRate<String, _> = KeyedRate::new(
            Rate {
                per_minute: 60,
                burst: 5,
            },
            clock.clone(),
        );
        let alice = "alice".to_string();
        let allowed = (0..200).filter(|_| rate.allow(&alice)).count();
        assert_eq!(allowed, 5, "the burst, then refusals");
        assert!(
            rate.allow(&"bob".to_string()),
            "another user has their own bucket"
        );
        clock.advance(Duration::from_secs(1));
        assert!(rate.allow(&alice), "one cell per second comes back");
        assert!(!rate.allow(&alice));
        clock.advance(Duration::from_secs(10));
        assert_eq!((0..10).filter(|_| rate.allow(&alice)).count(), 5);
    }

    #[test]
    fn zero_means_no_limit() {
        let rate: KeyedRate<IpAddr, _> = KeyedRate::new(
            Rate {
                per_minute: 0,
                burst: 0,
            },
            DefaultClock::default(),
        );
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!((0..10_000).all(|_| rate.allow(&a)));
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let o = Occupancy::new(3, 2);
        let a1 = o.admit("alice").expect("1");
        let _a2 = o.admit("alice").expect("2");
        assert_eq!(o.admit("alice").unwrap_err(), Full::User(2));
        let _b = o.admit("bob").expect("bob");
        assert_eq!(o.admit("carol").unwrap_err(), Full::Gateway(3));
        drop(a1);
        let _a3 = o.admit("alice").expect("a slot came back");
        assert_eq!(o.open(), 3);
    }

    #[test]
    fn a_new_quota_hands_out_no_fresh_burst_until_the_old_buckets_have_refilled() {
        let clock = FakeRelativeClock::default();
        let old = Rate {
            per_minute: 60,
            burst: 5,
        };
        let rate: KeyedRate<String, _> = KeyedRate::new(old, clock.clone());
        let alice = "alice".to_string();
        assert_eq!((0..10).filter(|_| rate.allow(&alice)).count(), 5);
        // Raised: alice's emptied bucket still holds her back; a newcomer has the new burst.
        rate.reconfigure(Rate {
            per_minute: 600,
            burst: 50,
        });
        assert!(!rate.allow(&alice), "a reload is no refill");
        assert_eq!(
            (0..100).filter(|_| rate.allow(&"bob".to_string())).count(),
            5,
            "the old bucket of a newcomer is full: the stricter burst while the changeover lasts"
        );
        clock.advance(Duration::from_secs(1));
        assert!(rate.allow(&alice), "the old quota's refill");
        // Once the old buckets would have refilled (5 s), only the new quota counts.
        clock.advance(Duration::from_secs(6));
        rate.sweep();
        assert_eq!((0..100).filter(|_| rate.allow(&alice)).count(), 50);
        // Lowered: applies at once.
        rate.reconfigure(Rate {
            per_minute: 6,
            burst: 1,
        });
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            (0..10).filter(|_| rate.allow(&"carol".to_string())).count(),
            1
        );
        // The same quota again changes nothing; turned off is off.
        rate.reconfigure(Rate {
            per_minute: 6,
            burst: 1,
        });
        assert!(!rate.allow(&"carol".to_string()));
        rate.reconfigure(Rate {
            per_minute: 0,
            burst: 0,
        });
        assert!((0..100).all(|_| rate.allow(&"carol".to_string())));
    }

    #[test]
    fn new_maxima_keep_the_open_associations_counted() {
        let o = Occupancy::new(10, 10);
        let a = o.admit("alice").expect("1");
        let _b = o.admit("alice").expect("2");
        o.reconfigure(2, 1);
        assert_eq!(o.open(), 2);
        assert_eq!(o.admit("bob").unwrap_err(), Full::Gateway(2));
        drop(a);
        assert_eq!(o.admit("alice").unwrap_err(), Full::User(1));
        let _c = o.admit("bob").expect("a slot came back");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_burst_from_one_address_uses_the_idle_pool_but_leaves_a_share_free() {
        let pool = Arc::new(PendingConnections::default());
        let bounds = Bounds {
            max_total: 8,
            max_per_address: 2,
            max_queued: 100,
        };
        let a = ip("127.0.0.2");
        let peak = Arc::new(Mutex::new(0usize));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let pool = pool.clone();
                let peak = peak.clone();
                tokio::spawn(async move {
                    let slot = pool.admit(a, bounds, WAIT).await?;
                    {
                        let mut m = peak.lock().unwrap_or_else(|p| p.into_inner());
                        *m = (*m).max(pool.counts().0);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    drop(slot);
                    Ok::<(), Cap>(())
                })
            })
            .collect();
        for t in tasks {
            t.await
                .expect("task")
                .expect("every connection of the burst admitted");
        }
        assert_eq!(
            *peak.lock().expect("peak"),
            6,
            "alone, beyond its share, but a share of the pool stays free"
        );
        assert_eq!(pool.counts(), (0, 0), "everything given back");
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_holding_its_share_delays_only_itself() {
        let pool = Arc::new(PendingConnections::default());
        let bounds = Bounds {
            max_total: 4,
            max_per_address: 2,
            max_queued: 100,
        };
        let (a, b, c) = (ip("127.0.0.2"), ip("127.0.0.3"), ip("127.0.0.4"));
        let _a1 = pool.admit(a, bounds, WAIT).await.expect("a1");
        let a2 = pool.admit(a, bounds, WAIT).await.expect("a2");
        // A's third waits; B is admitted at once.
        let third = tokio::spawn({
            let pool = pool.clone();
            async move { pool.admit(a, bounds, WAIT).await }
        });
        tokio::task::yield_now().await;
        let _b1 = pool.admit(b, bounds, WAIT).await.expect("b at once");
        let c1 = pool
            .admit(c, bounds, WAIT)
            .await
            .expect("c at once: the pool is now full");
        assert_eq!(pool.counts(), (4, 1));
        // The pool is full: B's second waits behind nobody of its own, A's third waits.
        let b2 = tokio::spawn({
            let pool = pool.clone();
            async move { pool.admit(b, bounds, WAIT).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(pool.counts(), (4, 2));
        // C's slot frees: it goes to B (1 held), not to A (2 held, its share).
        drop(c1);
        let _b2 = b2.await.expect("task").expect("b2 got the freed slot");
        assert!(!third.is_finished(), "a is at its share");
        drop(a2);
        let _a3 = third
            .await
            .expect("task")
            .expect("a's own slot came back to a");
        assert_eq!(pool.counts(), (4, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_room_at_the_expense_of_the_longest() {
        let pool = Arc::new(PendingConnections::default());
        let bounds = Bounds {
            max_total: 1,
            max_per_address: 1,
            max_queued: 3,
        };
        let (a, b) = (ip("127.0.0.2"), ip("127.0.0.3"));
        let _held = pool.admit(a, bounds, WAIT).await.expect("a1");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.admit(a, bounds, WAIT).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(pool.counts(), (1, 3));
        assert_eq!(
            pool.admit(a, bounds, WAIT).await.unwrap_err(),
            Cap::QueueFull,
            "the address with the longest queue is turned away"
        );
        let b1 = tokio::spawn({
            let pool = pool.clone();
            async move { pool.admit(b, bounds, WAIT).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(pool.counts(), (1, 3), "b took the place of a's newest");
        let mut results = Vec::new();
        for w in waiters {
            let w = w.await.expect("task");
            results.push(w.as_ref().map(|_| ()).map_err(|e| *e));
        }
        // The newest of a's waiters was evicted; the two others time out (a1 is never released).
        assert_eq!(results[2], Err(Cap::Evicted));
        assert_eq!(results[..2], [Err(Cap::Timeout), Err(Cap::Timeout)]);
        assert_eq!(b1.await.expect("task").unwrap_err(), Cap::Timeout);
        assert_eq!(pool.counts(), (1, 0), "timed-out waiters left the queue");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_gives_back_a_slot_granted_meanwhile() {
        let pool = Arc::new(PendingConnections::default());
        let bounds = Bounds {
            max_total: 1,
            max_per_address: 1,
            max_queued: 10,
        };
        let a = ip("127.0.0.2");
        let held = pool.admit(a, bounds, WAIT).await.expect("a1");
        let mut waiter = Box::pin(pool.admit(a, bounds, WAIT));
        assert!(futures_poll(&mut waiter).is_none(), "waits");
        drop(held); // grants the slot to the waiter, which is dropped before it looks
        drop(waiter);
        assert_eq!(pool.counts(), (0, 0));
        let _again = pool.admit(a, bounds, WAIT).await.expect("the slot is free");
    }

    /// Poll a future once.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
