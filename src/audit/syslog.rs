//! The syslog sink of the audit trail: each event as an RFC 5424 message carrying a PS3.15 A.5
//! AuditMessage, sent over UDP (RFC 5426) or TLS (RFC 5425, with a replay window after a failure).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event as XmlEvent};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::Losses;
use crate::config::SyslogTarget;

/// The most characters of one field a DICOM audit message carries (AE titles are 16, UIDs 64).
const MAX_XML_FIELD: usize = 256;
/// After a failed write, at most this many bytes of the messages written last on that connection are
/// written again on the next one (at-least-once for what the collector may not have read).
const REPLAY_BYTES: usize = 1024 * 1024;
/// The pause between attempts to reach an unreachable syslog collector.
const SYSLOG_RETRY: Duration = Duration::from_secs(5);

/// The DICOM audit event a pacsgate event maps to: (EventID code, meaning, EventTypeCode, action code).
fn dicom_event(
    event: &str,
) -> (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static str,
) {
    match event {
        "association.accepted" | "login.failed" => (
            "110114",
            "User Authentication",
            Some(("110122", "Login")),
            "E",
        ),
        "association.ended" => (
            "110114",
            "User Authentication",
            Some(("110123", "Logout")),
            "E",
        ),
        "lockout" | "refused" | "association.rejected" => ("110113", "Security Alert", None, "E"),
        "find" | "qido" => ("110112", "Query", None, "E"),
        "move" | "get" | "store" | "move.delivered" | "wado" | "stow" => {
            ("110104", "DICOM Instances Transferred", None, "R")
        }
        "started" => (
            "110100",
            "Application Activity",
            Some(("110120", "Application Start")),
            "E",
        ),
        _ => ("110100", "Application Activity", None, "E"),
    }
}

/// Text an XML 1.0 document may carry: characters XML 1.0 does not allow (C0 controls other than tab,
/// newline and carriage return; U+FFFE, U+FFFF) become U+FFFD, and at most `max` characters are kept
/// (a cut ends in `…`). The JSON audit line keeps the exact value.
pub(super) fn xml_safe(text: &str, max: usize) -> Cow<'_, str> {
    let allowed = |c: char| matches!(c, '\t' | '\n' | '\r' | ' '..='\u{FFFD}' | '\u{10000}'..);
    if text.chars().all(allowed) && text.chars().nth(max).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if allowed(c) { c } else { '\u{FFFD}' })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    Cow::Owned(out)
}

/// RFC 5424 message with a PS3.15 A.5 AuditMessage as MSG. `host` is the HOSTNAME field,
/// `source_id` the AuditSourceID. Every value from an event passes [`xml_safe`].
pub(super) fn syslog_message(map: &Map<String, Value>, host: &str, source_id: &str) -> Vec<u8> {
    let event = xml_field(map, "event");
    let (id, meaning, type_code, action) = dicom_event(&event);
    let time = xml_field(map, "time");
    let mut w = Writer::new(Vec::new());
    let _ = w.write_event(XmlEvent::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
    let _ = w.write_event(XmlEvent::Start(BytesStart::new("AuditMessage")));
    let mut ident = BytesStart::new("EventIdentification");
    ident.push_attribute(("EventActionCode", action));
    ident.push_attribute(("EventDateTime", time.as_str()));
    let outcome = if event_failed(&event, map) { "4" } else { "0" };
    ident.push_attribute(("EventOutcomeIndicator", outcome));
    let _ = w.write_event(XmlEvent::Start(ident));
    let _ = w.write_event(coded("EventID", id, meaning));
    if let Some((c, m)) = type_code {
        let _ = w.write_event(coded("EventTypeCode", c, m));
    }
    let _ = w.write_event(XmlEvent::End(BytesEnd::new("EventIdentification")));
    write_participants(&mut w, map, source_id);
    write_objects(&mut w, map);
    let _ = w.write_event(XmlEvent::End(BytesEnd::new("AuditMessage")));
    let xml = w.into_inner();
    // PRI 85 = facility 10 (security/authorization) * 8 + severity 5 (notice).
    let mut msg = format!(
        "<85>1 {time} {host} pacsgate {} {} - ",
        std::process::id(),
        id
    )
    .into_bytes();
    msg.extend_from_slice(&xml);
    msg
}

/// The string value `key` of an event, XML-safe ("" when absent).
fn xml_field(map: &Map<String, Value>, key: &str) -> String {
    let v = map.get(key).and_then(Value::as_str).unwrap_or("");
    xml_safe(v, MAX_XML_FIELD).into_owned()
}

/// Whether the event is a failure: a refusal, or a failed status (DIMSE statuses are "0x...."
/// strings, web statuses HTTP integers).
fn event_failed(event: &str, map: &Map<String, Value>) -> bool {
    matches!(
        event,
        "login.failed" | "lockout" | "refused" | "association.rejected"
    ) || match map.get("status") {
        Some(Value::String(s)) => s != "0x0000",
        Some(Value::Number(n)) => n.as_u64().is_none_or(|n| n >= 400),
        _ => false,
    }
}

/// A coded value (`csd-code`, DCM, `originalText`) as the empty element `tag`.
fn coded(tag: &str, code: &str, meaning: &str) -> XmlEvent<'static> {
    let mut e = BytesStart::new(tag.to_string());
    e.push_attribute(("csd-code", code));
    e.push_attribute(("codeSystemName", "DCM"));
    e.push_attribute(("originalText", meaning));
    XmlEvent::Empty(e)
}

