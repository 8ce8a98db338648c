//! Who is asking: a Bearer JWT, HTTP Basic (argon2id, with a short cache) or a client certificate,
//! checked before anything else, with limits that keep anonymous clients from spending the gateway:
//!
//! - per client address, at most `[http] failed_logins_per_minute` failed or unfinished credential
//!   checks per minute: more are answered 429 with `Retry-After` before any check runs;
//! - then the login rule both doors share (`policy::login`): one normalized user name, lockouts
//!   (`failed_logins`, `failed_logins_per_address`, with the attempts in flight), and a bounded wait
//!   for a password-check slot (`auth::PASSWORD_CHECK_WAIT`): busy is a 503 with `Retry-After`,
//!   never a failed login;
//! - the Basic cache belongs to one configuration: after a reload it is empty, so a user removed
//!   from the file is refused at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::{self, HeaderMap};
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::gateway::State;
use crate::metrics::metrics;
use crate::policy;
use crate::policy::login::{Door, Refused, normalize_user};

/// Seconds a client told "busy" (503) is asked to wait.
const BUSY_RETRY_AFTER: u64 = 2;

/// Successful HTTP Basic logins are remembered this long, so a viewer's hundreds of requests do not
/// each cost an argon2 computation. Keyed by a salted SHA-256 of user and password, never the password.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(60);
const BASIC_CACHE_MAX: usize = 10_000;
/// The window of `failed_logins_per_minute`.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked before stale ones are swept, and the most ever tracked (bounded memory).
const SWEEP_ABOVE: usize = 10_000;
const MAX_ADDRESSES: usize = 100_000;

/// The body of every 401, whatever failed: it never says whether the user exists, has a password or
/// signs in by certificate only (DICOM answers all of these 1/2/1 alike). Why is in the log line and
/// the `login.failed` audit event.
pub const UNAUTHORIZED_BODY: &str = "authentication required\n";

/// A request that did not authenticate: the answer the client gets.
#[derive(Debug)]
pub enum NotAuthenticated {
    /// 401 with `WWW-Authenticate` and [`UNAUTHORIZED_BODY`]; the reason is for the log only.
    Unauthorized(String),
    /// 429 with `Retry-After`.
    Limited { reason: String, retry_after: u64 },
    /// 503 with `Retry-After`: no password check slot in time.
    Busy { retry_after: u64 },
}

/// The budget an address draws on: IPv4 addresses one by one, IPv6 by /64 (one subscriber's
/// prefix: counting its addresses one by one would give an attacker 2^64 budgets).
fn bucket(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Failed and unfinished credential checks per client address, over the last minute.
#[derive(Debug, Default)]
pub struct Failures {
    by_address: Mutex<HashMap<IpAddr, Record>>,
}

#[derive(Debug, Default)]
struct Record {
    failed: VecDeque<Instant>,
    in_flight: usize,
}

/// A credential check in progress; counts against its address until it is dropped, and for a
/// minute after that when it [failed](Attempt::failed).
pub struct Attempt<'a> {
    failures: &'a Failures,
    address: IpAddr,
    /// false when no limit applied (nothing to give back).
    counted: bool,
}

impl Failures {
    /// Start a credential check from `address`, unless `per_minute` checks from it failed or are
    /// still running: then the seconds until one leaves the window.
    pub fn begin(
        &self,
        address: IpAddr,
        per_minute: u32,
        now: Instant,
    ) -> Result<Attempt<'_>, u64> {
        let address = bucket(address);
        let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, r| {
                r.in_flight > 0
                    || r.failed
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        if per_minute == 0 {
            return Ok(Attempt {
                failures: self,
                address,
                counted: false,
            });
        }
        {
            if map.len() >= MAX_ADDRESSES && !map.contains_key(&address) {
                return Err(FAILURE_WINDOW.as_secs());
            }
            let r = map.entry(address).or_default();
            while r
                .failed
                .front()
                .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
            {
                r.failed.pop_front();
            }
            if r.failed.len() + r.in_flight >= per_minute as usize {
                let retry = r
                    .failed
                    .front()
                    .map(|t| FAILURE_WINDOW.saturating_sub(now.duration_since(*t)))
                    .unwrap_or(Duration::from_secs(1));
                return Err(retry.as_secs().max(1));
            }
            r.in_flight += 1;
        }
        Ok(Attempt {
            failures: self,
            address,
            counted: true,
        })
    }
}

