//! The login rule, written once for both doors (DICOM: User Identity, client certificate, device;
//! HTTPS: Basic, Bearer, client certificate):
//!
//! 1. the name a peer claims is normalized once ([`normalize_user`]); that name, and only it, is
//!    used for the lock check, the password check, the count, the audit and the log;
//! 2. the lock of the address and of that name at the address is checked before anything is
//!    verified, and the attempt waits (bounded, phase `login_turn`) until it cannot take the count
//!    past the threshold together with the attempts in flight;
//! 3. on failure: the count (lockout.rs), audit `login.failed` (written here only, for both doors,
//!    also for a credential the web door could not read: [`Login::unreadable`]), and per lock it
//!    starts audit `lockout` and one WARN line `lockout`; on success the failures of that name at
//!    that address are cleared (never a lock in force);
//! 4. a check that found the password slots busy (`AuthError::Busy`) verified nothing: it is not a
//!    failed login, and the door answers it as transient (DICOM 2/3/2, HTTP 503).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dicom_ul::pdu::UserIdentity;
use serde_json::{Value, json};

use super::Limiter;
use super::lockout::{Locked, Turn};
use crate::audit::Audit;
use crate::auth::{self, AuthError, AuthFailure, Authenticator, Claim, Method, Principal};

pub use crate::config::{MAX_USER_NAME, NameError, normalize_user};

/// How long an attempt waits for its turn (phase `login_turn`): as long as for a password slot.
pub const LOGIN_TURN_WAIT: Duration = auth::PASSWORD_CHECK_WAIT;

/// Which door a login came through, for the audit fields of that door.
#[derive(Debug, Clone, Copy)]
pub enum Door<'a> {
    Dicom {
        calling_ae: &'a str,
        called_ae: &'a str,
    },
    Web,
}

/// Why a login was refused.
#[derive(Debug)]
pub enum Refused {
    /// Locked out: nothing was verified or counted (DICOM 2/3/2, HTTP 429).
    Locked {
        user: Option<String>,
        locked: Locked,
    },
    /// No turn or no password-check slot within the bound: nothing was verified or counted
    /// (DICOM 2/3/2, HTTP 503).
    Busy(AuthFailure),
    /// The credential did not verify: counted and audited (DICOM 1/2/1, HTTP 401).
    Failed(AuthFailure),
}

impl Refused {
    /// The normalized name (or the principal named by a certificate or token), for the log line.
    pub fn user(&self) -> Option<&str> {
        match self {
            Refused::Locked { user, .. } => user.as_deref(),
            Refused::Busy(f) | Refused::Failed(f) => f.user.as_deref(),
        }
    }

    pub fn method(&self) -> Option<Method> {
        match self {
            Refused::Locked { .. } => None,
            Refused::Busy(f) | Refused::Failed(f) => f.method,
        }
    }

    /// A failed login (permanent answer); otherwise the refusal is transient (locked, busy).
    pub fn is_failed_login(&self) -> bool {
        matches!(self, Refused::Failed(_))
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Locked { locked, .. } => locked.fmt(f),
            Refused::Busy(failure) | Refused::Failed(failure) => failure.error.fmt(f),
        }
    }
}

/// One login at one door from one peer.
pub struct Login<'a> {
    limiter: &'a Limiter,
    audit: &'a Audit,
    peer: SocketAddr,
    door: Door<'a>,
}

/// An attempt counted in flight; given back when dropped, after its failure (if any) was counted.
struct Attempt<'a> {
    limiter: &'a Limiter,
    user: Option<String>,
    address: IpAddr,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.limiter
            .lockout()
            .end(self.user.as_deref(), self.address);
        self.limiter.turns.notify_waiters();
    }
}

impl<'a> Login<'a> {
    pub fn new(limiter: &'a Limiter, audit: &'a Audit, peer: SocketAddr, door: Door<'a>) -> Self {
        Login {
            limiter,
            audit,
            peer,
            door,
        }
    }

    /// The DICOM door: the User Identity is read once ([`Claim::read`]), its type 2 name is the
    /// login name; otherwise a certificate or a `[[device]]` decides (address checks only).
    pub async fn dicom(
        &self,
        authenticator: &Authenticator,
        identity: Option<&UserIdentity>,
        certificate_names: &[String],
        origin: auth::Origin<'_>,
    ) -> Result<Principal, Refused> {
        let claim = Claim::read(identity);
        let verify = authenticator.authenticate_claim(&claim, certificate_names, origin);
        self.attempt(claim.login_name(), verify).await
    }

