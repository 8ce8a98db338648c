//! `pacsgate demo`: the gateway in front of the embedded in-memory archive, on loopback, with
//! development certificates, demo users and a generated pacsgate.toml in one clearly named folder.
//!
//! - `archive/` the embedded demo archive (C-ECHO, C-FIND, C-STORE, C-GET over synthetic data)
//! - `mod.rs`   the folder (certificates, keys, token, sample file, config), the start of archive
//!   and gateway
//! - `instructions.rs` what is printed for the user: how to connect, the query guard tried

pub mod archive;
mod instructions;

use instructions::python_snippet;
pub use instructions::{Tried, guard_lines, instructions, shell_quote};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::devcerts::{self, CertsError};
use crate::gateway::{Gateway, ServerError, State};
use archive::{DEMO_UID_ROOT, DemoArchive};

/// The called AE title clients use.
pub const CALLED_AE: &str = "DEMO";
/// The demo archive's own AE title.
pub const ARCHIVE_AE: &str = "DEMO-ARCHIVE";
/// The password user and its obviously-demo password.
pub const PASSWORD_USER: &str = "demo";
pub const PASSWORD: &str = "demo-password";
/// The reading user: a role without `unrestricted_queries`, so the query guard applies to it.
pub const READER_USER: &str = "reader";
pub const READER_PASSWORD: &str = "reader-password";
pub const READER_ROLE: &str = "reader";
/// The port the demo keeps when it is free (the usual DICOM port; otherwise a free loopback port).
pub const DEFAULT_PORT: u16 = 11112;
/// The user of the client certificate (its subject CN).
pub const CERTIFICATE_USER: &str = "demo-cert";
/// The subject of the demo token.
pub const TOKEN_USER: &str = "demo-token";
/// The role of the demo users but the reader (it may list everything: demo data only).
pub const ROLE: &str = "demo";
/// Issuer and audience of the demo token.
pub const TOKEN_ISSUER: &str = "pacsgate-demo";
pub const TOKEN_AUDIENCE: &str = "pacsgate";
/// The demo token's lifetime.
pub const TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);
/// The file that marks a folder as made by `pacsgate demo`.
const MARKER: &str = "README.txt";
const MARKER_FIRST_LINE: &str = "This folder was made by `pacsgate demo`.";

/// What stops the demo from starting.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "--listen {0}: the demo listens on loopback only (127.0.0.1 or [::1]), e.g. --listen 127.0.0.1:11112"
    )]
    NotLoopback(SocketAddr),
    #[error(
        "{0} exists and was not made by `pacsgate demo` (it has files but no {MARKER}); choose another --dir"
    )]
    ForeignFolder(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] CertsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot make the demo token: {0}")]
    Token(#[from] crate::auth::jwt::MintError),
    #[error("{0}")]
    Other(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::Io { what, path, source }
}

/// The files of a demo folder.
#[derive(Debug, Clone)]
pub struct DemoFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub token: PathBuf,
    /// Unix time the token expires.
    pub token_expires: u64,
    pub sample: PathBuf,
    pub python_client: PathBuf,
    /// true when certificates and keys from an earlier run were reused.
    pub reused: bool,
}

/// A running demo: the gateway bound to its listener, the archive serving in a task.
pub struct Demo {
    pub files: DemoFiles,
    pub listen: SocketAddr,
    /// Why the demo does not listen on the default port, when it does not.
    pub port_note: Option<String>,
    pub archive_address: SocketAddr,
    pub instances: usize,
    pub gateway: Gateway,
    listener: Option<TcpListener>,
    archive_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.archive_task.abort();
    }
}

