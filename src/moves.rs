//! The C-MOVE return path: the archive's sub-operation associations arrive on `return_listen`, are
//! matched to a C-MOVE in progress and its `[[destination]]`, and are relayed there (TLS when configured).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::association;
use crate::config::{Config, Destination};
use crate::dimse::{self, command_field as cf};
use crate::pdu::Rejection;
use crate::relay::{self, Actions, Inspector, RelayLimits, Side};
use crate::server::{self, Gateway, Stop};
use crate::tls::{self, TlsError};

/// A byte stream the relay can use, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A C-MOVE that a user started and the gateway let through.
#[derive(Debug, Clone)]
pub struct PendingMove {
    pub id: u64,
    pub destination: String,
    pub user: String,
    pub calling_ae: String,
    pub message_id: u16,
}

/// The C-MOVEs in progress. The return listener only admits associations for a destination that
/// an allowed C-MOVE is moving to right now.
#[derive(Debug, Default)]
pub struct MoveRegistry {
    pending: Mutex<(u64, Vec<PendingMove>)>,
}

impl MoveRegistry {
    pub fn begin(&self, destination: &str, user: &str, calling_ae: &str, message_id: u16) -> u64 {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0 += 1;
        let id = p.0;
        p.1.push(PendingMove {
            id,
            destination: destination.to_string(),
            user: user.to_string(),
            calling_ae: calling_ae.to_string(),
            message_id,
        });
        id
    }

    pub fn end(&self, id: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.1.retain(|m| m.id != id);
    }

    /// The oldest move in progress to `destination`.
    pub fn find(&self, destination: &str) -> Option<PendingMove> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.1.iter().find(|m| m.destination == destination).cloned()
    }
}

/// Outgoing TLS to destinations, built once per configuration.
#[derive(Clone, Default)]
pub struct DestinationConnectors {
    tls: HashMap<String, (TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl DestinationConnectors {
    pub fn new(config: &Config) -> Result<DestinationConnectors, TlsError> {
        let mut tls = HashMap::new();
        for d in &config.destinations {
            if let Some(t) = &d.tls {
                let client =
                    tls::client_config(&t.ca, t.certificate.as_deref(), t.private_key.as_deref())?;
                let name = rustls::pki_types::ServerName::try_from(t.server_name.clone()).map_err(
                    |e| TlsError::Setup {
                        path: t.ca.clone(),
                        message: format!(
                            "destination {} server name {:?}: {e}",
                            d.ae_title, t.server_name
                        ),
                    },
                )?;
                tls.insert(d.ae_title.clone(), (TlsConnector::from(client), name));
            }
        }
        Ok(DestinationConnectors { tls })
    }

    async fn connect(&self, d: &Destination, within: Duration) -> Result<Box<dyn Io>, String> {
        let what = format!("destination {}", d.ae_title);
        let tcp = server::connect_tcp(&d.address, within, &what).await?;
        match self.tls.get(&d.ae_title) {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                match tokio::time::timeout(within, connector.connect(name.clone(), tcp)).await {
                    Ok(Ok(s)) => Ok(Box::new(s)),
                    Ok(Err(e)) => Err(format!("{what} at {}: TLS: {e}", d.address)),
                    Err(_) => Err(format!("{what} at {}: TLS handshake timed out", d.address)),
                }
            }
        }
    }
}

/// The addresses allowed on the return listener: the configured list, or else the upstream archives.
async fn allowed(config: &Config, peer: IpAddr) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    if let Some(list) = &config.gateway.return_allowed_addresses {
        return list.iter().any(|net| net.contains(&peer));
    }
    for u in &config.upstreams {
        let resolved = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host(u.address.as_str()),
        )
        .await;
        if let Ok(Ok(mut addrs)) = resolved
            && addrs.any(|a| a.ip() == peer)
        {
            return true;
        }
    }
    false
}

/// Counts the C-STORE sub-operations relayed on a return-path association.
#[derive(Default)]
pub struct SubOperations {
    pub stored: u32,
    pub failed: u32,
}

impl Inspector for SubOperations {
    fn inspect(&mut self, from: Side, pdata: &[u8]) -> Result<Actions, String> {
        // Side::Archive here is the destination: its C-STORE responses say what arrived.
        if from == Side::Archive {
            for pdv in dimse::pdv_items(pdata).filter(|p| p.is_command && p.is_last) {
                if let Ok(c) = dimse::decode_command(pdv.data)
                    && c.field == (cf::C_STORE_RQ | cf::RESPONSE)
                {
                    match c.status {
                        Some(0x0000) | Some(0xB000) | Some(0xB007) | Some(0xB006) => {
                            self.stored += 1
                        }
                        _ => self.failed += 1,
                    }
                }
            }
        }
        Ok(Actions::PASS)
    }
}

