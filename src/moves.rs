//! The C-MOVE return path: the archive's sub-operation associations arrive on `return_listen`, are
//! matched to a C-MOVE in progress and its `[[destination]]`, and are relayed there (TLS when configured).
//!
//! Admission, in order: a pending-connection slot of the return listener (bounded in all and per
//! address); an allowed address (`return_allowed_addresses`, else the upstream archives'); an
//! A-ASSOCIATE-RQ within the ARTIM timer whose called AE is a `[[destination]]`; and a C-MOVE in
//! progress to that destination whose archive this is: the calling AE is that upstream's `ae_title`
//! and the address one it connects back from (its `return_addresses`, else the address the gateway
//! reached it at). Once relayed, only C-STORE requests (from the archive) and C-STORE responses (from
//! the destination) pass; any other DIMSE message aborts the association on both sides.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::config::{Config, Destination, unmapped};
use crate::dimse::{self, command_field as cf};
use crate::gateway::{self, Gateway, Stop};
use crate::relay::{self, Actions, Inspector, RelayLimits, Side};
use crate::tls::{self, TlsError};
use crate::ul::association;
use crate::ul::pdu::Rejection;

/// A byte stream the relay can use, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The archive one association's C-MOVEs go to, and so the only peer their results may come back from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnPeer {
    /// The upstream's `called_ae`, for the log.
    pub upstream: String,
    /// The calling AE title its sub-operation associations carry: the upstream's `ae_title`.
    pub ae_title: String,
    /// The addresses it connects back from.
    pub addresses: Vec<ipnet::IpNet>,
}

impl ReturnPeer {
    fn admits(&self, address: IpAddr, calling_ae: &str) -> bool {
        let address = unmapped(address);
        calling_ae == self.ae_title && self.addresses.iter().any(|n| n.contains(&address))
    }
}

/// A C-MOVE that a user started and the gateway let through.
#[derive(Debug, Clone)]
pub struct PendingMove {
    pub id: u64,
    pub destination: String,
    pub user: String,
    pub calling_ae: String,
    pub message_id: u16,
    /// Where its sub-operations may come from; `None`: from nowhere.
    pub from: Option<ReturnPeer>,
    /// The association that began it.
    owner: u64,
}

/// The C-MOVEs in progress, shared by every association and the return listener.
#[derive(Debug, Default)]
pub struct MovesInProgress {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    next_id: u64,
    moves: Vec<PendingMove>,
}

/// What the return listener may do with an association request.
#[derive(Debug)]
pub enum Claim {
    /// The move it belongs to.
    Admitted(PendingMove),
    /// No C-MOVE to this destination is in progress.
    NoMove,
    /// Moves to this destination are in progress, but none from this calling AE at this address.
    NotTheirArchive { expected: Vec<String> },
}

impl MovesInProgress {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry one association's session uses: its moves come back only from `from`.
    pub fn for_upstream(self: &Arc<Self>, from: ReturnPeer) -> MoveRegistry {
        let owner = {
            let mut b = self.book();
            b.next_id += 1;
            b.next_id
        };
        MoveRegistry {
            moves: self.clone(),
            owner,
            from: Some(from),
        }
    }

    /// The oldest move in progress to `destination` whose archive connects from `address` as `calling_ae`.
    pub fn claim(&self, destination: &str, address: IpAddr, calling_ae: &str) -> Claim {
        let b = self.book();
        let mut to_destination = b
            .moves
            .iter()
            .filter(|m| m.destination == destination)
            .peekable();
        if to_destination.peek().is_none() {
            return Claim::NoMove;
        }
        let mut expected = Vec::new();
        for m in to_destination {
            match &m.from {
                Some(from) if from.admits(address, calling_ae) => {
                    return Claim::Admitted(m.clone());
                }
                Some(from) => expected.push(format!(
                    "{:?} from {}",
                    from.ae_title,
                    nets(&from.addresses)
                )),
                None => {}
            }
        }
        expected.dedup();
        Claim::NotTheirArchive { expected }
    }

    /// Moves in progress (for tests and the log).
    pub fn len(&self) -> usize {
        self.book().moves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin(&self, owner: u64, from: Option<ReturnPeer>, m: NewMove<'_>) -> u64 {
        let mut b = self.book();
        b.next_id += 1;
        let id = b.next_id;
        b.moves.push(PendingMove {
            id,
            destination: m.destination.to_string(),
            user: m.user.to_string(),
            calling_ae: m.calling_ae.to_string(),
            message_id: m.message_id,
            from,
            owner,
        });
        id
    }

    fn end(&self, owner: u64, id: u64) {
        self.book()
            .moves
            .retain(|m| !(m.id == id && m.owner == owner));
    }

    fn end_all(&self, owner: u64) {
        self.book().moves.retain(|m| m.owner != owner);
    }
}

struct NewMove<'a> {
    destination: &'a str,
    user: &'a str,
    calling_ae: &'a str,
    message_id: u16,
}

