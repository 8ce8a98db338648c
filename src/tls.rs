//! The TLS edge: the rustls server config (PS3.15 B.12: TLS 1.2/1.3, ECDHE, AEAD) and client certificate loading.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

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

/// The listener's server config: our chain and key, and when `client_ca` is set, client certificates
/// verified against it (optional unless `require_client_certificate`) and against `client_crl`.
/// With CRLs, every certificate in a client's chain below the trust anchor must be covered by one of
/// them: a certificate whose revocation status is unknown fails the handshake like a revoked one.
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
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
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup {
            path: tls.private_key.clone(),
            message: format!("certificate and private key do not form a usable pair: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// A client config for the gateway's own outgoing TLS (e.g. to a C-MOVE destination): the CA that
/// signs the peer's certificate, and optionally the gateway's client certificate and key.
pub fn client_config(
    ca: &Path,
    certificate: Option<&Path>,
    private_key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = load_roots("destination CA", ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup {
            path: ca.to_path_buf(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match (certificate, private_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                load_certificates("certificate", cert)?,
                load_private_key(key)?,
            )
            .map_err(|e| TlsError::Setup {
                path: key.to_path_buf(),
                message: format!("certificate and private key do not form a usable pair: {e}"),
            })?,
        _ => builder.with_no_client_auth(),
    };
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
