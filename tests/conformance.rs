//! docs/conformance.md against the code: every table marked `<!-- conformance-table: NAME -->` is read
//! and compared with the definitions the gateway uses (operations, statuses, rejections, transfer
//! syntaxes, storage SOP classes, association defaults, TLS suites and groups, audit event codes,
//! QIDO-RS media types). A change on either side without the other fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry};
use pacsgate::config::Operation;
use pacsgate::dimse::status;
use pacsgate::ul::pdu::Rejection;

const DOC: &str = "docs/conformance.md";

/// The rows (cells, backticks removed) of the table after `<!-- conformance-table: NAME -->`.
fn table(name: &str) -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC))
        .unwrap_or_else(|e| panic!("{DOC}: {e}"));
    let marker = format!("<!-- conformance-table: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("{DOC} has no {marker}"));
    let rows: Vec<Vec<String>> = doc[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.trim_start().starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "{DOC}: table {name} has no rows");
    rows
}

fn column(name: &str, i: usize) -> Vec<String> {
    table(name).into_iter().map(|r| r[i].clone()).collect()
}

/// Every operation a role can allow. The match makes a new variant a compile error here.
fn all_operations() -> Vec<Operation> {
    let all = [
        Operation::Echo,
        Operation::Find,
        Operation::Get,
        Operation::Move,
        Operation::Store,
        Operation::Worklist,
    ];
    for op in all {
        match op {
            Operation::Echo
            | Operation::Find
            | Operation::Get
            | Operation::Move
            | Operation::Store
            | Operation::Worklist => {}
        }
    }
    all.to_vec()
}

/// Every rejection the gateway sends. The match makes a new variant a compile error here.
fn all_rejections() -> Vec<Rejection> {
    let all = [
        Rejection::NotAuthenticated,
        Rejection::CalledAeNotRecognized,
        Rejection::ProtocolVersion,
        Rejection::ApplicationContext,
        Rejection::NotExpected,
        Rejection::UpstreamUnavailable,
        Rejection::LocalLimitExceeded,
    ];
    for r in all {
        match r {
            Rejection::NotAuthenticated
            | Rejection::CalledAeNotRecognized
            | Rejection::ProtocolVersion
            | Rejection::ApplicationContext
            | Rejection::NotExpected
            | Rejection::UpstreamUnavailable
            | Rejection::LocalLimitExceeded => {}
        }
    }
    all.to_vec()
}

fn minimal_config(dir: &Path, extra: &str) -> Result<pacsgate::config::Config, String> {
    let path = dir.join("pacsgate.toml");
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n[tls]\ncertificate = \"server.crt\"\nprivate_key = \"server.key\"\n\
         [[upstream]]\ncalled_ae = \"ARCHIVE\"\naddress = \"127.0.0.1:104\"\nae_title = \"ARCHIVE\"\n{extra}"
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    pacsgate::config::Config::load(&path).map_err(|e| e.to_string())
}

#[test]
fn the_operations_table_lists_what_a_role_can_allow() {
    let doc: BTreeSet<String> = column("operations", 0).into_iter().collect();
    let code: BTreeSet<String> = all_operations()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    assert_eq!(doc, code, "{DOC} operations vs config::Operation");
    // Each name in the table is one the configuration accepts; a name outside it is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    for op in &doc {
        let role = format!("[[role]]\nname = \"r\"\nallow = [\"{op}\"]\n");
        minimal_config(dir.path(), &role).unwrap_or_else(|e| panic!("allow = [{op:?}]: {e}"));
    }
    let role = "[[role]]\nname = \"r\"\nallow = [\"n-create\"]\n";
    assert!(minimal_config(dir.path(), role).is_err());
}

