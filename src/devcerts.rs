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
    #[error(
        "{0} is a symbolic link: refusing to write through it (remove it, or choose another folder)"
    )]
    Symlink(PathBuf),
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
    /// true when no host was given and the folder's server.crt / server.key were kept.
    pub reused_server: bool,
}

/// The host names a server certificate is issued for when none is given and none exists yet.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The file names a run will write, refused up front if one is a symlink, so that a refused run writes
/// nothing (not half a set).
fn refuse_planted_links(paths: &[PathBuf]) -> Result<(), CertsError> {
    for path in paths {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(CertsError::Symlink(path.clone()));
        }
    }
    Ok(())
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

/// Write a file without ever following a symbolic link: a planted symlink at `path` is refused; the
/// bytes go to a new file (O_CREAT | O_EXCL | O_NOFOLLOW) beside it, which then replaces `path` by
/// rename (which replaces a directory entry, never the target of a link). Private keys get mode
/// 0600 from their creation, never a wider one.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(CertsError::Symlink(path.to_path_buf()));
        }
        Ok(m) if !m.file_type().is_file() => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a regular file",
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("no file name")))?;
    let temporary = path.with_file_name(format!(
        ".{}.new-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(if private { 0o600 } else { 0o644 });
    let mut f = options
        .open(&temporary)
        .map_err(|source| CertsError::Write {
            path: temporary.clone(),
            source,
        })?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(err(e));
    }
    Ok(())
}

/// Create a folder (and its parents) and refuse one that is a symbolic link.
fn make_folder(dir: &Path) -> Result<(), CertsError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(CertsError::Symlink(dir.to_path_buf())),
        _ => std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn load_or_make_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, bool), CertsError> {
    make_folder(dir)?;
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
    generate_with_ca(dir, dir, hosts, clients)
}

/// [`generate`] with the CA (ca.crt, ca.key) kept in `ca_dir`, e.g. off the gateway's folder: `dir`
/// gets a copy of ca.crt (what the gateway and clients trust), never the CA's key.
pub fn generate_with_ca(
    dir: &Path,
    ca_dir: &Path,
    hosts: &[String],
    clients: &[String],
) -> Result<DevCerts, CertsError> {
    make_folder(dir)?;
    let (ca, reused_ca) = load_or_make_ca(ca_dir)?;
    if ca_dir != dir {
        let ca_cert = ca_dir.join("ca.crt");
        let pem = std::fs::read(&ca_cert).map_err(|source| CertsError::Read {
            path: ca_cert.clone(),
            source,
        })?;
        write_file(&dir.join("ca.crt"), &pem, false)?;
    }

    let (server_cert, server_key_path) = (dir.join("server.crt"), dir.join("server.key"));
    // Without --host, an existing server pair is kept (a run that only adds clients must not replace
    // the certificate the gateway serves); with --host, or when there is none, it is issued.
    let reused_server = hosts.is_empty() && server_cert.is_file() && server_key_path.is_file();
    let mut targets: Vec<PathBuf> = clients
        .iter()
        .flat_map(|n| {
            let (c, k) = client_paths(dir, n);
            [c, k]
        })
        .collect();
    if !reused_server {
        targets.extend([server_cert.clone(), server_key_path.clone()]);
    }
    refuse_planted_links(&targets)?;
    if !reused_server {
        let default_hosts: Vec<String> = DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
        let hosts = if hosts.is_empty() {
            &default_hosts[..]
        } else {
            hosts
        };
        issue_server(&ca, hosts, &server_cert, &server_key_path)?;
    }

    let mut out_clients = Vec::new();
    for name in clients {
        let (c, k) = issue_client(&ca, dir, name)?;
        out_clients.push((name.clone(), c, k));
    }
    Ok(DevCerts {
        ca_cert: dir.join("ca.crt"),
        ca_key: ca_dir.join("ca.key"),
        server_cert,
        server_key: server_key_path,
        clients: out_clients,
        reused_ca,
        reused_server,
    })
}

/// A client name as a file name: letters, digits, `-` and `.` kept, anything else `_`.
fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The certificate and key files of client `name` in `dir`.
fn client_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let safe = safe_name(name);
    (
        dir.join(format!("{safe}.crt")),
        dir.join(format!("{safe}.key")),
    )
}

