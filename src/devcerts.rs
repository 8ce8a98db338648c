//! Development certificates with rcgen: a local CA, a server certificate and client certificates.
//! For trying pacsgate out and for tests; production uses the site's own CA (see certs/README.md).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, SanType,
};

/// What went wrong making or writing certificates, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Generate { what: String, message: String },
}

/// The files `generate` wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// (name, certificate, key) per client.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
    /// true when an existing CA in the folder was reused.
    pub reused_ca: bool,
}

/// Validity of development certificates.
const VALID_DAYS: i64 = 365;

fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertsError {
    let what = what.into();
    move |e| CertsError::Generate {
        what,
        message: e.to_string(),
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time_now();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Write a file; private keys get mode 0600 from the start, never a wider one.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

fn load_or_make_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, bool), CertsError> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert_path.exists() && key_path.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(gen_err(format!("CA key {}", key_path.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, key)
            .map_err(gen_err(format!("CA certificate {}", cert_path.display())))?;
        return Ok((issuer, true));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("CA key"))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "pacsgate development CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pacsgate (development only)");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params);
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    Ok((Issuer::new(params, key), false))
}

/// Make (or extend) a development PKI in `dir`: the CA is reused when `ca.crt` and `ca.key` exist,
/// the server certificate (RSA 2048, so that old TLS 1.2 peers find a suite) names `hosts`, and each
/// client certificate (ECDSA P-256) carries the client's name as subject CN and SAN.
pub fn generate(dir: &Path, hosts: &[String], clients: &[String]) -> Result<DevCerts, CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (ca, reused_ca) = load_or_make_ca(dir)?;

    let server_key = KeyPair::generate_for(&PKCS_RSA_SHA256).map_err(gen_err("server key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("server"))?;
    for host in hosts {
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .map_err(gen_err(format!("host name {host:?}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    let cn = hosts.first().map(String::as_str).unwrap_or("localhost");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let cert = params
        .signed_by(&server_key, &ca)
        .map_err(gen_err("server certificate"))?;
    let (server_cert, server_key_path) = (dir.join("server.crt"), dir.join("server.key"));
    write_file(&server_cert, cert.pem().as_bytes(), false)?;
    write_file(
        &server_key_path,
        server_key.serialize_pem().as_bytes(),
        true,
    )?;

    let mut out_clients = Vec::new();
    for name in clients {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(gen_err(format!("key for {name}")))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err(name.clone()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        if let Ok(dns) = name.clone().try_into() {
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        let cert = params
            .signed_by(&key, &ca)
            .map_err(gen_err(format!("certificate for {name}")))?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let (c, k) = (
            dir.join(format!("{safe}.crt")),
            dir.join(format!("{safe}.key")),
        );
        write_file(&c, cert.pem().as_bytes(), false)?;
        write_file(&k, key.serialize_pem().as_bytes(), true)?;
        out_clients.push((name.clone(), c, k));
    }
    Ok(DevCerts {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert,
        server_key: server_key_path,
        clients: out_clients,
        reused_ca,
    })
}

/// An ES256 signing key pair for development tokens: (private PKCS#8 PEM, public SPKI PEM).
pub fn jwt_keypair(dir: &Path) -> Result<(PathBuf, PathBuf), CertsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("JWT key"))?;
    let (private, public) = (dir.join("jwt-signing.key"), dir.join("jwt-public.pem"));
    write_file(&private, key.serialize_pem().as_bytes(), true)?;
    write_file(&public, key.public_key_pem().as_bytes(), false)?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_reuses_the_ca_and_keys_stay_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = generate(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            &["alice".into()],
        )
        .expect("first");
        assert!(!first.reused_ca);
        let ca = std::fs::read(&first.ca_cert).expect("ca");
        let second = generate(dir.path(), &["localhost".into()], &["bob".into()]).expect("second");
        assert!(second.reused_ca);
        assert_eq!(std::fs::read(&second.ca_cert).expect("ca"), ca);
        for key in [&first.ca_key, &first.server_key, &second.clients[0].2] {
            let mode = std::fs::metadata(key).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // The client certificate verifies against the CA and carries the name.
        use rustls::pki_types::pem::PemObject;
        let der =
            rustls::pki_types::CertificateDer::from_pem_file(&second.clients[0].1).expect("pem");
        assert_eq!(crate::auth::certificate::names(&der)[0], "bob");
        let _ = crate::tls::load_roots("CA", &second.ca_cert).expect("roots");
    }
}
