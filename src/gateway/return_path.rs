//! The C-MOVE return path (PS3.4 C.4.2: the archive's C-STORE sub-operations): the archive's
//! sub-operation associations arrive on `return_listen`, are matched to a C-MOVE in progress and its
//! `[[destination]]`, and are relayed there (TLS when configured).
//!
//! Admission, in order: a pending-connection slot of the return listener (bounded in all and per
//! address); an allowed address (`return_allowed_addresses`, else the upstream archives'); an
//! A-ASSOCIATE-RQ within the ARTIM timer whose called AE is a `[[destination]]`; and a C-MOVE in
//! progress to that destination whose archive this is: the calling AE is that upstream's `ae_title`
//! and the address one it connects back from (its `return_addresses`, else the address the gateway
//! reached it at). Once relayed, only C-STORE requests (from the archive) and C-STORE responses (from
//! the destination) pass; any other DIMSE message aborts the association on both sides.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::{Gateway, PendingSlot, State, Stop, open_upstream, request_phase, send, write_within};
use crate::config::{Config, Destination, unmapped};
use crate::dimse::{self, command_field as cf};
use crate::moves::{Claim, DestinationConnectors, MovesInProgress};
use crate::relay::{self, Actions, Inspector, RelayLimits, Side};
use crate::ul::association;
use crate::ul::pdata::PData;
use crate::ul::pdu::Rejection;

