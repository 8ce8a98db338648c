//! Who may do what, how fast, and how much: role grants, rate limits, lockout and the login rule,
//! occupancy, the query guard.

pub mod limits;
pub mod lockout;
pub mod login;
pub mod query_guard;

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{Config, Operation, QueryModel, Unrestricted};
use limits::{Full, Occupancy, Rates, Slot};
use lockout::{Locked, Lockout};

/// What one authenticated user may do: the union of their roles.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub allow: BTreeSet<Operation>,
    pub move_destinations: HashSet<String>,
    /// Query models in which the anti-enumeration guard does not apply: from roles that both allow
    /// `find` and say `unrestricted_queries` (true: every model). One role's flag never lifts the
    /// guard for another role's grants.
    pub unrestricted: Unrestricted,
    /// The smallest `query_min_chars` among the roles (the most permissive).
    pub query_min_chars: usize,
    pub max_query_results: u32,
}

impl Grants {
    pub fn for_roles(config: &Config, roles: &[String]) -> Grants {
        let mut g = Grants {
            query_min_chars: usize::MAX,
            ..Grants::default()
        };
        let mut cap = None;
        for role in roles.iter().filter_map(|r| config.roles.get(r)) {
            g.allow.extend(role.allow.iter().copied());
            g.move_destinations
                .extend(role.move_destinations.iter().cloned());
            if role.allow.contains(&Operation::Find) {
                g.unrestricted = g.unrestricted.union(&role.unrestricted);
            }
            g.query_min_chars = g.query_min_chars.min(role.query_min_chars);
            let role_cap = role
                .max_query_results
                .unwrap_or(config.limits.max_query_results);
            cap = Some(cap.map_or(role_cap, |c: u32| c.max(role_cap)));
        }
        if g.query_min_chars == usize::MAX {
            g.query_min_chars = 2;
        }
        g.max_query_results = cap.unwrap_or(config.limits.max_query_results);
        g
    }

    pub fn allows(&self, op: Operation) -> bool {
        self.allow.contains(&op)
    }

    /// Does a C-FIND of this SOP class skip the anti-enumeration guard? Only under `true`, or for the
    /// models listed (a SOP class of no listed model: only under `true`).
    pub fn unrestricted_find(&self, sop_class: &str) -> bool {
        match &self.unrestricted {
            Unrestricted::None => false,
            Unrestricted::All => true,
            Unrestricted::Models(m) => {
                QueryModel::of_find_sop_class(sop_class).is_some_and(|model| m.contains(&model))
            }
        }
    }

    /// Does a QIDO-RS query skip the guard? Under `true` or with `study` listed.
    pub fn unrestricted_qido(&self) -> bool {
        match &self.unrestricted {
            Unrestricted::None => false,
            Unrestricted::All => true,
            Unrestricted::Models(m) => m.contains(&QueryModel::Study),
        }
    }
}

impl Unrestricted {
    fn union(&self, other: &Unrestricted) -> Unrestricted {
        match (self, other) {
            (Unrestricted::All, _) | (_, Unrestricted::All) => Unrestricted::All,
            (Unrestricted::None, x) | (x, Unrestricted::None) => x.clone(),
            (Unrestricted::Models(a), Unrestricted::Models(b)) => {
                Unrestricted::Models(a.union(b).copied().collect())
            }
        }
    }
}

/// The limits shared by every association: rate limiters, lockout and occupancy.
pub struct Limiter {
    pub rates: Rates,
    pub lockout: Mutex<Lockout>,
    pub occupancy: Arc<Occupancy>,
    /// Woken whenever a login attempt ends, for the attempts waiting for their turn (login.rs).
    turns: tokio::sync::Notify,
}

impl Limiter {
    pub fn new(config: &Config) -> Limiter {
        let l = &config.limits;
        Limiter {
            rates: Rates::new(l, governor::clock::DefaultClock::default()),
            lockout: Mutex::new(Lockout::new(
                l.failed_logins,
                l.failed_logins_per_address,
                l.failed_login_window,
                l.lockout,
            )),
            occupancy: Occupancy::new(l.max_associations, l.max_associations_per_user),
            turns: tokio::sync::Notify::new(),
        }
    }

    /// Apply a reloaded `[limits]`: new quotas and thresholds, the same records. Lockouts in force
    /// keep their end (a reload never unlocks anyone; a restart does), failures counted so far stay
    /// counted, open associations stay counted, and rate buckets carry over as
    /// [`limits::KeyedRate::reconfigure`] describes.
    pub fn reconfigure(&self, limits: &crate::config::Limits) {
        self.rates.reconfigure(limits);
        {
            let mut lockout = self.lockout();
            lockout.per_user = limits.failed_logins;
            lockout.per_address = limits.failed_logins_per_address;
            lockout.window = limits.failed_login_window;
            lockout.lock = limits.lockout;
        }
        self.occupancy
            .reconfigure(limits.max_associations, limits.max_associations_per_user);
    }

    fn lockout(&self) -> std::sync::MutexGuard<'_, Lockout> {
        self.lockout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Is this address (or this normalized login name at it) locked? Logins go through
    /// [`login::Login`], which checks, counts and clears; this is the early address check.
    pub fn check_locked(&self, user: Option<&str>, address: IpAddr) -> Result<(), Locked> {
        self.lockout().check(user, address, Instant::now())
    }

    pub fn admit(&self, user: &str) -> Result<Slot, Full> {
        self.occupancy.admit(user)
    }
}