/// Refuse a folder that has files but was not made by the demo, so that `--dir /etc/pacsgate`
/// cannot overwrite a real server key. Creates the folder (mode 700) when missing.
fn claim_folder(dir: &Path) -> Result<(), DemoError> {
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(CertsError::Symlink(dir.to_path_buf()).into());
    }
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io("cannot read the folder", dir))?;
        let empty = entries.next().is_none();
        let ours = std::fs::read_to_string(dir.join(MARKER))
            .is_ok_and(|t| t.starts_with(MARKER_FIRST_LINE));
        if !empty && !ours {
            return Err(DemoError::ForeignFolder(dir.to_path_buf()));
        }
    } else {
        std::fs::create_dir_all(dir).map_err(io("cannot create the folder", dir))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("cannot set the mode of", dir))?;
    }
    let marker = format!(
        "{MARKER_FIRST_LINE}\n\n\
         Development certificates and keys, demo users and the generated pacsgate.toml of the demo.\n\
         Nothing here is fit for real patient data. Delete the folder to start afresh.\n\
         - ca.crt / ca.key            the development CA\n\
         - server.crt / server.key    the gateway's certificate (localhost, 127.0.0.1, ::1)\n\
         - {CERTIFICATE_USER}.crt / .key  the client certificate of user {CERTIFICATE_USER}\n\
         - jwt-signing.key / jwt-public.pem  the key pair of the demo tokens\n\
         - demo.jwt                   a token for user {TOKEN_USER} (renewed at each start)\n\
         - pacsgate.toml              the gateway's configuration (rewritten at each start)\n\
         - sample.dcm                 one small image to store\n\
         - demo_client.py             a pynetdicom client\n"
    );
    devcerts::write_file(&dir.join(MARKER), marker.as_bytes(), false)?;
    Ok(())
}

/// Certificates, keys, token, sample file and client script; reuses certificates and keys from an
/// earlier run. `progress` is told about anything slow.
pub fn prepare_files(
    dir: &Path,
    listen: SocketAddr,
    progress: &mut dyn FnMut(&str),
) -> Result<DemoFiles, DemoError> {
    claim_folder(dir)?;
    let cert_files = [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        &format!("{CERTIFICATE_USER}.crt"),
        &format!("{CERTIFICATE_USER}.key"),
    ]
    .map(|f| dir.join(f));
    let reused_certs = cert_files.iter().all(|f| f.exists());
    if !reused_certs {
        progress("making development certificates (an RSA 2048 server key takes a moment) ...");
        devcerts::generate(
            dir,
            &["localhost".into(), "127.0.0.1".into(), "::1".into()],
            &[CERTIFICATE_USER.to_string()],
        )?;
    }
    let (jwt_private, jwt_public) = (dir.join("jwt-signing.key"), dir.join("jwt-public.pem"));
    let reused_jwt = jwt_private.exists() && jwt_public.exists();
    if !reused_jwt {
        devcerts::jwt_keypair(dir)?;
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| DemoError::Other(format!("system clock before 1970: {e}")))?
        .as_secs();
    let token_expires = now + TOKEN_TTL.as_secs();
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": TOKEN_USER,
        "iat": now, "nbf": now, "exp": token_expires, "roles": [ROLE],
    });
    let token = crate::auth::jwt::mint(&jwt_private, &claims)?;
    let token_path = dir.join("demo.jwt");
    devcerts::write_file(&token_path, format!("{token}\n").as_bytes(), true)?;

    let sample = dir.join("sample.dcm");
    if !sample.exists() {
        write_sample(&sample)?;
    }
    let python_client = dir.join("demo_client.py");
    let script = python_snippet(
        "os.path.join(os.path.dirname(os.path.abspath(__file__)), \"ca.crt\")",
        listen,
    );
    devcerts::write_file(
        &python_client,
        format!("#!/usr/bin/env python3\n\"\"\"pynetdicom through the pacsgate demo: C-FIND as user demo over TLS.\"\"\"\nimport os\n{script}").as_bytes(),
        false,
    )?;

    Ok(DemoFiles {
        dir: dir.to_path_buf(),
        config: dir.join("pacsgate.toml"),
        ca_cert: dir.join("ca.crt"),
        client_cert: cert_files[4].clone(),
        client_key: cert_files[5].clone(),
        token: token_path,
        token_expires,
        sample,
        python_client,
        reused: reused_certs && reused_jwt,
    })
}

