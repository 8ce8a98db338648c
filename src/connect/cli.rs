//! `pacsgate connect` options, from the command line and an optional `[connect]` section of a TOML
//! file (the command line wins), validated into [`Settings`]; and [`run`] (in `run.rs`, re-exported here), which main.rs calls.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::gateway::{Credentials, Gateway, TlsFiles, TokenFile};
use super::retrieve::LocalStore;
use super::{ConnectError, Tunnel, move_as_get};

const DEFAULT_LISTEN: &str = "127.0.0.1:11114";
const DEFAULT_TIMEOUT_S: f64 = 30.0;
const DEFAULT_IDLE_S: f64 = 900.0;
const DEFAULT_KEEPALIVE_S: f64 = 60.0;

/// Run a local tunnel to a pacsgate gateway for viewers that speak plain DICOM
///
/// Listens on loopback for plain DICOM; each association goes to the gateway over TLS (its
/// certificate verified against --ca) with your credentials added as DICOM User Identity.
/// Point the viewer's DICOM node at 127.0.0.1 and the --listen port, with the called AE title
/// the gateway knows the archive by. The password comes from --password-env, --password-file
/// or a prompt, never from the command line. A --token-file is re-read whenever it changes.
///
/// C-MOVE to the viewer's own storage SCP behind NAT: --move-as-get --local-store AE@HOST:PORT
/// performs such a C-MOVE as a C-GET through the gateway (your role needs `get`) and hands the
/// instances to that storage SCP.
///
/// Only the local user who started connect may use it (its UID is checked on every connection:
/// the kernel's socket table for TCP, peer credentials for --socket); --allow-user UID admits
/// another. Anyone else gets A-ASSOCIATE-RJ 1/1/1 and nothing reaches the gateway.
///
/// Examples:
///   PW='...' pacsgate connect --gateway pacs-gw.example.org:2762 --ca ca.crt --user dr.house --password-env PW
///   pacsgate connect --gateway pacs-gw:2762 --ca ca.crt --token-file ~/.cache/pacs.jwt --listen 127.0.0.1:11114
///   pacsgate connect --config ~/.config/pacsgate/connect.toml
///   pacsgate connect --gateway pacs-gw:2762 --ca ca.crt --user dr.house --move-as-get --local-store VIEWER@127.0.0.1:11113
#[derive(clap::Args, Debug, Default, Clone)]
#[command(verbatim_doc_comment)]
pub struct ConnectArgs {
    /// TOML file with a [connect] section holding any of these options (the command line wins).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// host:port of the gateway's DICOM TLS port.
    #[arg(long)]
    pub gateway: Option<String>,
    /// Where to listen for plain DICOM [default: 127.0.0.1:11114]. Loopback only unless --allow-remote.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Allow a --listen address other than loopback: anyone who reaches it uses your credentials.
    #[arg(long)]
    pub allow_remote: bool,
    /// Also listen on a Unix domain socket at this path (mode 0600, peer credentials checked).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Admit this local user (numeric UID) too, besides the one who started connect (repeatable).
    #[arg(long = "allow-user", value_name = "UID")]
    pub allow_user: Vec<u32>,
    /// CA certificate (PEM) the gateway's certificate must be signed by [default: the system CA bundle].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to the gateway.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Name the gateway's certificate must carry [default: the host of --gateway].
    #[arg(long)]
    pub server_name: Option<String>,
    /// User name for username + password identity (password from --password-env, --password-file or a prompt).
    #[arg(long)]
    pub user: Option<String>,
    /// Environment variable holding the password.
    #[arg(long)]
    pub password_env: Option<String>,
    /// File holding the password (one line).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// File holding a JWT (re-read when it changes, e.g. by an OIDC helper).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Perform a C-MOVE to a --local-store destination as a C-GET through the gateway.
    #[arg(long)]
    pub move_as_get: bool,
    /// A local storage SCP as AE@HOST:PORT, e.g. the viewer's own (repeatable). Loopback (or
    /// localhost) only unless --allow-remote-store.
    #[arg(long = "local-store", value_name = "AE@HOST:PORT")]
    pub local_store: Vec<String>,
    /// Allow a --local-store on another machine: its instances then leave this one in plain DICOM.
    #[arg(long)]
    pub allow_remote_store: bool,
    /// Bytes move-as-get may hold for one local association (C-MOVE identifiers, command fragments
    /// and failed-instance lists); a C-MOVE past it is refused 0xA701 [default: 1MiB].
    #[arg(long, value_name = "BYTES")]
    pub move_buffer: Option<String>,
    /// Bytes move-as-get may hold for all local associations together [default: 16MiB].
    #[arg(long, value_name = "BYTES")]
    pub move_buffer_total: Option<String>,
    /// Seconds to wait for each step: connect, TLS handshake, each answer [default: 30].
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Seconds without a PDU either way before an association is aborted; also the longest wait
    /// for the archive's next message during a move-as-get [default: 900].
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Seconds between keep-alive C-ECHOs on a viewer's association while a move-as-get runs
    /// for it, so that no idle timeout ends it [default: 60; 0: none].
    #[arg(long)]
    pub keepalive: Option<f64>,
}

