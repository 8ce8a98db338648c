//! The one `validate` step that turns the file format into the runtime config: one `validate_<section>`
//! function per section (like sozu's `populate_*`), run in a fixed order so the first error reported
//! for a file stays the same, then the checks that span sections (move destinations, listeners).

mod access;
mod network;
mod services;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::FileConfig;
use super::{Config, ConfigError, Gateway};

/// What every section's step needs: the file's path (for errors) and its folder (for relative paths).
struct Ctx<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Ctx<'_> {
    /// The error for `key`.
    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message,
        }
    }

    /// A path from the file, relative to the file's folder unless absolute.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// A number of seconds: above 0, at most a day.
    fn secs(&self, key: &str, v: f64) -> Result<Duration, ConfigError> {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(self.invalid(
                key,
                format!("{v} must be a number of seconds above 0 and at most 86400"),
            ))
        }
    }

    /// A listener's `address:port`.
    fn listen(&self, key: &str, a: &str) -> Result<SocketAddr, ConfigError> {
        a.parse::<SocketAddr>()
            .map_err(|e| self.invalid(key, format!("{a:?} is not an address:port ({e})")))
    }

    /// An optional listener's `address:port`.
    fn optional_listen(
        &self,
        key: &str,
        a: Option<&str>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        a.map(|a| self.listen(key, a)).transpose()
    }
}

/// Validate every section in turn; the order is the order errors are found in.
pub(super) fn validate(file: FileConfig, path: &Path) -> Result<Config, ConfigError> {
    let cx = Ctx {
        path,
        base: path.parent().unwrap_or(Path::new(".")),
    };
    let gateway = network::validate_gateway(&cx, &file.gateway)?;
    let timeouts = network::validate_timeouts(&cx, &file.timeouts)?;
    let tls = network::validate_tls(&cx, file.tls)?;
    let upstreams = network::validate_upstreams(&cx, file.upstream)?;
    let roles = access::validate_roles(&cx, file.role)?;
    let users = access::validate_users(&cx, file.user, &roles)?;
    let jwt = file
        .auth
        .jwt
        .map(|j| access::validate_jwt(&cx, j))
        .transpose()?;
    let limits = access::validate_limits(&cx, file.limits)?;
    let devices = access::validate_devices(&cx, file.device, &roles)?;
    let destinations = network::validate_destinations(&cx, file.destination)?;
    network::check_move_destinations(&cx, &roles, &destinations)?;
    let return_path = network::validate_return_path(&cx, &file.gateway, &destinations)?;
    let audit = file
        .audit
        .map(|a| services::validate_audit(&cx, a))
        .transpose()?;
    let http = file
        .http
        .map(|h| services::validate_http(&cx, h))
        .transpose()?;
    let admin = file
        .admin
        .map(|a| services::validate_admin(&cx, a))
        .transpose()?;
    let admin_listen = admin.as_ref().map(|a| a.listen);
    let device_listen = cx.optional_listen(
        "gateway.device_listen",
        file.gateway.device_listen.as_deref(),
    )?;
    network::check_listeners(
        &cx,
        [
            ("gateway.listen", Some(gateway.listen)),
            ("gateway.device_listen", device_listen),
            ("gateway.return_listen", return_path.listen),
            ("http.listen", http.as_ref().map(|h| h.listen)),
            ("admin.listen", admin_listen),
        ],
    )?;

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
            listen: gateway.listen,
            device_listen,
            return_listen: return_path.listen,
            return_allowed_addresses: return_path.allowed_addresses,
            ae_title: file.gateway.ae_title,
            max_pdu_length: gateway.max_pdu_length,
            max_association_request_length: gateway.max_association_request_length,
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
