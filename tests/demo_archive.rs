//! The embedded demo archive (`pacsgate::demo::archive`) on its own, in process, with real peers:
//! its API, DCMTK (echoscu, findscu, storescu, getscu), pynetdicom (tests/peers/scu.py) and raw bytes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use pacsgate::demo::archive::{DEMO_UID_ROOT, DemoArchive, serve};
use serde_json::json;

const AE: &str = "DEMO-ARCHIVE";

/// The archive served on 127.0.0.1:0 by its own runtime until dropped.
struct Server {
    port: u16,
    archive: Arc<DemoArchive>,
    _runtime: tokio::runtime::Runtime,
}

fn start(archive: DemoArchive) -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let archive = Arc::new(archive);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    runtime.spawn(serve(listener, archive.clone(), AE.to_string()));
    Server {
        port,
        archive,
        _runtime: runtime,
    }
}

fn parse(bytes: &[u8], ts: &str) -> InMemDicomObject {
    let ts = match ts {
        uids::EXPLICIT_VR_LITTLE_ENDIAN => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        uids::IMPLICIT_VR_LITTLE_ENDIAN => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        other => panic!("unexpected transfer syntax {other}"),
    };
    InMemDicomObject::read_dataset_with_ts(bytes, &ts).expect("parse data set")
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .expect("element")
        .to_str()
        .expect("text")
        .trim_end_matches([' ', '\0'])
        .to_string()
}

#[test]
fn synthetic_data_is_deterministic_and_readable() {
    let a = DemoArchive::with_synthetic_data();
    let b = DemoArchive::with_synthetic_data();
    assert_eq!(a.instance_count(), 14);
    let uid = format!("{DEMO_UID_ROOT}.4.2.1.1.3");
    let bytes = a.instance_bytes(&uid).expect("SMITH^JANE's third image");
    assert_eq!(Some(bytes.clone()), b.instance_bytes(&uid));
    assert_eq!(
        a.instance_transfer_syntax(&uid).as_deref(),
        Some(uids::EXPLICIT_VR_LITTLE_ENDIAN)
    );
    let obj = parse(&bytes, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    assert_eq!(text(&obj, tags::PATIENT_NAME), "SMITH^JANE");
    assert_eq!(text(&obj, tags::PHOTOMETRIC_INTERPRETATION), "MONOCHROME2");
    let pixels = obj.element(tags::PIXEL_DATA).expect("pixels");
    assert_eq!(pixels.to_bytes().expect("bytes").len(), 64 * 64 * 2);
    assert_eq!(DemoArchive::empty().instance_count(), 0);
}

fn data_set(uid: &str) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr, value) in [
        (
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
        ),
        (tags::SOP_INSTANCE_UID, VR::UI, uid),
        (tags::PATIENT_ID, VR::LO, "API-1"),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    }
    obj
}