/// A byte stream the relay can use, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection to the destination `d` within `within`, with its TLS when configured.
async fn connect_destination(
    connectors: &DestinationConnectors,
    d: &Destination,
    within: Duration,
) -> Result<Box<dyn Io>, String> {
    let what = format!("destination {}", d.ae_title);
    let tcp = super::connect_tcp(&d.address, within, &what).await?;
    match connectors.tls_for(&d.ae_title) {
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

/// How long resolving an upstream's host name may take when checking a return-path address.
const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// The addresses allowed to connect to the return listener at all: the configured list, or else the
/// upstream archives (the addresses their `address` resolves to and their `return_addresses`).
async fn allowed(config: &Config, peer: IpAddr) -> bool {
    let peer = unmapped(peer);
    if let Some(list) = &config.gateway.return_allowed_addresses {
        return list.iter().any(|net| net.contains(&peer));
    }
    for u in &config.upstreams {
        if u.return_addresses
            .as_ref()
            .is_some_and(|list| list.iter().any(|net| net.contains(&peer)))
        {
            return true;
        }
        let resolved =
            tokio::time::timeout(RESOLVE_WITHIN, tokio::net::lookup_host(u.address.as_str())).await;
        if let Ok(Ok(mut addrs)) = resolved
            && addrs.any(|a| unmapped(a.ip()) == peer)
        {
            return true;
        }
    }
    false
}

/// The name of a DIMSE command field, for refusals.
fn command_name(field: u16) -> String {
    let base = match field & !cf::RESPONSE {
        cf::C_STORE_RQ => "C-STORE",
        cf::C_GET_RQ => "C-GET",
        cf::C_FIND_RQ => "C-FIND",
        cf::C_MOVE_RQ => "C-MOVE",
        cf::C_ECHO_RQ => "C-ECHO",
        cf::C_CANCEL_RQ => "C-CANCEL",
        other => return format!("command {other:#06x}"),
    };
    format!(
        "{base}-{}",
        if field & cf::RESPONSE != 0 {
            "RSP"
        } else {
            "RQ"
        }
    )
}

/// The return path's inspector: only C-STORE requests from the archive and C-STORE responses from
/// the destination pass (anything else ends the association with an A-ABORT both ways, before it is
/// forwarded), and the destination's responses are counted.
#[derive(Default)]
pub struct SubOperations {
    pub stored: u32,
    pub failed: u32,
    /// Command fragments not yet complete, per side (archive, destination).
    pending: [Vec<u8>; 2],
}

impl Inspector for SubOperations {
    fn inspect(&mut self, from: Side, pdata: PData<'_>) -> Result<Actions, String> {
        // The requestor is the archive, the acceptor the destination.
        let (slot, allowed, who) = match from {
            Side::Requestor => (0, cf::C_STORE_RQ, "the archive"),
            Side::Acceptor => (1, cf::C_STORE_RQ | cf::RESPONSE, "the destination"),
        };
        for pdv in pdata.items().filter(|p| p.is_command) {
            let buf = &mut self.pending[slot];
            if buf.len() + pdv.data.len() > dimse::MAX_COMMAND_LENGTH {
                return Err(format!(
                    "{who} sent a command set over {} bytes",
                    dimse::MAX_COMMAND_LENGTH
                ));
            }
            buf.extend_from_slice(pdv.data);
            if !pdv.is_last {
                continue;
            }
            let bytes = std::mem::take(buf);
            let c = dimse::decode_command(&bytes)
                .map_err(|e| format!("{who} sent a command set that does not decode: {e}"))?;
            if c.field != allowed {
                return Err(format!(
                    "{who} sent a {} on the return path, where only C-STORE is relayed",
                    command_name(c.field)
                ));
            }
            if from == Side::Acceptor {
                match c.status {
                    Some(0x0000) | Some(0xB000) | Some(0xB007) | Some(0xB006) => self.stored += 1,
                    _ => self.failed += 1,
                }
            }
        }
        Ok(Actions::PASS)
    }
}

/// Accept the archive's sub-operation associations until the task is dropped.
pub async fn serve_return(gateway: Gateway, listener: TcpListener) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let state = gateway.current();
                // Bounded like the TLS listener's, in a pool of its own: a flood here cannot take
                // the slots of clinicians signing in, nor theirs the archive's.
                let pending = gateway.return_pending().clone();
                let registry = gateway.moves.clone();
                let shutdown = gateway.shutdown_signal();
                gateway.tasks.spawn(async move {
                    let bounds = super::Bounds::from_limits(&state.config.limits);
                    let within = state.config.timeouts.tls_handshake;
                    let slot = match pending.admit(peer.ip(), bounds, within).await {
                        Ok(slot) => slot,
                        Err(cap) => {
                            crate::metrics::metrics().refusal("return_pending");
                            tracing::warn!(target: crate::logfmt::targets::MOVES, peer = %peer, op = "move", outcome = "dropped", reason = %cap, "return association");
                            return;
                        }
                    };
                    let association = ReturnAssociation {
                        state: &state,
                        registry: &registry,
                        peer,
                        started: Instant::now(),
                        line: ReturnLine::default(),
                        slot: Some(slot),
                        shutdown,
                    };
                    handle_return(association, stream).await;
                });
            }
            Err(e) => {
                tracing::warn!(target: crate::logfmt::targets::MOVES, reason = %e, "return listener: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// One sub-operation association, from admission to its log line.
async fn handle_return(mut association: ReturnAssociation<'_>, stream: TcpStream) {
    let result = association.relay_return(stream).await;
    let (outcome, reason) = match result {
        Ok(end) => (
            if end == relay::RelayEnd::Released {
                "released"
            } else {
                "aborted"
            },
            end.reason(),
        ),
        Err(stop) => (stop.outcome(), stop.reason()),
    };
    let ReturnAssociation {
        peer,
        started,
        line,
        ..
    } = association;
    tracing::info!(target: crate::logfmt::targets::MOVES, peer = %peer,
        user = line.user.as_deref().unwrap_or("-"),
        calling_ae = ?line.calling_ae,
        called_ae = ?line.called_ae,
        op = "move",
        outcome,
        reason = ?reason,
        instances = line.stored,
        failed = line.failed,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_to_destination = line.bytes,
        "return association"
    );
}

/// What is known about one sub-operation association, for its log line.
#[derive(Default)]
struct ReturnLine {
    user: Option<String>,
    calling_ae: String,
    called_ae: String,
    stored: u32,
    failed: u32,
    bytes: u64,
}

/// What one sub-operation association's phases share.
struct ReturnAssociation<'a> {
    state: &'a State,
    registry: &'a MovesInProgress,
    peer: SocketAddr,
    /// When it got its pending-connection slot: the ARTIM timer counts from here.
    started: Instant,
    line: ReturnLine,
    /// The pending-connection slot, held until the association is admitted.
    slot: Option<PendingSlot>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl ReturnAssociation<'_> {
    /// The phases up to the A-ASSOCIATE-AC, then the relay; a stop is answered to the archive here.
    async fn relay_return(&mut self, mut archive: TcpStream) -> Result<relay::RelayEnd, Stop> {
        let _ = archive.set_nodelay(true);
        match self.establish(&mut archive).await {
            Ok((viewer, max)) => Ok(self.relay(archive, viewer, max).await),
            Err(stop) => {
                stop.answer(&mut archive).await;
                self.slot = None;
                Err(stop)
            }
        }
    }

    /// Phases: allowed address, A-ASSOCIATE-RQ, destination, C-MOVE in progress, destination
    /// connect and its A-ASSOCIATE-AC passed to the archive.
    async fn establish(&mut self, archive: &mut TcpStream) -> Result<(Box<dyn Io>, u32), Stop> {
        let cfg = &self.state.config;
        if !allowed(cfg, self.peer.ip()).await {
            let reason = "address is not allowed on the return listener";
            return Err(Stop::Refused(reason.into()));
        }
        let rq = request_phase(archive, cfg, self.started).await?;
        self.line.calling_ae = rq.calling_ae_title.clone();
        self.line.called_ae = rq.called_ae_title.clone();
        let Some(destination) = cfg.destination(&rq.called_ae_title) else {
            let reason = format!("called AE {:?} is no [[destination]]", rq.called_ae_title);
            return Err(Stop::rejected(Rejection::CalledAeNotRecognized, reason));
        };
        let pending = self.claim(destination, &rq.calling_ae_title)?;
        self.line.user = Some(pending.user);
        let max = cfg.gateway.max_pdu_length;
        let request =
            association::rewrite_request(&rq, &destination.ae_title, max).map_err(|e| {
                Stop::Protocol {
                    abort: None,
                    reason: e.to_string(),
                }
            })?;
        let t = cfg.timeouts;
        let connect =
            connect_destination(&self.state.destinations, destination, t.upstream_connect);
        let what = format!("destination {}", destination.ae_title);
        let (mut viewer, ac) = open_upstream(connect, &request, t.upstream_response, &what).await?;
        let (accept, _viewer_max) =
            match association::rewrite_accept(&ac, &rq.called_ae_title, false, max) {
                Ok(a) => a,
                Err(e) => {
                    send(&mut viewer, &crate::ul::pdu::abort(0)).await;
                    return Err(Stop::rejected(
                        Rejection::UpstreamUnavailable,
                        e.to_string(),
                    ));
                }
            };
        if let Err(e) = write_within(archive, &accept, t.association_request).await {
            send(&mut viewer, &crate::ul::pdu::abort(0)).await;
            return Err(Stop::Aborted(format!("archive: {e}")));
        }
        self.slot = None; // admitted: no longer a pending connection
        Ok((viewer, max))
    }

    /// Phase: the C-MOVE in progress to `destination` that this archive may deliver to.
    fn claim(
        &self,
        destination: &Destination,
        calling_ae: &str,
    ) -> Result<crate::moves::PendingMove, Stop> {
        match self
            .registry
            .claim(&destination.ae_title, self.peer.ip(), calling_ae)
        {
            Claim::Admitted(m) => Ok(m),
            Claim::NoMove => {
                let reason = format!("no C-MOVE to {} is in progress", destination.ae_title);
                Err(Stop::rejected(Rejection::NotExpected, reason))
            }
            Claim::NotTheirArchive { expected } => {
                let reason = format!(
                    "calling AE {:?} at {} is not the archive of a C-MOVE to {} in progress (expected {})",
                    calling_ae,
                    unmapped(self.peer.ip()),
                    destination.ae_title,
                    expected.join("; ")
                );
                Err(Stop::rejected(Rejection::NotExpected, reason))
            }
        }
    }

    /// Phase: relay, C-STORE only.
    async fn relay(
        &mut self,
        archive: TcpStream,
        viewer: Box<dyn Io>,
        max: u32,
    ) -> relay::RelayEnd {
        // The relay forwards C-STORE traffic unchanged; the gateway's own limit bounds each read.
        let limits = RelayLimits {
            from_client: max,
            from_archive: max,
            idle: self.state.config.timeouts.idle,
        };
        let shutdown = self.shutdown.clone();
        let (end, stats, counted) =
            relay::relay(archive, viewer, limits, SubOperations::default(), shutdown).await;
        self.line.stored = counted.stored;
        self.line.failed = counted.failed;
        self.line.bytes = stats.from_client;
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(field: u16, status: Option<u16>) -> Vec<u8> {
        // A command set by hand: group 0000 elements, Implicit VR Little Endian.
        let mut body = Vec::new();
        let mut element = |element: u16, value: &[u8]| {
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&element.to_le_bytes());
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            body.extend_from_slice(value);
        };
        element(0x0002, b"1.2.840.10008.5.1.4.1.1.2\0");
        element(0x0100, &field.to_le_bytes());
        element(0x0110, &7u16.to_le_bytes());
        element(0x0800, &0x0101u16.to_le_bytes());
        if let Some(s) = status {
            element(0x0900, &s.to_le_bytes());
        }
        let mut out = Vec::new();
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn pdata(pieces: &[(&[u8], bool)]) -> Vec<u8> {
        let mut items = Vec::new();
        for (data, last) in pieces {
            items.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
            items.push(1);
            items.push(if *last { 0x03 } else { 0x01 });
            items.extend_from_slice(data);
        }
        let mut out = vec![crate::ul::pdu::P_DATA_TF, 0];
        out.extend_from_slice(&(items.len() as u32).to_be_bytes());
        out.extend_from_slice(&items);
        out
    }

    #[test]
    fn only_c_store_passes_the_return_path() {
        let mut s = SubOperations::default();
        let store = command(cf::C_STORE_RQ, None);
        assert!(
            s.inspect_pdu(Side::Requestor, &pdata(&[(&store, true)]))
                .is_ok()
        );
        let ok = command(cf::C_STORE_RQ | cf::RESPONSE, Some(0));
        assert!(
            s.inspect_pdu(Side::Acceptor, &pdata(&[(&ok, true)]))
                .is_ok()
        );
        assert_eq!((s.stored, s.failed), (1, 0));

        let echo = command(cf::C_ECHO_RQ, None);
        let err = s
            .inspect_pdu(Side::Requestor, &pdata(&[(&echo, true)]))
            .unwrap_err();
        assert!(err.contains("C-ECHO-RQ"), "{err}");
        // Split over two PDUs, it is judged when complete.
        let find = command(cf::C_FIND_RQ, None);
        let (head, tail) = find.split_at(10);
        assert!(
            s.inspect_pdu(Side::Requestor, &pdata(&[(head, false)]))
                .is_ok()
        );
        assert!(
            s.inspect_pdu(Side::Requestor, &pdata(&[(tail, true)]))
                .is_err()
        );
        // The destination may not ask the archive anything either.
        let find = command(cf::C_FIND_RQ, None);
        assert!(
            s.inspect_pdu(Side::Acceptor, &pdata(&[(&find, true)]))
                .is_err()
        );
        assert!(
            s.inspect_pdu(Side::Requestor, &pdata(&[(b"garbage", true)]))
                .is_err()
        );
    }
}
