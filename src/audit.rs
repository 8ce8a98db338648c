//! The audit trail, apart from the debug log: JSON lines appended to `[audit] file` (one write per event,
//! so a crash loses none), and optionally DICOM audit messages (PS3.15 A.5 XML) to syslog (RFC 5424).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event as XmlEvent};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use crate::config::{AuditConfig, OnAuditFailure, SyslogTarget};
use crate::metrics::{AuditLabels, metrics};

/// A string field longer than this is cut (and says so); a line never grows without bound.
const MAX_FIELD: usize = 1024;
/// The most characters of one field a DICOM audit message carries (AE titles are 16, UIDs 64).
const MAX_XML_FIELD: usize = 256;
/// Events waiting for the syslog sender; more are counted as dropped, never block the data path.
const SYSLOG_QUEUE: usize = 4096;
/// Lost audit events are logged at most this often (with the count since the last line).
const LOSS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed write, at most this many bytes of the messages written last on that connection are
/// written again on the next one (at-least-once for what the collector may not have read).
const REPLAY_BYTES: usize = 1024 * 1024;
/// The pause between attempts to reach an unreachable syslog collector.
const SYSLOG_RETRY: Duration = Duration::from_secs(5);

/// Why the audit trail could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Audit events one sink lost, logged at most once per [`LOSS_LOG_INTERVAL`] with the count.
#[derive(Debug)]
struct Losses {
    sink: &'static str,
    /// Lost since the last log line.
    unlogged: AtomicU64,
    last_line: Mutex<Option<Instant>>,
}

impl Losses {
    fn new(sink: &'static str) -> Losses {
        // Its series exists at 0 from start-up (metrics.rs), before anything is lost.
        Losses {
            sink,
            unlogged: AtomicU64::new(0),
            last_line: Mutex::new(None),
        }
    }

    /// `n` events lost for `reason`: counted at once, logged unless a line went out recently.
    fn lost(&self, n: u64, reason: &str) {
        if n == 0 {
            return;
        }
        metrics()
            .audit_failures
            .get_or_create(&AuditLabels { sink: self.sink })
            .inc_by(n);
        self.unlogged.fetch_add(n, Ordering::Relaxed);
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOSS_LOG_INTERVAL) {
            *last = Some(Instant::now());
            let lost = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::error!(
                sink = self.sink,
                lost,
                reason = ?reason,
                "audit: events lost (logged at most every 10 s; pacsgate_audit_failures_total counts them all)"
            );
        }
    }

    /// Log the losses not logged yet, if any (when the sink works again).
    fn flush(&self, what: &str) {
        let lost = self.unlogged.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                sink = self.sink,
                lost,
                "audit: {what}; events lost since the last line"
            );
        }
    }
}

/// The audit file and whether its last write worked.
#[derive(Debug)]
struct FileSink {
    /// The file, and why its last write failed (cleared by the next write that works).
    file: Mutex<(File, Option<String>)>,
    /// The last write failed: the lock-free check [`Audit::refusing`] starts with.
    failing: AtomicBool,
    losses: Losses,
}

/// The queue to the syslog sender task.
#[derive(Debug)]
struct SyslogSink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    losses: Arc<Losses>,
}

/// Where audit events go.
#[derive(Debug)]
pub struct Audit {
    file: Option<FileSink>,
    syslog: Option<SyslogSink>,
    on_failure: OnAuditFailure,
    /// AuditSourceID of the DICOM audit messages.
    source_id: String,
    /// HOSTNAME of the syslog header.
    host: String,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Cut long strings, recursively; JSON escaping does the rest (control characters, quotes, newlines).
fn bound(v: &mut Value) {
    match v {
        Value::String(s) if s.len() > MAX_FIELD => {
            let mut cut = MAX_FIELD;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            let extra = s.len() - cut;
            s.truncate(cut);
            s.push_str(&format!("…[{extra} bytes cut]"));
        }
        Value::Array(items) => {
            items.truncate(256);
            items.iter_mut().for_each(bound);
        }
        Value::Object(map) => map.values_mut().for_each(bound),
        _ => {}
    }
}

impl Audit {
    /// No audit trail (events are dropped silently).
    pub fn disabled() -> Audit {
        Audit {
            file: None,
            syslog: None,
            on_failure: OnAuditFailure::Continue,
            source_id: "pacsgate".into(),
            host: "-".into(),
        }
    }