/// A small image of a patient not in the synthetic data, for trying C-STORE: a copy of a
/// synthetic CT image with a new patient, study, series and instance.
fn write_sample(path: &Path) -> Result<(), DemoError> {
    let archive = DemoArchive::with_synthetic_data();
    let source = format!("{DEMO_UID_ROOT}.4.1.1.1.1");
    let bytes = archive
        .instance_bytes(&source)
        .ok_or_else(|| DemoError::Other(format!("synthetic instance {source} missing")))?;
    let mut obj =
        InMemDicomObject::read_dataset_with_ts(&bytes[..], &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| DemoError::Other(format!("synthetic instance: {e}")))?;
    let uid = format!("{DEMO_UID_ROOT}.9.1.1");
    for (tag, vr, value) in [
        (tags::PATIENT_NAME, VR::PN, "SAMPLE^STORED"),
        (tags::PATIENT_ID, VR::LO, "DEMO-SAMPLE"),
        (
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            &format!("{DEMO_UID_ROOT}.9.2.1") as &str,
        ),
        (
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &format!("{DEMO_UID_ROOT}.9.3.1"),
        ),
        (tags::SOP_INSTANCE_UID, VR::UI, &uid),
        (tags::STUDY_DESCRIPTION, VR::LO, "Stored with pacsgate demo"),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    }
    let sop_class = obj
        .get(tags::SOP_CLASS_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches('\0').to_string())
        .unwrap_or_else(|| uids::CT_IMAGE_STORAGE.to_string());
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .media_storage_sop_class_uid(sop_class)
                .media_storage_sop_instance_uid(uid),
        )
        .map_err(|e| DemoError::Other(format!("sample file meta: {e}")))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| DemoError::Other(format!("cannot encode {}: {e}", path.display())))?;
    Ok(devcerts::write_file(path, &bytes, false)?)
}

/// The generated configuration.
pub fn config_text(
    listen: SocketAddr,
    archive: SocketAddr,
    password_hash: &str,
    reader_hash: &str,
) -> String {
    format!(
        r#"# pacsgate.toml of `pacsgate demo`, rewritten at each start (the archive's port changes).
# Development certificates, demo users and a demo password: never use any of this for real data.
# Every key is described in docs/configuration.md; config/pacsgate.toml is a commented example.

[gateway]
listen = "{listen}"   # loopback only
ae_title = "PACSGATE"

[tls]
certificate = "server.crt"
private_key = "server.key"
client_ca = "ca.crt"                   # a client certificate from this CA names a [[user]]
require_client_certificate = false     # passwords and tokens work without one

# The embedded in-memory demo archive, started by `pacsgate demo` on a free loopback port.
[[upstream]]
called_ae = "{CALLED_AE}"
address = "{archive}"
ae_title = "{ARCHIVE_AE}"

# Tokens (User Identity type 5) signed with jwt-signing.key, e.g. demo.jwt.
[auth.jwt]
issuer = "{TOKEN_ISSUER}"
audience = "{TOKEN_AUDIENCE}"
public_key = "jwt-public.pem"
algorithms = ["ES256"]

[[role]]
name = "{ROLE}"
allow = ["echo", "find", "get", "move", "store"]   # the demo archive has no C-MOVE
unrestricted_queries = true            # allow wildcard queries such as PatientName=* (demo data only)

# A reading role as a hospital would have it: the query guard applies (PatientName=* is refused
# 0xA700; a query naming a patient, an accession number or a study works).
[[role]]
name = "{READER_ROLE}"
allow = ["echo", "find", "get"]

[[user]]
name = "{PASSWORD_USER}"                        # password "{PASSWORD}"
password_hash = "{password_hash}"
roles = ["{ROLE}"]

[[user]]
name = "{READER_USER}"                      # password "{READER_PASSWORD}"
password_hash = "{reader_hash}"
roles = ["{READER_ROLE}"]

[[user]]
name = "{CERTIFICATE_USER}"                   # signs in with {CERTIFICATE_USER}.crt and {CERTIFICATE_USER}.key
roles = ["{ROLE}"]

# The token user "{TOKEN_USER}" needs no [[user]] table: its roles come from the token.
"#
    )
}

