//! `pacsgate connect` started: settings validated, secrets read, the local listeners bound, and the
//! tunnel served until SIGTERM or Ctrl-C.

use std::sync::Arc;

use super::ConnectError;
use super::cli::{ConnectArgs, Settings, usage};

/// `pacsgate connect`: validate, read the secrets, listen, and serve until SIGTERM or Ctrl-C.
pub async fn run(args: ConnectArgs) -> Result<(), ConnectError> {
    let settings = Settings::from_args(&args)?;
    if let Some((_, key)) = &settings.client_certificate
        && let Some(warning) = crate::tls::key_permission_warning(key)
    {
        tracing::warn!(target: crate::logfmt::targets::CONNECT_CLI, "{warning}");
    }
    let credentials = settings.credentials()?;
    let tunnel = Arc::new(settings.tunnel(credentials)?);
    // Fail now, not at the first association, when the identity cannot be sent at all.
    tunnel.gateway.identity()?;
    if !settings.listen.ip().is_loopback() {
        tracing::warn!(target: crate::logfmt::targets::CONNECT_CLI, listen = %settings.listen,
            "listening beyond loopback (--allow-remote): anyone who reaches this port uses your credentials"
        );
    }
    let tcp = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(source)
            if source.kind() == std::io::ErrorKind::AddrInUse && settings.default_listen =>
        {
            return Err(usage(format!(
                "cannot listen on {} (the default): the port is in use, perhaps by another connect; \
                 use --listen 127.0.0.1:PORT with a free port",
                settings.listen
            )));
        }
        Err(source) => {
            return Err(ConnectError::Listen {
                address: settings.listen,
                source,
            });
        }
    };
    let unix = match &settings.socket {
        Some(path) => Some((
            super::local::bind_unix(path).map_err(|source| ConnectError::ListenUnix {
                path: path.clone(),
                source,
            })?,
            path.clone(),
        )),
        None => None,
    };
    let listeners = super::local::Listeners { tcp, unix };
    tracing::info!(target: crate::logfmt::targets::CONNECT_CLI, listen = %settings.listen,
        socket = ?settings.socket,
        owner_uid = tunnel.callers.owner,
        allowed_uids = %tunnel.callers.describe(),
        gateway = %settings.gateway,
        trust = %tunnel.gateway.trust,
        credentials = ?tunnel.gateway.credentials,
        move_as_get = %if settings.local_stores.is_empty() {
            "off".to_string()
        } else {
            settings.local_stores.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
        },
        "pacsgate connect listening (plain DICOM) -> gateway (DICOM TLS)"
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ConnectError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    super::serve(tunnel, listeners, stop).await;
    Ok(())
}
