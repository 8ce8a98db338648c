//! Configuration: the TOML file format, and the one `validate` step that turns it into the runtime config.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What went wrong with a configuration file, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the keys pacsgate knows. `message` is one line (for logs); `rendering` is
    /// toml's own multi-line rendering with the line quoted and the column marked (for the terminal).
    #[error("configuration file {path}: {message}")]
    Parse {
        path: PathBuf,
        message: String,
        rendering: String,
    },
    /// A private key, or the configuration file holding password hashes, that other local users can read.
    #[error(
        "configuration file {path}: {} (refused unless [gateway] allow_readable_keys = true)",
        file.describe()
    )]
    Readable { path: PathBuf, file: ReadableFile },
    #[error("configuration file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// File format (what the admin writes)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    gateway: FileGateway,
    tls: FileTls,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    upstream: Vec<FileUpstream>,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    user: Vec<FileUser>,
    #[serde(default)]
    role: Vec<FileRole>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    device: Vec<FileDevice>,
    #[serde(default)]
    destination: Vec<FileDestination>,
    audit: Option<FileAudit>,
    admin: Option<FileAdmin>,
    http: Option<FileHttp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    listen: String,
    upstream: String,
    dicomweb_path: Option<String>,
    wado_uri_path: Option<String>,
    #[serde(default)]
    allow_paths: Vec<String>,
    #[serde(default)]
    cors_origins: Vec<String>,
    #[serde(default = "default_max_query_response")]
    max_query_response: usize,
    #[serde(default = "default_failed_logins_per_minute")]
    failed_logins_per_minute: u32,
}

const DEFAULT_DICOMWEB_PATH: &str = "/dicom-web";
fn default_max_query_response() -> usize {
    16 * 1024 * 1024
}
fn default_failed_logins_per_minute() -> u32 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    file: Option<PathBuf>,
    syslog: Option<String>,
    syslog_ca: Option<PathBuf>,
    syslog_server_name: Option<String>,
    #[serde(default = "default_syslog_timeout")]
    syslog_timeout: f64,
    on_failure: Option<String>,
    source_id: Option<String>,
}
fn default_syslog_timeout() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default = "default_admin_max_connections")]
    max_connections: usize,
    #[serde(default = "d5")]
    header_timeout: f64,
    #[serde(default = "default_admin_fd_reserve")]
    fd_reserve: usize,
    bearer_token_file: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

fn default_admin_max_connections() -> usize {
    16
}
fn default_admin_fd_reserve() -> usize {
    128
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDestination {
    ae_title: String,
    address: String,
    tls: Option<FileDestinationTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDestinationTls {
    ca: PathBuf,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGateway {
    listen: String,
    #[serde(default = "default_ae_title")]
    ae_title: String,
    #[serde(default = "default_max_pdu_length")]
    max_pdu_length: u32,
    #[serde(default = "default_max_association_request_length")]
    max_association_request_length: u32,
    device_listen: Option<String>,
    return_listen: Option<String>,
    return_allowed_addresses: Option<Vec<String>>,
    #[serde(default)]
    allow_readable_keys: bool,
}

fn default_ae_title() -> String {
    "PACSGATE".to_string()
}
fn default_max_pdu_length() -> u32 {
    DEFAULT_MAX_PDU_LENGTH
}
fn default_max_association_request_length() -> u32 {
    DEFAULT_MAX_ASSOCIATION_REQUEST_LENGTH
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    certificate: PathBuf,
    private_key: PathBuf,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    require_client_certificate: bool,
    client_identity: Option<ClientIdentity>,
    #[serde(default)]
    client_crl: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    #[serde(default = "d10")]
    tls_handshake: f64,
    #[serde(default = "d10")]
    association_request: f64,
    #[serde(default = "d5")]
    upstream_connect: f64,
    #[serde(default = "d30")]
    upstream_response: f64,
    #[serde(default = "d300")]
    idle: f64,
    #[serde(default = "d30")]
    shutdown_grace: f64,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            tls_handshake: d10(),
            association_request: d10(),
            upstream_connect: d5(),
            upstream_response: d30(),
            idle: d300(),
            shutdown_grace: d30(),
        }
    }
}
fn d5() -> f64 {
    5.0
}
fn d10() -> f64 {
    10.0
}
fn d30() -> f64 {
    30.0
}
fn d300() -> f64 {
    300.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    called_ae: String,
    address: String,
    ae_title: String,
    return_addresses: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    jwt: Option<FileJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    issuer: String,
    audience: String,
    public_key: Option<PathBuf>,
    jwks: Option<PathBuf>,
    algorithms: Option<Vec<String>>,
    #[serde(default = "default_roles_claim")]
    roles_claim: String,
    #[serde(default = "default_leeway")]
    leeway: u64,
    #[serde(default = "default_max_lifetime")]
    max_lifetime: u64,
}

fn default_max_lifetime() -> u64 {
    crate::auth::jwt::DEFAULT_MAX_LIFETIME_SECONDS
}

fn default_roles_claim() -> String {
    "roles".to_string()
}
fn default_leeway() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    name: String,
    password_hash: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRole {
    name: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    move_destinations: Vec<String>,
    #[serde(default)]
    unrestricted_queries: FileUnrestricted,
    #[serde(default = "default_query_min_chars")]
    query_min_chars: usize,
    max_query_results: Option<u32>,
}

/// `unrestricted_queries = true | false | ["patient", "study"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileUnrestricted {
    All(bool),
    Models(Vec<String>),
}

impl Default for FileUnrestricted {
    fn default() -> Self {
        FileUnrestricted::All(false)
    }
}

fn default_query_min_chars() -> usize {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDevice {
    ae_title: String,
    addresses: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// `[limits]`: every limit has a default; 0 turns a rate limit off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLimits {
    associations_per_minute: u32,
    associations_burst: Option<u32>,
    queries_per_minute: u32,
    queries_burst: Option<u32>,
    retrievals_per_minute: u32,
    retrievals_burst: Option<u32>,
    max_associations: usize,
    max_associations_per_user: usize,
    max_pending_connections: usize,
    max_pending_per_address: Option<usize>,
    max_query_results: u32,
    failed_logins: u32,
    failed_logins_per_address: u32,
    failed_login_window: u64,
    lockout_seconds: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            associations_per_minute: 120,
            associations_burst: None,
            queries_per_minute: 120,
            queries_burst: None,
            retrievals_per_minute: 60,
            retrievals_burst: None,
            max_associations: 500,
            max_associations_per_user: 32,
            max_pending_connections: 256,
            max_pending_per_address: None,
            max_query_results: 500,
            failed_logins: 5,
            failed_logins_per_address: 20,
            failed_login_window: 900,
            lockout_seconds: 900,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runtime config (what the gateway uses)
// ---------------------------------------------------------------------------------------------

/// The largest P-DATA-TF PDU the gateway accepts or lets either peer send: 256 KiB by default.
pub const DEFAULT_MAX_PDU_LENGTH: u32 = 256 * 1024;
/// The largest A-ASSOCIATE-RQ an anonymous peer may send (covers 128 presentation contexts and a JWT).
pub const DEFAULT_MAX_ASSOCIATION_REQUEST_LENGTH: u32 = 64 * 1024;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub gateway: Gateway,
    pub tls: Tls,
    pub timeouts: Timeouts,
    pub upstreams: Vec<Upstream>,
    pub jwt: Option<Jwt>,
    pub users: HashMap<String, User>,
    pub roles: HashMap<String, Role>,
    pub limits: Limits,
    pub devices: Vec<Device>,
    pub destinations: Vec<Destination>,
    pub audit: Option<AuditConfig>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not at all.
    pub admin_listen: Option<SocketAddr>,
    /// `[admin]`: the admin port's bounds and access (its `listen` is `admin_listen`).
    pub admin: Option<Admin>,
    /// The DICOMweb door; `None`: not served.
    pub http: Option<Http>,
}

/// `[http]`: an HTTPS reverse proxy in front of the archive's DICOMweb API.
#[derive(Debug, Clone)]
pub struct Http {
    pub listen: SocketAddr,
    /// The archive's HTTP server: scheme, host and port (`http://10.0.0.20:8042`), without a path:
    /// a base URL's path (`http://10.0.0.20:8042/dicom-web`) became `dicomweb_path`.
    pub upstream: String,
    /// DICOMweb root path, the same on the gateway and the archive (`/dicom-web`); `""` is `/`.
    pub dicomweb_path: String,
    pub wado_uri_path: Option<String>,
    /// Other path prefixes passed through for any authenticated user with a role.
    pub allow_paths: Vec<String>,
    pub cors_origins: Vec<String>,
    /// The most of a QIDO-RS response the gateway reads to enforce the result cap.
    pub max_query_response: usize,
    /// Failed (or unfinished) credential checks one client address may have per minute; 0: no limit.
    pub failed_logins_per_minute: u32,
}

/// `[admin]`: the admin port (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Connections served at once; more wait in the kernel's backlog (they hold no descriptor of ours).
    pub max_connections: usize,
    /// How long a request head (and the TLS handshake, with `client_ca`) may take.
    pub header_timeout: Duration,
    /// File descriptors the admin port leaves to the doors: it accepts nothing while fewer are free.
    pub fd_reserve: usize,
    /// `/metrics` answers only `Authorization: Bearer <the token in this file>` (or a client certificate).
    pub bearer_token_file: Option<PathBuf>,
    /// The admin port speaks TLS (the `[tls]` certificate); `/metrics` answers a client certificate
    /// this CA signed (or the bearer token). `/healthz` and `/readyz` need neither.
    pub client_ca: Option<PathBuf>,
}

