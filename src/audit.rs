//! The audit trail, apart from the debug log: JSON lines appended to `[audit] file` (one write per event,
//! so a crash loses none), and optionally DICOM audit messages (PS3.15 A.5 XML) to syslog (RFC 5424).
//! The syslog side (the RFC 5424 message, the UDP and TLS senders) is `audit/syslog.rs`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::config::{AuditConfig, OnAuditFailure, SyslogTarget};
use crate::metrics::{AuditLabels, metrics};

mod syslog;

use syslog::{hostname, syslog_message, syslog_sender};

/// A string field longer than this is cut (and says so); a line never grows without bound.
const MAX_FIELD: usize = 1024;
/// Events waiting for the syslog sender; more are counted as dropped, never block the data path.
const SYSLOG_QUEUE: usize = 4096;
/// Lost audit events are logged at most this often (with the count since the last line).
const LOSS_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

#[cfg(test)]
mod tests {
    use super::syslog::xml_safe;
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
