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