#[test]
fn the_refusal_statuses_are_the_gateways() {
    let doc: BTreeSet<u16> = column("refusal-statuses", 0)
        .iter()
        .map(|s| {
            u16::from_str_radix(s.trim_start_matches("0x"), 16)
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        })
        .collect();
    let code: BTreeSet<u16> = [
        status::SOP_CLASS_NOT_SUPPORTED,
        status::REFUSED_NOT_AUTHORIZED,
        status::DUPLICATE_INVOCATION,
        status::OUT_OF_RESOURCES,
        status::OUT_OF_RESOURCES_MATCHES,
        status::MOVE_DESTINATION_UNKNOWN,
        status::IDENTIFIER_DOES_NOT_MATCH,
        status::CANCEL,
    ]
    .into_iter()
    .collect();
    assert_eq!(doc, code, "{DOC} refusal statuses vs dimse::status");
}

#[test]
fn the_rejection_table_matches_the_codes_sent() {
    let doc: BTreeSet<(String, String)> = table("rejections")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let code: BTreeSet<(String, String)> = all_rejections()
        .into_iter()
        .map(|r| {
            let (a, b, c) = r.codes();
            (format!("{a}/{b}/{c}"), r.name().to_string())
        })
        .collect();
    assert_eq!(doc, code, "{DOC} rejections vs pdu::Rejection");
}

#[test]
fn identifiers_are_read_in_exactly_the_listed_transfer_syntaxes() {
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
    let doc: BTreeSet<String> = column("identifier-transfer-syntaxes", 0)
        .into_iter()
        .collect();
    let registry = dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    let mut accepted = BTreeSet::new();
    for ts in registry.iter() {
        match pacsgate::dimse::decode_identifier(&[], ts.uid()) {
            Ok(_) => {
                accepted.insert(ts.uid().to_string());
            }
            Err(pacsgate::dimse::DimseError::TransferSyntax(_)) => {}
            Err(e) => panic!("{}: {e}", ts.uid()),
        }
    }
    assert_eq!(
        doc, accepted,
        "{DOC} identifier transfer syntaxes vs dimse::decode_identifier"
    );
    for row in table("identifier-transfer-syntaxes") {
        let name = registry.get(&row[0]).map(|t| t.name()).unwrap_or_default();
        assert_eq!(row[1], name, "{DOC}: the name of {}", row[0]);
    }
}

#[test]
fn the_storage_classes_table_is_what_move_as_get_proposes() {
    let rows = table("storage-classes");
    let doc: Vec<String> = rows.iter().map(|r| r[1].clone()).collect();
    let code: Vec<String> = pacsgate::connect::storage_classes::STORAGE_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let expected: String = code
        .iter()
        .map(|uid| {
            let name = dicom_dictionary_std::sop_class::StandardSopClassDictionary
                .by_uid(uid)
                .map(|e| e.name().to_string())
                .unwrap_or_default();
            format!("| {name} | `{uid}` |\n")
        })
        .collect();
    assert_eq!(
        doc, code,
        "{DOC} storage-classes vs connect::storage_classes::STORAGE_CLASSES; the table should read:\n{expected}"
    );
    for row in &rows {
        let name = dicom_dictionary_std::sop_class::StandardSopClassDictionary
            .by_uid(&row[1])
            .map(|e| e.name().to_string())
            .unwrap_or_default();
        assert_eq!(row[0], name, "{DOC}: the name of {}", row[1]);
    }
}

