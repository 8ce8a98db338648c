//! The gateway end of the tunnel: TLS to the gateway with its certificate verified (fail closed),
//! the clinician's credentials as a User Identity sub-item, and the gateway's answer in words.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dicom_ul::pdu::{AssociationRQ, Pdu, UserIdentity, UserIdentityType, UserVariableItem};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::ConnectError;
use super::link::{self, Answer, LinkError};
use crate::tools::client::Rejection;

/// The longest User Identity a DICOM request can carry: the sub-item length is 16 bits and counts
/// type, flag and both 2-byte field lengths (6 bytes) besides the fields (PS3.7 D.3.3.7.1).
pub const MAX_IDENTITY_FIELDS: usize = 65535 - 6;

/// CA bundles of common systems, tried in order when no `--ca` is given.
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// Who the clinician is to the gateway.
pub enum Credentials {
    /// Only the TLS client certificate.
    Certificate,
    /// Type 2: username and passcode (read once, at start).
    Password { user: String, password: String },
    /// Type 5: a JWT from a file, re-read whenever the file changes.
    TokenFile(TokenFile),
}

impl std::fmt::Debug for Credentials {
    /// Never shows a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Certificate => f.write_str("the client certificate"),
            Credentials::Password { user, .. } => write!(f, "user {user} with a password"),
            Credentials::TokenFile(t) => write!(f, "the token in {}", t.path.display()),
        }
    }
}

/// A token file and what was read from it last, keyed by modification time and size.
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, u64, String)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> TokenFile {
        TokenFile {
            path,
            cached: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token, re-read when the file's modification time or size changed since the last read.
    pub fn token(&self) -> Result<String, ConnectError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| {
            ConnectError::Secret(format!(
                "cannot read the token file {}: {e}",
                self.path.display()
            ))
        })?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cached = match self.cached.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((modified, len, token)) = cached.as_ref()
            && (*modified, *len) == stamp
        {
            return Ok(token.clone());
        }
        let token = crate::tools::secret::token(None, Some(&self.path))
            .map_err(|e| ConnectError::Secret(e.to_string()))?
            .ok_or_else(|| ConnectError::Secret("no token".into()))?;
        if cached.is_some() {
            tracing::info!(file = %self.path.display(), "token file changed: using the new token");
        }
        *cached = Some((stamp.0, stamp.1, token.clone()));
        Ok(token)
    }
}

/// Seconds since the token expired, when its `exp` claim lies in the past (read without
/// verifying the signature: only to explain a rejection).
pub fn expired_for(token: &str) -> Option<u64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    (exp < now).then(|| now - exp)
}

/// A User Identity sub-item, refused when it would not fit its 16-bit lengths (dicom-ul's writer
/// would silently wrap them).
pub fn identity_item(
    kind: UserIdentityType,
    primary: &[u8],
    secondary: &[u8],
) -> Result<UserIdentity, ConnectError> {
    let what = match kind {
        UserIdentityType::Jwt => "token",
        _ => "user name and password",
    };
    if primary.len() + secondary.len() > MAX_IDENTITY_FIELDS {
        return Err(ConnectError::IdentityTooLarge {
            what,
            bytes: primary.len() + secondary.len(),
            limit: MAX_IDENTITY_FIELDS,
        });
    }
    Ok(UserIdentity::new(
        true,
        kind,
        primary.to_vec(),
        secondary.to_vec(),
    ))
}

/// Why the gateway could not be reached, or did not accept.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("gateway {address} unreachable: {message}")]
    Connect { address: String, message: String },
    #[error(
        "the gateway's certificate does not verify against {trust}: {message}; refusing to send credentials"
    )]
    Certificate { trust: String, message: String },
    #[error("TLS handshake with the gateway {address} failed: {message}")]
    Tls { address: String, message: String },
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error(transparent)]
    Credentials(#[from] ConnectError),
}

/// Where the gateway is and how to reach it.
pub struct Gateway {
    /// host:port
    pub address: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// What the certificate is verified against, for messages: "--ca FILE" or the system bundle.
    pub trust: String,
    pub credentials: Credentials,
    /// Bound on connect, handshake, and the answer to an association request.
    pub timeout: Duration,
}

