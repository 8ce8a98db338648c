//! Forward only what was checked: raw DIMSE messages built to be read one way by the gateway and another
//! by the archive (repeated and out-of-order tags, deep nesting, reused message IDs, a command on another
//! presentation context, wildcards where UIDs belong), sent over TLS to the gateway in front of Orthanc.
//! Each test asserts on what the archive did (objects moved, matches returned), not only on the status.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const STUDY_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const STUDY_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
const STUDY_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
const WORKLIST_FIND: &str = "1.2.840.10008.5.1.4.31";

/// One Implicit VR Little Endian element, its value padded to even length with `pad`.
fn el(group: u16, element: u16, value: &[u8], pad: u8) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(&v);
    out
}

fn text(group: u16, element: u16, value: &str) -> Vec<u8> {
    el(group, element, value.as_bytes(), b' ')
}

fn uid(group: u16, element: u16, value: &str) -> Vec<u8> {
    el(group, element, value.as_bytes(), 0)
}

fn us(element: u16, v: u16) -> Vec<u8> {
    el(0x0000, element, &v.to_le_bytes(), 0)
}

/// A command set with its group length; the elements in the order given (repeats allowed).
fn command(elements: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = elements.concat();
    let mut out = el(0x0000, 0x0000, &(body.len() as u32).to_le_bytes(), 0);
    out.extend(body);
    out
}

fn request(sop_class: &str, field: u16, id: u16, extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut e = vec![uid(0, 0x0002, sop_class), us(0x0100, field), us(0x0110, id)];
    e.extend_from_slice(extra);
    e
}

fn find(sop_class: &str, id: u16) -> Vec<u8> {
    let mut e = request(sop_class, 0x0020, id, &[us(0x0700, 0)]);
    e.push(us(0x0800, 0));
    command(&e)
}

fn move_rq(id: u16, destination: &str) -> Vec<Vec<u8>> {
    let mut e = request(STUDY_MOVE, 0x0021, id, &[]);
    e.push(text(0, 0x0600, destination));
    e.push(us(0x0700, 0));
    e.push(us(0x0800, 0));
    e
}

