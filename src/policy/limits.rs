//! Rate limits (governor, keyed by client address or user) and association occupancy (global, per user).

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
}