    /// Open the audit file for appending (mode 600 when created) and start the syslog sender.
    /// The sender ends when this `Audit` is dropped (a reload replaced it) and its queue is
    /// delivered or the collector cannot be reached.
    pub fn open(cfg: Option<&AuditConfig>) -> Result<Audit, AuditError> {
        let Some(cfg) = cfg else {
            return Ok(Audit::disabled());
        };
        let file = match &cfg.file {
            None => None,
            Some(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Some(FileSink {
                    file: Mutex::new((f, None)),
                    failing: AtomicBool::new(false),
                    losses: Losses::new("file"),
                })
            }
        };
        let syslog = match &cfg.syslog {
            None => None,
            Some(target) => {
                let (tx, rx) = tokio::sync::mpsc::channel(SYSLOG_QUEUE);
                let connector = match target {
                    SyslogTarget::Tls { ca, .. } => Some(tokio_rustls::TlsConnector::from(
                        crate::tls::client_config(ca, None, None)?,
                    )),
                    SyslogTarget::Udp(_) => None,
                };
                let losses = Arc::new(Losses::new("syslog"));
                tokio::spawn(syslog_sender(
                    target.clone(),
                    connector,
                    rx,
                    cfg.syslog_timeout,
                    losses.clone(),
                ));
                Some(SyslogSink { tx, losses })
            }
        };
        let host = hostname();
        Ok(Audit {
            file,
            syslog,
            on_failure: cfg.on_failure,
            source_id: cfg.source_id.clone().unwrap_or_else(|| host.clone()),
            host,
        })
    }

    /// With `on_failure = "refuse"`: why new associations and web requests are refused now (the
    /// last write to the audit file failed), or `None` when they may go on.
    pub fn refusing(&self) -> Option<String> {
        if self.on_failure != OnAuditFailure::Refuse {
            return None;
        }
        let file = self.file.as_ref()?;
        if !file.failing.load(Ordering::Relaxed) {
            return None;
        }
        file.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Record one event: `event` names it (e.g. "association.accepted"), `fields` say the rest.
    pub fn record(&self, event: &str, fields: Value) {
        if self.file.is_none() && self.syslog.is_none() {
            return;
        }
        let mut map = Map::new();
        map.insert("time".into(), json!(now_rfc3339()));
        map.insert("event".into(), json!(event));
        if let Value::Object(f) = fields {
            for (k, v) in f {
                if !v.is_null() {
                    map.insert(k, v);
                }
            }
        }
        let mut value = Value::Object(map);
        bound(&mut value);
        if let Some(sink) = &self.file {
            let mut line = value.to_string();
            line.push('\n');
            let mut guard = sink.file.lock().unwrap_or_else(|p| p.into_inner());
            let (f, failing) = &mut *guard;
            // One write per line: O_APPEND keeps lines whole, and the kernel has it once write returns.
            match f.write_all(line.as_bytes()) {
                Ok(()) => {
                    if failing.take().is_some() {
                        sink.failing.store(false, Ordering::Relaxed);
                        sink.losses.flush("the audit file is writable again");
                        tracing::warn!(event, "audit: the audit file is writable again");
                    }
                }
                Err(e) => {
                    let reason = format!("cannot write the audit file: {e}");
                    sink.losses.lost(1, &reason);
                    *failing = Some(reason);
                    sink.failing.store(true, Ordering::Relaxed);
                }
            }
        }
        if let Some(sink) = &self.syslog
            && let Value::Object(map) = &value
            && sink
                .tx
                .try_send(syslog_message(map, &self.host, &self.source_id))
                .is_err()
        {
            sink.losses.lost(
                1,
                "the syslog queue is full (the collector is slow or unreachable)",
            );
        }
    }
}

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
fn xml_safe(text: &str, max: usize) -> Cow<'_, str> {
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
fn syslog_message(map: &Map<String, Value>, host: &str, source_id: &str) -> Vec<u8> {
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
fn hostname() -> String {
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
async fn syslog_sender(
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
                tracing::warn!(server_name, "audit syslog: invalid server name");
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
        tracing::warn!(target = %addr, "audit syslog: cannot open a UDP socket");
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
                tracing::info!(target = %self.address, resend = self.resend.len(), "audit syslog: connected to the collector");
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
                tracing::debug!(target = %self.address, "audit syslog: sender of a replaced configuration ends");
                return None;
            }
            if self
                .warned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                self.warned = Some(Instant::now());
                tracing::warn!(target = %self.address, reason = ?reason, "audit syslog: collector unreachable; retrying every 5 s (logged once a minute)");
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
            tracing::warn!(target = %self.address, reason = ?problem, resend = again + 1,
                           "audit syslog: reconnecting to the collector; the last messages written go again (it may get some twice)");
            window.push_back(msg);
            window.extend(self.resend.drain(..));
            self.resend = window;
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_stay_whole_and_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&AuditConfig {
            file: Some(path.clone()),
            syslog: None,
            syslog_timeout: Duration::from_secs(10),
            on_failure: OnAuditFailure::Continue,
            source_id: None,
        }))
        .expect("open");
        audit.record(
            "find",
            json!({"user": "a\nb\"c", "query": {"PatientName": "x".repeat(5000)}}),
        );
        audit.record("refused", json!({"user": "d", "rule": "not_authorized"}));
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(first["user"], "a\nb\"c");
        assert!(
            first["query"]["PatientName"]
                .as_str()
                .is_some_and(|s| s.len() < 1100 && s.contains("cut"))
        );
        assert_eq!(
            serde_json::from_str::<Value>(lines[1]).expect("json")["event"],
            "refused"
        );
    }