/// The requestor (user, calling AE title, the peer's host) and pacsgate as ActiveParticipants,
/// then the AuditSourceIdentification.
fn write_participants(w: &mut Writer<Vec<u8>>, map: &Map<String, Value>, source_id: &str) {
    let user = xml_field(map, "user");
    let peer = xml_field(map, "peer");
    let host_of_peer = peer
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or(peer);
    let mut requestor = BytesStart::new("ActiveParticipant");
    requestor.push_attribute(("UserID", if user.is_empty() { "-" } else { user.as_str() }));
    let calling = xml_field(map, "calling_ae");
    if !calling.is_empty() {
        requestor.push_attribute(("AlternativeUserID", calling.as_str()));
    }
    requestor.push_attribute(("UserIsRequestor", "true"));
    requestor.push_attribute(("NetworkAccessPointID", host_of_peer.as_str()));
    requestor.push_attribute(("NetworkAccessPointTypeCode", "2"));
    let _ = w.write_event(XmlEvent::Empty(requestor));
    let mut gateway = BytesStart::new("ActiveParticipant");
    gateway.push_attribute(("UserID", "pacsgate"));
    gateway.push_attribute(("UserIsRequestor", "false"));
    let _ = w.write_event(XmlEvent::Empty(gateway));
    let mut source = BytesStart::new("AuditSourceIdentification");
    let source_id = xml_safe(source_id, MAX_XML_FIELD);
    source.push_attribute(("AuditSourceID", source_id.as_ref()));
    let _ = w.write_event(XmlEvent::Empty(source));
}

/// A ParticipantObjectIdentification for the study and the SOP instance an event names.
fn write_objects(w: &mut Writer<Vec<u8>>, map: &Map<String, Value>) {
    for (key, code_value, meaning) in [
        ("study_uid", "110180", "Study Instance UID"),
        ("sop_instance_uid", "110181", "SOP Class UID"),
    ] {
        let uid = xml_field(map, key);
        if uid.is_empty() {
            continue;
        }
        let mut obj = BytesStart::new("ParticipantObjectIdentification");
        obj.push_attribute(("ParticipantObjectID", uid.as_str()));
        obj.push_attribute(("ParticipantObjectTypeCode", "2"));
        obj.push_attribute(("ParticipantObjectTypeCodeRole", "3"));
        let _ = w.write_event(XmlEvent::Start(obj));
        let _ = w.write_event(coded("ParticipantObjectIDTypeCode", code_value, meaning));
        let _ = w.write_event(XmlEvent::End(BytesEnd::new(
            "ParticipantObjectIdentification",
        )));
    }
}

/// The HOSTNAME of the syslog header (RFC 5424 6.2.4: printable US-ASCII, at most 255), from
/// gethostname(2), which needs no /proc (the unit's `ProcSubset=pid` hides /proc/sys); "-" if none.
pub(super) fn hostname() -> String {
    let name = gethostname::gethostname();
    let name = name.to_string_lossy();
    let name = name.trim();
    if !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_graphic()) {
        name.to_string()
    } else {
        "-".into()
    }
}

/// Send queued messages: UDP datagrams (RFC 5426) or octet-counted frames over TLS (RFC 5425).
/// Every wait on the collector (connect, TLS handshake, each write) is bounded by `within`; a write
/// that fails or does not finish in time drops the connection, and on the next one the gateway writes
/// again that message and the last [`REPLAY_BYTES`] written before it (which the collector may not have
/// read: RFC 5425 has no acknowledgement), so a stalled collector gets duplicates rather than gaps. A
/// collector that cannot be reached is retried every 5 s while this sender's `Audit` lives; once it is
/// gone (replaced on reload), the sender ends instead of retrying, counting what it could not deliver.
pub(super) async fn syslog_sender(
    target: SyslogTarget,
    connector: Option<tokio_rustls::TlsConnector>,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    within: Duration,
    losses: Arc<Losses>,
) {
    match target {
        SyslogTarget::Udp(addr) => udp_sender(addr, rx, within, &losses).await,
        SyslogTarget::Tls {
            address,
            server_name,
            ..
        } => {
            let Some(connector) = connector else { return };
            let Ok(name) = rustls::pki_types::ServerName::try_from(server_name.clone()) else {
                tracing::warn!(target: crate::logfmt::targets::AUDIT, server_name, "audit syslog: invalid server name");
                return;
            };
            let mut collector = Collector {
                address,
                name,
                connector,
                within,
                losses: &losses,
                resend: VecDeque::new(),
                warned: None,
            };
            collector.run(rx).await
        }
    }
}