/// Issues a client certificate (ECDSA P-256, `name` as subject CN and, when it is one, DNS SAN)
/// and writes it with its key into `dir`; returns their paths.
fn issue_client(
    ca: &Issuer<'static, KeyPair>,
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf), CertsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(gen_err(format!("key for {name}")))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(gen_err(name.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, name);
    if let Ok(dns) = name.to_string().try_into() {
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params);
    let cert = params
        .signed_by(&key, ca)
        .map_err(gen_err(format!("certificate for {name}")))?;
    let (c, k) = client_paths(dir, name);
    write_file(&c, cert.pem().as_bytes(), false)?;
    write_file(&k, key.serialize_pem().as_bytes(), true)?;
    Ok((c, k))
}

/// Issues the server certificate for `hosts` (DNS names or IP addresses) and writes it with its key.
fn issue_server(
    ca: &Issuer<'static, KeyPair>,
    hosts: &[String],
    server_cert: &Path,
    server_key_path: &Path,
) -> Result<(), CertsError> {
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
        .signed_by(&server_key, ca)
        .map_err(gen_err("server certificate"))?;
    write_file(server_cert, cert.pem().as_bytes(), false)?;
    write_file(server_key_path, server_key.serialize_pem().as_bytes(), true)?;

    Ok(())
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
    fn a_run_without_hosts_keeps_the_server_pair_and_a_refused_run_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = generate(dir.path(), &["pacs-gw.example.org".into()], &[]).expect("first");
        let (cert, key) = (
            std::fs::read(&first.server_cert).expect("cert"),
            std::fs::read(&first.server_key).expect("key"),
        );
        let second = generate(dir.path(), &[], &["nurse.joy".into()]).expect("second");
        assert!(second.reused_server);
        assert_eq!(std::fs::read(&second.server_cert).expect("cert"), cert);
        assert_eq!(std::fs::read(&second.server_key).expect("key"), key);
        assert!(dir.path().join("nurse.joy.key").is_file());
        // A planted link at one client's key: refused before anything is written.
        std::os::unix::fs::symlink("/nonexistent-target", dir.path().join("bob.key"))
            .expect("link");
        let err = generate(dir.path(), &["other.example.org".into()], &["bob".into()])
            .expect_err("refused");
        assert!(matches!(err, CertsError::Symlink(_)), "{err}");
        assert_eq!(
            std::fs::read(&second.server_cert).expect("cert"),
            cert,
            "server pair rewritten"
        );
        assert!(!dir.path().join("bob.crt").exists(), "half a pair written");
        // With --host the pair is issued again.
        let third = generate(dir.path(), &["other.example.org".into()], &[]).expect("third");
        assert!(!third.reused_server);
        assert_ne!(std::fs::read(&third.server_cert).expect("cert"), cert);
    }

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

    #[test]
    fn a_planted_symlink_is_refused_and_its_target_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, "precious").expect("write");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        std::os::unix::fs::symlink(&target, out.join("server.key")).expect("symlink");
        let err = generate(&out, &["localhost".into()], &[]).unwrap_err();
        assert!(matches!(err, CertsError::Symlink(_)), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "precious");
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "the target's mode is untouched");

        // A folder that is a symlink is refused too; a regular file is replaced, not written through.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("linked")).expect("symlink");
        assert!(matches!(
            generate(&dir.path().join("linked"), &["localhost".into()], &[]),
            Err(CertsError::Symlink(_))
        ));
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "old").expect("write");
        write_file(&plain, b"new", true).expect("replace");
        assert_eq!(std::fs::read_to_string(&plain).expect("read"), "new");
        let mode = std::fs::metadata(&plain)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_ca_key_can_live_in_another_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (gw, ca) = (dir.path().join("gateway"), dir.path().join("ca"));
        let made =
            generate_with_ca(&gw, &ca, &["localhost".into()], &["alice".into()]).expect("generate");
        assert!(
            !gw.join("ca.key").exists(),
            "no CA key in the gateway's folder"
        );
        assert!(ca.join("ca.key").exists() && gw.join("ca.crt").exists());
        assert_eq!(made.ca_key, ca.join("ca.key"));
        assert_eq!(
            std::fs::read(gw.join("ca.crt")).expect("copy"),
            std::fs::read(ca.join("ca.crt")).expect("ca")
        );
        let again =
            generate_with_ca(&gw, &ca, &["localhost".into()], &["bob".into()]).expect("again");
        assert!(again.reused_ca);
    }
}
