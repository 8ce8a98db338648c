//! The audit trail, apart from the debug log: JSON lines appended to `[audit] file` (one write per event,
//! so a crash loses none), and optionally DICOM audit messages (PS3.15 A.5 XML) to syslog (RFC 5424).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event as XmlEvent};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use crate::config::{AuditConfig, SyslogTarget};
use crate::metrics::{AuditLabels, metrics};

/// A string field longer than this is cut (and says so); a line never grows without bound.
const MAX_FIELD: usize = 1024;
/// Events waiting for the syslog sender; more are counted as dropped, never block the data path.
const SYSLOG_QUEUE: usize = 4096;

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

/// Where audit events go.
#[derive(Debug)]
pub struct Audit {
    file: Option<Mutex<File>>,
    syslog: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
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
        }
    }

    /// Open the audit file for appending (mode 600 when created) and start the syslog sender.
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
                Some(Mutex::new(f))
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
                tokio::spawn(syslog_sender(target.clone(), connector, rx));
                Some(tx)
            }
        };
        Ok(Audit { file, syslog })
    }

    /// Record one event: `event` names it (e.g. "association.accepted"), `fields` says the rest.
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
        if let Some(file) = &self.file {
            let mut line = value.to_string();
            line.push('\n');
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            // One write per line: O_APPEND keeps lines whole, and the kernel has it once write returns.
            if let Err(e) = f.write_all(line.as_bytes()) {
                metrics()
                    .audit_failures
                    .get_or_create(&AuditLabels { sink: "file" })
                    .inc();
                tracing::error!(reason = %e, event, "audit: cannot write the audit file");
            }
        }
        if let Some(tx) = &self.syslog
            && let Value::Object(map) = &value
            && tx.try_send(syslog_message(map)).is_err()
        {
            metrics()
                .audit_failures
                .get_or_create(&AuditLabels { sink: "syslog" })
                .inc();
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
        _ => ("110100", "Application Activity", None, "E"),
    }
}

/// RFC 5424 message with a PS3.15 A.5 AuditMessage as MSG.
fn syslog_message(map: &Map<String, Value>) -> Vec<u8> {
    let text = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let event = text("event");
    let (id, meaning, type_code, action) = dicom_event(&event);
    let failed = matches!(
        event.as_str(),
        "login.failed" | "lockout" | "refused" | "association.rejected"
    ) || map
        .get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| s != "0x0000");
    let mut w = Writer::new(Vec::new());
    let _ = w.write_event(XmlEvent::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
    let _ = w.write_event(XmlEvent::Start(BytesStart::new("AuditMessage")));
    let time = text("time");
    let mut ident = BytesStart::new("EventIdentification");
    ident.push_attribute(("EventActionCode", action));
    ident.push_attribute(("EventDateTime", time.as_str()));
    ident.push_attribute(("EventOutcomeIndicator", if failed { "4" } else { "0" }));
    let _ = w.write_event(XmlEvent::Start(ident));
    let code = |tag: &str, code: &str, meaning: &str| {
        let mut e = BytesStart::new(tag.to_string());
        e.push_attribute(("csd-code", code));
        e.push_attribute(("codeSystemName", "DCM"));
        e.push_attribute(("originalText", meaning));
        XmlEvent::Empty(e)
    };
    let _ = w.write_event(code("EventID", id, meaning));
    if let Some((c, m)) = type_code {
        let _ = w.write_event(code("EventTypeCode", c, m));
    }
    let _ = w.write_event(XmlEvent::End(BytesEnd::new("EventIdentification")));
    let user = text("user");
    let peer = text("peer");
    let host = peer
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or(peer);
    let mut requestor = BytesStart::new("ActiveParticipant");
    requestor.push_attribute(("UserID", if user.is_empty() { "-" } else { user.as_str() }));
    let calling = text("calling_ae");
    if !calling.is_empty() {
        requestor.push_attribute(("AlternativeUserID", calling.as_str()));
    }
    requestor.push_attribute(("UserIsRequestor", "true"));
    requestor.push_attribute(("NetworkAccessPointID", host.as_str()));
    requestor.push_attribute(("NetworkAccessPointTypeCode", "2"));
    let _ = w.write_event(XmlEvent::Empty(requestor));
    let mut gateway = BytesStart::new("ActiveParticipant");
    gateway.push_attribute(("UserID", "pacsgate"));
    gateway.push_attribute(("UserIsRequestor", "false"));
    let _ = w.write_event(XmlEvent::Empty(gateway));
    let mut source = BytesStart::new("AuditSourceIdentification");
    source.push_attribute(("AuditSourceID", "pacsgate"));
    let _ = w.write_event(XmlEvent::Empty(source));
    for (key, code_value, meaning) in [
        ("study_uid", "110180", "Study Instance UID"),
        ("sop_instance_uid", "110181", "SOP Class UID"),
    ] {
        let uid = text(key);
        if uid.is_empty() {
            continue;
        }
        let mut obj = BytesStart::new("ParticipantObjectIdentification");
        obj.push_attribute(("ParticipantObjectID", uid.as_str()));
        obj.push_attribute(("ParticipantObjectTypeCode", "2"));
        obj.push_attribute(("ParticipantObjectTypeCodeRole", "3"));
        let _ = w.write_event(XmlEvent::Start(obj));
        let _ = w.write_event(code("ParticipantObjectIDTypeCode", code_value, meaning));
        let _ = w.write_event(XmlEvent::End(BytesEnd::new(
            "ParticipantObjectIdentification",
        )));
    }
    let _ = w.write_event(XmlEvent::End(BytesEnd::new("AuditMessage")));
    let xml = w.into_inner();
    let host = hostname();
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "-".into())
}