#[test]
fn the_association_defaults_are_the_configurations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = minimal_config(dir.path(), "").expect("minimal config");
    let secs = |d: std::time::Duration| d.as_secs().to_string();
    let code: BTreeMap<&str, String> = [
        (
            "gateway.max_pdu_length",
            c.gateway.max_pdu_length.to_string(),
        ),
        (
            "gateway.max_association_request_length",
            c.gateway.max_association_request_length.to_string(),
        ),
        (
            "limits.max_associations",
            c.limits.max_associations.to_string(),
        ),
        (
            "limits.max_associations_per_user",
            c.limits.max_associations_per_user.to_string(),
        ),
        (
            "limits.max_pending_connections",
            c.limits.max_pending_connections.to_string(),
        ),
        (
            "limits.associations_per_minute",
            c.limits.associations.per_minute.to_string(),
        ),
        (
            "limits.max_query_results",
            c.limits.max_query_results.to_string(),
        ),
        ("timeouts.tls_handshake", secs(c.timeouts.tls_handshake)),
        (
            "timeouts.association_request",
            secs(c.timeouts.association_request),
        ),
        (
            "timeouts.upstream_connect",
            secs(c.timeouts.upstream_connect),
        ),
        (
            "timeouts.upstream_response",
            secs(c.timeouts.upstream_response),
        ),
        ("timeouts.idle", secs(c.timeouts.idle)),
        ("timeouts.shutdown_grace", secs(c.timeouts.shutdown_grace)),
    ]
    .into_iter()
    .collect();
    let doc: BTreeMap<String, String> = table("association-defaults")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let code: BTreeMap<String, String> =
        code.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(doc, code, "{DOC} association defaults vs config defaults");
}

#[test]
fn the_tls_tables_are_the_listeners_suites_and_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = pacsgate::devcerts::generate(dir.path(), &["localhost".to_string()], &[])
        .expect("development certificates");
    let c = minimal_config(dir.path(), "").expect("config");
    let mut tls = c.tls.clone();
    tls.certificate = made.server_cert;
    tls.private_key = made.server_key;
    let server = pacsgate::tls::server_config(&tls).expect("server config");
    let provider = server.crypto_provider();
    let suites: Vec<String> = provider
        .cipher_suites
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    assert_eq!(
        column("tls-cipher-suites", 0),
        suites,
        "{DOC} TLS cipher suites (in order of preference)"
    );
    let groups: Vec<String> = provider
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(
        column("tls-groups", 0),
        groups,
        "{DOC} TLS key exchange groups (in order of preference)"
    );
}

#[tokio::test]
async fn the_audit_table_is_what_the_syslog_messages_carry() {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp socket");
    let cfg = pacsgate::config::AuditConfig {
        file: None,
        syslog: Some(pacsgate::config::SyslogTarget::Udp(
            socket.local_addr().expect("address"),
        )),
        syslog_timeout: std::time::Duration::from_secs(10),
        on_failure: pacsgate::config::OnAuditFailure::Continue,
        source_id: None,
    };
    let audit = pacsgate::audit::Audit::open(Some(&cfg)).expect("audit");
    for row in table("audit-events") {
        let (event, event_id, type_code) = (&row[0], &row[1], &row[2]);
        audit.record(event, serde_json::json!({"user": "conformance"}));
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no syslog message for {event}"))
            .expect("recv");
        let message = String::from_utf8_lossy(&buf[..n]).to_string();
        let event_id_element = message
            .split("<EventID")
            .nth(1)
            .and_then(|s| s.split("/>").next())
            .unwrap_or_default()
            .to_string();
        assert!(
            event_id_element.contains(&format!("csd-code=\"{event_id}\"")),
            "{event}: EventID {event_id} expected in {message}"
        );
        if type_code == "-" {
            assert!(!message.contains("<EventTypeCode"), "{event}: {message}");
        } else {
            assert!(
                message.contains(&format!("csd-code=\"{type_code}\"")),
                "{event}: EventTypeCode {type_code} expected in {message}"
            );
        }
    }
}

#[test]
fn qido_rs_media_types_are_the_ones_listed() {
    for row in table("qido-accept") {
        let accepted = match row[1].as_str() {
            "yes" => true,
            "no (406)" => false,
            other => panic!("{DOC} qido-accept: {other:?} is neither yes nor no (406)"),
        };
        assert_eq!(
            pacsgate::web::answer::accepts_json(&row[0]),
            accepted,
            "Accept: {}",
            row[0]
        );
    }
}
