//! `[audit]`, `[http]` and `[admin]`: the audit trail's destinations, the DICOMweb door and the admin port.

use super::Ctx;
use crate::config::file::{DEFAULT_DICOMWEB_PATH, FileAdmin, FileAudit, FileHttp};
use crate::config::{Admin, AuditConfig, ConfigError, Http, OnAuditFailure, SyslogTarget};

pub(super) fn validate_audit(cx: &Ctx, a: FileAudit) -> Result<AuditConfig, ConfigError> {
    let syslog = syslog_target(cx, &a)?;
    let on_failure = match a.on_failure.as_deref() {
        None | Some("continue") => OnAuditFailure::Continue,
        Some("refuse") => OnAuditFailure::Refuse,
        Some(other) => {
            return Err(cx.invalid(
                "audit.on_failure",
                format!("{other:?}: expected \"continue\" or \"refuse\""),
            ));
        }
    };
    if on_failure == OnAuditFailure::Refuse && a.file.is_none() {
        return Err(cx.invalid(
            "audit.on_failure",
            "\"refuse\" needs an audit file (audit.file) to watch".into(),
        ));
    }
    if let Some(id) = &a.source_id
        && (id.is_empty() || id.chars().count() > 64 || id.chars().any(char::is_control))
    {
        return Err(cx.invalid(
            "audit.source_id",
            format!("{id:?}: 1 to 64 characters, no control characters"),
        ));
    }
    Ok(AuditConfig {
        file: a.file.as_deref().map(|p| cx.resolve(p)),
        syslog,
        syslog_timeout: cx.secs("audit.syslog_timeout", a.syslog_timeout)?,
        on_failure,
        source_id: a.source_id,
    })
}

/// `audit.syslog`: `udp://IP:PORT` or `tls://HOST:PORT` (with `syslog_ca`).
fn syslog_target(cx: &Ctx, a: &FileAudit) -> Result<Option<SyslogTarget>, ConfigError> {
    Ok(match a.syslog.as_deref() {
        None => None,
        Some(url) => {
            if let Some(rest) = url.strip_prefix("udp://") {
                Some(SyslogTarget::Udp(rest.parse().map_err(|_| {
                    cx.invalid("audit.syslog", format!("{url:?}: expected udp://IP:PORT"))
                })?))
            } else if let Some(rest) = url.strip_prefix("tls://") {
                let host = match rest.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                        h.trim_matches(['[', ']']).to_string()
                    }
                    _ => {
                        return Err(cx.invalid(
                            "audit.syslog",
                            format!("{url:?}: expected tls://HOST:PORT"),
                        ));
                    }
                };
                let ca = a
                    .syslog_ca
                    .as_deref()
                    .map(|p| cx.resolve(p))
                    .ok_or_else(|| {
                        cx.invalid(
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
                return Err(cx.invalid(
                    "audit.syslog",
                    format!("{url:?}: expected udp://IP:PORT or tls://HOST:PORT"),
                ));
            }
        }
    })
}

pub(super) fn validate_http(cx: &Ctx, h: FileHttp) -> Result<Http, ConfigError> {
    let listen = cx.listen("http.listen", &h.listen)?;
    let (upstream, base_path) = upstream_base_url(&h.upstream)
        .map_err(|m| cx.invalid("http.upstream", format!("{:?}: {m}", h.upstream)))?;
    let path = |key: &str, p: &str| -> Result<String, ConfigError> {
        if !p.starts_with('/') || p.contains("..") {
            return Err(cx.invalid(key, format!("{p:?} must be an absolute path")));
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
            return Err(cx.invalid(
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
    if !(1..=4096).contains(&h.max_requests_per_user) {
        return Err(cx.invalid(
            "http.max_requests_per_user",
            format!(
                "is {}: give 1 to 4096 (requests one user may have in flight at once)",
                h.max_requests_per_user
            ),
        ));
    }
    Ok(Http {
        listen,
        upstream,
        dicomweb_path,
        wado_uri_path,
        allow_paths,
        cors_origins: h.cors_origins,
        max_query_response: h.max_query_response.max(1024),
        failed_logins_per_minute: h.failed_logins_per_minute,
        max_requests_per_user: h.max_requests_per_user,
    })
}

pub(super) fn validate_admin(cx: &Ctx, a: FileAdmin) -> Result<Admin, ConfigError> {
    let listen = cx.listen("admin.listen", &a.listen)?;
    if a.max_connections == 0 {
        return Err(cx.invalid(
            "admin.max_connections",
            "is 0: the admin port would answer nobody".into(),
        ));
    }
    Ok(Admin {
        listen,
        max_connections: a.max_connections,
        header_timeout: cx.secs("admin.header_timeout", a.header_timeout)?,
        fd_reserve: a.fd_reserve,
        bearer_token_file: a.bearer_token_file.as_deref().map(|p| cx.resolve(p)),
        client_ca: a.client_ca.as_deref().map(|p| cx.resolve(p)),
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
