//! The runtime configuration (what the gateway uses): the validated sections of [`super::Config`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The largest P-DATA-TF PDU the gateway accepts or lets either peer send: 256 KiB by default.
pub const DEFAULT_MAX_PDU_LENGTH: u32 = 256 * 1024;
/// The largest A-ASSOCIATE-RQ an anonymous peer may send (covers 128 presentation contexts and a JWT).
pub const DEFAULT_MAX_ASSOCIATION_REQUEST_LENGTH: u32 = 64 * 1024;

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
    /// Requests one user may have in flight at once (until the answer's body has been sent).
    pub max_requests_per_user: usize,
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

    pub(super) fn parse(s: &str) -> Option<Operation> {
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