/// `[audit]`: the audit trail's destinations.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub file: Option<PathBuf>,
    pub syslog: Option<SyslogTarget>,
    /// The bound on the syslog collector's connect and TLS handshake, and on each message written.
    pub syslog_timeout: Duration,
    /// What happens to new associations and web requests while the audit file cannot be written.
    pub on_failure: OnAuditFailure,
    /// AuditSourceID of the DICOM audit messages; `None`: the host name.
    pub source_id: Option<String>,
}

/// `[audit] on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnAuditFailure {
    /// Keep serving; the failure is logged and counted.
    #[default]
    Continue,
    /// Refuse new associations (A-ASSOCIATE-RJ 2/3/1) and web requests (503) until a write succeeds.
    Refuse,
}

/// A syslog collector.
#[derive(Debug, Clone)]
pub enum SyslogTarget {
    /// RFC 5426: one datagram per message.
    Udp(SocketAddr),
    /// RFC 5425: octet-counted frames over TLS.
    Tls {
        address: String,
        server_name: String,
        ca: PathBuf,
    },
}

/// A C-MOVE destination the gateway relays the archive's sub-operations to.
#[derive(Debug, Clone)]
pub struct Destination {
    pub ae_title: String,
    pub address: String,
    pub tls: Option<DestinationTls>,
}

/// TLS for the leg from the gateway to a destination.
#[derive(Debug, Clone)]
pub struct DestinationTls {
    pub ca: PathBuf,
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// The name the destination's certificate must carry; default: the host of `address`.
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub listen: SocketAddr,
    /// Optional plain (non-TLS) listener that admits only `[[device]]` entries.
    pub device_listen: Option<SocketAddr>,
    /// Plain listener for the archive's C-MOVE sub-operation associations (the return path).
    pub return_listen: Option<SocketAddr>,
    /// Who may connect to `return_listen`; `None`: the upstream archives' addresses.
    pub return_allowed_addresses: Option<Vec<ipnet::IpNet>>,
    pub ae_title: String,
    pub max_pdu_length: u32,
    pub max_association_request_length: u32,
    /// Start (and reload) even when private keys or the configuration file are readable by other users.
    pub allow_readable_keys: bool,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub require_client_certificate: bool,
    /// The certificate field that names the user; `None`: the subject CN, then SAN DNS names, then
    /// SAN e-mail addresses (the first that is a configured user).
    pub client_identity: Option<ClientIdentity>,
    /// CRLs of the client CAs (PEM or DER), re-read on every reload. A revoked client certificate
    /// fails the TLS handshake; a CRL that does not load refuses the start or the reload.
    pub client_crl: Vec<PathBuf>,
}

/// `[tls] client_identity`: which field of a verified client certificate is the user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdentity {
    /// The subject's common name.
    Cn,
    /// A subjectAltName dNSName.
    SanDns,
    /// A subjectAltName rfc822Name (e-mail address).
    SanEmail,
}

/// Every wait on the network, named after its phase.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub association_request: Duration,
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub idle: Duration,
    /// After SIGTERM: how long associations in flight may finish before they get an A-ABORT.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub called_ae: String,
    pub address: String,
    pub ae_title: String,
    /// Where this archive's C-MOVE sub-operation associations come from; `None`: the address the
    /// gateway reached it at for the C-MOVE.
    pub return_addresses: Option<Vec<ipnet::IpNet>>,
}

#[derive(Debug, Clone)]
pub enum JwtKeySource {
    PublicKey(PathBuf),
    Jwks(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Jwt {
    pub issuer: String,
    pub audience: String,
    pub key: JwtKeySource,
    pub algorithms: Option<Vec<jsonwebtoken::Algorithm>>,
    pub roles_claim: String,
    pub leeway: u64,
    /// The longest a token may be valid (`exp - iat`), in seconds; `iat` is required.
    pub max_lifetime: u64,
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub password_hash: Option<String>,
    pub roles: Vec<String>,
}

/// A DIMSE operation a role may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    Echo,
    Find,
    Get,
    Move,
    Store,
    /// C-FIND on the Modality Worklist information model.
    Worklist,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Echo => "echo",
            Operation::Find => "find",
            Operation::Get => "get",
            Operation::Move => "move",
            Operation::Store => "store",
            Operation::Worklist => "worklist",
        }
    }

    fn parse(s: &str) -> Option<Operation> {
        Some(match s {
            "echo" => Operation::Echo,
            "find" => Operation::Find,
            "get" => Operation::Get,
            "move" => Operation::Move,
            "store" => Operation::Store,
            "worklist" => Operation::Worklist,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub allow: BTreeSet<Operation>,
    pub move_destinations: Vec<String>,
    /// May run some C-FIND queries the anti-enumeration guard would refuse (`unrestricted` says which).
    pub unrestricted_queries: bool,
    /// The query models this role's queries skip the guard in (only where the role allows `find`).
    pub unrestricted: Unrestricted,
    /// Characters an identifying key needs before its first wildcard (anti-enumeration guard).
    pub query_min_chars: usize,
    /// Overrides `[limits] max_query_results` for holders of this role.
    pub max_query_results: Option<u32>,
}

/// A C-FIND query information model, as `unrestricted_queries` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueryModel {
    /// Patient Root Query/Retrieve Information Model - FIND (1.2.840.10008.5.1.4.1.2.1.1).
    Patient,
    /// Study Root Query/Retrieve Information Model - FIND (1.2.840.10008.5.1.4.1.2.2.1), and QIDO-RS.
    Study,
}

impl QueryModel {
    pub const ALL: [QueryModel; 2] = [QueryModel::Patient, QueryModel::Study];

    pub fn name(self) -> &'static str {
        match self {
            QueryModel::Patient => "patient",
            QueryModel::Study => "study",
        }
    }

    /// The model of a C-FIND SOP class; `None` for others (Patient/Study Only, worklist, ...).
    pub fn of_find_sop_class(uid: &str) -> Option<QueryModel> {
        match uid.trim_end_matches('\0') {
            "1.2.840.10008.5.1.4.1.2.1.1" => Some(QueryModel::Patient),
            "1.2.840.10008.5.1.4.1.2.2.1" => Some(QueryModel::Study),
            _ => None,
        }
    }
}

/// `[[role]] unrestricted_queries`: where the anti-enumeration guard does not apply to this role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Unrestricted {
    /// `false` (the default): the guard applies to every query.
    #[default]
    None,
    /// `true`: no guard on any C-FIND model nor QIDO-RS.
    All,
    /// A list: no guard in these models only (QIDO-RS counts as `study`).
    Models(BTreeSet<QueryModel>),
}

/// A rate: so many per minute with a burst; `per_minute == 0` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

/// `[limits]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub associations: Rate,
    pub queries: Rate,
    pub retrievals: Rate,
    pub max_associations: usize,
    pub max_associations_per_user: usize,
    pub max_pending_connections: usize,
    /// Of those, how many one client address may hold.
    pub max_pending_per_address: usize,
    pub max_query_results: u32,
    pub failed_logins: u32,
    pub failed_logins_per_address: u32,
    pub failed_login_window: Duration,
    pub lockout: Duration,
}