    /// The rule around `verify`: `user` is the normalized login name the peer claimed (None for a
    /// token, a certificate, or a name that cannot be a user: those count for the address only).
    pub async fn attempt(
        &self,
        user: Option<&str>,
        verify: impl Future<Output = Result<Principal, AuthFailure>>,
    ) -> Result<Principal, Refused> {
        let attempt = self.begin(user).await?;
        let result = verify.await;
        self.finish(&attempt, result)
    }

    /// Phase `login_turn`: the lock check and a place among the attempts in flight, within the bound.
    async fn begin(&self, user: Option<&str>) -> Result<Attempt<'a>, Refused> {
        let address = self.peer.ip();
        let deadline = tokio::time::Instant::now() + LOGIN_TURN_WAIT;
        loop {
            // Registered before the check, so an attempt ending in between is not missed.
            let notified = self.limiter.turns.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let turn = self.limiter.lockout().begin(user, address, Instant::now());
            match turn {
                Turn::Go => {
                    return Ok(Attempt {
                        limiter: self.limiter,
                        user: user.map(str::to_string),
                        address,
                    });
                }
                Turn::Locked(locked) => {
                    return Err(Refused::Locked {
                        user: user.map(str::to_string),
                        locked,
                    });
                }
                Turn::Wait => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Refused::Busy(AuthFailure {
                    method: None,
                    user: user.map(str::to_string),
                    error: AuthError::Busy {
                        phase: "login_turn",
                        why: "earlier attempts for this name or address are still being checked",
                    },
                }));
            }
        }
    }

    fn finish(
        &self,
        attempt: &Attempt<'_>,
        result: Result<Principal, AuthFailure>,
    ) -> Result<Principal, Refused> {
        match result {
            Ok(principal) => {
                if let Some(user) = &attempt.user {
                    self.limiter
                        .lockout()
                        .success(user, attempt.address, Instant::now());
                }
                Ok(principal)
            }
            Err(failure) if failure.error.is_busy() => Err(Refused::Busy(failure)),
            Err(failure) => {
                self.failed(attempt.user.as_deref(), &failure);
                Err(Refused::Failed(failure))
            }
        }
    }

    /// A credential the door could not even read (the web door: a malformed `Authorization`
    /// header). It is audited `login.failed` like any failed login; it names no user and verified
    /// nothing, so it is not counted for a lockout (the door's own per-address budget counts it).
    pub fn unreadable(&self, reason: &str) {
        self.audit_failed(None, None, reason.to_string());
    }

    /// The one `login.failed` audit event: peer, user, method, the door's fields, reason (absent
    /// fields are left out by the audit trail).
    fn audit_failed(&self, user: Option<&str>, method: Option<Method>, reason: String) {
        let mut event = json!({
            "peer": self.peer.to_string(),
            "user": user,
            "method": method.map(|m| m.name()),
        });
        match self.door {
            Door::Dicom {
                calling_ae,
                called_ae,
            } => {
                event["calling_ae"] = json!(calling_ae);
                event["called_ae"] = json!(called_ae);
            }
            Door::Web => event["via"] = json!("http"),
        }
        event["reason"] = json!(reason);
        self.audit.record("login.failed", event);
    }

    /// Count, audit and log one failed login.
    fn failed(&self, login_name: Option<&str>, failure: &AuthFailure) {
        let peer = self.peer.to_string();
        self.audit_failed(
            failure.user.as_deref(),
            failure.method,
            failure.error.to_string(),
        );

        let (locks, seconds) = {
            let mut lockout = self.limiter.lockout();
            let locks = lockout.failure(login_name, self.peer.ip(), Instant::now());
            (locks, lockout.lock.as_secs())
        };
        for lock in locks {
            let mut event: Value = json!({
                "peer": peer,
                "user": failure.user,
                "scope": format!("{lock:?}"),
                "seconds": seconds,
                "rule": "failed_logins",
            });
            if matches!(self.door, Door::Web) {
                event["via"] = json!("http");
            }
            self.audit.record("lockout", event);
            tracing::warn!(
                peer = %self.peer,
                user = ?failure.user.as_deref().unwrap_or("-"),
                lock = ?lock,
                seconds,
                reason = "failed logins",
                "lockout"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::lockout::Lockout;
    use std::sync::Arc;

    fn limiter(per_user: u32, per_address: u32) -> Limiter {
        let text = "[gateway]\nlisten = \"127.0.0.1:2762\"\n[tls]\ncertificate = \"s.crt\"\n\
                    private_key = \"s.key\"\n[[upstream]]\ncalled_ae = \"ARCHIVE\"\n\
                    address = \"127.0.0.1:4242\"\nae_title = \"ORTHANC\"\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("/etc/p.toml"))
            .expect("a minimal configuration");
        let l = Limiter::new(&config);
        *l.lockout() = Lockout::new(
            per_user,
            per_address,
            Duration::from_secs(300),
            Duration::from_secs(60),
        );
        l
    }

    fn failure(user: &str) -> AuthFailure {
        AuthFailure {
            method: Some(Method::Password),
            user: Some(user.into()),
            error: AuthError::WrongPassword,
        }
    }

    fn principal(user: &str) -> Principal {
        Principal {
            user: user.into(),
            method: Method::Password,
            roles: vec!["r".into()],
        }
    }

    const PEER: &str = "127.0.0.1:4000";

    #[tokio::test]
    async fn the_lock_is_checked_before_verify_runs_and_busy_is_not_counted() {
        let limiter = limiter(2, 100);
        let audit = Audit::disabled();
        let login = Login::new(&limiter, &audit, PEER.parse().expect("addr"), Door::Web);
        for _ in 0..5 {
            let r = login
                .attempt(
                    Some("alice"),
                    std::future::ready(Err(AuthFailure {
                        method: Some(Method::Password),
                        user: Some("alice".into()),
                        error: AuthError::Busy {
                            phase: "password_check",
                            why: "queue full",
                        },
                    })),
                )
                .await;
            assert!(matches!(r, Err(Refused::Busy(_))), "{r:?}");
        }
        for _ in 0..2 {
            let r = login
                .attempt(Some("alice"), std::future::ready(Err(failure("alice"))))
                .await;
            assert!(r.as_ref().is_err_and(Refused::is_failed_login), "{r:?}");
        }
        let ran = std::sync::atomic::AtomicBool::new(false);
        let r = login
            .attempt(Some("alice"), async {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(principal("alice"))
            })
            .await;
        assert!(matches!(r, Err(Refused::Locked { .. })), "{r:?}");
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "verified while locked"
        );
        assert!(limiter.lockout().records() > 0);
    }

    #[tokio::test]
    async fn concurrent_guesses_get_one_clean_burst_then_the_threshold_holds() {
        let limiter = Arc::new(limiter(3, 100));
        let audit = Arc::new(Audit::disabled());
        let checks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        // A clean record lets CLEAN_BURST attempts start at once (bursts from one NAT address); once
        // they fail, the lock holds for the rest, and no attempt waits unbounded.
        let burst = crate::policy::lockout::CLEAN_BURST;
        for _ in 0..burst + 8 {
            let (limiter, audit, checks) = (limiter.clone(), audit.clone(), checks.clone());
            tasks.push(tokio::spawn(async move {
                let login = Login::new(&limiter, &audit, PEER.parse().expect("addr"), Door::Web);
                login
                    .attempt(Some("alice"), async {
                        checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(failure("alice"))
                    })
                    .await
                    .map(|_| ())
            }));
        }
        let mut locked = 0;
        for t in tasks {
            match t.await.expect("task") {
                Err(Refused::Locked { .. }) => locked += 1,
                Err(Refused::Failed(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(checks.load(std::sync::atomic::Ordering::SeqCst), burst);
        assert_eq!(locked, 8);
        assert!(limiter.lockout().records() > 0);
    }

    #[tokio::test]
    async fn a_success_at_the_same_time_as_the_locking_failure_does_not_lift_the_lock() {
        let limiter = limiter(1, 100);
        let audit = Audit::disabled();
        let addr: SocketAddr = PEER.parse().expect("addr");
        let login = Login::new(&limiter, &audit, addr, Door::Web);
        let r = login
            .attempt(Some("bob"), async {
                // A failure for bob at this address is counted while this check runs.
                limiter
                    .lockout()
                    .failure(Some("bob"), addr.ip(), Instant::now());
                Ok(principal("bob"))
            })
            .await;
        assert!(r.is_ok());
        assert!(limiter.check_locked(Some("bob"), addr.ip()).is_err());
    }
}