/// The gateway's listener: `listen` when given (loopback only); else port 11112 on loopback when
/// free, otherwise a free loopback port (and a note saying so).
async fn bind(listen: Option<SocketAddr>) -> Result<(TcpListener, Option<String>), DemoError> {
    let in_use = |address: SocketAddr| {
        DemoError::Other(format!(
            "cannot listen on {address}: it is in use; choose another port with --listen 127.0.0.1:PORT"
        ))
    };
    let bind_err = |address: SocketAddr| {
        move |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                in_use(address)
            } else {
                DemoError::Server(ServerError::Listen { address, source })
            }
        }
    };
    if let Some(address) = listen {
        if !address.ip().is_loopback() {
            return Err(DemoError::NotLoopback(address));
        }
        let l = TcpListener::bind(address)
            .await
            .map_err(bind_err(address))?;
        return Ok((l, None));
    }
    let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT));
    match TcpListener::bind(default).await {
        Ok(l) => Ok((l, None)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let l = TcpListener::bind(any).await.map_err(bind_err(any))?;
            let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
            Ok((
                l,
                Some(format!(
                    "port {DEFAULT_PORT} is in use (another DICOM server?): the demo listens on 127.0.0.1:{port} instead"
                )),
            ))
        }
        Err(e) => Err(bind_err(default)(e)),
    }
}

/// Bind the gateway's listener (see [`bind`]), start the archive on 127.0.0.1:0, write the folder
/// and configuration, and load it.
pub async fn start(
    dir: &Path,
    listen: Option<SocketAddr>,
    progress: &mut dyn FnMut(&str),
) -> Result<Demo, DemoError> {
    if let Some(address) = listen
        && !address.ip().is_loopback()
    {
        return Err(DemoError::NotLoopback(address));
    }
    let (listener, port_note) = bind(listen).await?;
    let listen = listener.local_addr().map_err(|source| {
        DemoError::Server(ServerError::Listen {
            address: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))),
            source,
        })
    })?;
    if let Some(note) = &port_note {
        progress(note);
    }
    let files = prepare_files(dir, listen, progress)?;

    let archive_listener = TcpListener::bind("127.0.0.1:0").await.map_err(io(
        "cannot listen for the demo archive on",
        Path::new("127.0.0.1:0"),
    ))?;
    let archive_address = archive_listener
        .local_addr()
        .map_err(io("no local address for", Path::new("127.0.0.1:0")))?;
    let data = Arc::new(DemoArchive::with_synthetic_data());
    let instances = data.instance_count();
    let archive_task = tokio::spawn(archive::serve(
        archive_listener,
        data,
        ARCHIVE_AE.to_string(),
    ));

    let hash = crate::auth::password::hash_password(PASSWORD).map_err(DemoError::Other)?;
    let reader_hash =
        crate::auth::password::hash_password(READER_PASSWORD).map_err(DemoError::Other)?;
    let text = config_text(listen, archive_address, &hash, &reader_hash);
    // Mode 600: it holds the password hashes (a readable one is refused by Config::load).
    let loaded = devcerts::write_file(&files.config, text.as_bytes(), true)
        .map_err(DemoError::from)
        .and_then(|()| Ok(Config::load(&files.config)?))
        .and_then(|config| Ok(State::new(config)?));
    let state = match loaded {
        Ok(s) => s,
        Err(e) => {
            archive_task.abort();
            return Err(e);
        }
    };
    let gateway = Gateway::new(state);
    Ok(Demo {
        files,
        listen,
        port_note,
        archive_address,
        instances,
        gateway,
        listener: Some(listener),
        archive_task,
    })
}

impl Demo {
    /// Serve associations until this future is dropped (e.g. on Ctrl-C).
    pub async fn serve(&mut self) {
        if let Some(listener) = self.listener.take() {
            self.gateway.serve(listener, true).await;
        }
    }