/// The file format: a `[connect]` section, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    connect: FileConnect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConnect {
    gateway: Option<String>,
    listen: Option<String>,
    allow_remote: Option<bool>,
    socket: Option<PathBuf>,
    allow_user: Option<Vec<u32>>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    move_as_get: Option<bool>,
    local_store: Option<Vec<String>>,
    allow_remote_store: Option<bool>,
    move_buffer: Option<String>,
    move_buffer_total: Option<String>,
    timeout: Option<f64>,
    idle_timeout: Option<f64>,
    keepalive: Option<f64>,
    /// Refused with a message: secrets do not belong in the file.
    password: Option<toml::Value>,
}

/// Who the clinician is, before any secret is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// The client certificate only.
    Certificate,
    Password {
        user: String,
        env: Option<String>,
        file: Option<PathBuf>,
    },
    TokenFile(PathBuf),
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: String,
    pub server_name: String,
    pub listen: SocketAddr,
    /// true when --listen was not given (the default port): a port in use then says "use --listen".
    pub default_listen: bool,
    pub allow_remote: bool,
    pub socket: Option<PathBuf>,
    pub allow_users: Vec<u32>,
    pub ca: Option<PathBuf>,
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    pub identity: IdentitySource,
    pub move_as_get: bool,
    pub local_stores: Vec<LocalStore>,
    pub buffer: move_as_get::BufferLimits,
    pub timeout: Duration,
    pub idle: Duration,
    /// None: no keep-alive.
    pub keepalive: Option<Duration>,
}

pub(super) fn usage(message: impl Into<String>) -> ConnectError {
    ConnectError::Usage(message.into())
}

