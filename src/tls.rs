//! The TLS edge: the rustls server configs (PS3.15 B.12: TLS 1.2/1.3, ECDHE, AEAD), one per door (DICOM,
//! HTTPS with ALPN), client certificates held to their purpose (clientAuth EKU, Key Usage fit for
//! signing), no session resumption where client certificates are verified, and certificate loading.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, RootCertStore, ServerConfig};

use crate::config::Tls;

/// What is wrong with the TLS files, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS setup with {path}: {message}")]
    Setup { path: PathBuf, message: String },
}

/// Load a PEM certificate chain.
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

/// Load a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Load trust anchors from a PEM file.
pub fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(what, path)? {
        roots.add(cert).map_err(|e| TlsError::Setup {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Load certificate revocation lists, PEM (`-----BEGIN X509 CRL-----`, several per file) or DER (one per file).
/// Each must parse: a CRL that cannot be read is an error, never an empty list (fail closed).
/// A CRL past its nextUpdate is still used, with a warning.
pub fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let mut crls = Vec::new();
    for path in paths {
        let read = |message: String| TlsError::Read {
            what: "client CRL",
            path: path.clone(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| read(e.to_string()))?;
        let found: Vec<CertificateRevocationListDer<'static>> = if bytes.trim_ascii().is_empty() {
            Vec::new()
        } else if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| read(e.to_string()))?
        } else {
            vec![CertificateRevocationListDer::from(bytes)]
        };
        if found.is_empty() {
            return Err(TlsError::Empty {
                what: "client CRL",
                path: path.clone(),
                expected: "X509 CRL",
            });
        }
        for crl in &found {
            let parsed = match CertificateRevocationList::from_der(crl) {
                Ok(([], parsed)) => parsed,
                Ok(_) => return Err(read("trailing bytes after the CRL".into())),
                Err(e) => return Err(read(format!("not a CRL: {e}"))),
            };
            if let Some(next) = parsed.next_update()
                && next < x509_parser::time::ASN1Time::now()
            {
                tracing::warn!(
                    path = %path.display(),
                    issuer = %parsed.issuer(),
                    next_update = %next,
                    "client CRL is past its next update; revocation is still checked against it: refresh it"
                );
            }
        }
        crls.extend(found);
    }
    Ok(crls)
}

/// A private key file that others may read deserves a warning, not a refusal.
pub fn key_permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "private key {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}

/// Which door a server config is for. Each has its own config, so its own session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `[gateway] listen`: DICOM over TLS (PS3.15 B.12). No ALPN, no session resumption at all: an
    /// association is long and its handshake cheap next to it, and every certificate is checked in full.
    Dicom,
    /// `[http] listen`: HTTPS, ALPN `http/1.1` (the door serves HTTP/1.1 only). Session resumption
    /// only when no client certificates are verified (`[tls] client_ca` unset).
    Web,
}

/// Why a client certificate that chains to `client_ca` is still refused: it is not meant for
/// client authentication.
#[derive(Debug, thiserror::Error)]
pub enum PurposeError {
    #[error(
        "client certificate has no extended key usage extension: clientAuth (1.3.6.1.5.5.7.3.2) is required"
    )]
    NoExtendedKeyUsage,
    #[error("client certificate's extended key usage does not include clientAuth")]
    NoClientAuth,
    #[error("client certificate's key usage does not include digitalSignature")]
    KeyUsage,
    #[error("client certificate cannot be parsed: {0}")]
    Unparsable(String),
}

/// The purpose of a client's end-entity certificate: the extended key usage must be present and
/// include clientAuth (an absent extension, which RFC 5280 reads as "any", is refused, and so is
/// anyExtendedKeyUsage alone); the key usage, when present, must include digitalSignature (what a
/// TLS client does with its key).
pub fn check_client_purpose(der: &[u8]) -> Result<(), PurposeError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PurposeError::Unparsable(e.to_string()))?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => {}
        Ok(Some(_)) => return Err(PurposeError::NoClientAuth),
        Ok(None) => return Err(PurposeError::NoExtendedKeyUsage),
        Err(e) => return Err(PurposeError::Unparsable(e.to_string())),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => Err(PurposeError::KeyUsage),
        Ok(_) => Ok(()),
        Err(e) => Err(PurposeError::Unparsable(e.to_string())),
    }
}

/// webpki's verifier (chain, validity, CRLs, an EKU that excludes clientAuth), then
/// [`check_client_purpose`].
#[derive(Debug)]
struct ClientPurposeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ClientPurposeVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_client_purpose(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                // rustls's own variant (alert unsupported_certificate).
                PurposeError::NoExtendedKeyUsage | PurposeError::NoClientAuth => {
                    CertificateError::InvalidPurpose
                }
                other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
            })
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The reason a TLS handshake failed, for the log line: rustls's message, with the client
/// certificate purpose checks said in full.
pub fn handshake_failure(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake: {e}");
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose) => {
            "TLS handshake: client certificate refused: its extended key usage must include clientAuth"
                .to_string()
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            format!("TLS handshake: client certificate refused: {other}")
        }
        other => format!("TLS handshake: {other}"),
    }
}