    /// Serve, and meanwhile try the query guard as the reader (a wildcard query, then a specific
    /// one) and hand the lines that show the result to `show`.
    pub async fn serve_showing_the_guard(&mut self, show: &mut dyn FnMut(&str)) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let this = &*self;
        let serve = this.gateway.serve(listener, true);
        tokio::pin!(serve);
        tokio::select! {
            _ = &mut serve => return,
            tried = this.try_the_guard() => show(&guard_lines(this.listen, &tried)),
        }
        serve.await;
    }

    /// The reader's two queries through the running gateway: `PatientName=*` (refused 0xA700)
    /// and one naming a patient (works).
    pub async fn try_the_guard(&self) -> Vec<Tried> {
        let mut out = Vec::new();
        for keys in [
            &["PatientName=*", "PatientID", "StudyDescription"][..],
            &["PatientID=DEMO-0002", "PatientName", "StudyDescription"][..],
        ] {
            let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            let mut names = Vec::new();
            let result = self
                .reader_find(&keys, &mut names)
                .await
                .map_err(|e| e.to_string());
            out.push(Tried {
                keys,
                result,
                names,
            });
        }
        out
    }

    async fn reader_find(
        &self,
        keys: &[String],
        names: &mut Vec<String>,
    ) -> Result<crate::tools::client::FindOutcome, crate::tools::ToolError> {
        use crate::tools::client::{self, Identity, Request, TlsClient};
        let timeout = Duration::from_secs(10);
        let tls = TlsClient::new(&self.files.ca_cert, None, &self.listen.ip().to_string())?;
        let conn = client::connect(&self.listen.to_string(), Some(&tls), timeout).await?;
        let find = crate::tools::query::Find::new(false, "STUDY", keys)?;
        let request = Request {
            calling_ae: "DEMO-GUARD".into(),
            called_ae: CALLED_AE.into(),
            identity: Identity::Password {
                user: READER_USER.into(),
                password: READER_PASSWORD.into(),
            },
            abstract_syntaxes: vec![find.model()],
            timeout,
        };
        let mut assoc = client::associate(conn, &request).await?;
        let outcome = assoc
            .find(find.model(), &find.identifier()?, |m| {
                names.push(crate::dimse::attribute(&m, tags::PATIENT_NAME));
                true
            })
            .await;
        match outcome {
            Ok(o) => {
                assoc.release().await?;
                Ok(o)
            }
            Err(e) => {
                assoc.abort().await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_validates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = crate::auth::password::hash_password(PASSWORD).expect("hash");
        let text = config_text(
            "127.0.0.1:11112".parse().expect("addr"),
            "127.0.0.1:40000".parse().expect("addr"),
            &hash,
            &hash,
        );
        let config = Config::parse(&text, &dir.path().join("pacsgate.toml")).expect("valid");
        assert_eq!(config.upstreams[0].called_ae, CALLED_AE);
        assert!(config.users.contains_key(PASSWORD_USER));
        assert!(config.users.contains_key(CERTIFICATE_USER));
        assert!(config.roles[ROLE].unrestricted_queries);
        assert!(!config.roles[READER_ROLE].unrestricted_queries);
        assert_eq!(
            config.users[READER_USER].roles,
            vec![READER_ROLE.to_string()]
        );
    }

    #[test]
    fn a_foreign_folder_is_refused_and_a_demo_folder_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("server.key"), "precious").expect("write");
        let listen = "127.0.0.1:11112".parse().expect("addr");
        let err = prepare_files(dir.path(), listen, &mut |_| {}).unwrap_err();
        assert!(matches!(err, DemoError::ForeignFolder(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("server.key")).expect("read"),
            "precious"
        );

        let demo = dir.path().join("demo");
        let first = prepare_files(&demo, listen, &mut |_| {}).expect("first");
        assert!(!first.reused);
        let ca = std::fs::read(&first.ca_cert).expect("ca");
        let second = prepare_files(&demo, listen, &mut |_| {}).expect("second");
        assert!(second.reused);
        assert_eq!(std::fs::read(&second.ca_cert).expect("ca"), ca);
        assert!(dicom_object::open_file(&second.sample).is_ok());
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_quote("pacsgate-demo/ca.crt"), "pacsgate-demo/ca.crt");
        assert_eq!(shell_quote("my dir/it's"), "'my dir/it'\\''s'");
    }
}