fn study_identifier(study: &str) -> Vec<u8> {
    [text(0x0008, 0x0052, "STUDY"), uid(0x0020, 0x000D, study)].concat()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Bench {
    pki: Pki,
    orthanc: Orthanc,
    gateway: Gateway,
    /// A destination Orthanc knows but no role allows; it must never receive anything.
    evil: StoreScp,
    /// The destination the clinician may move to, behind the gateway's return path.
    viewer: StoreScp,
    study: String,
    audit: std::path::PathBuf,
    _data: tempfile::TempDir,
}

/// Orthanc with three studies of patient BYPASS1 (3 + 2 + 1 instances) and three more patients; users
/// `reader` (echo, find, worklist; guard on), `clinician` (find, move, get to VIEWER), result cap 2.
fn bench() -> Bench {
    let pki = Pki::generate();
    let evil = StoreScp::start("EVIL");
    let viewer = StoreScp::start("VIEWER");
    let return_port = free_port();
    let orthanc = Orthanc::start(
        "ORTHANC",
        &[
            ("EVIL", "127.0.0.1", evil.port),
            ("VIEWER", "127.0.0.1", return_port),
        ],
    );
    let data = common::tempdir("bypass");
    let made = make_instances_with_uids(
        data.path(),
        &[
            ("BYPASS1", "DOE^JOHN", 3),
            ("BYPASS1", "DOE^JOHN", 2),
            ("BYPASS1", "DOE^JOHN", 1),
            ("OTHER1", "ROE^JANE", 1),
            ("OTHER2", "POE^EDGAR", 1),
            ("OTHER3", "LOE^CLARA", 1),
        ],
    );
    for i in &made {
        orthanc.upload(&std::fs::read(&i.path).expect("read instance"));
    }
    let study = made[0].study_uid.clone();
    let hash = password_hash(PASSWORD);
    let port = free_port();
    let audit = data.path().join("audit.jsonl");
    let config = GatewayConfig::new(port)
        .set(
            "gateway",
            &format!("return_listen = \"127.0.0.1:{return_port}\""),
        )
        .tls(&pki)
        .upstream("ARCHIVE", orthanc.dicom_port, "ORTHANC")
        .destination("VIEWER", viewer.port)
        .set("limits", "max_query_results = 2")
        .path("audit", "file", &audit)
        .role("reader", &["echo", "find", "worklist"])
        .role_with(
            "clinician",
            &["echo", "find", "move", "get"],
            &["move_destinations = [\"VIEWER\"]"],
        )
        .user("reader", &hash, &["reader"])
        .user("clinician", &hash, &["clinician"])
        .to_toml();
    let mut gateway = Gateway::start(port, &config);
    gateway.wait_listening(return_port);
    Bench {
        pki,
        orthanc,
        gateway,
        evil,
        viewer,
        study,
        audit,
        _data: data,
    }
}

struct Message {
    context: usize,
    command: Vec<u8>,
    data: Option<Vec<u8>>,
}

fn send(b: &Bench, user: &str, contexts: &[&str], messages: &[Message], all_first: bool) -> Value {
    let dir = common::tempdir("plan");
    let plan = json!({
        "port": b.gateway.port(),
        "ca": b.pki.ca_cert,
        "user": user,
        "password": PASSWORD,
        "contexts": contexts,
        "send_all_first": all_first,
        "then_echo": contexts.first() == Some(&VERIFICATION),
        "messages": messages.iter().map(|m| json!({
            "context": m.context,
            "command": hex(&m.command),
            "data": m.data.as_deref().map(hex),
        })).collect::<Vec<_>>(),
    });
    let path = dir.path().join("plan.json");
    std::fs::write(&path, plan.to_string()).expect("write plan");
    let mut cmd = std::process::Command::new(python());
    cmd.arg(peers_dir().join("raw_dimse.py")).arg(&path);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or_else(|_| panic!("raw_dimse.py gave no report:\n{}", output_text(&out)))
}

/// One request (command and data set) on the second context, then a C-ECHO on Verification.
fn ask(b: &Bench, user: &str, sop_class: &str, command: Vec<u8>, data: Vec<u8>) -> Value {
    let message = Message {
        context: 1,
        command,
        data: Some(data),
    };
    send(b, user, &[VERIFICATION, sop_class], &[message], false)
}

fn statuses(report: &Value) -> Vec<u64> {
    report["responses"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["status"].as_u64()).collect())
        .unwrap_or_default()
}

fn pending(report: &Value) -> usize {
    statuses(report)
        .iter()
        .filter(|s| **s == 0xFF00 || **s == 0xFF01)
        .count()
}

/// Files a storescp received, after giving a (wrongly) started move time to deliver.
fn received_after_a_while(scp: &StoreScp) -> usize {
    std::thread::sleep(Duration::from_millis(1500));
    scp.files().len()
}

fn assert_gateway_up(b: &Bench) {
    let r = send(b, "reader", &[VERIFICATION], &[], false);
    assert_eq!(r["echo"], json!(0), "the gateway no longer serves: {r}");
}

#[test]
fn a_repeated_command_field_does_not_turn_a_find_into_a_move() {
    let b = bench();
    // DCMTK (Orthanc) keeps the first CommandField (C-MOVE), a last-wins reader the second (C-FIND).
    let mut e = move_rq(1, "EVIL");
    e.insert(2, us(0x0100, 0x0020));
    let r = ask(
        &b,
        "reader",
        STUDY_MOVE,
        command(&e),
        study_identifier(&b.study),
    );
    assert!(
        r["aborted"] == json!(true) || r["closed"] == json!(true),
        "{r}"
    );
    assert_eq!(
        received_after_a_while(&b.evil),
        0,
        "the archive ran the move: {r}"
    );
    assert!(
        b.gateway
            .log()
            .contains("repeated or out of ascending order")
    );
    assert_gateway_up(&b);
}