/// TLS client settings for the gateway.
pub struct TlsFiles<'a> {
    pub ca: Option<&'a Path>,
    pub client: Option<(&'a Path, &'a Path)>,
}

impl Gateway {
    pub fn new(
        address: String,
        server_name: &str,
        tls: TlsFiles<'_>,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Gateway, ConnectError> {
        let (roots, trust) = match tls.ca {
            Some(ca) => (
                crate::tls::load_roots("gateway CA", ca)?,
                format!("--ca {}", ca.display()),
            ),
            None => system_roots()?,
        };
        let client_auth = match tls.client {
            None => None,
            Some((cert, key)) => Some((
                crate::tls::load_certificates("client certificate", cert)?,
                crate::tls::load_private_key(key)?,
            )),
        };
        let config = crate::tls::build_client_config(
            crate::tls::ServerVerification::Roots(roots),
            client_auth,
        )
        .map_err(|e| match (e, tls.client) {
            (crate::tls::ClientBuildError::ClientAuth(e), Some((cert, key))) => {
                ConnectError::TlsSetup(format!(
                    "{} and {} do not form a usable pair: {e}",
                    cert.display(),
                    key.display()
                ))
            }
            (
                crate::tls::ClientBuildError::Versions(e)
                | crate::tls::ClientBuildError::ClientAuth(e),
                _,
            ) => ConnectError::TlsSetup(e.to_string()),
        })?;
        let name = server_name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            ConnectError::Usage(format!("{name:?} is not a host name or IP address"))
        })?;
        Ok(Gateway {
            address,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            trust,
            credentials,
            timeout,
        })
    }

    /// The User Identity sub-item for the next association (None: certificate only).
    pub fn identity(&self) -> Result<Option<UserIdentity>, ConnectError> {
        match &self.credentials {
            Credentials::Certificate => Ok(None),
            Credentials::Password { user, password } => identity_item(
                UserIdentityType::UsernamePassword,
                user.as_bytes(),
                password.as_bytes(),
            )
            .map(Some),
            Credentials::TokenFile(file) => {
                identity_item(UserIdentityType::Jwt, file.token()?.as_bytes(), b"").map(Some)
            }
        }
    }

    /// Why a rejection may have happened, from what we know locally (an expired token).
    pub fn rejection_hint(&self) -> Option<String> {
        let Credentials::TokenFile(file) = &self.credentials else {
            return None;
        };
        let token = file.token().ok()?;
        expired_for(&token).map(|s| {
            format!(
                "the token in {} expired {s} s ago; refresh it",
                file.path().display()
            )
        })
    }

    /// `rq` as the gateway must see it: the clinician's User Identity instead of any the local
    /// client sent; everything else as the local client asked.
    pub fn request(&self, rq: &AssociationRQ) -> Result<Vec<u8>, ConnectError> {
        let mut rq = rq.clone();
        rq.user_variables
            .retain(|v| !matches!(v, UserVariableItem::UserIdentityItem(_)));
        let identity = self.identity()?;
        if let Some(identity) = identity.clone() {
            rq.user_variables
                .push(UserVariableItem::UserIdentityItem(identity));
        }
        let bytes = link::encode(&Pdu::AssociationRQ(rq))
            .map_err(|e| ConnectError::Encode(e.to_string()))?;
        // dicom-ul writes 16-bit item lengths with `as u16`: make sure nothing wrapped.
        let back = crate::ul::association::parse_request(&bytes)
            .map_err(|e| ConnectError::Encode(format!("the request does not read back: {e}")))?;
        if crate::ul::association::user_identity(&back) != identity.as_ref() {
            return Err(ConnectError::Encode(
                "the user identity does not fit the A-ASSOCIATE-RQ's user information item".into(),
            ));
        }
        Ok(bytes)
    }

    /// TCP and TLS to the gateway, each within the timeout, with the certificate verified.
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, OpenError> {
        let connect_error = |message: String| OpenError::Connect {
            address: self.address.clone(),
            message,
        };
        let tcp = match tokio::time::timeout(self.timeout, TcpStream::connect(&self.address)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => return Err(connect_error("connect timed out".into())),
        };
        let _ = tcp.set_nodelay(true);
        match tokio::time::timeout(
            self.timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                let tls_error = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                match tls_error {
                    Some(rustls::Error::InvalidCertificate(reason)) => {
                        Err(OpenError::Certificate {
                            trust: self.trust.clone(),
                            message: format!("invalid peer certificate: {reason:?}"),
                        })
                    }
                    _ => Err(OpenError::Tls {
                        address: self.address.clone(),
                        message: e.to_string(),
                    }),
                }
            }
            Err(_) => Err(OpenError::Tls {
                address: self.address.clone(),
                message: "handshake timed out".into(),
            }),
        }
    }

    /// Connect, send `request`, and read the gateway's answer.
    pub async fn open(&self, request: &[u8]) -> Result<(TlsStream<TcpStream>, Answer), OpenError> {
        let mut stream = self.connect().await?;
        let answer = link::exchange(&mut stream, request, self.timeout).await?;
        Ok((stream, answer))
    }
}