/// Send queued messages: UDP datagrams (RFC 5426) or octet-counted frames over TLS (RFC 5425),
/// reconnecting with a pause when the collector is away.
async fn syslog_sender(
    target: SyslogTarget,
    connector: Option<tokio_rustls::TlsConnector>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    match target {
        SyslogTarget::Udp(addr) => {
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
                let _ = socket.send_to(&msg, addr).await;
            }
        }
        SyslogTarget::Tls {
            address,
            server_name,
            ..
        } => {
            let Some(connector) = connector else { return };
            let mut pending: Option<Vec<u8>> = None;
            loop {
                let Ok(name) = rustls::pki_types::ServerName::try_from(server_name.clone()) else {
                    tracing::warn!(server_name, "audit syslog: invalid server name");
                    return;
                };
                let connected = async {
                    let tcp = tokio::net::TcpStream::connect(&address).await?;
                    connector.connect(name, tcp).await
                };
                let mut stream = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    connected,
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    _ => {
                        tracing::warn!(target = %address, "audit syslog: collector unreachable; retrying in 5 s");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        continue;
                    }
                };
                loop {
                    let msg = match pending.take() {
                        Some(m) => m,
                        None => match rx.recv().await {
                            Some(m) => m,
                            None => return,
                        },
                    };
                    let mut frame = format!("{} ", msg.len()).into_bytes();
                    frame.extend_from_slice(&msg);
                    if stream.write_all(&frame).await.is_err() || stream.flush().await.is_err() {
                        pending = Some(msg);
                        break;
                    }
                }
            }
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
        let host = hostname();
        let pid = format!(" {} ", std::process::id());
        golden_events()
            .iter()
            .map(|m| {
                let msg = String::from_utf8(syslog_message(m)).expect("utf8");
                let (header, xml) = msg.split_once("<?xml").expect("an XML declaration");
                let header = header
                    .replacen(&format!(" {host} "), " HOST ", 1)
                    .replacen(&pid, " PID ", 1);
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
    fn syslog_messages_carry_a_dicom_audit_message() {
        let mut map = Map::new();
        map.insert("time".into(), json!("2026-01-01T00:00:00Z"));
        map.insert("event".into(), json!("login.failed"));
        map.insert("user".into(), json!("mallory<&>"));
        map.insert("peer".into(), json!("127.0.0.1:4000"));
        let msg = String::from_utf8(syslog_message(&map)).expect("utf8");
        assert!(msg.starts_with("<85>1 2026-01-01T00:00:00Z "));
        assert!(msg.contains("csd-code=\"110114\""));
        assert!(msg.contains("EventOutcomeIndicator=\"4\""));
        assert!(msg.contains("UserID=\"mallory&lt;&amp;&gt;\""));
    }
}
