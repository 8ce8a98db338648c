//! The TOML file format (what the admin writes): serde types with `deny_unknown_fields` and their
//! defaults. `validate` turns them into the runtime types of `runtime.rs`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ClientIdentity, DEFAULT_MAX_ASSOCIATION_REQUEST_LENGTH, DEFAULT_MAX_PDU_LENGTH};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) gateway: FileGateway,
    pub(super) tls: FileTls,
    #[serde(default)]
    pub(super) timeouts: FileTimeouts,
    #[serde(default)]
    pub(super) upstream: Vec<FileUpstream>,
    #[serde(default)]
    pub(super) auth: FileAuth,
    #[serde(default)]
    pub(super) user: Vec<FileUser>,
    #[serde(default)]
    pub(super) role: Vec<FileRole>,
    #[serde(default)]
    pub(super) limits: FileLimits,
    #[serde(default)]
    pub(super) device: Vec<FileDevice>,
    #[serde(default)]
    pub(super) destination: Vec<FileDestination>,
    pub(super) audit: Option<FileAudit>,
    pub(super) admin: Option<FileAdmin>,
    pub(super) http: Option<FileHttp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHttp {
    pub(super) listen: String,
    pub(super) upstream: String,
    pub(super) dicomweb_path: Option<String>,
    pub(super) wado_uri_path: Option<String>,
    #[serde(default)]
    pub(super) allow_paths: Vec<String>,
    #[serde(default)]
    pub(super) cors_origins: Vec<String>,
    #[serde(default = "default_max_query_response")]
    pub(super) max_query_response: usize,
    #[serde(default = "default_failed_logins_per_minute")]
    pub(super) failed_logins_per_minute: u32,
    #[serde(default = "default_max_requests_per_user")]
    pub(super) max_requests_per_user: usize,
}

pub(super) const DEFAULT_DICOMWEB_PATH: &str = "/dicom-web";
fn default_max_query_response() -> usize {
    16 * 1024 * 1024
}
fn default_failed_logins_per_minute() -> u32 {
    10
}
fn default_max_requests_per_user() -> usize {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAudit {
    pub(super) file: Option<PathBuf>,
    pub(super) syslog: Option<String>,
    pub(super) syslog_ca: Option<PathBuf>,
    pub(super) syslog_server_name: Option<String>,
    #[serde(default = "default_syslog_timeout")]
    pub(super) syslog_timeout: f64,
    pub(super) on_failure: Option<String>,
    pub(super) source_id: Option<String>,
}
fn default_syslog_timeout() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    #[serde(default = "default_admin_listen")]
    pub(super) listen: String,
    #[serde(default = "default_admin_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "d5")]
    pub(super) header_timeout: f64,
    #[serde(default = "default_admin_fd_reserve")]
    pub(super) fd_reserve: usize,
    pub(super) bearer_token_file: Option<PathBuf>,
    pub(super) client_ca: Option<PathBuf>,
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
pub(super) struct FileDestination {
    pub(super) ae_title: String,
    pub(super) address: String,
    pub(super) tls: Option<FileDestinationTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDestinationTls {
    pub(super) ca: PathBuf,
    pub(super) certificate: Option<PathBuf>,
    pub(super) private_key: Option<PathBuf>,
    pub(super) server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGateway {
    pub(super) listen: String,
    #[serde(default = "default_ae_title")]
    pub(super) ae_title: String,
    #[serde(default = "default_max_pdu_length")]
    pub(super) max_pdu_length: u32,
    #[serde(default = "default_max_association_request_length")]
    pub(super) max_association_request_length: u32,
    pub(super) device_listen: Option<String>,
    pub(super) return_listen: Option<String>,
    pub(super) return_allowed_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allow_readable_keys: bool,
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
pub(super) struct FileTls {
    pub(super) certificate: PathBuf,
    pub(super) private_key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
    #[serde(default)]
    pub(super) require_client_certificate: bool,
    pub(super) client_identity: Option<ClientIdentity>,
    #[serde(default)]
    pub(super) client_crl: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTimeouts {
    #[serde(default = "d10")]
    pub(super) tls_handshake: f64,
    #[serde(default = "d10")]
    pub(super) association_request: f64,
    #[serde(default = "d10")]
    pub(super) upstream_connect: f64,
    #[serde(default = "d30")]
    pub(super) upstream_response: f64,
    #[serde(default = "d300")]
    pub(super) idle: f64,
    #[serde(default = "d30")]
    pub(super) shutdown_grace: f64,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            tls_handshake: d10(),
            association_request: d10(),
            upstream_connect: d10(),
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
pub(super) struct FileUpstream {
    pub(super) called_ae: String,
    pub(super) address: String,
    pub(super) ae_title: String,
    pub(super) return_addresses: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAuth {
    pub(super) jwt: Option<FileJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileJwt {
    pub(super) issuer: String,
    pub(super) audience: String,
    pub(super) public_key: Option<PathBuf>,
    pub(super) jwks: Option<PathBuf>,
    pub(super) algorithms: Option<Vec<String>>,
    #[serde(default = "default_roles_claim")]
    pub(super) roles_claim: String,
    #[serde(default = "default_leeway")]
    pub(super) leeway: u64,
    #[serde(default = "default_max_lifetime")]
    pub(super) max_lifetime: u64,
}

fn default_max_lifetime() -> u64 {
    crate::config::DEFAULT_MAX_LIFETIME_SECONDS
}

fn default_roles_claim() -> String {
    "roles".to_string()
}
fn default_leeway() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUser {
    pub(super) name: String,
    pub(super) password_hash: Option<String>,
    #[serde(default)]
    pub(super) roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRole {
    pub(super) name: String,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    #[serde(default)]
    pub(super) move_destinations: Vec<String>,
    #[serde(default)]
    pub(super) unrestricted_queries: FileUnrestricted,
    #[serde(default = "default_query_min_chars")]
    pub(super) query_min_chars: usize,
    pub(super) max_query_results: Option<u32>,
}

/// `unrestricted_queries = true | false | ["patient", "study"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FileUnrestricted {
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
pub(super) struct FileDevice {
    pub(super) ae_title: String,
    pub(super) addresses: Vec<String>,
    #[serde(default)]
    pub(super) roles: Vec<String>,
}

/// `[limits]`: every limit has a default; 0 turns a rate limit off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileLimits {
    pub(super) associations_per_minute: u32,
    pub(super) associations_burst: Option<u32>,
    pub(super) queries_per_minute: u32,
    pub(super) queries_burst: Option<u32>,
    pub(super) retrievals_per_minute: u32,
    pub(super) retrievals_burst: Option<u32>,
    pub(super) max_associations: usize,
    pub(super) max_associations_per_user: usize,
    pub(super) max_pending_connections: usize,
    pub(super) max_pending_per_address: Option<usize>,
    pub(super) max_query_results: u32,
    pub(super) failed_logins: u32,
    pub(super) failed_logins_per_address: u32,
    pub(super) failed_login_window: u64,
    pub(super) lockout_seconds: u64,
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
