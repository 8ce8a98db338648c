//! `pacsgate run` as a library function: the gateway built from a loaded configuration, every
//! listener bound and served, SIGHUP reloads, and on SIGTERM or Ctrl-C a drain (the return path
//! stays open while the moves in flight finish, then `shutdown_grace`, then A-ABORT both ways).
//! Above `gateway`, `web` and `admin`: it is the one module that assembles them (through `listeners`).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::gateway::{Gateway, ServerError, State};
use crate::listeners::{Kind, Listeners};

/// Why `pacsgate run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot install the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How often rate-limit buckets of addresses and users not seen for a while are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Serve `config` until SIGTERM or Ctrl-C, then drain and stop.
pub async fn run(config: Config) -> Result<(), ServiceError> {
    // Only with allow_readable_keys = true does a readable key get this far.
    for file in config.readable_secret_files() {
        tracing::warn!(target: crate::logfmt::targets::RUN, "allow_readable_keys = true, and {}", file.describe());
    }
    let gateway = Gateway::new(State::new(config)?);
    let mut listeners = Listeners::start(&gateway).await?;
    let sweeper = sweep(&gateway);
    serve_until_stopped(&gateway, &mut listeners).await?;
    // Stop accepting; the return path stays open while the moves in flight finish.
    listeners.close_except(&[Kind::Return]);
    sweeper.abort();
    let grace = gateway.current().config.timeouts.shutdown_grace;
    tracing::info!(target: crate::logfmt::targets::RUN, grace_s = grace.as_secs_f64(),
        "shutting down: no new associations"
    );
    gateway.drain(grace).await;
    listeners.close_except(&[]);
    tracing::info!(target: crate::logfmt::targets::RUN, "stopped");
    Ok(())
}

/// Rate-limit buckets of addresses and users not seen for a while are forgotten (bounded memory).
fn sweep(gateway: &Gateway) -> JoinHandle<()> {
    let g = gateway.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            g.current().limiter.rates.sweep();
        }
    })
}

/// Reload on SIGHUP until SIGTERM or Ctrl-C.
async fn serve_until_stopped(
    gateway: &Gateway,
    listeners: &mut Listeners,
) -> Result<(), ServiceError> {
    let install = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| ServiceError::Signal {
            signal: name,
            source,
        })
    };
    let mut hangup = install(SignalKind::hangup(), "SIGHUP")?;
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = hangup.recv() => listeners.reload(gateway).await,
        }
    }
}

/// SIGTERM or Ctrl-C (Ctrl-C only, when the SIGTERM handler cannot be installed).
pub async fn shutdown_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