/// Accept the archive's sub-operation associations until the task is dropped.
pub async fn serve_return(gateway: Gateway, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = gateway.current();
                let registry = gateway.moves.clone();
                let shutdown = gateway.shutdown_signal();
                gateway.tasks.spawn(async move {
                    handle_return(&state, &registry, stream, peer, shutdown).await;
                });
            }
            Err(e) => {
                tracing::warn!(reason = %e, "return listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_return(
    state: &server::State,
    registry: &MoveRegistry,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut line = ReturnLine::default();
    let result = relay_return(state, registry, stream, peer, started, &mut line, shutdown).await;
    let (outcome, reason) = match result {
        Ok(end) => (
            if end == relay::RelayEnd::Released {
                "released"
            } else {
                "aborted"
            },
            end.reason(),
        ),
        Err(stop) => (stop.outcome, stop.reason),
    };
    tracing::info!(
        peer = %peer,
        user = line.user.as_deref().unwrap_or("-"),
        calling_ae = %line.calling_ae,
        called_ae = %line.called_ae,
        op = "move",
        outcome,
        reason = %reason,
        instances = line.stored,
        failed = line.failed,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_to_destination = line.bytes,
        "return association"
    );
}

#[derive(Default)]
struct ReturnLine {
    user: Option<String>,
    calling_ae: String,
    called_ae: String,
    stored: u32,
    failed: u32,
    bytes: u64,
}

async fn relay_return(
    state: &server::State,
    registry: &MoveRegistry,
    mut archive: TcpStream,
    peer: SocketAddr,
    started: Instant,
    line: &mut ReturnLine,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<relay::RelayEnd, Stop> {
    let cfg = &state.config;
    let _ = archive.set_nodelay(true);
    if !allowed(cfg, peer.ip()).await {
        return Err(Stop::new(
            "refused",
            "address is not allowed on the return listener",
        ));
    }
    let rq = server::read_request(&mut archive, cfg, started).await?;
    line.calling_ae = rq.calling_ae_title.clone();
    line.called_ae = rq.called_ae_title.clone();
    let Some(destination) = cfg.destination(&rq.called_ae_title) else {
        let reason = format!("called AE {:?} is no [[destination]]", rq.called_ae_title);
        return Err(server::reject(&mut archive, Rejection::CalledAeNotRecognized, reason).await);
    };
    let Some(pending) = registry.find(&destination.ae_title) else {
        let reason = format!("no C-MOVE to {} is in progress", destination.ae_title);
        return Err(server::reject(&mut archive, Rejection::NotExpected, reason).await);
    };
    line.user = Some(pending.user.clone());
    let max = cfg.gateway.max_pdu_length;
    let request = association::rewrite_request(&rq, &destination.ae_title, max)
        .map_err(|e| Stop::new("protocol_error", e.to_string()))?;
    let t = cfg.timeouts;
    let connect = state.destinations.connect(destination, t.upstream_connect);
    let what = format!("destination {}", destination.ae_title);
    let (mut viewer, ac) =
        server::open_upstream(&mut archive, connect, &request, t.upstream_response, &what).await?;
    let (accept, _viewer_max) =
        match association::rewrite_accept(&ac, &rq.called_ae_title, false, max) {
            Ok(a) => a,
            Err(e) => {
                server::send(&mut viewer, &crate::pdu::abort(0)).await;
                return Err(server::reject(
                    &mut archive,
                    Rejection::UpstreamUnavailable,
                    e.to_string(),
                )
                .await);
            }
        };
    if let Err(e) = server::write_within(&mut archive, &accept, t.association_request).await {
        server::send(&mut viewer, &crate::pdu::abort(0)).await;
        return Err(Stop::new("aborted", format!("archive: {e}")));
    }
    // The relay forwards unchanged; the gateway's own limit bounds each read.
    let limits = RelayLimits {
        from_client: max,
        from_archive: max,
        idle: t.idle,
    };
    let (end, stats, counted) =
        relay::relay(archive, viewer, limits, SubOperations::default(), shutdown).await;
    line.stored = counted.stored;
    line.failed = counted.failed;
    line.bytes = stats.from_client;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_are_found_by_destination_until_they_end() {
        let r = MoveRegistry::default();
        assert!(r.find("VIEWER").is_none());
        let a = r.begin("VIEWER", "alice", "WS1", 3);
        let b = r.begin("VIEWER", "bob", "WS2", 9);
        assert_eq!(r.find("VIEWER").map(|m| m.user), Some("alice".into()));
        r.end(a);
        assert_eq!(r.find("VIEWER").map(|m| m.user), Some("bob".into()));
        r.end(b);
        assert!(r.find("VIEWER").is_none());
    }
}