#[test]
fn a_repeated_move_destination_does_not_defeat_destination_binding() {
    let b = bench();
    // First copy EVIL (what the archive reads), second VIEWER (what a last-wins check would allow).
    let mut e = move_rq(1, "EVIL");
    e.insert(4, text(0, 0x0600, "VIEWER"));
    let r = ask(
        &b,
        "clinician",
        STUDY_MOVE,
        command(&e),
        study_identifier(&b.study),
    );
    assert!(
        r["aborted"] == json!(true) || r["closed"] == json!(true),
        "{r}"
    );
    assert_eq!(
        received_after_a_while(&b.evil),
        0,
        "EVIL received objects: {r}"
    );

    // The honest move still works, and is an audit event with its counts.
    let r = ask(
        &b,
        "clinician",
        STUDY_MOVE,
        command(&move_rq(2, "VIEWER")),
        study_identifier(&b.study),
    );
    assert_eq!(statuses(&r).last(), Some(&0), "{r}");
    assert_eq!(b.viewer.files().len(), 3, "{r}");
    assert_eq!(b.evil.files().len(), 0);
    let audit = std::fs::read_to_string(&b.audit).expect("audit file");
    let moved: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == json!("move"))
        .collect();
    assert!(
        moved.iter().any(|e| e["study_uid"] == json!(b.study)
            && e["destination"] == json!("VIEWER")
            && e["completed"] == json!(3)
            && e["user"] == json!("clinician")),
        "no move event in the audit trail:\n{audit}"
    );
}

#[test]
fn a_repeated_patient_name_does_not_pass_the_guard() {
    let b = bench();
    let id = [
        text(0x0008, 0x0052, "STUDY"),
        text(0x0010, 0x0010, "*"),
        text(0x0010, 0x0010, "DOE^JOHN"),
    ]
    .concat();
    let r = ask(&b, "reader", STUDY_FIND, find(STUDY_FIND, 1), id);
    assert_eq!(pending(&r), 0, "matches came back: {r}");
    assert_eq!(statuses(&r), vec![0xA900], "{r}");
    assert_eq!(r["echo"], json!(0), "the association stays usable: {r}");
}

#[test]
fn deep_nesting_is_refused_and_the_gateway_stays_up() {
    let b = bench();
    // About 1,900 undefined-length sequences (61 KB) overflowed a worker's stack before.
    let mut inner = text(0x0010, 0x0010, "DOE^JOHN");
    for _ in 0..1900 {
        let mut seq = vec![0x08, 0x00, 0x10, 0x11, 0xFF, 0xFF, 0xFF, 0xFF];
        seq.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        seq.extend(inner);
        seq.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        seq.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        inner = seq;
    }
    let id = [
        text(0x0008, 0x0052, "STUDY"),
        inner,
        text(0x0010, 0x0020, "BYPASS1"),
    ]
    .concat();
    assert!(id.len() < 64 * 1024);
    let r = ask(&b, "reader", STUDY_FIND, find(STUDY_FIND, 1), id);
    assert_eq!(statuses(&r), vec![0xA900], "{r}");
    assert_eq!(r["echo"], json!(0), "{r}");
    assert_gateway_up(&b);
}

#[test]
fn a_reused_message_id_does_not_reset_the_result_cap() {
    let b = bench();
    // Three studies of BYPASS1 match; the cap is 2. The second request reuses the first's ID.
    let id = [
        text(0x0008, 0x0052, "STUDY"),
        text(0x0010, 0x0020, "BYPASS1"),
        uid(0x0020, 0x000D, ""),
    ]
    .concat();
    let r = send(
        &b,
        "clinician",
        &[VERIFICATION, STUDY_FIND],
        &[
            Message {
                context: 1,
                command: find(STUDY_FIND, 7),
                data: Some(id.clone()),
            },
            Message {
                context: 1,
                command: find(STUDY_FIND, 7),
                data: Some(id),
            },
        ],
        true,
    );
    assert!(statuses(&r).contains(&0x0210), "{r}");
    assert!(pending(&r) <= 2, "more matches than the cap: {r}");
}