impl Attempt<'_> {
    /// The check failed: it counts for the next minute.
    pub fn failed(self, now: Instant) {
        if !self.counted {
            return;
        }
        let mut map = self
            .failures
            .by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get_mut(&self.address) {
            r.failed.push_back(now);
            while r.failed.len() > 1024 {
                r.failed.pop_front();
            }
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut map = self
            .failures
            .by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get_mut(&self.address) {
            r.in_flight = r.in_flight.saturating_sub(1);
            if r.in_flight == 0 && r.failed.is_empty() {
                map.remove(&self.address);
            }
        }
    }
}

/// Basic logins that verified, under the configuration they verified against.
pub struct BasicCache {
    salt: [u8; 16],
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    /// The configuration the entries were made under; any other one empties the cache.
    generation: Weak<State>,
    entries: HashMap<[u8; 32], (Principal, Instant)>,
}

impl BasicCache {
    pub fn new() -> BasicCache {
        let mut salt = [0u8; 16];
        {
            use argon2::password_hash::rand_core::{OsRng, RngCore};
            OsRng.fill_bytes(&mut salt);
        }
        BasicCache {
            salt,
            inner: Mutex::new(CacheInner {
                generation: Weak::new(),
                entries: HashMap::new(),
            }),
        }
    }

    fn key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// The entries of `state`'s generation (the cache is emptied when the state is another one).
    fn of<'a>(
        inner: &'a mut CacheInner,
        state: &Arc<State>,
    ) -> &'a mut HashMap<[u8; 32], (Principal, Instant)> {
        if !std::ptr::eq(inner.generation.as_ptr(), Arc::as_ptr(state)) {
            inner.entries.clear();
            inner.generation = Arc::downgrade(state);
        }
        &mut inner.entries
    }

    fn cached(&self, state: &Arc<State>, key: &[u8; 32]) -> Option<Principal> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::of(&mut inner, state)
            .get(key)
            .filter(|(_, at)| at.elapsed() < BASIC_CACHE_TTL)
            .map(|(p, _)| p.clone())
    }

    /// Remember a login that verified under `state`, unless a reload replaced `state` meanwhile.
    fn remember(&self, state: &Arc<State>, current: &Arc<State>, key: [u8; 32], p: Principal) {
        if !Arc::ptr_eq(state, current) {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entries = Self::of(&mut inner, state);
        if entries.len() >= BASIC_CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < BASIC_CACHE_TTL);
            if entries.len() >= BASIC_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (p, Instant::now()));
    }
}

/// What the `Authorization` header offers.
enum Credential<'a> {
    Bearer(&'a str),
    Basic { user: String, password: String },
    Malformed(&'static str),
    None,
}

fn credential(headers: &HeaderMap) -> Credential<'_> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Credential::None;
    };
    if all.next().is_some() {
        return Credential::Malformed("more than one Authorization header");
    }
    let Ok(a) = value.to_str() else {
        return Credential::Malformed("Authorization header is not ASCII");
    };
    let (scheme, rest) = a.split_once(' ').unwrap_or((a, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Credential::Bearer(rest);
    }
    if scheme.eq_ignore_ascii_case("basic") && !rest.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        return match decoded.as_deref().and_then(|d| d.split_once(':')) {
            Some((user, password)) => Credential::Basic {
                user: user.to_string(),
                password: password.to_string(),
            },
            None => Credential::Malformed("malformed Basic credentials"),
        };
    }
    Credential::Malformed("unsupported Authorization scheme (use Bearer or Basic)")
}

/// The web door's authentication.
pub struct WebLogin {
    pub failures: Failures,
    pub basic: BasicCache,
}

impl WebLogin {
    pub fn new() -> WebLogin {
        WebLogin {
            failures: Failures::default(),
            basic: BasicCache::new(),
        }
    }