/// A modality that cannot authenticate, let in by calling AE title and source address together.
#[derive(Debug, Clone)]
pub struct Device {
    pub ae_title: String,
    pub addresses: Vec<ipnet::IpNet>,
    pub roles: Vec<String>,
}

impl Device {
    pub fn matches(&self, calling_ae: &str, address: std::net::IpAddr) -> bool {
        let address = unmapped(address);
        self.ae_title == calling_ae && self.addresses.iter().any(|net| net.contains(&address))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.5`, from a dual-stack socket) as the IPv4 address it is.
pub fn unmapped(address: std::net::IpAddr) -> std::net::IpAddr {
    match address {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(address),
        v4 => v4,
    }
}

/// The largest AE title the standard allows.
const AE_TITLE_MAX: usize = 16;

/// A file holding a secret that local users other than the owner and the group can read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadableFile {
    /// What it is: `tls.private_key`, `destination[0].tls.private_key`, or the configuration file.
    pub what: String,
    pub file: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// It carries a POSIX access ACL giving a named user or group read or write access
    /// (`setfacl -m u:NAME:r`; `ls -l` shows `+` after the mode).
    pub acl: bool,
}

impl ReadableFile {
    /// One sentence: which file, its mode, and the fix.
    pub fn describe(&self) -> String {
        if self.acl {
            return format!(
                "{} {} carries a POSIX ACL that lets named users or groups read or write it (mode {:o}+; getfacl shows them): \
                 remove it with setfacl -b; 640 is safe only when the file's group is the service's group (chown root:pacsgate)",
                self.what,
                self.file.display(),
                self.mode & 0o777
            );
        }
        format!(
            "{} {} can be read by other users (mode {:o}, in folders they can enter): chmod o-rwx it; \
             640 is safe only when the file's group is the service's group (chown root:pacsgate)",
            self.what,
            self.file.display(),
            self.mode & 0o777
        )
    }
}

/// Would two listeners collide at bind: the same port (not 0) and the same address, or either on
/// every address (`0.0.0.0` / `[::]`, which on Linux also takes the other family's port)?
fn same_listener(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The `password_hash` shipped in config/pacsgate.toml (of "change-me"): published, so refused at load.
pub const EXAMPLE_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$5I0q52ByG98xmUX5BNx18Q$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s";

/// The extended attribute holding a file's POSIX access ACL (Linux; absent when the ACL is just the mode).
const ACL_ACCESS: &str = "system.posix_acl_access";
/// `ACL_USER` and `ACL_GROUP`: the entries naming a user or group beyond owner, group and others.
const ACL_NAMED_USER: u16 = 0x02;
const ACL_NAMED_GROUP: u16 = 0x08;

/// Does `path` carry a POSIX access ACL whose named user or group entries hold any of `bits`
/// (`0o4` read, `0o2` write, `0o1` search)? The attribute is the kernel's `posix_acl_xattr` layout: a
/// 4-byte version, then 8-byte entries (tag u16, permissions u16, id u32, little-endian). Fail closed:
/// an attribute that cannot be read (other than "not supported" or "absent") or does not parse counts.
fn acl_grants(path: &Path, bits: u16) -> bool {
    let value = match xattr::get(path, ACL_ACCESS) {
        Ok(None) => return false,
        Ok(Some(v)) => v,
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return false,
        Err(e) if e.raw_os_error() == Some(61) => return false, // ENODATA: no ACL
        Err(_) => return true,
    };
    let Some(entries) = value.get(4..) else {
        return true;
    };
    if entries.len() % 8 != 0 {
        return true;
    }
    entries.chunks_exact(8).any(|e| {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        (tag == ACL_NAMED_USER || tag == ACL_NAMED_GROUP) && perm & bits != 0
    })
}

/// Can users other than the owner and the group read or write `file`? When its mode lets "others"
/// in and every folder above it lets them pass (`o+x`, or a folder ACL giving a named user or group
/// search): a key in a 700 folder is safe. A file whose POSIX ACL gives a named user or group read or
/// write counts wherever it is (its mode bits do not tell who that is). A file that cannot be inspected
/// is left to the loader that reads it (which names the error). `(mode, acl)`.
fn readable_by_others(file: &Path) -> Option<(u32, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).ok()?.permissions().mode();
    if acl_grants(file, 0o6) {
        return Some((mode, true));
    }
    if mode & 0o006 == 0 {
        return None;
    }
    let real = std::fs::canonicalize(file).ok()?;
    for folder in real.ancestors().skip(1) {
        let m = std::fs::metadata(folder).ok()?.permissions().mode();
        if m & 0o001 == 0 && !acl_grants(folder, 0o1) {
            return None;
        }
    }
    Some((mode, false))
}

impl Config {
    /// Read and validate a configuration file, and refuse it when a private key it names, or the
    /// file itself while it holds password hashes, can be read by other users (unless
    /// `[gateway] allow_readable_keys = true`). `run`, `check` and every reload load through here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        if !config.gateway.allow_readable_keys
            && let Some(file) = config.readable_secret_files().into_iter().next()
        {
            return Err(ConfigError::Readable {
                path: path.to_path_buf(),
                file,
            });
        }
        Ok(config)
    }

    /// The files holding secrets: the server's private key, the gateway's client keys for
    /// destinations, and the configuration file itself when it holds a password hash.
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        let mut files = vec![("tls.private_key".to_string(), self.tls.private_key.clone())];
        for (i, d) in self.destinations.iter().enumerate() {
            if let Some(key) = d.tls.as_ref().and_then(|t| t.private_key.as_ref()) {
                files.push((format!("destination[{i}].tls.private_key"), key.clone()));
            }
        }
        if self.users.values().any(|u| u.password_hash.is_some()) {
            files.push((
                "the configuration file (it holds password hashes)".to_string(),
                self.path.clone(),
            ));
        }
        files
    }

    /// What `check` warns about: settings that load but leave a door nobody can pass, roles nobody
    /// holds, or a protection switched off without a word.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.users.is_empty() && self.jwt.is_none() && self.devices.is_empty() {
            out.push(
                "nobody can pass: there is no [[user]], no [auth.jwt] and no [[device]], so every association and web request is refused"
                    .to_string(),
            );
        }
        let mut users: Vec<&User> = self.users.values().collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        for u in &users {
            if u.password_hash.is_none() && self.tls.client_ca.is_none() {
                out.push(format!(
                    "user {:?} has no password_hash and [tls] client_ca is not set: they cannot sign in",
                    u.name
                ));
            }
            if u.roles.is_empty() {
                out.push(format!(
                    "user {:?} holds no role: once signed in they may do nothing",
                    u.name
                ));
            }
        }
        let mut roles: Vec<&Role> = self.roles.values().collect();
        roles.sort_by(|a, b| a.name.cmp(&b.name));
        for r in roles {
            let holders: Vec<String> = users
                .iter()
                .filter(|u| u.roles.contains(&r.name))
                .map(|u| format!("user {:?}", u.name))
                .chain(
                    self.devices
                        .iter()
                        .filter(|d| d.roles.contains(&r.name))
                        .map(|d| format!("device {:?}", d.ae_title)),
                )
                .collect();
            if holders.is_empty() {
                out.push(match self.jwt {
                    Some(_) => format!(
                        "role {:?}: no [[user]] or [[device]] holds it (only a token's {:?} claim can give it)",
                        r.name,
                        self.jwt.as_ref().map_or("roles", |j| j.roles_claim.as_str())
                    ),
                    None => format!("role {:?}: nobody holds it", r.name),
                });
            }
            let holders = if holders.is_empty() {
                "tokens only".to_string()
            } else {
                holders.join(", ")
            };
            match &r.unrestricted {
                Unrestricted::None => {}
                _ if !r.allow.contains(&Operation::Find) => out.push(format!(
                    "role {:?}: unrestricted_queries has no effect (the role does not allow \"find\"; it never lifts the guard for another role)",
                    r.name
                )),
                Unrestricted::All => out.push(format!(
                    "role {:?} has unrestricted_queries = true: the anti-enumeration guard is off for every query model and QIDO-RS for its holders ({holders}), who may list every patient (PatientName=*); name the models it needs, e.g. [\"study\"]",
                    r.name
                )),
                Unrestricted::Models(m) => out.push(format!(
                    "role {:?}: unrestricted_queries lifts the anti-enumeration guard for the {} model{} for its holders ({holders})",
                    r.name,
                    m.iter().map(|m| m.name()).collect::<Vec<_>>().join(" and "),
                    if m.contains(&QueryModel::Study) { " (and QIDO-RS)" } else { "" }
                )),
            }
        }
        let l = &self.limits;
        if l.failed_logins == 0 {
            out.push(if l.failed_logins_per_address == 0 {
                "[limits] failed_logins = 0 and failed_logins_per_address = 0: nobody is ever locked out, passwords can be guessed without limit".to_string()
            } else {
                format!(
                    "[limits] failed_logins = 0: no user name is ever locked out; only failed_logins_per_address ({} per {} s) limits password guessing",
                    l.failed_logins_per_address,
                    l.failed_login_window.as_secs()
                )
            });
        } else if l.failed_logins_per_address == 0 {
            out.push(
                "[limits] failed_logins_per_address = 0: one address may try any number of user names"
                    .to_string(),
            );
        }
        if l.lockout == Duration::ZERO && (l.failed_logins > 0 || l.failed_logins_per_address > 0) {
            out.push("[limits] lockout_seconds = 0: a lockout ends at once".to_string());
        }
        out
    }

    /// Those of [`Config::secret_files`] that other users can read or write.
    pub fn readable_secret_files(&self) -> Vec<ReadableFile> {
        self.secret_files()
            .into_iter()
            .filter_map(|(what, file)| {
                readable_by_others(&file).map(|(mode, acl)| ReadableFile {
                    what,
                    file,
                    mode,
                    acl,
                })
            })
            .collect()
    }

    /// Parse and validate configuration text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                let quoted: String = text
                    .lines()
                    .nth(line - 1)
                    .unwrap_or("")
                    .trim()
                    .chars()
                    .take(80)
                    .collect();
                format!(" (line {line}, column {column}: {quoted:?})")
            });
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "{}{}",
                    e.message().trim_end().replace('\n', " "),
                    at.unwrap_or_default()
                ),
                rendering: e.to_string().trim_end().to_string(),
            }
        })?;
        validate(file, path)
    }

    /// The destination an AE title names.
    pub fn destination(&self, ae_title: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.ae_title == ae_title)
    }

    /// The upstream a called AE title maps to.
    pub fn upstream_for(&self, called_ae: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.called_ae == called_ae)
    }
}

fn validate(file: FileConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    let listen: SocketAddr = file.gateway.listen.parse().map_err(|e| {
        invalid(
            "gateway.listen",
            format!("{:?} is not an address:port ({e})", file.gateway.listen),
        )
    })?;
    check_ae_title(&file.gateway.ae_title).map_err(|m| invalid("gateway.ae_title", m))?;
    let max_pdu_length = file.gateway.max_pdu_length;
    if !(4096..=16 * 1024 * 1024).contains(&max_pdu_length) {
        return Err(invalid(
            "gateway.max_pdu_length",
            format!("{max_pdu_length} is outside 4096..=16777216"),
        ));
    }
    let max_rq = file.gateway.max_association_request_length;
    if !(1024..=1024 * 1024).contains(&max_rq) {
        return Err(invalid(
            "gateway.max_association_request_length",
            format!("{max_rq} is outside 1024..=1048576"),
        ));
    }

    let t = &file.timeouts;
    let secs = |key: &str, v: f64| -> Result<Duration, ConfigError> {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(invalid(
                key,
                format!("{v} must be a number of seconds above 0 and at most 86400"),
            ))
        }
    };
    let timeouts = Timeouts {
        tls_handshake: secs("timeouts.tls_handshake", t.tls_handshake)?,
        association_request: secs("timeouts.association_request", t.association_request)?,
        upstream_connect: secs("timeouts.upstream_connect", t.upstream_connect)?,
        upstream_response: secs("timeouts.upstream_response", t.upstream_response)?,
        idle: secs("timeouts.idle", t.idle)?,
        shutdown_grace: secs("timeouts.shutdown_grace", t.shutdown_grace)?,
    };

    let tls = Tls {
        certificate: resolve(&file.tls.certificate),
        private_key: resolve(&file.tls.private_key),
        client_ca: file.tls.client_ca.as_deref().map(resolve),
        require_client_certificate: file.tls.require_client_certificate,
        client_identity: file.tls.client_identity,
        client_crl: file.tls.client_crl.iter().map(|p| resolve(p)).collect(),
    };
    if !tls.client_crl.is_empty() && tls.client_ca.is_none() {
        return Err(invalid(
            "tls.client_crl",
            "is set but tls.client_ca is not: there are no client certificates to revoke".into(),
        ));
    }
    if tls.require_client_certificate && tls.client_ca.is_none() {
        return Err(invalid(
            "tls.require_client_certificate",
            "is true but tls.client_ca is not set: there is nothing to verify client certificates against".into(),
        ));
    }

    if file.upstream.is_empty() {
        return Err(invalid(
            "upstream",
            "no [[upstream]] is configured: every association would be rejected".into(),
        ));
    }
    let mut upstreams = Vec::new();
    for (i, u) in file.upstream.into_iter().enumerate() {
        let key = |k: &str| format!("upstream[{i}].{k}");
        check_ae_title(&u.called_ae).map_err(|m| invalid(&key("called_ae"), m))?;
        check_ae_title(&u.ae_title).map_err(|m| invalid(&key("ae_title"), m))?;
        if u.address
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(invalid(
                &key("address"),
                format!("{:?} is not host:port", u.address),
            ));
        }
        if upstreams
            .iter()
            .any(|o: &Upstream| o.called_ae == u.called_ae)
        {
            return Err(invalid(
                &key("called_ae"),
                format!("{:?} is mapped twice", u.called_ae),
            ));
        }
        let return_addresses = u
            .return_addresses
            .as_deref()
            .map(|list| address_list(list).map_err(|m| invalid(&key("return_addresses"), m)))
            .transpose()?;
        upstreams.push(Upstream {
            called_ae: u.called_ae,
            address: u.address,
            ae_title: u.ae_title,
            return_addresses,
        });
    }

    let mut roles = HashMap::new();
    for (i, r) in file.role.into_iter().enumerate() {
        let mut allow = BTreeSet::new();
        for op in &r.allow {
            let op = Operation::parse(op).ok_or_else(|| {
                invalid(
                    &format!("role[{i}].allow"),
                    format!("unknown operation {op:?}; expected echo, find, get, move, store or worklist"),
                )
            })?;
            allow.insert(op);
        }
        if roles.contains_key(&r.name) {
            return Err(invalid(
                &format!("role[{i}].name"),
                format!("role {:?} is defined twice", r.name),
            ));
        }
        for dest in &r.move_destinations {
            check_ae_title(dest)
                .map_err(|m| invalid(&format!("role[{i}].move_destinations"), m))?;
        }
        if r.max_query_results == Some(0) {
            return Err(invalid(
                &format!("role[{i}].max_query_results"),
                "must be at least 1".into(),
            ));
        }
        let unrestricted = match r.unrestricted_queries {
            FileUnrestricted::All(false) => Unrestricted::None,
            FileUnrestricted::All(true) => Unrestricted::All,
            FileUnrestricted::Models(names) => {
                let mut models = BTreeSet::new();
                for name in &names {
                    let model = QueryModel::ALL
                        .into_iter()
                        .find(|m| m.name() == name)
                        .ok_or_else(|| {
                            invalid(
                                &format!("role[{i}].unrestricted_queries"),
                                format!(
                                    "unknown query model {name:?} (use \"patient\", \"study\", or true for all)"
                                ),
                            )
                        })?;
                    models.insert(model);
                }
                if models.is_empty() {
                    Unrestricted::None
                } else {
                    Unrestricted::Models(models)
                }
            }
        };
        roles.insert(
            r.name.clone(),
            Role {
                name: r.name,
                allow,
                move_destinations: r.move_destinations,
                unrestricted_queries: unrestricted != Unrestricted::None,
                unrestricted,
                query_min_chars: r.query_min_chars,
                max_query_results: r.max_query_results,
            },
        );
    }

    let mut users = HashMap::new();
    for (i, u) in file.user.into_iter().enumerate() {
        if u.name.is_empty() {
            return Err(invalid(&format!("user[{i}].name"), "is empty".into()));
        }
        if u.password_hash.is_some() {
            crate::auth::password::check_login_name(&u.name).map_err(|m| {
                invalid(
                    &format!("user[{i}].name"),
                    format!("user {:?} cannot sign in with a password: {m}", u.name),
                )
            })?;
        }
        if let Some(hash) = &u.password_hash {
            crate::auth::password::check_hash_format(hash).map_err(|m| {
                invalid(
                    &format!("user[{i}].password_hash"),
                    format!("user {:?}: {m}", u.name),
                )
            })?;
            if hash == EXAMPLE_PASSWORD_HASH {
                return Err(invalid(
                    &format!("user[{i}].password_hash"),
                    format!(
                        "user {:?} has the example configuration's published hash (of \"change-me\"): anyone may sign in as them; \
                         make a hash of a real password with `pacsgate hash-password` and put it here",
                        u.name
                    ),
                ));
            }
        }
        for role in &u.roles {
            if !roles.contains_key(role) {
                return Err(invalid(
                    &format!("user[{i}].roles"),
                    format!(
                        "user {:?} names role {role:?}, which no [[role]] defines",
                        u.name
                    ),
                ));
            }
        }
        if users.contains_key(&u.name) {
            return Err(invalid(
                &format!("user[{i}].name"),
                format!("user {:?} is defined twice", u.name),
            ));
        }
        users.insert(
            u.name.clone(),
            User {
                name: u.name,
                password_hash: u.password_hash,
                roles: u.roles,
            },
        );
    }

    let jwt = match file.auth.jwt {
        None => None,
        Some(j) => {
            let key = match (j.public_key, j.jwks) {
                (Some(p), None) => JwtKeySource::PublicKey(resolve(&p)),
                (None, Some(p)) => JwtKeySource::Jwks(resolve(&p)),
                _ => {
                    return Err(invalid(
                        "auth.jwt",
                        "set exactly one of public_key or jwks".into(),
                    ));
                }
            };
            let algorithms = match j.algorithms {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for a in list {
                        let alg: jsonwebtoken::Algorithm = a.parse().map_err(|_| {
                            invalid(
                                "auth.jwt.algorithms",
                                format!("unknown algorithm {a:?} (e.g. RS256, ES256, EdDSA)"),
                            )
                        })?;
                        if matches!(
                            alg,
                            jsonwebtoken::Algorithm::HS256
                                | jsonwebtoken::Algorithm::HS384
                                | jsonwebtoken::Algorithm::HS512
                        ) {
                            return Err(invalid(
                                "auth.jwt.algorithms",
                                format!("{a} is a shared-secret algorithm; use a public-key one"),
                            ));
                        }
                        out.push(alg);
                    }
                    if out.is_empty() {
                        return Err(invalid("auth.jwt.algorithms", "is empty".into()));
                    }
                    Some(out)
                }
            };
            if j.issuer.is_empty() {
                return Err(invalid("auth.jwt.issuer", "is empty".into()));
            }
            if j.audience.is_empty() {
                return Err(invalid("auth.jwt.audience", "is empty".into()));
            }
            if j.leeway > crate::auth::jwt::MAX_LEEWAY_SECONDS {
                return Err(invalid(
                    "auth.jwt.leeway",
                    format!(
                        "{} s is more than the {} s allowed: a token would be accepted that long after it expired",
                        j.leeway,
                        crate::auth::jwt::MAX_LEEWAY_SECONDS
                    ),
                ));
            }
            if j.max_lifetime == 0 {
                return Err(invalid(
                    "auth.jwt.max_lifetime",
                    "is 0: no token could be accepted (seconds, default 86400 = 24 h)".into(),
                ));
            }
            Some(Jwt {
                issuer: j.issuer,
                audience: j.audience,
                key,
                algorithms,
                roles_claim: j.roles_claim,
                leeway: j.leeway,
                max_lifetime: j.max_lifetime,
            })
        }
    };

    let l = file.limits;
    let rate = |key: &str, per_minute: u32, burst: Option<u32>| -> Result<Rate, ConfigError> {
        let burst = burst.unwrap_or(per_minute.max(1));
        if per_minute > 0 && burst == 0 {
            return Err(invalid(key, "burst must be at least 1".into()));
        }
        Ok(Rate { per_minute, burst })
    };
    if l.max_query_results == 0 {
        return Err(invalid(
            "limits.max_query_results",
            "must be at least 1".into(),
        ));
    }
    for (key, v) in [
        ("limits.max_associations", l.max_associations),
        (
            "limits.max_associations_per_user",
            l.max_associations_per_user,
        ),
        ("limits.max_pending_connections", l.max_pending_connections),
        (
            "limits.max_pending_per_address",
            l.max_pending_per_address.unwrap_or(1),
        ),
    ] {
        if v == 0 {
            return Err(invalid(key, "must be at least 1".into()));
        }
    }
    // Default: an eighth of the pending slots, at most 32.
    let max_pending_per_address = l
        .max_pending_per_address
        .unwrap_or((l.max_pending_connections / 8).clamp(1, 32));
    if max_pending_per_address > l.max_pending_connections {
        return Err(invalid(
            "limits.max_pending_per_address",
            format!(
                "{max_pending_per_address} is more than max_pending_connections ({}): one address could take every slot",
                l.max_pending_connections
            ),
        ));
    }
    let limits = Limits {
        associations: rate(
            "limits.associations_burst",
            l.associations_per_minute,
            l.associations_burst,
        )?,
        queries: rate(
            "limits.queries_burst",
            l.queries_per_minute,
            l.queries_burst,
        )?,
        retrievals: rate(
            "limits.retrievals_burst",
            l.retrievals_per_minute,
            l.retrievals_burst,
        )?,
        max_associations: l.max_associations,
        max_associations_per_user: l.max_associations_per_user,
        max_pending_connections: l.max_pending_connections,
        max_pending_per_address,
        max_query_results: l.max_query_results,
        failed_logins: l.failed_logins,
        failed_logins_per_address: l.failed_logins_per_address,
        failed_login_window: Duration::from_secs(l.failed_login_window.max(1)),
        lockout: Duration::from_secs(l.lockout_seconds),
    };

    let mut devices = Vec::new();
    for (i, d) in file.device.into_iter().enumerate() {
        check_ae_title(&d.ae_title).map_err(|m| invalid(&format!("device[{i}].ae_title"), m))?;
        if d.addresses.is_empty() {
            return Err(invalid(
                &format!("device[{i}].addresses"),
                "is empty: a device must be bound to its addresses".into(),
            ));
        }
        let key = format!("device[{i}].addresses");
        let addresses = address_list(&d.addresses).map_err(|m| invalid(&key, m))?;
        // With the entries of the same AE title before it: together they must not let that AE in from anywhere.
        let same_ae: Vec<ipnet::IpNet> = devices
            .iter()
            .filter(|o: &&Device| o.ae_title == d.ae_title)
            .flat_map(|o| o.addresses.iter().copied())
            .chain(addresses.iter().copied())
            .collect();
        if let Some(all) = covers_everything(&same_ae) {
            return Err(invalid(
                &key,
                format!(
                    "device {:?}: together with the other [[device]] entries for this AE title the addresses cover {all}, every address there is: a device is let in by AE title and address, and an AE title is no secret",
                    d.ae_title
                ),
            ));
        }
        for role in &d.roles {
            if !roles.contains_key(role) {
                return Err(invalid(
                    &format!("device[{i}].roles"),
                    format!(
                        "device {:?} names role {role:?}, which no [[role]] defines",
                        d.ae_title
                    ),
                ));
            }
        }
        devices.push(Device {
            ae_title: d.ae_title,
            addresses,
            roles: d.roles,
        });
    }
    let mut destinations: Vec<Destination> = Vec::new();
    for (i, d) in file.destination.into_iter().enumerate() {
        let key = |k: &str| format!("destination[{i}].{k}");
        check_ae_title(&d.ae_title).map_err(|m| invalid(&key("ae_title"), m))?;
        let host = match d.address.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                h.trim_matches(['[', ']']).to_string()
            }
            _ => {
                return Err(invalid(
                    &key("address"),
                    format!("{:?} is not host:port", d.address),
                ));
            }
        };
        if destinations.iter().any(|o| o.ae_title == d.ae_title) {
            return Err(invalid(
                &key("ae_title"),
                format!("{:?} is defined twice", d.ae_title),
            ));
        }
        let tls = match d.tls {
            None => None,
            Some(t) => {
                if t.certificate.is_some() != t.private_key.is_some() {
                    return Err(invalid(
                        &key("tls"),
                        "certificate and private_key go together".into(),
                    ));
                }
                Some(DestinationTls {
                    ca: resolve(&t.ca),
                    certificate: t.certificate.as_deref().map(resolve),
                    private_key: t.private_key.as_deref().map(resolve),
                    server_name: t.server_name.unwrap_or(host),
                })
            }
        };
        destinations.push(Destination {
            ae_title: d.ae_title,
            address: d.address,
            tls,
        });
    }
    for role in roles.values() {
        for dest in &role.move_destinations {
            if !destinations.iter().any(|d| &d.ae_title == dest) {
                return Err(invalid(
                    "role.move_destinations",
                    format!(
                        "role {:?} lists {dest:?}, which no [[destination]] defines: C-MOVE results must come back through the gateway",
                        role.name
                    ),
                ));
            }
        }
    }
    let return_listen = match &file.gateway.return_listen {
        None => None,
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "gateway.return_listen",
                format!("{a:?} is not an address:port ({e})"),
            )
        })?),
    };
    if !destinations.is_empty() && return_listen.is_none() {
        return Err(invalid(
            "gateway.return_listen",
            "[[destination]] entries need a return_listen for the archive's sub-operations".into(),
        ));
    }
    let return_allowed_addresses = file
        .gateway
        .return_allowed_addresses
        .as_deref()
        .map(|list| address_list(list).map_err(|m| invalid("gateway.return_allowed_addresses", m)))
        .transpose()?;
    let audit = match file.audit {
        None => None,
        Some(a) => {
            let syslog = match a.syslog.as_deref() {
                None => None,
                Some(url) => {
                    if let Some(rest) = url.strip_prefix("udp://") {
                        Some(SyslogTarget::Udp(rest.parse().map_err(|_| {
                            invalid("audit.syslog", format!("{url:?}: expected udp://IP:PORT"))
                        })?))
                    } else if let Some(rest) = url.strip_prefix("tls://") {
                        let host = match rest.rsplit_once(':') {
                            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                                h.trim_matches(['[', ']']).to_string()
                            }
                            _ => {
                                return Err(invalid(
                                    "audit.syslog",
                                    format!("{url:?}: expected tls://HOST:PORT"),
                                ));
                            }
                        };
                        let ca = a.syslog_ca.as_deref().map(resolve).ok_or_else(|| {
                            invalid(
                                "audit.syslog_ca",
                                "syslog over TLS needs the collector's CA".into(),
                            )
                        })?;
                        Some(SyslogTarget::Tls {
                            address: rest.to_string(),
                            server_name: a.syslog_server_name.clone().unwrap_or(host),
                            ca,
                        })
                    } else {
                        return Err(invalid(
                            "audit.syslog",
                            format!("{url:?}: expected udp://IP:PORT or tls://HOST:PORT"),
                        ));
                    }
                }
            };
            let on_failure = match a.on_failure.as_deref() {
                None | Some("continue") => OnAuditFailure::Continue,
                Some("refuse") => OnAuditFailure::Refuse,
                Some(other) => {
                    return Err(invalid(
                        "audit.on_failure",
                        format!("{other:?}: expected \"continue\" or \"refuse\""),
                    ));
                }
            };
            if on_failure == OnAuditFailure::Refuse && a.file.is_none() {
                return Err(invalid(
                    "audit.on_failure",
                    "\"refuse\" needs an audit file (audit.file) to watch".into(),
                ));
            }
            if let Some(id) = &a.source_id
                && (id.is_empty() || id.chars().count() > 64 || id.chars().any(char::is_control))
            {
                return Err(invalid(
                    "audit.source_id",
                    format!("{id:?}: 1 to 64 characters, no control characters"),
                ));
            }
            Some(AuditConfig {
                file: a.file.as_deref().map(resolve),
                syslog,
                syslog_timeout: secs("audit.syslog_timeout", a.syslog_timeout)?,
                on_failure,
                source_id: a.source_id,
            })
        }
    };
    let http = match file.http {
        None => None,
        Some(h) => {
            let listen = h.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "http.listen",
                    format!("{:?} is not an address:port ({e})", h.listen),
                )
            })?;
            let (upstream, base_path) = upstream_base_url(&h.upstream)
                .map_err(|m| invalid("http.upstream", format!("{:?}: {m}", h.upstream)))?;
            let path = |key: &str, p: &str| -> Result<String, ConfigError> {
                if !p.starts_with('/') || p.contains("..") {
                    return Err(invalid(key, format!("{p:?} must be an absolute path")));
                }
                Ok(p.trim_end_matches('/').to_string())
            };
            let configured = h
                .dicomweb_path
                .as_deref()
                .map(|p| path("http.dicomweb_path", p))
                .transpose()?;
            let base_path = base_path.map(|p| path("http.upstream", &p)).transpose()?;
            // The base URL's path is the DICOMweb root; dicomweb_path may say it again, not otherwise.
            let dicomweb_path = match (base_path, configured) {
                (Some(from_url), Some(given)) if from_url != given => {
                    return Err(invalid(
                        "http.dicomweb_path",
                        format!(
                            "{given:?} contradicts http.upstream {:?}, whose path {from_url:?} is the DICOMweb root: give the root once",
                            h.upstream
                        ),
                    ));
                }
                (Some(p), _) | (None, Some(p)) => p,
                (None, None) => DEFAULT_DICOMWEB_PATH.to_string(),
            };
            let wado_uri_path = h
                .wado_uri_path
                .as_deref()
                .map(|p| path("http.wado_uri_path", p))
                .transpose()?;
            let allow_paths = h
                .allow_paths
                .iter()
                .map(|p| path("http.allow_paths", p))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Http {
                listen,
                upstream,
                dicomweb_path,
                wado_uri_path,
                allow_paths,
                cors_origins: h.cors_origins,
                max_query_response: h.max_query_response.max(1024),
                failed_logins_per_minute: h.failed_logins_per_minute,
            })
        }
    };
    let admin = match file.admin {
        None => None,
        Some(a) => {
            let listen = a.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "admin.listen",
                    format!("{:?} is not an address:port ({e})", a.listen),
                )
            })?;
            if a.max_connections == 0 {
                return Err(invalid(
                    "admin.max_connections",
                    "is 0: the admin port would answer nobody".into(),
                ));
            }
            Some(Admin {
                listen,
                max_connections: a.max_connections,
                header_timeout: secs("admin.header_timeout", a.header_timeout)?,
                fd_reserve: a.fd_reserve,
                bearer_token_file: a.bearer_token_file.as_deref().map(resolve),
                client_ca: a.client_ca.as_deref().map(resolve),
            })
        }
    };
    let admin_listen = admin.as_ref().map(|a| a.listen);
    let device_listen = match &file.gateway.device_listen {
        None => None,
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "gateway.device_listen",
                format!("{a:?} is not an address:port ({e})"),
            )
        })?),
    };
    let listeners: Vec<(&str, SocketAddr)> = [
        ("gateway.listen", Some(listen)),
        ("gateway.device_listen", device_listen),
        ("gateway.return_listen", return_listen),
        ("http.listen", http.as_ref().map(|h| h.listen)),
        ("admin.listen", admin_listen),
    ]
    .into_iter()
    .filter_map(|(key, a)| a.map(|a| (key, a)))
    .collect();
    for (i, (first, a)) in listeners.iter().enumerate() {
        if let Some((second, b)) = listeners[i + 1..]
            .iter()
            .find(|(_, b)| same_listener(*a, *b))
        {
            return Err(invalid(
                second,
                format!(
                    "{b} is the address {first} ({a}) listens on too: give each listener its own port"
                ),
            ));
        }
    }

    Ok(Config {
        path: path.to_path_buf(),
        limits,
        devices,
        destinations,
        audit,
        admin_listen,
        admin,
        http,
        gateway: Gateway {
            listen,
            device_listen,
            return_listen,
            return_allowed_addresses,
            ae_title: file.gateway.ae_title,
            max_pdu_length,
            max_association_request_length: max_rq,
            allow_readable_keys: file.gateway.allow_readable_keys,
        },
        tls,
        timeouts,
        upstreams,
        jwt,
        users,
        roles,
    })
}

/// `[http] upstream`: `http://HOST:PORT` or a DICOMweb base URL `http://HOST:PORT/PATH`. Returns the
/// origin (`http://HOST:PORT`) and the path, if any (`/PATH`; a lone `/` is none).
fn upstream_base_url(url: &str) -> Result<(String, Option<String>), String> {
    let rest = url.strip_prefix("http://").ok_or(
        "expected http://HOST:PORT or a DICOMweb base URL http://HOST:PORT/dicom-web (the archive's plain HTTP port)",
    )?;
    if rest.contains(['?', '#', '@', '\\'])
        || rest.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("give scheme, host, port and the DICOMweb root path only (no query, fragment or user name)".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.parse::<hyper::http::uri::Authority>().is_err() {
        return Err(format!("{authority:?} is not HOST:PORT"));
    }
    let path = path.trim_end_matches('/');
    let origin = format!("http://{authority}");
    Ok((origin, (!path.is_empty()).then(|| path.to_string())))
}

/// A list of addresses and CIDR blocks that admit peers without credentials (`[[device]]`, the return
/// path): parsed, IPv4-mapped IPv6 blocks written as the IPv4 blocks they are (peers are compared as
/// IPv4), and refused when together they cover every address of a family.
fn address_list(list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    let mut nets = Vec::new();
    for a in list {
        let net = a
            .parse::<ipnet::IpNet>()
            .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("{a:?} is not an address or CIDR block"))?;
        nets.push(unmap(net));
    }
    if let Some(all) = covers_everything(&nets) {
        return Err(format!(
            "{list:?} covers {all}, every address there is: name the hosts or networks that may connect"
        ));
    }
    Ok(nets)
}

/// An IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) as the IPv4 block it stands for; others truncated
/// to their network address.
fn unmap(net: ipnet::IpNet) -> ipnet::IpNet {
    if let ipnet::IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return ipnet::IpNet::V4(v4.trunc());
    }
    net.trunc()
}

/// `Some("0.0.0.0/0")` or `Some("::/0")` when the blocks, merged, cover a whole address family.
fn covers_everything(nets: &[ipnet::IpNet]) -> Option<String> {
    let merged = ipnet::IpNet::aggregate(&nets.iter().map(|n| unmap(*n)).collect::<Vec<_>>());
    merged
        .iter()
        .find(|n| n.prefix_len() == 0)
        .map(|n| n.to_string())
}

/// An AE title: 1 to 16 characters of the ISO 646 basic set, no backslash or control characters.
fn check_ae_title(ae: &str) -> Result<(), String> {
    if ae.trim().is_empty() || ae.len() > AE_TITLE_MAX {
        return Err(format!("{ae:?} must be 1 to {AE_TITLE_MAX} characters"));
    }
    if ae != ae.trim() {
        return Err(format!("{ae:?} has leading or trailing spaces"));
    }
    if !ae
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '\\' || c == ' ')
    {
        return Err(format!("{ae:?} has characters an AE title cannot hold"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
listen = "127.0.0.1:2762"
[tls]
certificate = "server.crt"
private_key = "server.key"
[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:4242"
ae_title = "ORTHANC"
[[role]]
name = "reader"
allow = ["echo", "find"]
[[user]]
name = "alice"
roles = ["reader"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/pacsgate/pacsgate.toml"))
    }

    #[test]
    fn minimal_config_validates_and_resolves_paths() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.tls.certificate, Path::new("/etc/pacsgate/server.crt"));
        assert_eq!(
            c.upstream_for("ARCHIVE").map(|u| u.ae_title.as_str()),
            Some("ORTHANC")
        );
        assert!(c.upstream_for("OTHER").is_none());
        assert_eq!(c.timeouts.idle, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace(
            "ae_title = \"ORTHANC\"",
            "ae_title = \"ORTHANC\"\naetitle = \"X\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("aetitle"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                MINIMAL.replace("127.0.0.1:2762", "nowhere"),
                "gateway.listen",
            ),
            (
                MINIMAL.replace("\"ORTHANC\"", "\"WAY_TOO_LONG_AE_TITLE\""),
                "upstream[0].ae_title",
            ),
            (MINIMAL.replace("\"find\"]", "\"fnd\"]"), "role[0].allow"),
            (
                MINIMAL.replace("roles = [\"reader\"]", "roles = [\"admin\"]"),
                "user[0].roles",
            ),
            (
                format!("{MINIMAL}\n[timeouts]\nidle = -1\n"),
                "timeouts.idle",
            ),
            (
                MINIMAL.replace(
                    "[[upstream]]",
                    "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n[[upstream]]",
                ),
                "auth.jwt",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "expected {key} in {err}");
        }
    }

    #[test]
    fn two_listen_keys_on_one_address_are_refused_naming_both() {
        let with = |gateway: &str, rest: &str| {
            MINIMAL.replace(
                "listen = \"127.0.0.1:2762\"",
                &format!("listen = \"127.0.0.1:2762\"\n{gateway}"),
            ) + rest
        };
        let err = |text: String| {
            parse(&text)
                .map(|_| ())
                .expect_err("two listeners on one address")
                .to_string()
        };
        let e = err(with("", "\n[admin]\nlisten = \"127.0.0.1:2762\"\n"));
        assert!(
            e.contains("admin.listen")
                && e.contains("gateway.listen")
                && e.contains("127.0.0.1:2762"),
            "{e}"
        );
        let e = err(with("device_listen = \"0.0.0.0:2762\"", ""));
        assert!(
            e.contains("gateway.device_listen") && e.contains("gateway.listen"),
            "{e}"
        );
        // Another port, or the same port on another loopback address: fine.
        parse(&with("", "\n[admin]\nlisten = \"127.0.0.1:9090\"\n")).expect("another port");
        parse(&with("", "\n[admin]\nlisten = \"127.0.0.2:2762\"\n")).expect("another address");
    }

    #[test]
    fn the_example_configs_published_password_hash_is_refused() {
        let example = include_str!("../../config/pacsgate.toml");
        assert!(
            example.contains(EXAMPLE_PASSWORD_HASH),
            "the example's hash changed"
        );
        let err = Config::parse(example, Path::new("/etc/pacsgate/pacsgate.toml"))
            .expect_err("the example's hash")
            .to_string();
        assert!(
            err.contains("password_hash")
                && err.contains("\"dr.house\"")
                && err.contains("pacsgate hash-password"),
            "{err}"
        );
        // The same file with a hash of its own loads.
        let own = example.replace(
            EXAMPLE_PASSWORD_HASH,
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s",
        );
        Config::parse(&own, Path::new("/etc/pacsgate/pacsgate.toml")).expect("own hash");
    }

    #[test]
    fn a_bad_password_hash_is_refused_at_load() {
        let text = MINIMAL.replace(
            "name = \"alice\"",
            "name = \"alice\"\npassword_hash = \"plaintext\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("user[0].password_hash"), "{err}");
    }

    fn with_device(addresses: &str) -> String {
        format!(
            "{MINIMAL}\n[[device]]\nae_title = \"CT1\"\naddresses = {addresses}\nroles = [\"reader\"]\n"
        )
    }

    #[test]
    fn a_device_cidr_that_covers_every_address_is_refused() {
        for everything in [
            r#"["0.0.0.0/0"]"#,
            r#"["::/0"]"#,
            r#"["::0/0"]"#,
            r#"["0:0:0:0:0:0:0:0/0"]"#,
            r#"["10.1.2.3/0"]"#,
            r#"["::ffff:0.0.0.0/96"]"#,
            r#"["::ffff:0:0/96"]"#,
            r#"["0.0.0.0/1", "128.0.0.0/1"]"#,
            r#"["10.0.0.5", "::/1", "8000::/1"]"#,
        ] {
            let err = parse(&with_device(everything)).unwrap_err().to_string();
            assert!(
                err.contains("device[0].addresses") && err.contains("every address"),
                "{everything}: {err}"
            );
        }
        // Two entries for the same AE title, each half of the space.
        let text = format!(
            "{}\n[[device]]\nae_title = \"CT1\"\naddresses = [\"128.0.0.0/1\"]\n",
            with_device(r#"["0.0.0.0/1"]"#)
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("device[1].addresses"), "{err}");
        // Real networks are fine, and an IPv4-mapped block is the IPv4 block (and matches).
        let c = parse(&with_device(
            r#"["10.0.0.0/8", "::ffff:192.168.0.0/112", "fd00::/8"]"#,
        ))
        .expect("valid");
        let d = &c.devices[0];
        assert_eq!(d.addresses[1].to_string(), "192.168.0.0/16");
        assert!(d.matches("CT1", "192.168.3.4".parse().expect("ip")));
        assert!(d.matches("CT1", "::ffff:10.9.8.7".parse().expect("ip")));
        assert!(!d.matches("CT1", "11.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn return_path_address_lists_follow_the_same_rule() {
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:2762\"",
            "listen = \"127.0.0.1:2762\"\nreturn_allowed_addresses = [\"::/0\"]",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("gateway.return_allowed_addresses"), "{err}");
        let text = MINIMAL.replace(
            "ae_title = \"ORTHANC\"",
            "ae_title = \"ORTHANC\"\nreturn_addresses = [\"0.0.0.0/0\"]",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("upstream[0].return_addresses"), "{err}");
        let text = MINIMAL.replace(
            "ae_title = \"ORTHANC\"",
            "ae_title = \"ORTHANC\"\nreturn_addresses = [\"10.0.0.21\", \"10.0.0.22\"]",
        );
        let c = parse(&text).expect("valid");
        assert_eq!(
            c.upstreams[0].return_addresses.as_ref().map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn client_identity_and_crls_are_read_and_checked() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.tls.client_identity, None, "default: CN, then SANs");
        assert!(c.tls.client_crl.is_empty());
        for (value, want) in [
            ("cn", ClientIdentity::Cn),
            ("san_dns", ClientIdentity::SanDns),
            ("san_email", ClientIdentity::SanEmail),
        ] {
            let text = MINIMAL.replace(
                "private_key = \"server.key\"",
                &format!(
                    "private_key = \"server.key\"\nclient_ca = \"ca.crt\"\nclient_identity = \"{value}\"\nclient_crl = [\"ca.crl\"]"
                ),
            );
            let c = parse(&text).expect("valid");
            assert_eq!(c.tls.client_identity, Some(want));
            assert_eq!(
                c.tls.client_crl,
                vec![PathBuf::from("/etc/pacsgate/ca.crl")]
            );
        }
        let text = MINIMAL.replace(
            "private_key = \"server.key\"",
            "private_key = \"server.key\"\nclient_identity = \"subject\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("client_identity") && err.contains("san_dns"),
            "{err}"
        );
        let text = MINIMAL.replace(
            "private_key = \"server.key\"",
            "private_key = \"server.key\"\nclient_crl = [\"ca.crl\"]",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("tls.client_crl"), "{err}");
    }

    #[test]
    fn jwt_leeway_has_an_upper_bound() {
        let jwt = |leeway: u64| {
            MINIMAL.replace(
                "[[upstream]]",
                &format!(
                    "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\npublic_key = \"jwt.pem\"\nleeway = {leeway}\n[[upstream]]"
                ),
            )
        };
        assert_eq!(
            parse(&jwt(300)).expect("valid").jwt.map(|j| j.leeway),
            Some(300)
        );
        let err = parse(&jwt(301)).unwrap_err().to_string();
        assert!(
            err.contains("auth.jwt.leeway") && err.contains("300"),
            "{err}"
        );
    }

    fn with_http(http: &str) -> String {
        format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:8443\"\n{http}\n")
    }

    #[test]
    fn the_http_upstream_may_be_a_dicomweb_base_url() {
        let http = |text: &str| parse(&with_http(text)).map(|c| c.http.expect("[http]"));
        for (text, origin, root) in [
            (
                "upstream = \"http://pacs:8042\"",
                "http://pacs:8042",
                "/dicom-web",
            ),
            (
                "upstream = \"http://pacs:8042/\"",
                "http://pacs:8042",
                "/dicom-web",
            ),
            (
                "upstream = \"http://pacs:8042/dicom-web\"",
                "http://pacs:8042",
                "/dicom-web",
            ),
            (
                "upstream = \"http://pacs:8042/orthanc/dicom-web/\"",
                "http://pacs:8042",
                "/orthanc/dicom-web",
            ),
            (
                "upstream = \"http://pacs:8042/dicom-web\"\ndicomweb_path = \"/dicom-web/\"",
                "http://pacs:8042",
                "/dicom-web",
            ),
            (
                "upstream = \"http://pacs:8042\"\ndicomweb_path = \"/wado\"",
                "http://pacs:8042",
                "/wado",
            ),
            (
                "upstream = \"http://[::1]:8042/rs\"",
                "http://[::1]:8042",
                "/rs",
            ),
        ] {
            let h = http(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (h.upstream.as_str(), h.dicomweb_path.as_str()),
                (origin, root),
                "{text}"
            );
        }
        for (text, key) in [
            (
                "upstream = \"http://pacs:8042/dicom-web\"\ndicomweb_path = \"/wado\"",
                "http.dicomweb_path",
            ),
            ("upstream = \"https://pacs:8042\"", "http.upstream"),
            (
                "upstream = \"http://pacs:8042/dicom-web?x=1\"",
                "http.upstream",
            ),
            ("upstream = \"http://user@pacs:8042\"", "http.upstream"),
            ("upstream = \"http:///dicom-web\"", "http.upstream"),
            ("upstream = \"http://pacs:8042/a/../b\"", "http.upstream"),
        ] {
            let err = http(text)
                .err()
                .unwrap_or_else(|| panic!("{text} accepted"))
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn warnings_name_a_door_nobody_can_pass_and_quiet_switches() {
        let w = parse(MINIMAL).expect("valid").warnings().join("\n");
        assert!(
            w.contains("\"alice\" has no password_hash and [tls] client_ca is not set"),
            "{w}"
        );
        let base = MINIMAL.replace(
            "private_key = \"server.key\"",
            "private_key = \"server.key\"\nclient_ca = \"ca.crt\"",
        );
        assert_eq!(
            parse(&base).expect("valid").warnings(),
            Vec::<String>::new()
        );
        let nobody = base.replace("[[user]]\nname = \"alice\"\nroles = [\"reader\"]\n", "");
        let w = parse(&nobody).expect("valid").warnings().join("\n");
        assert!(w.contains("nobody can pass"), "{w}");
        assert!(w.contains("role \"reader\": nobody holds it"), "{w}");
        let quiet = base.replace(
            "allow = [\"echo\", \"find\"]",
            "allow = [\"echo\", \"find\"]\nunrestricted_queries = true",
        ) + "\n[limits]\nfailed_logins = 0\n";
        let w = parse(&quiet).expect("valid").warnings().join("\n");
        assert!(
            w.contains("role \"reader\" has unrestricted_queries = true")
                && w.contains("user \"alice\""),
            "{w}"
        );
        assert!(w.contains("failed_logins = 0"), "{w}");
    }

    #[test]
    fn keys_and_a_config_with_password_hashes_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pacsgate-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let key = dir.join("server.key");
        std::fs::write(&key, "key").expect("write");
        let path = dir.join("pacsgate.toml");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s";
        let text = MINIMAL.replace(
            "name = \"alice\"",
            &format!("name = \"alice\"\npassword_hash = \"{hash}\""),
        );
        std::fs::write(&path, &text).expect("write");
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        mode(&path, 0o640);
        for (key_mode, refused) in [(0o600, false), (0o640, false), (0o644, true), (0o602, true)] {
            mode(&key, key_mode);
            let got = Config::load(&path);
            assert_eq!(got.is_err(), refused, "key mode {key_mode:o}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("tls.private_key"), "{e}");
            }
        }
        mode(&key, 0o600);
        mode(&path, 0o644);
        let err = Config::load(&path)
            .expect_err("readable hashes")
            .to_string();
        assert!(
            err.contains("password hashes") && err.contains("644"),
            "{err}"
        );
        // In a folder others cannot enter, the same modes are safe.
        mode(&key, 0o644);
        mode(&dir, 0o750);
        assert!(Config::load(&path).is_ok());
        mode(&dir, 0o755);
        // Said on purpose: loads, and the files are listed (for check's warnings).
        std::fs::write(
            &path,
            text.replace(
                "listen = \"127.0.0.1:2762\"",
                "listen = \"127.0.0.1:2762\"\nallow_readable_keys = true",
            ),
        )
        .expect("write");
        let c = Config::load(&path).expect("allowed");
        assert_eq!(c.readable_secret_files().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