#[test]
fn store_keeps_bytes_as_received_and_refuses_unreadable_data_sets() {
    let archive = DemoArchive::empty();
    let uid = format!("{DEMO_UID_ROOT}.9.10");
    let mut implicit = Vec::new();
    data_set(&uid)
        .write_dataset_with_ts(&mut implicit, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("encode");
    let stored = archive
        .store(implicit.clone(), uids::IMPLICIT_VR_LITTLE_ENDIAN)
        .expect("store");
    assert_eq!(stored, uid);
    assert_eq!(archive.instance_bytes(&uid), Some(implicit));
    // Storing again replaces.
    let mut explicit = Vec::new();
    data_set(&uid)
        .write_dataset_with_ts(&mut explicit, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("encode");
    archive
        .store(explicit.clone(), uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .expect("store");
    assert_eq!(archive.instance_count(), 1);
    assert_eq!(archive.instance_bytes(&uid), Some(explicit));

    let ts = uids::EXPLICIT_VR_LITTLE_ENDIAN;
    assert!(
        archive
            .store(vec![0x08, 0x00, 0x18, 0x00, 0xFF], ts)
            .is_err()
    );
    assert!(archive.store(Vec::new(), ts).is_err());
    let mut no_uid = Vec::new();
    let mut obj = data_set("x");
    obj.remove_element(tags::SOP_INSTANCE_UID);
    obj.write_dataset_with_ts(&mut no_uid, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("encode");
    assert!(archive.store(no_uid, ts).is_err());
    assert_eq!(archive.instance_count(), 1);
}

#[test]
fn echoscu_is_answered_and_a_wrong_called_ae_is_rejected() {
    let server = start(DemoArchive::empty());
    let port = server.port.to_string();
    assert_success(
        &dcmtk("echoscu", &["-aec", AE, "127.0.0.1", &port]),
        "echoscu",
    );
    let rejected = dcmtk("echoscu", &["-aec", "SOMEONE-ELSE", "127.0.0.1", &port]);
    let text = output_text(&rejected);
    assert!(!rejected.status.success(), "{text}");
    assert!(text.contains("Called AE Title Not Recognized"), "{text}");
}

#[test]
fn findscu_queries_match_the_synthetic_data_at_each_level() {
    let server = start(DemoArchive::with_synthetic_data());
    let port = server.port.to_string();
    let find = |model: &str, keys: &[&str]| -> Vec<InMemDicomObject> {
        let dir = common::tempdir("findscu");
        let mut args = vec![
            model,
            "-aec",
            AE,
            "-X",
            "-od",
            dir.path().to_str().expect("path"),
        ];
        for key in keys {
            args.extend(["-k", key]);
        }
        args.extend(["127.0.0.1", &port]);
        let out = dcmtk("findscu", &args);
        let text = assert_success(&out, "findscu");
        assert!(!text.contains("E: "), "{text}");
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                dicom_object::open_file(f)
                    .expect("response file")
                    .into_inner()
            })
            .collect()
    };
    let studies = find(
        "-S",
        &[
            "QueryRetrieveLevel=STUDY",
            "PatientName=*",
            "StudyInstanceUID",
            "NumberOfStudyRelatedInstances",
        ],
    );
    assert_eq!(studies.len(), 6);
    let total: u32 = studies
        .iter()
        .map(|s| {
            text(s, tags::NUMBER_OF_STUDY_RELATED_INSTANCES)
                .parse::<u32>()
                .expect("count")
        })
        .sum();
    assert_eq!(total, 14);
    let patients = find("-P", &["QueryRetrieveLevel=PATIENT", "PatientID"]);
    assert_eq!(patients.len(), 4);
    let jane = find(
        "-P",
        &[
            "QueryRetrieveLevel=PATIENT",
            "PatientName=SMITH^J*",
            "PatientID",
        ],
    );
    assert_eq!(jane.len(), 1);
    assert_eq!(text(&jane[0], tags::PATIENT_NAME), "SMITH^JANE");
    let images = find(
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &format!("StudyInstanceUID={DEMO_UID_ROOT}.2.2.1"),
            &format!("SeriesInstanceUID={DEMO_UID_ROOT}.3.2.1.1"),
            "SOPInstanceUID",
        ],
    );
    assert_eq!(images.len(), 3);
}

#[test]
fn storescu_then_getscu_and_pynetdicom_get_return_the_bytes_stored() {
    let server = start(DemoArchive::empty());
    let port = server.port.to_string();
    let data = common::tempdir("archive-data");
    let made = make_instances_with_uids(data.path(), &[("STORE1", "STORE^TEST", 2)]);
    let mut args = vec!["-aec", AE, "127.0.0.1", &port];
    let paths: Vec<String> = made.iter().map(|i| i.path.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    assert_success(&dcmtk("storescu", &args), "storescu");
    assert_eq!(server.archive.instance_count(), 2);
    for i in &made {
        let original = std::fs::read(&i.path).expect("read");
        let stored = server
            .archive
            .instance_bytes(&i.sop_uid)
            .expect("stored instance");
        assert!(stored == dataset_bytes(&original), "stored as received");
    }

    // getscu (plain DICOM) retrieves the study back.
    let out_dir = common::tempdir("getscu");
    let study = format!("StudyInstanceUID={}", made[0].study_uid);
    let out = dcmtk(
        "getscu",
        &[
            "-S",
            "-aec",
            AE,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &study,
            "-od",
            out_dir.path().to_str().expect("path"),
            "127.0.0.1",
            &port,
        ],
    );
    assert_success(&out, "getscu");
    let received = std::fs::read_dir(out_dir.path()).expect("dir").count();
    assert_eq!(received, 2, "{}", output_text(&out));

    // pynetdicom: C-GET of the series, byte-identical data sets, and a C-ECHO.
    let raw = common::tempdir("pyget");
    let series = format!("SeriesInstanceUID={}", made[0].series_uid);
    let study_key = format!("StudyInstanceUID={}", made[0].study_uid);
    let got = pyscu(&[
        "get",
        "--port",
        &port,
        "--aec",
        AE,
        "--level",
        "SERIES",
        "-k",
        &study_key,
        "-k",
        &series,
        "--out",
        raw.path().to_str().expect("path"),
    ]);
    assert_eq!(
        got["statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0)),
        "{got}"
    );
    assert_eq!(got["received"].as_array().map(Vec::len), Some(2), "{got}");
    for i in &made {
        let back = std::fs::read(raw.path().join(format!("{}.raw", i.sop_uid))).expect("raw");
        let original = std::fs::read(&i.path).expect("read");
        assert!(
            back == dataset_bytes(&original),
            "C-GET returned other bytes"
        );
    }
    let echo = pyscu(&["echo", "--port", &port, "--aec", AE]);
    assert_eq!(echo["statuses"], json!([0]), "{echo}");
}

#[test]
fn pynetdicom_finds_patients_and_studies() {
    let server = start(DemoArchive::with_synthetic_data());
    let port = server.port.to_string();
    let patients = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        AE,
        "--model",
        "patient",
        "--level",
        "PATIENT",
        "-k",
        "PatientName=*",
        "-k",
        "PatientID=",
    ]);
    assert_eq!(
        patients["matches"].as_array().map(Vec::len),
        Some(4),
        "{patients}"
    );
    let studies = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        AE,
        "--level",
        "STUDY",
        "-k",
        "PatientID=DEMO-0002",
        "-k",
        "StudyInstanceUID=",
    ]);
    assert!(
        studies["matches"].as_array().is_some_and(|m| !m.is_empty()),
        "{studies}"
    );
    let bad_level = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        AE,
        "--level",
        "WARD",
        "-k",
        "PatientID=",
    ]);
    assert_eq!(bad_level["statuses"], json!([0xA900]), "{bad_level}");
}

