//! Who is this peer? Client certificate, username + passcode, or JWT, checked before the archive sees a byte.

pub mod certificate;
pub mod jwt;
pub mod password;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dicom_ul::pdu::{UserIdentity, UserIdentityType};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, Role, User};
use jwt::{JwtSetupError, JwtVerifier, TokenError};
use password::NameError;

/// How a peer proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Certificate,
    Password,
    Jwt,
    /// A `[[device]]`: calling AE title and source address, no credential (the weak option).
    Device,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Certificate => "certificate",
            Method::Password => "password",
            Method::Jwt => "jwt",
            Method::Device => "device",
        }
    }
}

/// An authenticated user and the roles they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub method: Method,
    pub roles: Vec<String>,
}

/// Why authentication failed. The texts name what was wrong, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: no verified client certificate and no user identity")]
    NoCredential,
    #[error("user identity type {0} is not a credential")]
    NotACredential(&'static str),
    #[error("unknown user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("user has no password (certificate sign-in only)")]
    NoPasswordSet,
    #[error("username and passcode refused outside TLS")]
    PasswordWithoutTls,
    #[error("token refused outside TLS")]
    TokenWithoutTls,
    #[error("JWT sign-in is not configured")]
    JwtNotConfigured,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("client certificate names no configured user ({0})")]
    CertificateUnknown(String),
    #[error("user holds no configured role")]
    NoRole,
    #[error("identity field is not valid UTF-8")]
    BadEncoding,
    #[error(transparent)]
    BadName(#[from] NameError),
    /// Nothing was checked: no password-check slot (or no turn for this name and address) came free
    /// within the bound. Not a failed login; DICOM answers 2/3/2, the web 503.
    #[error("password checks busy ({phase}: {why})")]
    Busy {
        phase: &'static str,
        why: &'static str,
    },
}

impl AuthError {
    /// Busy: nothing was verified, so nothing may be counted as a failed login.
    pub fn is_busy(&self) -> bool {
        matches!(self, AuthError::Busy { .. })
    }
}

/// Where an association comes from, as far as authentication cares.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub address: std::net::IpAddr,
    pub calling_ae: &'a str,
    /// false on the plain device listener.
    pub over_tls: bool,
}

/// A failed attempt: the method tried and the user name claimed, if any, for the log line.
#[derive(Debug)]
pub struct AuthFailure {
    pub method: Option<Method>,
    pub user: Option<String>,
    pub error: AuthError,
}

/// The limit on password checks running at once: each costs ~20 MiB and tens of milliseconds of a core.
const CONCURRENT_PASSWORD_CHECKS: usize = 4;
/// How many password checks may wait for one of those slots; more are answered Busy at once. As many
/// as the default pool of handshakes (`max_pending_connections`): a burst of sign-ins from one NAT
/// address waits its turn here (bounded by `PASSWORD_CHECK_WAIT`) rather than being turned away.
pub const QUEUED_PASSWORD_CHECKS: usize = 256;
/// How long a password check may wait for a slot (phase `password_check`) before it is answered Busy.
pub const PASSWORD_CHECK_WAIT: Duration = Duration::from_secs(5);

/// What a User Identity claims, read once: the type 2 primary field is turned into a login name
/// here (password::normalize_user) and nowhere else; the lock check, the password check, the count
/// and the audit all take this one name.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    identity: Option<&'a UserIdentity>,
    name: Option<Result<String, NameError>>,
}

impl<'a> Claim<'a> {
    pub fn read(identity: Option<&'a UserIdentity>) -> Claim<'a> {
        let name = identity
            .filter(|i| i.identity_type() == UserIdentityType::UsernamePassword)
            .map(|i| password::normalize_user(&i.primary_field()));
        Claim { identity, name }
    }

    /// The normalized login name (type 2), when the peer claimed one that can be a user name.
    /// The JWT subject is not a login name: it is not counted per name.
    pub fn login_name(&self) -> Option<&str> {
        self.name.as_ref()?.as_deref().ok()
    }
}

/// The argon2 slots shared by both doors: a bounded number of checks at once, a bounded queue in
/// front of them, and a bounded wait in it.
#[derive(Debug)]
struct PasswordSlots {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queued: usize,
    wait: Duration,
}

/// One place in the queue, given back on drop.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PasswordSlots {
    fn new(slots: usize, max_queued: usize, wait: Duration) -> PasswordSlots {
        PasswordSlots {
            slots: Arc::new(Semaphore::new(slots)),
            queued: AtomicUsize::new(0),
            max_queued,
            wait,
        }
    }