/// RFC 5426: each queued message in one datagram.
async fn udp_sender(
    addr: SocketAddr,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    within: Duration,
    losses: &Losses,
) {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        tracing::warn!(target: crate::logfmt::targets::AUDIT, target = %addr, "audit syslog: cannot open a UDP socket");
        return;
    };
    while let Some(msg) = rx.recv().await {
        match tokio::time::timeout(within, socket.send_to(&msg, addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => losses.lost(1, &format!("syslog UDP send: {e}")),
            Err(_) => losses.lost(1, "syslog UDP send timed out"),
        }
    }
}

type CollectorStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// RFC 5425: the TLS collector of [`syslog_sender`], its connection retried and its last messages
/// written again after a failure.
struct Collector<'a> {
    address: String,
    name: rustls::pki_types::ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    within: Duration,
    losses: &'a Losses,
    /// Messages to write before new ones: after a failed connection, what it may not have
    /// delivered (at most REPLAY_BYTES of the last ones written, then the one that failed).
    resend: VecDeque<Vec<u8>>,
    /// When "collector unreachable" was last logged (once a minute).
    warned: Option<Instant>,
}

impl Collector<'_> {
    /// Connect, write until a write fails, connect again; until the queue closes (or, while
    /// unreachable, until a reload replaced this sender).
    async fn run(&mut self, mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>) {
        loop {
            let Some(mut stream) = self.connect(&rx).await else {
                return;
            };
            if self.warned.take().is_some() || !self.resend.is_empty() {
                tracing::info!(target: crate::logfmt::targets::AUDIT, target = %self.address, resend = self.resend.len(), "audit syslog: connected to the collector");
            }
            self.losses.flush("the syslog collector is reachable again");
            if !self.write(&mut stream, &mut rx).await {
                return;
            }
        }
    }

    /// A TLS connection to the collector, retried every [`SYSLOG_RETRY`]; `None` when it was
    /// unreachable and the queue is closed (a reload replaced this sender's configuration).
    async fn connect(
        &mut self,
        rx: &tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Option<CollectorStream> {
        let within = self.within;
        loop {
            let connected = async {
                let tcp = tokio::net::TcpStream::connect(&self.address).await?;
                self.connector.connect(self.name.clone(), tcp).await
            };
            let reason = match tokio::time::timeout(within, connected).await {
                Ok(Ok(s)) => return Some(s),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("syslog_timeout ({within:?}) passed in connect or TLS handshake"),
            };
            if rx.is_closed() {
                // A reload replaced this sender's configuration: stop, do not retry.
                let lost = (self.resend.len() + rx.len()) as u64;
                self.losses.lost(
                    lost,
                    "the collector was unreachable when a reload replaced the audit settings",
                );
                tracing::debug!(target: crate::logfmt::targets::AUDIT, target = %self.address, "audit syslog: sender of a replaced configuration ends");
                return None;
            }
            if self
                .warned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                self.warned = Some(Instant::now());
                tracing::warn!(target: crate::logfmt::targets::AUDIT, target = %self.address, reason = ?reason, "audit syslog: collector unreachable; retrying every 5 s (logged once a minute)");
            }
            tokio::time::sleep(SYSLOG_RETRY).await;
        }
    }

    /// Write the messages to resend, then queued ones, as octet-counted frames. False when the
    /// queue closed; true when a write failed (the last messages written are then queued to
    /// resend on the next connection).
    async fn write(
        &mut self,
        stream: &mut CollectorStream,
        rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> bool {
        let within = self.within;
        // The last messages written on this connection, up to REPLAY_BYTES: the collector
        // acknowledges nothing (RFC 5425), so these may still sit unread in its buffers.
        let mut window: VecDeque<Vec<u8>> = VecDeque::new();
        let mut window_bytes = 0usize;
        loop {
            let msg = match self.resend.pop_front() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return false,
                },
            };
            let mut frame = format!("{} ", msg.len()).into_bytes();
            frame.extend_from_slice(&msg);
            let wrote = tokio::time::timeout(within, async {
                stream.write_all(&frame).await?;
                stream.flush().await
            })
            .await;
            let problem = match wrote {
                Ok(Ok(())) => {
                    window_bytes += msg.len();
                    window.push_back(msg);
                    while window_bytes > REPLAY_BYTES {
                        match window.pop_front() {
                            Some(old) => window_bytes -= old.len(),
                            None => break,
                        }
                    }
                    continue;
                }
                Ok(Err(e)) => format!("write failed: {e}"),
                Err(_) => format!(
                    "write not done within syslog_timeout ({within:?}): the collector is not reading"
                ),
            };
            let again = window.len();
            tracing::warn!(target: crate::logfmt::targets::AUDIT, target = %self.address, reason = ?problem, resend = again + 1,
                           "audit syslog: reconnecting to the collector; the last messages written go again (it may get some twice)");
            window.push_back(msg);
            window.extend(self.resend.drain(..));
            self.resend = window;
            return true;
        }
    }
}