/// Trust anchors from the first system CA bundle found.
fn system_roots() -> Result<(rustls::RootCertStore, String), ConnectError> {
    for path in SYSTEM_CA_BUNDLES {
        let Ok(iter) = CertificateDer::pem_file_iter(path) else {
            continue;
        };
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(iter.flatten());
        if added > 0 {
            return Ok((roots, format!("the system CA bundle {path}")));
        }
    }
    Err(ConnectError::Usage(
        "no --ca given and no system CA bundle found: give --ca FILE, the CA that signs the gateway's certificate".into(),
    ))
}

/// An A-ASSOCIATE-RJ in words, e.g. "rejected permanently by the service provider (ACSE):
/// no reason given (1/2/1); from pacsgate this means: missing, wrong or expired credentials".
pub fn rejection_words(rj: &[u8]) -> String {
    let code = |i: usize| rj.get(i).copied().unwrap_or(0);
    let r = Rejection {
        result: code(7),
        source: code(8),
        reason: code(9),
    };
    let mut words = format!("{} ({}/{}/{})", r.words(), r.result, r.source, r.reason);
    if let Some(hint) = r.pacsgate_hint() {
        words.push_str("; from pacsgate this means: ");
        words.push_str(hint);
    }
    words
}

/// An A-ABORT in words.
pub fn abort_words(abort: &[u8]) -> String {
    let code = |i: usize| abort.get(i).copied().unwrap_or(0);
    crate::tools::client::Abort {
        source: code(8),
        reason: code(9),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_that_do_not_fit_are_refused() {
        let big = vec![b'x'; MAX_IDENTITY_FIELDS + 1];
        let err = identity_item(UserIdentityType::Jwt, &big, b"").unwrap_err();
        assert!(err.to_string().contains("token"), "{err}");
        assert!(identity_item(UserIdentityType::Jwt, &big[1..], b"").is_ok());
        assert!(identity_item(UserIdentityType::UsernamePassword, b"u", &big[1..]).is_err());
    }

    #[test]
    fn token_files_are_reread_when_they_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "aaa.bbb.ccc\n").expect("write");
        let file = TokenFile::new(path.clone());
        assert_eq!(file.token().expect("token"), "aaa.bbb.ccc");
        std::fs::write(&path, "dddd.eeee.ffff\n").expect("write");
        assert_eq!(file.token().expect("token"), "dddd.eeee.ffff");
        std::fs::write(&path, "not a token").expect("write");
        assert!(file.token().is_err());
        std::fs::remove_file(&path).expect("remove");
        assert!(file.token().is_err());
    }

    #[test]
    fn expiry_is_read_from_the_claims() {
        use base64::Engine;
        let enc = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let past = format!("x.{}.y", enc(&serde_json::json!({"exp": now - 100})));
        assert!(expired_for(&past).is_some_and(|s| s >= 100));
        let future = format!("x.{}.y", enc(&serde_json::json!({"exp": now + 100})));
        assert_eq!(expired_for(&future), None);
        assert_eq!(expired_for("garbage"), None);
    }

    #[test]
    fn rejections_read_as_words() {
        let words = rejection_words(&crate::ul::pdu::associate_rj(1, 2, 1));
        assert!(words.contains("rejected permanently"), "{words}");
        assert!(words.contains("(1/2/1)"), "{words}");
        assert!(words.contains("credentials"), "{words}");
    }
}
