//! Test PKI made at test time with rcgen (never committed): a CA, server and client certificates, JWT signing keys, and token helpers.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize,
};
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Certificates and keys in a temp dir (PEM files; private keys PKCS#8, mode 0600).
/// All certificates are ECDSA P-256 unless the name says RSA.
pub struct Pki {
    /// The trusted CA's certificate.
    pub ca_cert: PathBuf,
    /// Server certificate for localhost, 127.0.0.1 and ::1, signed by the CA (serverAuth).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A second CA that nothing trusts, for "signed by a stranger" tests.
    pub other_ca_cert: PathBuf,
    /// ES256 signing key (PKCS#8 PEM) and its public key (SPKI PEM).
    pub jwt_private_pem: PathBuf,
    pub jwt_public_pem: PathBuf,
    /// An unrelated ES256 pair, for "token signed by another key" tests.
    pub other_jwt_private_pem: PathBuf,
    pub other_jwt_public_pem: PathBuf,
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key")
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = p256();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pacsgate tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign the test CA");
    (cert.pem(), Issuer::new(params, key))
}

fn write_file(path: &Path, contents: &str, private: bool) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Leaf certificate parameters: CN = `cn`, the given SANs, one EKU, valid 1975..4096.
fn leaf_params(cn: &str, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate SANs");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params
}

impl Pki {
    /// Generates the CA, the server pair, a second CA and two JWT key pairs (ECDSA P-256; ~10 ms).
    pub fn generate() -> Pki {
        let dir = super::tempdir("pki");
        let d = dir.path();
        let (ca_pem, ca) = new_ca("pacsgate test CA");
        let (other_ca_pem, other_ca) = new_ca("untrusted test CA");
        let ca_cert = d.join("ca.crt");
        let other_ca_cert = d.join("other-ca.crt");
        write_file(&ca_cert, &ca_pem, false);
        write_file(&other_ca_cert, &other_ca_pem, false);

        let server_cert = d.join("server.crt");
        let server_key = d.join("server.key");
        let key = p256();
        let cert = leaf_params(
            "localhost",
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .signed_by(&key, &ca)
        .expect("sign the server certificate");
        write_file(&server_cert, &cert.pem(), false);
        write_file(&server_key, &key.serialize_pem(), true);

        let jwt = |name: &str| {
            let key = p256();
            let private = d.join(format!("{name}.key"));
            let public = d.join(format!("{name}.pub.pem"));
            write_file(&private, &key.serialize_pem(), true);
            write_file(&public, &key.public_key_pem(), false);
            (private, public)
        };
        let (jwt_private_pem, jwt_public_pem) = jwt("jwt");
        let (other_jwt_private_pem, other_jwt_public_pem) = jwt("other-jwt");

        Pki {
            ca_cert,
            server_cert,
            server_key,
            other_ca_cert,
            jwt_private_pem,
            jwt_public_pem,
            other_jwt_private_pem,
            other_jwt_public_pem,
            ca,
            other_ca,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn issue(
        &self,
        issuer: &Issuer<'static, KeyPair>,
        file_stem: &str,
        name: &str,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let key = p256();
        let mut params = leaf_params(name, &[name], ExtendedKeyUsagePurpose::ClientAuth);
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params
            .signed_by(&key, issuer)
            .unwrap_or_else(|e| panic!("sign client certificate {name}: {e}"));
        let cert_path = self.dir.path().join(format!("{file_stem}.crt"));
        let key_path = self.dir.path().join(format!("{file_stem}.key"));
        write_file(&cert_path, &cert.pem(), false);
        write_file(&key_path, &key.serialize_pem(), true);
        (cert_path, key_path)
    }

    /// A client certificate (clientAuth) with CN = `name` and SAN DNS `name`, signed by the
    /// trusted CA. Returns (cert path, key path). `name` must be a valid DNS name.
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue(&self.ca, &format!("client-{name}"), name, false)
    }

    /// Like [`Pki::client`] but signed by the untrusted second CA.
    pub fn other_ca_client(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue(
            &self.other_ca,
            &format!("other-ca-client-{name}"),
            name,
            false,
        )
    }

    /// Like [`Pki::client`] but with the given extended key usages (none: no EKU extension at all)
    /// and key usages (none: no Key Usage extension). `file_stem` names the files.
    pub fn client_with_usages(
        &self,
        file_stem: &str,
        name: &str,
        ekus: &[ExtendedKeyUsagePurpose],
        key_usages: &[KeyUsagePurpose],
    ) -> (PathBuf, PathBuf) {
        let key = p256();
        let mut params = leaf_params(name, &[name], ExtendedKeyUsagePurpose::ClientAuth);
        params.extended_key_usages = ekus.to_vec();
        params.key_usages = key_usages.to_vec();
        let cert = params
            .signed_by(&key, &self.ca)
            .unwrap_or_else(|e| panic!("sign client certificate {name}: {e}"));
        let cert_path = self.dir.path().join(format!("{file_stem}.crt"));
        let key_path = self.dir.path().join(format!("{file_stem}.key"));
        write_file(&cert_path, &cert.pem(), false);
        write_file(&key_path, &key.serialize_pem(), true);
        (cert_path, key_path)
    }

    /// Like [`Pki::client`] but expired (valid 2000-01-01 .. 2001-01-01).
    pub fn expired_client(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue(&self.ca, &format!("expired-client-{name}"), name, true)
    }

    /// An RSA-2048 server certificate (same names, same CA) for peers that need ECDHE_RSA
    /// suites. Returns (cert path, key path). Takes a fraction of a second.
    pub fn rsa_server(&self) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)
            .expect("generate an RSA-2048 key");
        let cert = leaf_params(
            "localhost",
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .signed_by(&key, &self.ca)
        .expect("sign the RSA server certificate");
        let cert_path = self.dir.path().join("server-rsa.crt");
        let key_path = self.dir.path().join("server-rsa.key");
        write_file(&cert_path, &cert.pem(), false);
        write_file(&key_path, &key.serialize_pem(), true);
        (cert_path, key_path)
    }
}

/// Seconds since the Unix epoch, for `iat` / `nbf` / `exp` claims.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An ES256 JWT over `claims`, signed with the PKCS#8 P-256 key in `private_pem`. Like an identity
/// provider, it adds `iat` (now) when `claims` has none (the gateway requires it); use
/// [`mint_jwt_exact`] to sign the claims as given.
pub fn mint_jwt(private_pem: &Path, claims: &Value) -> String {
    let mut claims = claims.clone();
    if let Some(map) = claims.as_object_mut() {
        map.entry("iat").or_insert_with(|| now().into());
    }
    mint_jwt_exact(private_pem, &claims)
}

/// An ES256 JWT over exactly `claims` (no `iat` added).
pub fn mint_jwt_exact(private_pem: &Path, claims: &Value) -> String {
    let pem = std::fs::read(private_pem)
        .unwrap_or_else(|e| panic!("read JWT key {}: {e}", private_pem.display()));
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).expect("JWT key is a P-256 PEM");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        claims,
        &key,
    )
    .expect("sign JWT")
}

/// An unsigned token `{"alg":"none","typ":"JWT"}.claims.` (empty signature), built by hand
/// for the negative test: a verifier must refuse it.
pub fn jwt_alg_none(claims: &Value) -> String {
    let header = br#"{"alg":"none","typ":"JWT"}"#;
    format!(
        "{}.{}.",
        base64url(header),
        base64url(claims.to_string().as_bytes())
    )
}

/// Base64url without padding (RFC 7515 section 2).
pub fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