fn read_file(path: &Path) -> Result<FileConnect, ConnectError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConnectError::ConfigFile {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    let file: File = toml::from_str(&text).map_err(|e| ConnectError::ConfigFile {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let mut c = file.connect;
    if c.password.is_some() {
        return Err(ConnectError::ConfigFile {
            path: path.to_path_buf(),
            message: "connect.password: a password does not belong in a file; use password_file or password_env".into(),
        });
    }
    // Relative paths are relative to the file's folder.
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut c.ca,
        &mut c.cert,
        &mut c.key,
        &mut c.password_file,
        &mut c.token_file,
        &mut c.socket,
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(c)
}

/// A byte count: digits with an optional K, KiB, M, MiB, G or GiB (K and KiB both 1024).
fn bytes(key: &str, value: Option<&str>, default: usize) -> Result<usize, ConnectError> {
    let Some(text) = value.map(str::trim) else {
        return Ok(default);
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => {
            return Err(usage(format!(
                "{key}: {text:?} is not a size (e.g. 65536, 512KiB, 4MiB)"
            )));
        }
    };
    let n: usize = digits.parse().map_err(|_| {
        usage(format!(
            "{key}: {text:?} is not a size (e.g. 65536, 512KiB, 4MiB)"
        ))
    })?;
    let n = n.saturating_mul(factor);
    if n < move_as_get::MIN_BUFFER {
        return Err(usage(format!(
            "{key}: {text} is below {} bytes, the largest command set",
            move_as_get::MIN_BUFFER
        )));
    }
    Ok(n)
}

/// A --local-store host is this machine: a loopback address or `localhost`.
fn is_local_host(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn seconds(key: &str, value: Option<f64>, default: f64) -> Result<Duration, ConnectError> {
    let v = value.unwrap_or(default);
    if !(v > 0.0 && v <= 86400.0) {
        return Err(usage(format!(
            "{key}: {v} must be above 0 and at most 86400 seconds"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `gateway` (HOST:PORT) and the name its certificate must carry (`server_name`, else the host).
fn gateway_and_name(
    args: &ConnectArgs,
    file: &mut FileConnect,
) -> Result<(String, String), ConnectError> {
    let gateway = args
        .gateway
        .clone()
        .or(file.gateway.take())
        .ok_or_else(|| usage("gateway: missing: give --gateway HOST:PORT (or gateway = \"HOST:PORT\" in [connect])"))?;
    let host = match gateway.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        _ => return Err(usage(format!("gateway: {gateway:?} is not HOST:PORT"))),
    };
    let server_name = args
        .server_name
        .clone()
        .or(file.server_name.take())
        .unwrap_or(host);
    Ok((gateway, server_name))
}

/// Where to listen, whether that is the default, and whether beyond loopback is allowed.
struct Listen {
    address: SocketAddr,
    default: bool,
    allow_remote: bool,
}

fn listen(args: &ConnectArgs, file: &mut FileConnect) -> Result<Listen, ConnectError> {
    let default = args.listen.is_none() && file.listen.is_none();
    let address = match (args.listen, file.listen.take()) {
        (Some(l), _) => l,
        (None, Some(text)) => text
            .parse()
            .map_err(|e| usage(format!("listen: {text:?} is not an address:port ({e})")))?,
        (None, None) => DEFAULT_LISTEN
            .parse()
            .map_err(|e| usage(format!("listen: {e}")))?,
    };
    let allow_remote = args.allow_remote || file.allow_remote.unwrap_or(false);
    if !address.ip().is_loopback() && !allow_remote {
        return Err(usage(format!(
            "listen: {address} is not a loopback address: anyone who can reach it would use your credentials. \
             Listen on 127.0.0.1, or pass --allow-remote (allow_remote = true) if you really mean it"
        )));
    }
    Ok(Listen {
        address,
        default,
        allow_remote,
    })
}

/// The client certificate and its key: both or neither.
fn client_certificate(
    args: &ConnectArgs,
    file: &mut FileConnect,
) -> Result<Option<(PathBuf, PathBuf)>, ConnectError> {
    let cert = args.cert.clone().or(file.cert.take());
    let key = args.key.clone().or(file.key.take());
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(usage("cert: needs key (the certificate's private key)")),
        (None, Some(_)) => Err(usage("key: needs cert")),
    }
}

/// Who the clinician is: a user with a password source, a token file, or the certificate alone.
fn identity(
    args: &ConnectArgs,
    file: &mut FileConnect,
    has_certificate: bool,
) -> Result<IdentitySource, ConnectError> {
    let user = args.user.clone().or(file.user.take());
    let password_env = args.password_env.clone().or(file.password_env.take());
    let password_file = args.password_file.clone().or(file.password_file.take());
    let token_file = args.token_file.clone().or(file.token_file.take());
    match (user, token_file) {
        (Some(_), Some(_)) => Err(usage(
            "user and token_file exclude each other: choose a password or a token",
        )),
        (Some(user), None) => {
            if password_env.is_some() && password_file.is_some() {
                return Err(usage("password_env and password_file exclude each other"));
            }
            Ok(IdentitySource::Password {
                user,
                env: password_env,
                file: password_file,
            })
        }
        (None, token) => {
            if password_env.is_some() || password_file.is_some() {
                return Err(usage("password_env / password_file need user"));
            }
            match token {
                Some(path) => Ok(IdentitySource::TokenFile(path)),
                None if has_certificate => Ok(IdentitySource::Certificate),
                None => Err(usage(
                    "no credentials: give --user NAME, --token-file FILE, or --cert FILE --key FILE",
                )),
            }
        }
    }
}

/// The --local-store entries: each AE title once, each on this machine unless --allow-remote-store.
fn local_stores(
    args: &ConnectArgs,
    file: &mut FileConnect,
) -> Result<Vec<LocalStore>, ConnectError> {
    let allow_remote_store = args.allow_remote_store || file.allow_remote_store.unwrap_or(false);
    let stores = if args.local_store.is_empty() {
        file.local_store.take().unwrap_or_default()
    } else {
        args.local_store.clone()
    };
    let mut local_stores: Vec<LocalStore> = Vec::new();
    for s in &stores {
        let store: LocalStore = s.parse().map_err(|e| usage(format!("local_store: {e}")))?;
        if local_stores.iter().any(|l| l.ae_title == store.ae_title) {
            return Err(usage(format!(
                "local_store: AE title {} is listed twice",
                store.ae_title
            )));
        }
        if !allow_remote_store && !is_local_host(&store.address) {
            return Err(usage(format!(
                "local_store: {store} is not on this machine: its instances would leave it in plain DICOM. \
                 Use a loopback address (127.0.0.1, [::1], localhost), or pass --allow-remote-store \
                 (allow_remote_store = true) if you really mean it"
            )));
        }
        local_stores.push(store);
    }
    Ok(local_stores)
}

/// The move-as-get buffers: per association and in total (the total at least the former).
fn buffer(
    args: &ConnectArgs,
    file: &FileConnect,
) -> Result<move_as_get::BufferLimits, ConnectError> {
    let per_association = bytes(
        "move_buffer",
        args.move_buffer.as_deref().or(file.move_buffer.as_deref()),
        move_as_get::DEFAULT_BUFFER,
    )?;
    let total = bytes(
        "move_buffer_total",
        args.move_buffer_total
            .as_deref()
            .or(file.move_buffer_total.as_deref()),
        move_as_get::DEFAULT_BUFFER_TOTAL,
    )?;
    if total < per_association {
        return Err(usage(format!(
            "move_buffer_total: {total} bytes is less than move_buffer ({per_association})"
        )));
    }
    Ok(move_as_get::BufferLimits {
        per_association,
        total,
    })
}

impl Settings {
    /// Merge the command line over the file (if any) and validate. Reads no secret.
    pub fn from_args(args: &ConnectArgs) -> Result<Settings, ConnectError> {
        let mut file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConnect::default(),
        };
        let (gateway, server_name) = gateway_and_name(args, &mut file)?;
        let listen = listen(args, &mut file)?;
        let client_certificate = client_certificate(args, &mut file)?;
        let identity = identity(args, &mut file, client_certificate.is_some())?;

        let mut allow_users = args.allow_user.clone();
        if allow_users.is_empty() {
            allow_users = file.allow_user.take().unwrap_or_default();
        }
        let move_as_get = args.move_as_get || file.move_as_get.unwrap_or(false);
        let local_stores = local_stores(args, &mut file)?;
        let buffer = buffer(args, &file)?;
        if move_as_get && local_stores.is_empty() {
            return Err(usage(
                "move_as_get: needs at least one --local-store AE@HOST:PORT (the viewer's storage SCP)",
            ));
        }
        if !move_as_get && !local_stores.is_empty() {
            return Err(usage(
                "local_store: only used by move-as-get: add --move-as-get (move_as_get = true)",
            ));
        }

        Ok(Settings {
            gateway,
            server_name,
            listen: listen.address,
            default_listen: listen.default,
            allow_remote: listen.allow_remote,
            socket: args.socket.clone().or(file.socket),
            allow_users,
            ca: args.ca.clone().or(file.ca),
            client_certificate,
            identity,
            move_as_get,
            local_stores,
            buffer,
            timeout: seconds("timeout", args.timeout.or(file.timeout), DEFAULT_TIMEOUT_S)?,
            idle: seconds(
                "idle_timeout",
                args.idle_timeout.or(file.idle_timeout),
                DEFAULT_IDLE_S,
            )?,
            keepalive: match args.keepalive.or(file.keepalive) {
                Some(0.0) => None,
                v => Some(seconds("keepalive", v, DEFAULT_KEEPALIVE_S)?),
            },
        })
    }

    /// Read the secrets: the password (environment, file or prompt), or a first look at the token file.
    pub fn credentials(&self) -> Result<Credentials, ConnectError> {
        match &self.identity {
            IdentitySource::Certificate => Ok(Credentials::Certificate),
            IdentitySource::Password { user, env, file } => {
                let password =
                    crate::tools::secret::password(user, env.as_deref(), file.as_deref())
                        .map_err(|e| ConnectError::Secret(e.to_string()))?;
                Ok(Credentials::Password {
                    user: user.clone(),
                    password,
                })
            }
            IdentitySource::TokenFile(path) => {
                let file = TokenFile::new(path.clone());
                file.token()?;
                Ok(Credentials::TokenFile(file))
            }
        }
    }

    /// The tunnel these settings describe, with `credentials`.
    pub fn tunnel(&self, credentials: Credentials) -> Result<Tunnel, ConnectError> {
        let callers = super::local::Callers::new(super::local::own_uid()?, &self.allow_users);
        let gateway = Gateway::new(
            self.gateway.clone(),
            &self.server_name,
            TlsFiles {
                ca: self.ca.as_deref(),
                client: self
                    .client_certificate
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            },
            credentials,
            self.timeout,
        )?;
        Ok(Tunnel {
            gateway: Arc::new(gateway),
            move_as_get: self.move_as_get.then(|| {
                Arc::new(move_as_get::Settings {
                    stores: self.local_stores.clone(),
                    timeout: self.timeout,
                    archive_wait: self.idle,
                    keepalive: self.keepalive,
                    buffer: move_as_get::Buffer::new(self.buffer),
                })
            }),
            request_timeout: self.timeout.min(Duration::from_secs(30)),
            idle: self.idle,
            callers,
        })
    }
}

pub use super::run::run;

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConnectArgs {
        ConnectArgs {
            gateway: Some("pacs-gw.example.org:2762".into()),
            user: Some("dr.house".into()),
            password_env: Some("PW".into()),
            ..ConnectArgs::default()
        }
    }

    #[test]
    fn defaults_are_loopback_and_the_gateway_host_names_the_certificate() {
        let s = Settings::from_args(&args()).expect("valid");
        assert_eq!(s.listen.to_string(), "127.0.0.1:11114");
        assert_eq!(s.server_name, "pacs-gw.example.org");
        assert!(!s.move_as_get);
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert!(matches!(s.identity, IdentitySource::Password { .. }));
    }

    #[test]
    fn a_remote_listen_address_needs_the_explicit_flag() {
        let mut a = args();
        a.listen = Some("0.0.0.0:11112".parse().expect("addr"));
        let err = Settings::from_args(&a).unwrap_err().to_string();
        assert!(
            err.contains("listen") && err.contains("--allow-remote"),
            "{err}"
        );
        a.allow_remote = true;
        assert!(Settings::from_args(&a).is_ok());
    }

    #[test]
    fn credentials_and_move_as_get_are_checked() {
        let mut a = args();
        a.token_file = Some("t.jwt".into());
        assert!(Settings::from_args(&a).is_err());
        let mut a = args();
        a.user = None;
        assert!(
            Settings::from_args(&a)
                .unwrap_err()
                .to_string()
                .contains("need user")
        );
        a.password_env = None;
        assert!(
            Settings::from_args(&a)
                .unwrap_err()
                .to_string()
                .contains("no credentials")
        );
        let mut a = args();
        a.move_as_get = true;
        assert!(Settings::from_args(&a).is_err());
        a.local_store = vec!["VIEWER@127.0.0.1:11113".into()];
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.local_stores[0].ae_title, "VIEWER");
        a.local_store.push("VIEWER@127.0.0.1:11114".into());
        assert!(Settings::from_args(&a).is_err());
        let mut a = args();
        a.local_store = vec!["VIEWER@127.0.0.1:11113".into()];
        assert!(
            Settings::from_args(&a)
                .unwrap_err()
                .to_string()
                .contains("--move-as-get")
        );
        let mut a = args();
        a.gateway = Some("no-port".into());
        assert!(Settings::from_args(&a).is_err());
    }

    #[test]
    fn a_remote_local_store_needs_the_explicit_flag_and_buffers_parse() {
        let mut a = args();
        a.move_as_get = true;
        for local in [
            "V@127.0.0.1:1",
            "V@[::1]:1",
            "V@localhost:1",
            "V@127.1.2.3:1",
        ] {
            a.local_store = vec![local.into()];
            assert!(Settings::from_args(&a).is_ok(), "{local}");
        }
        a.local_store = vec!["V@10.1.2.3:104".into()];
        let err = Settings::from_args(&a).unwrap_err().to_string();
        assert!(
            err.contains("not on this machine") && err.contains("--allow-remote-store"),
            "{err}"
        );
        a.local_store = vec!["V@viewer.example.org:104".into()];
        assert!(Settings::from_args(&a).is_err());
        a.allow_remote_store = true;
        assert!(Settings::from_args(&a).is_ok());

        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.buffer, move_as_get::BufferLimits::default());
        a.move_buffer = Some("256KiB".into());
        a.move_buffer_total = Some("4M".into());
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.buffer.per_association, 256 * 1024);
        assert_eq!(s.buffer.total, 4 << 20);
        a.move_buffer = Some("8MiB".into());
        assert!(
            Settings::from_args(&a).is_err(),
            "total below per association"
        );
        a.move_buffer = Some("1K".into());
        assert!(Settings::from_args(&a).is_err(), "below a command set");
        a.move_buffer = Some("lots".into());
        assert!(Settings::from_args(&a).is_err());
    }

    #[test]
    fn the_file_section_is_strict_and_the_command_line_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("connect.toml");
        std::fs::write(
            &path,
            "[connect]\ngateway = \"gw:2762\"\nlisten = \"127.0.0.1:4000\"\nca = \"ca.crt\"\n\
             token_file = \"me.jwt\"\nmove_as_get = true\nlocal_store = [\"VIEWER@127.0.0.1:4001\"]\n",
        )
        .expect("write");
        let a = ConnectArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:5000".parse().expect("addr")),
            ..ConnectArgs::default()
        };
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.gateway, "gw:2762");
        assert_eq!(s.listen.port(), 5000);
        assert_eq!(s.ca, Some(dir.path().join("ca.crt")));
        assert_eq!(
            s.identity,
            IdentitySource::TokenFile(dir.path().join("me.jwt"))
        );
        assert!(s.move_as_get);

        std::fs::write(&path, "[connect]\ngateway = \"gw:2762\"\ngatway = \"x\"\n").expect("write");
        let err = Settings::from_args(&a).unwrap_err().to_string();
        assert!(err.contains("gatway"), "{err}");

        std::fs::write(
            &path,
            "[connect]\ngateway = \"gw:2762\"\nuser = \"u\"\npassword = \"secret\"\n",
        )
        .expect("write");
        let err = Settings::from_args(&a).unwrap_err().to_string();
        assert!(err.contains("connect.password"), "{err}");
        assert!(!err.contains("secret"), "{err}");

        std::fs::write(
            &path,
            "[connect]\ngateway = \"gw:2762\"\nuser = \"u\"\ntimeout = \"slow\"\n",
        )
        .expect("write");
        let err = Settings::from_args(&a).unwrap_err().to_string();
        assert!(err.contains("timeout"), "{err}");
    }
}