#[test]
fn a_command_on_another_context_is_refused() {
    let b = bench();
    // A worklist SOP class on the Study Root context: the guard would skip it, Orthanc would run a
    // Study Root query for every patient.
    let id = [text(0x0008, 0x0052, "STUDY"), text(0x0010, 0x0010, "*")].concat();
    let r = ask(&b, "reader", STUDY_FIND, find(WORKLIST_FIND, 1), id);
    assert_eq!(pending(&r), 0, "matches came back: {r}");
    assert_eq!(statuses(&r), vec![0x0122], "{r}");
    assert_eq!(r["echo"], json!(0), "{r}");
}

#[test]
fn wildcards_in_uids_and_multi_valued_keys_are_refused() {
    let b = bench();
    let study = |keys: &[Vec<u8>]| {
        [vec![text(0x0008, 0x0052, "STUDY")], keys.to_vec()]
            .concat()
            .concat()
    };
    let cases = [
        (
            "StudyInstanceUID=*",
            study(&[uid(0x0020, 0x000D, "*")]),
            0xA900,
        ),
        (
            "PatientID=BYPASS1\\*",
            study(&[text(0x0010, 0x0020, "BYPASS1\\*")]),
            0xA700,
        ),
        (
            "SeriesInstanceUID at STUDY level",
            study(&[uid(0x0020, 0x000E, "1.2.3")]),
            0xA700,
        ),
    ];
    for (what, id, status) in cases {
        let r = ask(&b, "reader", STUDY_FIND, find(STUDY_FIND, 1), id);
        assert_eq!(pending(&r), 0, "{what}: matches came back: {r}");
        assert_eq!(statuses(&r), vec![status], "{what}: {r}");
    }
    // Retrievals: a C-GET by a wildcard patient ID, a C-MOVE without the study's UID.
    let patient = [
        text(0x0008, 0x0052, "PATIENT"),
        text(0x0010, 0x0020, "BYPASS*"),
    ]
    .concat();
    let mut get = request(STUDY_GET, 0x0010, 1, &[us(0x0700, 0)]);
    get.push(us(0x0800, 0));
    let r = ask(&b, "clinician", STUDY_GET, command(&get), patient);
    assert_eq!(statuses(&r), vec![0xA701], "{r}");
    let r = ask(
        &b,
        "clinician",
        STUDY_MOVE,
        command(&move_rq(1, "VIEWER")),
        study(&[text(0x0010, 0x0020, "BYPASS1")]),
    );
    assert_eq!(statuses(&r), vec![0xA701], "{r}");
    assert_eq!(received_after_a_while(&b.viewer), 0);
    assert_eq!(
        b.orthanc.instance_count(),
        9,
        "the archive still holds its data"
    );
}

