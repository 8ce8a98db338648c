//! Configuration: the TOML file format (`file.rs`), the one `validate` step per section that turns it
//! into the runtime config (`validate/`, `runtime.rs`), and what `check` warns about.
//!
//! - `file.rs`: the serde types of the file (`deny_unknown_fields`, defaults)
//! - `validate/`: one `validate_<section>` step per section, then the checks across sections
//! - `runtime.rs`: the validated sections the gateway uses
//! - `credentials.rs`: what a configured credential must look like (login names, hashes, JWT bounds)
//! - `secrets.rs`: secret files other local users can read

mod credentials;
mod file;
mod runtime;
mod secrets;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use credentials::{
    DEFAULT_MAX_LIFETIME_SECONDS, EXAMPLE_PASSWORD_HASH, MAX_LEEWAY_SECONDS, MAX_USER_NAME,
    NameError, check_hash_format, check_login_name, normalize_user,
};
pub use runtime::*;
pub use secrets::ReadableFile;
use secrets::readable_by_others;

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

impl Config {
    /// Read and validate a configuration file, and refuse it when a private key it names, or the
    /// file itself while it holds password hashes, can be read by other users (unless
    /// `[gateway] allow_readable_keys = true`). `run`, `check` and every reload load through here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Named absolutely from here on (the log, the audit, `check`), symlinks left as they are:
        // relative paths in the file are relative to the folder the admin put it in.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = absolute.as_path();
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
        if let Some(token) = self
            .admin
            .as_ref()
            .and_then(|a| a.bearer_token_file.as_ref())
        {
            files.push(("admin.bearer_token_file".to_string(), token.clone()));
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
        let file: file::FileConfig = toml::from_str(text).map_err(|e| {
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
        validate::validate(file, path)
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