    /// Authenticate one request. `current` yields the configuration in force now (to tell whether a
    /// reload happened while a password was being checked).
    pub async fn authenticate(
        &self,
        state: &Arc<State>,
        current: impl Fn() -> Arc<State>,
        headers: &HeaderMap,
        peer: SocketAddr,
        names: &[String],
    ) -> Result<Principal, NotAuthenticated> {
        let address = peer.ip();
        // A locked address is refused before anything else is looked at.
        if let Err(locked) = state.limiter.check_locked(None, address) {
            metrics().refusal("locked_out");
            tracing::info!(peer = %peer, outcome = "rejected", reason = ?locked.to_string(), "web request");
            return Err(NotAuthenticated::Limited {
                reason: locked.to_string(),
                retry_after: locked.seconds_left(),
            });
        }
        let credential = credential(headers);
        if matches!(credential, Credential::None) && names.is_empty() {
            // A browser's first request is often one: no login was tried, so no failure is counted.
            tracing::info!(peer = %peer, outcome = "rejected", reason = "no credentials", "web request");
            return Err(NotAuthenticated::Unauthorized("no credentials".into()));
        }
        let attempt = self.begin(state, peer)?;
        // The login rule both doors share: lock check, a turn among the attempts in flight, the
        // count, the audit (policy::login).
        let login = policy::login::Login::new(&state.limiter, &state.audit, peer, Door::Web);
        let result = match credential {
            Credential::Bearer(token) => {
                login
                    .attempt(None, async { state.authenticator.token(token) })
                    .await
            }
            Credential::Basic { user, password } => {
                self.basic_login(state, current, &login, &user, &password)
                    .await
            }
            Credential::Malformed(reason) => {
                attempt.failed(Instant::now());
                login.unreadable(reason);
                metrics().refusal("not_authenticated");
                tracing::info!(peer = %peer, outcome = "rejected", reason, "web request");
                return Err(NotAuthenticated::Unauthorized(reason.into()));
            }
            Credential::None => {
                login
                    .attempt(None, async { state.authenticator.certificate(names) })
                    .await
            }
        };
        result.map_err(|refused| refusal(refused, peer, attempt))
    }

    /// This address's budget of failed and unfinished checks, taken before any of them runs.
    fn begin(&self, state: &State, peer: SocketAddr) -> Result<Attempt<'_>, NotAuthenticated> {
        let per_minute = state
            .config
            .http
            .as_ref()
            .map_or(0, |h| h.failed_logins_per_minute);
        self.failures
            .begin(peer.ip(), per_minute, Instant::now())
            .map_err(|retry_after| {
                metrics().refusal("failed_logins_per_minute");
                tracing::info!(peer = %peer, outcome = "rejected", reason = "failed_logins_per_minute", "web request");
                NotAuthenticated::Limited {
                    reason: "too many failed logins from this address".into(),
                    retry_after,
                }
            })
    }

    /// A Basic username + password through the login rule: a recent check of the same pair from
    /// the cache, otherwise verified (and remembered unless a reload happened meanwhile).
    async fn basic_login(
        &self,
        state: &Arc<State>,
        current: impl Fn() -> Arc<State>,
        login: &policy::login::Login<'_>,
        user: &str,
        password: &str,
    ) -> Result<Principal, Refused> {
        let name = normalize_user(user.as_bytes());
        let verify = async {
            let key = name.as_deref().ok().map(|u| self.basic.key(u, password));
            if let Some(p) = key.as_ref().and_then(|k| self.basic.cached(state, k)) {
                return Ok(p);
            }
            let result = state
                .authenticator
                .password(&name, password.as_bytes().to_vec())
                .await;
            if let (Ok(p), Some(key)) = (&result, key) {
                self.basic.remember(state, &current(), key, p.clone());
            }
            result
        };
        login.attempt(name.as_deref().ok(), verify).await
    }
}

