//! Rate limits (governor, keyed by client address or user) and association occupancy (global, per user).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Rate;

type Keyed<K, C> = RateLimiter<
    K,
    DashMapStateStore<K>,
    C,
    governor::middleware::NoOpMiddleware<<C as Clock>::Instant>,
>;

/// One keyed limit; `None` inside means "no limit".
pub struct KeyedRate<K: std::hash::Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: Option<Keyed<K, C>>,
}

impl<K: std::hash::Hash + Eq + Clone, C: Clock> KeyedRate<K, C> {
    pub fn new(rate: Rate, clock: C) -> KeyedRate<K, C> {
        let limiter = NonZeroU32::new(rate.per_minute).and_then(|per_minute| {
            let period = Duration::from_secs(60) / per_minute.get();
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_minute);
            Quota::with_period(period)
                .map(|q| RateLimiter::dashmap_with_clock(q.allow_burst(burst), clock))
        });
        KeyedRate { limiter }
    }

    /// Take one cell for `key`; false when over the limit.
    pub fn allow(&self, key: &K) -> bool {
        match &self.limiter {
            None => true,
            Some(l) => l.check_key(key).is_ok(),
        }
    }

    /// Forget keys whose buckets are full again (bounded memory).
    pub fn sweep(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// Associations open now: at most `max` in all and `max_per_user` per user.
#[derive(Debug)]
pub struct Occupancy {
    max: usize,
    max_per_user: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
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
            max,
            max_per_user,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn admit(self: &Arc<Self>, user: &str) -> Result<Slot, Full> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.max {
            return Err(Full::Gateway(self.max));
        }
        let n = open.1.get(user).copied().unwrap_or(0);
        if n >= self.max_per_user {
            return Err(Full::User(self.max_per_user));
        }
        open.0 += 1;
        open.1.insert(user.to_string(), n + 1);
        Ok(Slot {
            occupancy: self.clone(),
            user: user.to_string(),
        })
    }

    /// Associations open now.
    pub fn open(&self) -> usize {
        self.open.lock().map(|o| o.0).unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .occupancy
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.user);
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
}