    /// Phase `password_check`: a slot now, or after a bounded wait in a bounded queue, or Busy.
    /// Decided before and whatever the user name: a busy answer says nothing about the user.
    async fn acquire(&self) -> Result<OwnedSemaphorePermit, AuthError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let ahead = self.queued.fetch_add(1, Ordering::AcqRel);
        let _place = Queued(&self.queued);
        if ahead >= self.max_queued {
            return Err(AuthError::Busy {
                phase: "password_check",
                why: "queue full",
            });
        }
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; if it were, fail closed as busy.
            Ok(Err(_)) | Err(_) => Err(AuthError::Busy {
                phase: "password_check",
                why: "no slot came free in time",
            }),
        }
    }
}

/// Checks credentials against the users, roles and JWT keys of one configuration.
#[derive(Debug)]
pub struct Authenticator {
    users: HashMap<String, User>,
    roles: HashMap<String, Role>,
    devices: Vec<crate::config::Device>,
    jwt: Option<JwtVerifier>,
    /// Verified against when the user is unknown, so that failures cost the same either way.
    dummy_hash: String,
    password_checks: PasswordSlots,
}

impl Authenticator {
    pub fn new(cfg: &Config) -> Result<Authenticator, JwtSetupError> {
        let jwt = cfg.jwt.as_ref().map(JwtVerifier::load).transpose()?;
        let dummy_hash =
            password::hash_password("pacsgate-dummy-password").unwrap_or_else(|_| String::new());
        Ok(Authenticator {
            users: cfg.users.clone(),
            roles: cfg.roles.clone(),
            devices: cfg.devices.clone(),
            jwt,
            dummy_hash,
            password_checks: PasswordSlots::new(
                CONCURRENT_PASSWORD_CHECKS,
                QUEUED_PASSWORD_CHECKS,
                PASSWORD_CHECK_WAIT,
            ),
        })
    }

    /// Authenticate one association. A User Identity of type 2 or 5 must verify; otherwise a verified
    /// client certificate naming a user is the credential; otherwise a `[[device]]` matching calling AE
    /// and address. Outside TLS only devices are admitted.
    pub async fn authenticate(
        &self,
        identity: Option<&UserIdentity>,
        certificate_names: &[String],
        origin: Origin<'_>,
    ) -> Result<Principal, AuthFailure> {
        self.authenticate_claim(&Claim::read(identity), certificate_names, origin)
            .await
    }

    /// [`Authenticator::authenticate`] with the identity already read (policy::login reads it first,
    /// to check the lock of the very name verified here).
    pub async fn authenticate_claim(
        &self,
        claim: &Claim<'_>,
        certificate_names: &[String],
        origin: Origin<'_>,
    ) -> Result<Principal, AuthFailure> {
        let over_tls = origin.over_tls;
        let identity = claim.identity;
        let fail = |method, user: Option<&str>, error| AuthFailure {
            method,
            user: user.map(str::to_string),
            error,
        };
        match identity.map(|i| (i.identity_type(), i)) {
            Some((UserIdentityType::UsernamePassword, id)) => {
                let user = claim.name.clone().unwrap_or(Err(NameError::Empty));
                if !over_tls {
                    return Err(fail(
                        Some(Method::Password),
                        user.as_deref().ok(),
                        AuthError::PasswordWithoutTls,
                    ));
                }
                self.password(&user, id.secondary_field()).await
            }
            Some((UserIdentityType::Jwt, id)) => {
                if !over_tls {
                    return Err(fail(Some(Method::Jwt), None, AuthError::TokenWithoutTls));
                }
                let token = String::from_utf8(id.primary_field())
                    .map_err(|_| fail(Some(Method::Jwt), None, AuthError::BadEncoding))?;
                self.token(token.trim_end_matches(['\0', ' ']))
            }
            other => {
                if !certificate_names.is_empty() {
                    return self.certificate(certificate_names);
                }
                if let Some(device) = self
                    .devices
                    .iter()
                    .find(|d| d.matches(origin.calling_ae, origin.address))
                {
                    let name = format!("device:{}", device.ae_title);
                    return self
                        .principal(&name, Method::Device, device.roles.clone())
                        .map_err(|e| fail(Some(Method::Device), Some(&name), e));
                }
                let error = match other {
                    Some((UserIdentityType::Username, _)) => {
                        AuthError::NotACredential("1 (username only)")
                    }
                    Some((UserIdentityType::KerberosServiceTicket, _)) => {
                        AuthError::NotACredential("3 (Kerberos)")
                    }
                    Some((UserIdentityType::SamlAssertion, _)) => {
                        AuthError::NotACredential("4 (SAML)")
                    }
                    Some(_) => AuthError::NotACredential("unknown"),
                    None => AuthError::NoCredential,
                };
                Err(fail(None, None, error))
            }
        }
    }