#[test]
fn a_character_set_escape_does_not_hide_a_wildcard() {
    let b = bench();
    // With ISO 2022 code extensions, DCMTK applies `ESC ( B` (back to ASCII) and matches `*`; a reader
    // that ignores escapes counts three characters before the wildcard.
    let escaped = |charset: &str| {
        [
            text(0x0008, 0x0005, charset),
            text(0x0008, 0x0052, "STUDY"),
            el(0x0010, 0x0010, b"\x1b(B\x1b(B*", b' '),
        ]
        .concat()
    };
    for charset in [
        "\\ISO 2022 IR 87",
        "ISO 2022 IR 13\\ISO 2022 IR 87",
        "ISO_IR 100",
    ] {
        let r = ask(
            &b,
            "reader",
            STUDY_FIND,
            find(STUDY_FIND, 1),
            escaped(charset),
        );
        assert_eq!(pending(&r), 0, "{charset}: matches came back: {r}");
        assert_eq!(statuses(&r), vec![0xA900], "{charset}: {r}");
    }
    // A plain character set with a specific name still works.
    let named = [
        text(0x0008, 0x0005, "ISO_IR 192"),
        text(0x0008, 0x0052, "STUDY"),
        text(0x0010, 0x0020, "BYPASS1"),
    ]
    .concat();
    let r = ask(&b, "reader", STUDY_FIND, find(STUDY_FIND, 2), named);
    // Three studies match; the result cap (2) ends the query with 0xFE00.
    assert_eq!(
        (pending(&r), statuses(&r).last()),
        (2, Some(&0xFE00)),
        "{r}"
    );
}

#[test]
fn a_retrieve_goes_to_the_archive_with_its_level_and_unique_keys_only() {
    // Orthanc retrieves a STUDY by AccessionNumber whenever one is given, whatever the
    // StudyInstanceUID the guard judged (and the audit would name): a made-up UID and other
    // patients' accession numbers moved their studies; `\` (two empty values) every study whose
    // accession number is empty. The gateway forwards the level and the unique keys only. The
    // same UID twice is refused (it would be sent twice).
    let b = bench();
    let with = |accession: &str, study: &str| {
        [
            text(0x0008, 0x0050, accession),
            text(0x0008, 0x0052, "STUDY"),
            uid(0x0020, 0x000D, study),
        ]
        .concat()
    };
    for (id, (what, identifier)) in [
        (
            "accession numbers",
            with("ACCOTHER1\\ACCOTHER2", "1.2.3.4.5"),
        ),
        ("two empty accession numbers", with("\\", "1.2.3.4.5")),
    ]
    .into_iter()
    .enumerate()
    {
        let r = ask(
            &b,
            "clinician",
            STUDY_MOVE,
            command(&move_rq(id as u16 + 1, "VIEWER")),
            identifier,
        );
        assert_ne!(statuses(&r).last(), Some(&0xA900), "{what}: {r}");
        assert_eq!(received_after_a_while(&b.viewer), 0, "{what}: {r}");
    }
    let twice = format!("{}\\{}", b.study, b.study);
    let r = ask(
        &b,
        "clinician",
        STUDY_MOVE,
        command(&move_rq(3, "VIEWER")),
        study_identifier(&twice),
    );
    assert_eq!(statuses(&r), vec![0xA900], "the study's UID twice: {r}");
    let mut get = request(STUDY_GET, 0x0010, 9, &[us(0x0700, 0)]);
    get.push(us(0x0800, 0));
    let r = ask(
        &b,
        "clinician",
        STUDY_GET,
        command(&get),
        with("ACCOTHER1", "1.2.3.4.5"),
    );
    assert_eq!(pending(&r), 0, "C-GET: {r}");
    assert_eq!(received_after_a_while(&b.viewer), 0);

    // A C-FIND match copied into the C-MOVE: another patient's AccessionNumber and a description
    // with wildcard characters beside the study's UID. The study moves, and only it.
    let copied = [
        text(0x0008, 0x0050, "ACCOTHER1"),
        text(0x0008, 0x0052, "STUDY"),
        text(0x0008, 0x1030, "*** STAT? ***"),
        uid(0x0020, 0x000D, &b.study),
    ]
    .concat();
    let r = ask(
        &b,
        "clinician",
        STUDY_MOVE,
        command(&move_rq(10, "VIEWER")),
        copied,
    );
    assert_eq!(statuses(&r).last(), Some(&0), "{r}");
    assert_eq!(received_after_a_while(&b.viewer), 3, "{r}");
    assert_eq!(b.evil.files().len(), 0);
    assert_gateway_up(&b);
}
