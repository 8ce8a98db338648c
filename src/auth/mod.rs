//! Who is this peer? Client certificate, username + passcode, or JWT, checked before the archive sees a byte.

pub mod certificate;
pub mod jwt;
pub mod password;

use std::collections::HashMap;
use std::sync::Arc;

use dicom_ul::pdu::{UserIdentity, UserIdentityType};
use tokio::sync::Semaphore;

use crate::config::{Config, Role, User};
use jwt::{JwtSetupError, JwtVerifier, TokenError};

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

/// Checks credentials against the users, roles and JWT keys of one configuration.
#[derive(Debug)]
pub struct Authenticator {
    users: HashMap<String, User>,
    roles: HashMap<String, Role>,
    devices: Vec<crate::config::Device>,
    jwt: Option<JwtVerifier>,
    /// Verified against when the user is unknown, so that failures cost the same either way.
    dummy_hash: String,
    password_checks: Arc<Semaphore>,
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
            password_checks: Arc::new(Semaphore::new(CONCURRENT_PASSWORD_CHECKS)),
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
        let over_tls = origin.over_tls;
        let fail = |method, user: Option<&str>, error| AuthFailure {
            method,
            user: user.map(str::to_string),
            error,
        };
        match identity.map(|i| (i.identity_type(), i)) {
            Some((UserIdentityType::UsernamePassword, id)) => {
                let user = String::from_utf8(id.primary_field())
                    .map_err(|_| fail(Some(Method::Password), None, AuthError::BadEncoding))?;
                let user = user.trim_end_matches(['\0', ' ']).to_string();
                if !over_tls {
                    return Err(fail(
                        Some(Method::Password),
                        Some(&user),
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

    /// A user name and password, checked against the user's argon2id hash.
    pub async fn password(&self, user: &str, password: Vec<u8>) -> Result<Principal, AuthFailure> {
        self.check_password(user, password)
            .await
            .and_then(|u| self.principal(&u.name, Method::Password, u.roles.clone()))
            .map_err(|error| AuthFailure {
                method: Some(Method::Password),
                user: Some(user.to_string()),
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

    async fn check_password(&self, user: &str, password: Vec<u8>) -> Result<&User, AuthError> {
        let found = self.users.get(user);
        let hash = found
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        // Bounded concurrency; the semaphore is never closed, so acquire cannot fail in practice.
        let permit = self.password_checks.clone().acquire_owned().await;
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            password::verify(&hash, &password)
        })
        .await
        .unwrap_or(false);
        match found {
            None => Err(AuthError::UnknownUser),
            Some(u) if u.password_hash.is_none() => Err(AuthError::NoPasswordSet),
            Some(_) if !ok => Err(AuthError::WrongPassword),
            Some(u) => Ok(u),
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