    /// A login name (normalized by password::normalize_user, or why it cannot be one) and a
    /// password, checked against the user's argon2id hash. A name that cannot be a user costs the
    /// same check and gets the same answer as a wrong password.
    pub async fn password(
        &self,
        user: &Result<String, NameError>,
        password: Vec<u8>,
    ) -> Result<Principal, AuthFailure> {
        self.check_password(user, password)
            .await
            .and_then(|u| self.principal(&u.name, Method::Password, u.roles.clone()))
            .map_err(|error| AuthFailure {
                method: Some(Method::Password),
                user: user.as_ref().ok().cloned(),
                error,
            })
    }

    /// A JWT (compact JWS), verified as configured in `[auth.jwt]`.
    pub fn token(&self, token: &str) -> Result<Principal, AuthFailure> {
        let fail = |user: Option<&str>, error| AuthFailure {
            method: Some(Method::Jwt),
            user: user.map(str::to_string),
            error,
        };
        let Some(verifier) = &self.jwt else {
            return Err(fail(None, AuthError::JwtNotConfigured));
        };
        let claims = verifier.verify(token).map_err(|e| fail(None, e.into()))?;
        self.principal(&claims.subject, Method::Jwt, claims.roles.clone())
            .map_err(|e| fail(Some(&claims.subject), e))
    }

    /// The names of a client certificate rustls verified against `client_ca`.
    pub fn certificate(&self, names: &[String]) -> Result<Principal, AuthFailure> {
        let fail = |user: Option<&str>, error| AuthFailure {
            method: Some(Method::Certificate),
            user: user.map(str::to_string),
            error,
        };
        let Some(user) = names.iter().find_map(|n| self.users.get(n)) else {
            return Err(fail(
                names.first().map(String::as_str),
                AuthError::CertificateUnknown(names.join(", ")),
            ));
        };
        self.principal(&user.name, Method::Certificate, user.roles.clone())
            .map_err(|e| fail(Some(&user.name), e))
    }

    async fn check_password(
        &self,
        user: &Result<String, NameError>,
        password: Vec<u8>,
    ) -> Result<&User, AuthError> {
        let found = user.as_ref().ok().and_then(|u| self.users.get(u));
        let hash = found
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let permit = self.password_checks.acquire().await?;
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            password::verify(&hash, &password)
        })
        .await
        .unwrap_or(false);
        match (user, found) {
            (Err(e), _) => Err(AuthError::BadName(*e)),
            (Ok(_), None) => Err(AuthError::UnknownUser),
            (Ok(_), Some(u)) if u.password_hash.is_none() => Err(AuthError::NoPasswordSet),
            (Ok(_), Some(_)) if !ok => Err(AuthError::WrongPassword),
            (Ok(_), Some(u)) => Ok(u),
        }
    }

    /// Keep only the roles the configuration defines; a user left with none is refused (fail closed).
    fn principal(
        &self,
        user: &str,
        method: Method,
        roles: Vec<String>,
    ) -> Result<Principal, AuthError> {
        let roles: Vec<String> = roles
            .into_iter()
            .filter(|r| self.roles.contains_key(r))
            .collect();
        if roles.is_empty() {
            return Err(AuthError::NoRole);
        }
        Ok(Principal {
            user: user.to_string(),
            method,
            roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_is_busy_at_once_and_a_wait_is_bounded() {
        let slots = PasswordSlots::new(1, 1, Duration::from_millis(200));
        let held = slots.acquire().await.expect("the free slot");
        let started = tokio::time::Instant::now();
        let (waiting, overflow) = tokio::join!(slots.acquire(), async {
            tokio::task::yield_now().await;
            let r = slots.acquire().await;
            (r, started.elapsed())
        });
        assert!(
            matches!(
                overflow.0,
                Err(AuthError::Busy {
                    why: "queue full",
                    ..
                })
            ),
            "{:?}",
            overflow.0
        );
        assert!(overflow.1 < Duration::from_millis(150), "{:?}", overflow.1);
        assert!(
            matches!(waiting, Err(AuthError::Busy { phase: "password_check", why }) if why.contains("in time"))
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(slots.queued.load(Ordering::Acquire), 0, "places given back");
        drop(held);
        let again = slots.acquire().await;
        assert!(again.is_ok(), "a freed slot is taken at once");
        assert!(
            AuthError::Busy {
                phase: "password_check",
                why: "queue full"
            }
            .to_string()
            .starts_with("password checks busy")
        );
    }
}