fn nets(list: &[ipnet::IpNet]) -> String {
    let v: Vec<String> = list.iter().map(|n| n.to_string()).collect();
    if v.is_empty() {
        "nowhere".into()
    } else {
        v.join(", ")
    }
}

/// One association's C-MOVEs. Made by [`MovesInProgress::for_upstream`] with the archive the
/// association was relayed to, so that only that archive can deliver the results; the moves it
/// began end when it is dropped (the association is over). `Default` makes a registry of its own
/// whose moves no return association can claim.
#[derive(Debug, Default)]
pub struct MoveRegistry {
    moves: Arc<MovesInProgress>,
    owner: u64,
    from: Option<ReturnPeer>,
}

impl MoveRegistry {
    /// A C-MOVE to `destination` passed to the archive: its sub-operations may now come back.
    pub fn begin(&self, destination: &str, user: &str, calling_ae: &str, message_id: u16) -> u64 {
        self.moves.begin(
            self.owner,
            self.from.clone(),
            NewMove {
                destination,
                user,
                calling_ae,
                message_id,
            },
        )
    }

    /// The move's final response passed: no more sub-operations for it.
    pub fn end(&self, id: u64) {
        self.moves.end(self.owner, id);
    }
}

impl Drop for MoveRegistry {
    fn drop(&mut self) {
        self.moves.end_all(self.owner);
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
        let tcp = gateway::connect_tcp(&d.address, within, &what).await?;
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
    fn inspect(&mut self, from: Side, pdata: &[u8]) -> Result<Actions, String> {
        // The relay's client side is the archive, its "archive" side the destination.
        let (slot, allowed, who) = match from {
            Side::Client => (0, cf::C_STORE_RQ, "the archive"),
            Side::Archive => (1, cf::C_STORE_RQ | cf::RESPONSE, "the destination"),
        };
        for pdv in dimse::pdv_items(pdata).filter(|p| p.is_command) {
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
            if from == Side::Archive {
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
                    let bounds = gateway::Bounds::from_limits(&state.config.limits);
                    let within = state.config.timeouts.tls_handshake;
                    let slot = match pending.admit(peer.ip(), bounds, within).await {
                        Ok(slot) => slot,
                        Err(cap) => {
                            crate::metrics::metrics().refusal("return_pending");
                            tracing::warn!(peer = %peer, op = "move", outcome = "dropped", reason = %cap, "return association");
                            return;
                        }
                    };
                    handle_return(&state, &registry, stream, peer, slot, shutdown).await;
                });
            }
            Err(e) => {
                tracing::warn!(reason = %e, "return listener: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn handle_return(
    state: &gateway::State,
    registry: &MovesInProgress,
    stream: TcpStream,
    peer: SocketAddr,
    slot: gateway::PendingSlot,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut line = ReturnLine::default();
    let result = relay_return(
        state, registry, stream, peer, started, &mut line, slot, shutdown,
    )
    .await;
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

#[derive(Default)]
struct ReturnLine {
    user: Option<String>,
    calling_ae: String,
    called_ae: String,
    stored: u32,
    failed: u32,
    bytes: u64,
}

#[allow(clippy::too_many_arguments)]
async fn relay_return(
    state: &gateway::State,
    registry: &MovesInProgress,
    mut archive: TcpStream,
    peer: SocketAddr,
    started: Instant,
    line: &mut ReturnLine,
    slot: gateway::PendingSlot,
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
    let rq = gateway::read_request(&mut archive, cfg, started).await?;
    line.calling_ae = rq.calling_ae_title.clone();
    line.called_ae = rq.called_ae_title.clone();
    let Some(destination) = cfg.destination(&rq.called_ae_title) else {
        let reason = format!("called AE {:?} is no [[destination]]", rq.called_ae_title);
        return Err(gateway::reject(&mut archive, Rejection::CalledAeNotRecognized, reason).await);
    };
    let pending = match registry.claim(&destination.ae_title, peer.ip(), &rq.calling_ae_title) {
        Claim::Admitted(m) => m,
        Claim::NoMove => {
            let reason = format!("no C-MOVE to {} is in progress", destination.ae_title);
            return Err(gateway::reject(&mut archive, Rejection::NotExpected, reason).await);
        }
        Claim::NotTheirArchive { expected } => {
            let reason = format!(
                "calling AE {:?} at {} is not the archive of a C-MOVE to {} in progress (expected {})",
                rq.calling_ae_title,
                unmapped(peer.ip()),
                destination.ae_title,
                expected.join("; ")
            );
            return Err(gateway::reject(&mut archive, Rejection::NotExpected, reason).await);
        }
    };
    line.user = Some(pending.user.clone());
    let max = cfg.gateway.max_pdu_length;
    let request = association::rewrite_request(&rq, &destination.ae_title, max)
        .map_err(|e| Stop::new("protocol_error", e.to_string()))?;
    let t = cfg.timeouts;
    let connect = state.destinations.connect(destination, t.upstream_connect);
    let what = format!("destination {}", destination.ae_title);
    let (mut viewer, ac) =
        gateway::open_upstream(&mut archive, connect, &request, t.upstream_response, &what).await?;
    let (accept, _viewer_max) =
        match association::rewrite_accept(&ac, &rq.called_ae_title, false, max) {
            Ok(a) => a,
            Err(e) => {
                gateway::send(&mut viewer, &crate::ul::pdu::abort(0)).await;
                return Err(gateway::reject(
                    &mut archive,
                    Rejection::UpstreamUnavailable,
                    e.to_string(),
                )
                .await);
            }
        };
    if let Err(e) = gateway::write_within(&mut archive, &accept, t.association_request).await {
        gateway::send(&mut viewer, &crate::ul::pdu::abort(0)).await;
        return Err(Stop::new("aborted", format!("archive: {e}")));
    }
    drop(slot); // admitted: no longer a pending connection
    // The relay forwards C-STORE traffic unchanged; the gateway's own limit bounds each read.
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

    fn orthanc() -> ReturnPeer {
        ReturnPeer {
            upstream: "ARCHIVE".into(),
            ae_title: "ORTHANC".into(),
            addresses: vec!["127.0.0.1/32".parse().expect("net")],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn moves_are_claimed_by_destination_and_archive_until_they_end() {
        let moves = Arc::new(MovesInProgress::default());
        let local = ip("127.0.0.1");
        assert!(matches!(
            moves.claim("VIEWER", local, "ORTHANC"),
            Claim::NoMove
        ));
        let alice = moves.for_upstream(orthanc());
        let bob = moves.for_upstream(orthanc());
        let a = alice.begin("VIEWER", "alice", "WS1", 3);
        let _b = bob.begin("VIEWER", "bob", "WS2", 9);
        match moves.claim("VIEWER", local, "ORTHANC") {
            Claim::Admitted(m) => assert_eq!(m.user, "alice"),
            other => panic!("{other:?}"),
        }
        // IPv4-mapped is the same address.
        assert!(matches!(
            moves.claim("VIEWER", ip("::ffff:127.0.0.1"), "ORTHANC"),
            Claim::Admitted(_)
        ));
        alice.end(a);
        match moves.claim("VIEWER", local, "ORTHANC") {
            Claim::Admitted(m) => assert_eq!(m.user, "bob"),
            other => panic!("{other:?}"),
        }
        drop(bob);
        assert!(moves.is_empty(), "a dropped registry ends its moves");
    }

    #[test]
    fn another_calling_ae_or_address_is_not_the_archive() {
        let moves = Arc::new(MovesInProgress::default());
        let session = moves.for_upstream(orthanc());
        session.begin("VIEWER", "alice", "WS1", 3);
        for (address, calling) in [("127.0.0.1", "INTRUDER"), ("127.0.0.2", "ORTHANC")] {
            assert!(
                matches!(
                    moves.claim("VIEWER", ip(address), calling),
                    Claim::NotTheirArchive { .. }
                ),
                "{calling} at {address}"
            );
        }
        // A registry made without an archive registers moves nobody can claim.
        let unbound = MoveRegistry::default();
        unbound.begin("VIEWER", "alice", "WS1", 4);
        assert!(matches!(
            unbound.moves.claim("VIEWER", ip("127.0.0.1"), "ORTHANC"),
            Claim::NotTheirArchive { .. }
        ));
    }

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
        assert!(s.inspect(Side::Client, &pdata(&[(&store, true)])).is_ok());
        let ok = command(cf::C_STORE_RQ | cf::RESPONSE, Some(0));
        assert!(s.inspect(Side::Archive, &pdata(&[(&ok, true)])).is_ok());
        assert_eq!((s.stored, s.failed), (1, 0));

        let echo = command(cf::C_ECHO_RQ, None);
        let err = s
            .inspect(Side::Client, &pdata(&[(&echo, true)]))
            .unwrap_err();
        assert!(err.contains("C-ECHO-RQ"), "{err}");
        // Split over two PDUs, it is judged when complete.
        let find = command(cf::C_FIND_RQ, None);
        let (head, tail) = find.split_at(10);
        assert!(s.inspect(Side::Client, &pdata(&[(head, false)])).is_ok());
        assert!(s.inspect(Side::Client, &pdata(&[(tail, true)])).is_err());
        // The destination may not ask the archive anything either.
        let find = command(cf::C_FIND_RQ, None);
        assert!(s.inspect(Side::Archive, &pdata(&[(&find, true)])).is_err());
        assert!(
            s.inspect(Side::Client, &pdata(&[(b"garbage", true)]))
                .is_err()
        );
    }
}