    /// Events covering every EventID mapping, escaping, IPv6, web (integer) and DIMSE (hex) statuses.
    fn golden_events() -> Vec<Map<String, Value>> {
        let events = [
            json!({"event": "association.accepted", "user": "dr.house", "peer": "10.1.5.23:51234",
                   "calling_ae": "WS1", "called_ae": "ARCHIVE", "method": "password"}),
            json!({"event": "login.failed", "user": "mallory<&>\"'", "peer": "[::1]:4000",
                   "calling_ae": "EVIL&AE", "reason": "wrong password"}),
            json!({"event": "association.ended", "user": "dr.house", "peer": "10.1.5.23:51234",
                   "calling_ae": "WS1", "outcome": "released"}),
            json!({"event": "association.rejected", "peer": "192.0.2.1:1", "rule": "not_authenticated"}),
            json!({"event": "lockout", "user": "bob", "peer": "127.0.0.1:9", "scope": "UserAtAddress"}),
            json!({"event": "refused", "user": "carol", "peer": "127.0.0.1:9", "via": "http",
                   "status": 403, "rule": "query_guard"}),
            json!({"event": "find", "user": "Zoë 日本", "peer": "127.0.0.1:9", "calling_ae": "WS1",
                   "status": "0x0000", "study_uid": "1.2.3"}),
            json!({"event": "find", "user": "zoe", "peer": "127.0.0.1:9", "status": "0xa700"}),
            json!({"event": "qido", "user": "carol", "peer": "127.0.0.1:9", "via": "http",
                   "status": 200, "study_uid": "1.2.3.4"}),
            json!({"event": "move", "user": "dr.house", "peer": "127.0.0.1:9", "status": "0x0000",
                   "study_uid": "1.2.3", "sop_instance_uid": "1.2.3.4.5", "destination": "VIEWER"}),
            json!({"event": "get", "user": "dr.house", "peer": "127.0.0.1:9", "status": "0xb000"}),
            json!({"event": "store", "user": "ct", "peer": "127.0.0.1:9", "status": "0x0000",
                   "sop_instance_uid": "9.8.7"}),
            json!({"event": "move.delivered", "peer": "127.0.0.1:9", "status": "0x0000"}),
            json!({"event": "wado", "user": "carol", "peer": "127.0.0.1:9", "via": "http",
                   "status": 200, "study_uid": "1.2", "series_uid": "1.2.1", "sop_instance_uid": "1.2.1.1"}),
            json!({"event": "stow", "user": "writer", "peer": "127.0.0.1:9", "via": "http",
                   "status": 200, "study_uid": "5.6"}),
            json!({"event": "reload", "outcome": "ok", "path": "/etc/pacsgate/pacsgate.toml"}),
            json!({"event": "echo", "user": "", "peer": "no-port", "status": "0x0000"}),
        ];
        events
            .into_iter()
            .map(|e| {
                let mut map = Map::new();
                map.insert("time".into(), json!("2026-01-01T00:00:00.5Z"));
                if let Value::Object(f) = e {
                    map.extend(f);
                }
                map
            })
            .collect()
    }