/// Bytes the archive sends back before closing, within `limit`.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn hostile_bytes_get_an_abort_not_an_allocation() {
    let server = start(DemoArchive::empty());
    // An A-ASSOCIATE-RQ header declaring 4 GiB: aborted at once.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.write_all(&[0x01, 0, 0xff, 0xff, 0xff, 0xff])
        .expect("write");
    let answer = read_until_closed(&mut s, Duration::from_secs(5));
    assert_eq!(
        answer.first(),
        Some(&0x07),
        "A-ABORT expected, got {answer:?}"
    );
    // P-DATA before any association: aborted.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.write_all(&[0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 1, 3])
        .expect("write");
    let answer = read_until_closed(&mut s, Duration::from_secs(5));
    assert_eq!(
        answer.first(),
        Some(&0x07),
        "A-ABORT expected, got {answer:?}"
    );
    // The archive still serves others.
    let echo = pyscu(&["echo", "--port", &server.port.to_string(), "--aec", AE]);
    assert_eq!(echo["statuses"], json!([0]), "{echo}");
}

// ---------------------------------------------------------------------------------------------
// `pacsgate demo` as a whole (the binary): nesting bound, port choice, the query guard, symlinks.

/// A running `pacsgate demo` (killed on drop) and the port it printed.
struct RunningDemo {
    proc: Spawned,
    port: u16,
    dir: std::path::PathBuf,
    _work: tempfile::TempDir,
}

impl RunningDemo {
    /// `pacsgate demo --dir WORK/demo EXTRA...`; waits (≤ 90 s) for the query guard's lines.
    fn start(extra: &[&str]) -> RunningDemo {
        let work = common::tempdir("demo-run");
        let dir = work.path().join("demo");
        let mut cmd = std::process::Command::new(common::gateway::BIN);
        cmd.arg("demo")
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .current_dir(work.path())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let mut proc = Spawned::spawn(cmd, &work.path().join("demo.log"));
        if let Err(e) = proc.wait_until(Duration::from_secs(90), "showing the query guard", |p| {
            p.log().contains("The query guard, tried just now") && p.log().contains("works:")
        }) {
            panic!("pacsgate demo did not start: {e}");
        }
        let log = proc.log();
        let port = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("gateway   127.0.0.1:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no gateway line:\n{log}"));
        RunningDemo {
            proc,
            port,
            dir,
            _work: work,
        }
    }

    fn log(&self) -> String {
        self.proc.log()
    }
}

impl Drop for RunningDemo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- pacsgate demo log -----\n{}\n-----", self.log());
        }
    }
}

/// An Implicit VR Little Endian element.
fn el(group: u16, element: u16, value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend(v);
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A C-STORE through the demo gateway (TLS, user demo) by tests/peers/raw_dimse.py, then a C-ECHO.
fn store_through_demo(demo: &RunningDemo, command: &[u8], data: &[u8]) -> serde_json::Value {
    let plan = json!({
        "port": demo.port,
        "ca": demo.dir.join("ca.crt"),
        "user": "demo",
        "password": "demo-password",
        "called": "DEMO",
        "contexts": ["1.2.840.10008.1.1", uids::CT_IMAGE_STORAGE],
        "send_all_first": false,
        "then_echo": true,
        "messages": [{"context": 1, "command": hex(command), "data": hex(data)}],
        "timeout": 60,
    });
    let path = demo.dir.join("plan.json");
    std::fs::write(&path, plan.to_string()).expect("write plan");
    let mut cmd = std::process::Command::new(python());
    cmd.arg(peers_dir().join("raw_dimse.py")).arg(&path);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(120));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or_else(|_| panic!("raw_dimse.py gave no report:\n{}", output_text(&out)))
}