/// The DICOM door's server config (see [`server_config_for`]).
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_for(tls, Door::Dicom)
}

/// A door's server config: our chain and key, and when `client_ca` is set, client certificates
/// verified against it (optional unless `require_client_certificate`), against `client_crl`, and
/// for their purpose ([`check_client_purpose`]).
/// With CRLs, every certificate in a client's chain below the trust anchor must be covered by one of
/// them: a certificate whose revocation status is unknown fails the handshake like a revoked one.
///
/// Session resumption (stateful cache and TLS 1.3 tickets) is off on the DICOM door, and on the web
/// door whenever client certificates are verified: a resumed session would carry a certificate
/// identity without the chain, validity and purpose checks of a full handshake.
pub fn server_config_for(tls: &Tls, door: Door) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = load_certificates("certificate", &tls.certificate)?;
    let key = load_private_key(&tls.private_key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup {
            path: tls.certificate.clone(),
            message: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots("client CA", ca)?;
            let crls = load_crls(&tls.client_crl)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls);
            let verifier = if tls.require_client_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::Setup {
                path: tls.client_crl.first().unwrap_or(ca).clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(Arc::new(ClientPurposeVerifier { inner: verifier }))
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup {
            path: tls.private_key.clone(),
            message: format!("certificate and private key do not form a usable pair: {e}"),
        })?;
    let resumption = door == Door::Web && tls.client_ca.is_none();
    if !resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.ticketer = Arc::new(NoTickets);
    }
    if door == Door::Web {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(config))
}

/// A ticketer that never issues a ticket (rustls's default is the same; set here so the choice is
/// visible and does not move with a rustls default).
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// How a client config checks the server's certificate.
pub enum ServerVerification {
    /// The chain must lead to one of these roots (WebPKI).
    Roots(RootCertStore),
    /// A custom verifier (the tools' TLS probe, which accepts any certificate).
    Custom(Arc<dyn rustls::client::danger::ServerCertVerifier>),
}

/// Which step of [`build_client_config`] failed; each caller words the error in its own terms.
#[derive(Debug)]
pub enum ClientBuildError {
    /// The provider refused the protocol versions.
    Versions(rustls::Error),
    /// The client certificate and key do not form a usable pair.
    ClientAuth(rustls::Error),
}

/// The one TLS client builder (tools, connect, the gateway's outgoing TLS): the aws-lc-rs provider,
/// TLS 1.3 and 1.2, the given server verification, and a client certificate when given.
pub fn build_client_config(
    verification: ServerVerification,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, ClientBuildError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(ClientBuildError::Versions)?;
    let builder = match verification {
        ServerVerification::Roots(roots) => builder.with_root_certificates(roots),
        ServerVerification::Custom(verifier) => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier),
    };
    match client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(ClientBuildError::ClientAuth),
    }
}

/// A client config for the gateway's own outgoing TLS (e.g. to a C-MOVE destination): the CA that
/// signs the peer's certificate, and optionally the gateway's client certificate and key.
pub fn client_config(
    ca: &Path,
    certificate: Option<&Path>,
    private_key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load_roots("destination CA", ca)?;
    let client_auth = match (certificate, private_key) {
        (Some(cert), Some(key)) => Some((
            load_certificates("certificate", cert)?,
            load_private_key(key)?,
        )),
        _ => None,
    };
    let config = build_client_config(ServerVerification::Roots(roots), client_auth).map_err(
        |e| match e {
            ClientBuildError::Versions(e) => TlsError::Setup {
                path: ca.to_path_buf(),
                message: e.to_string(),
            },
            ClientBuildError::ClientAuth(e) => TlsError::Setup {
                path: private_key.unwrap_or(ca).to_path_buf(),
                message: format!("certificate and private key do not form a usable pair: {e}"),
            },
        },
    )?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crl() -> (String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::Issuer::new(params, key);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2090, 1, 1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("CRL");
        (crl.pem().expect("pem"), crl.der().to_vec())
    }

    #[test]
    fn crls_load_as_pem_or_der_and_anything_else_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pem, der) = crl();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let good = [write("a.crl", pem.as_bytes()), write("b.der", &der)];
        assert_eq!(load_crls(&good).expect("load").len(), 2);
        for (name, bytes) in [
            ("empty.crl", &b""[..]),
            ("garbage.crl", b"\x30\x03\x02\x01"),
            (
                "certificate.pem",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
        ] {
            let path = write(name, bytes);
            let err = load_crls(std::slice::from_ref(&path))
                .expect_err(name)
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        assert!(load_crls(&[dir.path().join("missing.crl")]).is_err());
    }
}