    /// The syslog messages of [`golden_events`], one per line, with the host and process id
    /// replaced by `HOST` and `PID`.
    fn golden_text() -> String {
        let pid = format!(" {} ", std::process::id());
        golden_events()
            .iter()
            .map(|m| {
                let msg = String::from_utf8(syslog_message(m, "HOST", "pacsgate")).expect("utf8");
                let (header, xml) = msg.split_once("<?xml").expect("an XML declaration");
                let header = header.replacen(&pid, " PID ", 1);
                format!("{header}<?xml{xml}\n")
            })
            .collect()
    }

    /// The audit XML is byte-identical to what pacsgate wrote with quick-xml 0.38 (the golden was
    /// made by that build; `PACSGATE_UPDATE_GOLDEN=1` rewrites it after a deliberate change).
    #[test]
    fn syslog_messages_match_the_golden() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/audit-syslog.txt");
        let text = golden_text();
        if std::env::var_os("PACSGATE_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).expect("write the golden");
        }
        let golden = std::fs::read_to_string(&path).expect("read the golden");
        for (i, (got, want)) in text.lines().zip(golden.lines()).enumerate() {
            assert_eq!(got, want, "message {i} differs from {}", path.display());
        }
        assert_eq!(text.lines().count(), golden.lines().count());
    }

    #[test]
    fn xml_text_loses_what_xml_1_0_forbids_and_is_bounded() {
        assert_eq!(xml_safe("WS1", 16), "WS1");
        assert_eq!(xml_safe("X\u{7}Y", 16), "X\u{FFFD}Y");
        assert_eq!(
            xml_safe("a\u{0}b\u{1b}[2J\u{FFFE}", 16),
            "a\u{FFFD}b\u{FFFD}[2J\u{FFFD}"
        );
        assert_eq!(xml_safe("tab\there\r\n", 16), "tab\there\r\n");
        assert_eq!(xml_safe(&"é".repeat(300), 256).chars().count(), 257);
        let mut map = Map::new();
        map.insert("event".into(), json!("login.failed"));
        map.insert("calling_ae".into(), json!("X\u{7}Y"));
        map.insert("user".into(), json!("u".repeat(5000)));
        let msg = String::from_utf8(syslog_message(&map, "h", "src\u{1}")).expect("utf8");
        assert!(!msg.chars().any(|c| c.is_control() && c != '\n'), "{msg:?}");
        assert!(msg.contains("AlternativeUserID=\"X\u{FFFD}Y\""), "{msg}");
        assert!(msg.len() < 2000, "{} bytes", msg.len());
    }

    #[test]
    fn a_web_request_the_archive_failed_is_a_failure() {
        for (status, outcome) in [(json!(200), "0"), (json!(404), "4"), (json!(502), "4")] {
            let mut map = Map::new();
            map.insert("event".into(), json!("wado"));
            map.insert("status".into(), status);
            let msg = String::from_utf8(syslog_message(&map, "h", "s")).expect("utf8");
            assert!(
                msg.contains(&format!("EventOutcomeIndicator=\"{outcome}\"")),
                "{msg}"
            );
        }
    }

    #[test]
    fn syslog_messages_carry_a_dicom_audit_message() {
        let mut map = Map::new();
        map.insert("time".into(), json!("2026-01-01T00:00:00Z"));
        map.insert("event".into(), json!("login.failed"));
        map.insert("user".into(), json!("mallory<&>"));
        map.insert("peer".into(), json!("127.0.0.1:4000"));
        let msg = String::from_utf8(syslog_message(&map, "host", "pacsgate")).expect("utf8");
        assert!(msg.starts_with("<85>1 2026-01-01T00:00:00Z "));
        assert!(msg.contains("csd-code=\"110114\""));
        assert!(msg.contains("EventOutcomeIndicator=\"4\""));
        assert!(msg.contains("UserID=\"mallory&lt;&amp;&gt;\""));
    }
}