#[test]
fn a_deeply_nested_c_store_through_the_demo_is_refused_and_the_demo_stays_up() {
    let mut demo = RunningDemo::start(&["--listen", &format!("127.0.0.1:{}", free_port())]);
    let instance = format!("{DEMO_UID_ROOT}.9.9.1");
    let command = {
        let body = [
            el(0x0000, 0x0002, uids::CT_IMAGE_STORAGE.as_bytes()),
            el(0x0000, 0x0100, &0x0001u16.to_le_bytes()),
            el(0x0000, 0x0110, &7u16.to_le_bytes()),
            el(0x0000, 0x0700, &0u16.to_le_bytes()),
            el(0x0000, 0x0800, &0u16.to_le_bytes()),
            el(0x0000, 0x1000, instance.as_bytes()),
        ]
        .concat();
        [el(0x0000, 0x0000, &(body.len() as u32).to_le_bytes()), body].concat()
    };
    // SOP Class and Instance UIDs, then Content Sequence inside Content Sequence, 50,000 deep
    // (undefined lengths), each closed properly.
    let depth = 50_000;
    let mut data = [
        el(0x0008, 0x0016, uids::CT_IMAGE_STORAGE.as_bytes()),
        el(0x0008, 0x0018, instance.as_bytes()),
    ]
    .concat();
    for _ in 0..depth {
        data.extend_from_slice(&[0x40, 0x00, 0x30, 0xA7, 0xFF, 0xFF, 0xFF, 0xFF]);
        data.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..depth {
        data.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        data.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    let report = store_through_demo(&demo, &command, &data);
    assert!(
        demo.proc.exited().is_none(),
        "the demo died:\n{}",
        demo.log()
    );
    let responses = report["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 1, "{report}");
    assert_eq!(responses[0]["status"], json!(0xC000), "{report}");
    assert_eq!(report["echo"], json!(0), "the demo still answers: {report}");
    assert!(demo.log().contains("nested deeper than"), "{}", demo.log());

    // The same at a depth within the bound is stored.
    let depth = 8;
    let instance = format!("{DEMO_UID_ROOT}.9.9.2");
    let command = {
        let body = [
            el(0x0000, 0x0002, uids::CT_IMAGE_STORAGE.as_bytes()),
            el(0x0000, 0x0100, &0x0001u16.to_le_bytes()),
            el(0x0000, 0x0110, &8u16.to_le_bytes()),
            el(0x0000, 0x0700, &0u16.to_le_bytes()),
            el(0x0000, 0x0800, &0u16.to_le_bytes()),
            el(0x0000, 0x1000, instance.as_bytes()),
        ]
        .concat();
        [el(0x0000, 0x0000, &(body.len() as u32).to_le_bytes()), body].concat()
    };
    let mut data = [
        el(0x0008, 0x0016, uids::CT_IMAGE_STORAGE.as_bytes()),
        el(0x0008, 0x0018, instance.as_bytes()),
    ]
    .concat();
    for _ in 0..depth {
        data.extend_from_slice(&[0x40, 0x00, 0x30, 0xA7, 0xFF, 0xFF, 0xFF, 0xFF]);
        data.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..depth {
        data.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        data.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    let report = store_through_demo(&demo, &command, &data);
    assert_eq!(report["responses"][0]["status"], json!(0), "{report}");
}

/// The lines of the demo's instructions that run a client.
fn command_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(str::trim)
        .filter(|l| {
            l.contains(" echo ")
                || l.contains(" find ")
                || l.starts_with("echoscu")
                || l.starts_with("findscu")
                || l.starts_with("storescu")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_demo_takes_a_free_port_when_11112_is_taken_and_shows_the_query_guard() {
    // 11112 held by the test (or by someone else already: either way, taken).
    let holder = std::net::TcpListener::bind("127.0.0.1:11112");
    let demo = RunningDemo::start(&[]);
    let log = demo.log();
    assert_ne!(demo.port, 11112, "{log}");
    assert!(
        log.contains(&format!(
            "port 11112 is in use (another DICOM server?): the demo listens on 127.0.0.1:{} instead",
            demo.port
        )),
        "{log}"
    );
    let port = demo.port.to_string();
    let lines = command_lines(&log);
    assert!(lines.len() >= 8, "{lines:#?}");
    for line in &lines {
        assert!(
            line.contains(&format!("127.0.0.1:{port}"))
                || line.ends_with(&format!(" {port}"))
                || line.contains(&format!(" {port} ")),
            "a printed command without the port {port}: {line}"
        );
        assert!(!line.contains("11112"), "{line}");
    }
    // The printed pacsgate echo works as printed.
    let echo = lines
        .iter()
        .find(|l| l.contains(" echo "))
        .expect("an echo line");
    let out = run_bounded(
        std::process::Command::new("sh").arg("-c").arg(echo),
        None,
        Duration::from_secs(60),
    );
    assert_success(&out, "the printed echo");

    // The query guard: the reader's PatientName=* refused 0xA700, the specific query works; both
    // really ran (the gateway logged them).
    let guard: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("The query guard, tried just now"))
        .take(3)
        .collect();
    assert!(guard[0].contains("as user reader"), "{guard:#?}");
    assert!(
        guard[1].contains("-k 'PatientName=*'") && guard[1].contains("refused 0xA700"),
        "{guard:#?}"
    );
    assert!(
        guard[2].contains("-k PatientID=DEMO-0002")
            && guard[2].contains("works: 1 match (SMITH^JANE)"),
        "{guard:#?}"
    );
    assert!(
        log.contains("user=\"reader\"") && log.contains("status=0xa700"),
        "{log}"
    );
    // The printed reader commands give the same answers.
    let reader: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("--user reader"))
        .collect();
    assert_eq!(reader.len(), 2, "{lines:#?}");
    let out = run_bounded(
        std::process::Command::new("sh").arg("-c").arg(reader[0]),
        None,
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("0xa700"),
        "{}",
        output_text(&out)
    );
    let out = run_bounded(
        std::process::Command::new("sh").arg("-c").arg(reader[1]),
        None,
        Duration::from_secs(60),
    );
    let text = assert_success(&out, "the reader's specific query");
    assert!(text.contains("SMITH^JANE"), "{text}");
    drop(demo);

    // With 11112 free (when this test was the one holding it), the demo keeps it.
    if let Ok(l) = holder {
        drop(l);
        let demo = RunningDemo::start(&[]);
        assert_eq!(demo.port, 11112, "{}", demo.log());
        assert!(!demo.log().contains("is in use"), "{}", demo.log());
    }
}

#[test]
fn certs_and_demo_refuse_a_planted_symlink_and_leave_its_target_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let work = common::tempdir("symlinks");
    let target = work.path().join("precious.txt");
    std::fs::write(&target, "precious").expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let untouched = |what: &str| {
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "precious",
            "{what}"
        );
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{what}");
    };

    // certs: server.key planted as a symlink.
    let out_dir = work.path().join("certs");
    std::fs::create_dir(&out_dir).expect("mkdir");
    std::os::unix::fs::symlink(&target, out_dir.join("server.key")).expect("symlink");
    let out = Gateway::run_command(&["certs", "--out", out_dir.to_str().expect("path")], None);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("server.key is a symbolic link: refusing to write through it"),
        "{text}"
    );
    untouched("certs");

    // demo: a demo folder with its marker, demo.jwt planted as a symlink.
    let demo_dir = work.path().join("demo");
    std::fs::create_dir(&demo_dir).expect("mkdir");
    std::fs::write(
        demo_dir.join("README.txt"),
        "This folder was made by `pacsgate demo`.\n",
    )
    .expect("marker");
    std::os::unix::fs::symlink(&target, demo_dir.join("demo.jwt")).expect("symlink");
    let out = Gateway::run_command(
        &[
            "demo",
            "--dir",
            demo_dir.to_str().expect("path"),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        None,
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("demo.jwt is a symbolic link"), "{text}");
    untouched("demo");

    // certs --ca-dir: the CA key stays in its own folder, the gateway's gets ca.crt only.
    let (gw, ca) = (work.path().join("gw"), work.path().join("ca"));
    let out = Gateway::run_command(
        &[
            "certs",
            "--out",
            gw.to_str().expect("path"),
            "--ca-dir",
            ca.to_str().expect("path"),
            "--client",
            "dr.house",
        ],
        None,
    );
    assert_success(&out, "certs --ca-dir");
    assert!(gw.join("ca.crt").exists() && gw.join("server.key").exists());
    assert!(
        !gw.join("ca.key").exists(),
        "the CA key in the gateway's folder"
    );
    assert!(ca.join("ca.key").exists());
}