/// A refused login as the web door's answer: its metric and log line; a failed check counts
/// against the address (`attempt`), a lockout or a busy refusal does not.
fn refusal(refused: Refused, peer: SocketAddr, attempt: Attempt<'_>) -> NotAuthenticated {
    let reason = refused.to_string();
    let user = refused.user().unwrap_or("-").to_string();
    match refused {
        Refused::Locked { locked, .. } => {
            metrics().refusal("locked_out");
            tracing::info!(peer = %peer, user = ?user, outcome = "rejected", reason = ?reason, "web request");
            NotAuthenticated::Limited {
                reason,
                retry_after: locked.seconds_left(),
            }
        }
        Refused::Busy(_) => {
            // Nothing was verified: not a failure of the client's.
            metrics().refusal("password_checks_busy");
            tracing::warn!(peer = %peer, user = ?user, outcome = "busy", reason = ?reason, "web request");
            NotAuthenticated::Busy {
                retry_after: BUSY_RETRY_AFTER,
            }
        }
        Refused::Failed(_) => {
            attempt.failed(Instant::now());
            metrics().refusal("not_authenticated");
            tracing::info!(peer = %peer, user = ?user, outcome = "rejected", reason = ?reason, "web request");
            NotAuthenticated::Unauthorized(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_and_unfinished_checks_count_per_address_for_a_minute() {
        let f = Failures::default();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        // Three checks at once: the fourth is refused while they run.
        let running: Vec<_> = (0..3)
            .map(|_| f.begin(a, 3, t0).expect("in budget"))
            .collect();
        assert!(f.begin(a, 3, t0).is_err());
        assert!(
            f.begin(b, 3, t0).is_ok(),
            "another address has its own budget"
        );
        // One succeeds (gone), two fail (they stay for a minute).
        let mut running = running.into_iter();
        drop(running.next());
        for r in running {
            r.failed(t0);
        }
        let ok = f.begin(a, 3, t0).expect("one left");
        assert_eq!(f.begin(a, 3, t0).err(), Some(60));
        drop(ok);
        let later = t0 + Duration::from_secs(45);
        let held = f.begin(a, 3, later);
        assert!(held.is_ok(), "the successful one freed its place");
        assert_eq!(f.begin(a, 3, later).err(), Some(15));
        assert!(f.begin(a, 3, t0 + Duration::from_secs(61)).is_ok());
        // IPv6 counts per /64; a v4-mapped address is its IPv4 address.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::ffff:2".parse().expect("ip");
        let held: Vec<_> = (0..3)
            .map(|_| f.begin(v6a, 3, t0).expect("in budget"))
            .collect();
        assert!(
            f.begin(v6b, 3, t0).is_err(),
            "another address of the same /64"
        );
        assert!(
            f.begin("2001:db8:0:1::1".parse().expect("ip"), 3, t0)
                .is_ok()
        );
        drop(held);
        assert_eq!(bucket("::ffff:10.0.0.1".parse().expect("ip")), a);
        // 0: no limit.
        let many: Vec<_> = (0..100).map(|_| f.begin(b, 0, t0)).collect();
        assert!(many.iter().all(Result::is_ok));
    }

    #[test]
    fn authorization_headers_are_read_strictly() {
        let h = |values: &[&str]| {
            let mut m = HeaderMap::new();
            for v in values {
                m.append(
                    header::AUTHORIZATION,
                    hyper::header::HeaderValue::from_str(v).expect("value"),
                );
            }
            m
        };
        assert!(matches!(credential(&h(&[])), Credential::None));
        assert!(matches!(
            credential(&h(&["Bearer abc"])),
            Credential::Bearer("abc")
        ));
        assert!(matches!(
            credential(&h(&["bearer  abc "])),
            Credential::Bearer("abc")
        ));
        let Credential::Basic { user, password } = credential(&h(&["Basic dTpwOnE="])) else {
            panic!("basic")
        };
        assert_eq!((user.as_str(), password.as_str()), ("u", "p:q"));
        for bad in [
            &["Basic !!"][..],
            &["Digest x"],
            &["Bearer"],
            &["Bearer a", "Bearer b"],
        ] {
            assert!(
                matches!(credential(&h(bad)), Credential::Malformed(_)),
                "{bad:?}"
            );
        }
    }
}
