//! DIMSE-aware policy with real peers: per-role operations, rate limits, lockout, the anti-enumeration
//! guard, the C-FIND result cap, and devices without credentials.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A gateway config: users `reader` (echo+find), `clinician` (everything, guard on),
/// `analyst` (find, unrestricted), `writer` (store); `limits` and `extra` appended verbatim.
fn config(
    port: u16,
    pki: &Pki,
    upstream_port: u16,
    upstream_ae: &str,
    limits: &str,
    extra: &str,
) -> String {
    let hash = password_hash(PASSWORD);
    GatewayConfig::new(port)
        .tls(pki)
        .client_ca(pki)
        .upstream("ARCHIVE", upstream_port, upstream_ae)
        .set("limits", limits)
        .role("reader", &["echo", "find"])
        .role("clinician", &["echo", "find", "get", "move", "store"])
        .role_with(
            "analyst",
            &["echo", "find"],
            &["unrestricted_queries = true"],
        )
        .role("modality", &["echo", "store"])
        .user("reader", &hash, &["reader"])
        .user("clinician", &hash, &["clinician"])
        .user("analyst", &hash, &["analyst"])
        .raw(extra)
        .to_toml()
}

fn args(cmd: &str, port: u16, pki: &Pki, user: &str, password: &str, rest: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        cmd.into(),
        "--port".into(),
        port.to_string(),
        "--aec".into(),
        "ARCHIVE".into(),
        "--tls-ca".into(),
        pki.ca_cert.display().to_string(),
        "--user".into(),
        user.into(),
        "--password".into(),
        password.into(),
    ];
    a.extend(rest.iter().map(|s| s.to_string()));
    a
}

fn run(a: &[String]) -> Value {
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    pyscu(&refs)
}

fn rejection(v: &Value) -> Option<(i64, i64, i64)> {
    let r = &v["rejection"];
    r.is_object().then(|| {
        (
            r["result"].as_i64().unwrap_or(-1),
            r["source"].as_i64().unwrap_or(-1),
            r["reason"].as_i64().unwrap_or(-1),
        )
    })
}

#[test]
fn a_readers_store_is_refused_0124_while_find_works_on_the_same_association() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    let existing = make_instances(data.path(), &[("KNOWN1", "KNOWN^PATIENT", 1)]);
    orthanc.upload(&std::fs::read(&existing[0]).expect("read"));
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(port, &pki, orthanc.dicom_port, "ORTHANC", "", ""),
    );

    let new = make_instances(data.path(), &[("NEW1", "NEW^PATIENT", 2)]);
    let mut a = args(
        "store",
        port,
        &pki,
        "reader",
        PASSWORD,
        &[
            "--then-find",
            "PatientID=KNOWN1",
            "--then-find",
            "StudyInstanceUID=",
        ],
    );
    a.extend(new.iter().map(|p| p.display().to_string()));
    let out = run(&a);
    assert_eq!(out["statuses"], json!([0x0124, 0x0124]), "{out}");
    assert_eq!(
        out["find_statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0)),
        "{out}"
    );
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(out["matches"][0]["PatientID"], json!("KNOWN1"));
    assert_eq!(
        orthanc.instance_count(),
        1,
        "the refused instances reached the archive"
    );
    let log = gw.log();
    assert!(
        log.contains("refused") && log.contains("store is not allowed"),
        "{log}"
    );

    // DCMTK's storescu sees the refusal too, and the association is released normally.
    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "ARCHIVE",
            "+tla",
            "+cf",
            pki.ca_cert.to_str().expect("path"),
            "-usr",
            "reader",
            "-pwd",
            PASSWORD,
            "-v",
            "127.0.0.1",
            &port.to_string(),
            new[0].to_str().expect("path"),
        ],
    );
    assert!(
        output_text(&out).contains("Store Response (Unknown Status: 0x124)"),
        "{}",
        output_text(&out)
    );
    assert_eq!(orthanc.instance_count(), 1);
}

#[test]
fn rapid_queries_hit_the_rate_limit_and_are_served_again_after_the_window() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    for f in make_instances(data.path(), &[("RATE1", "RATE^LIMIT", 1)]) {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let port = free_port();
    // 600 per minute = one every 100 ms, burst 5.
    let limits = "queries_per_minute = 600\nqueries_burst = 5";
    let gw = Gateway::start(
        port,
        &config(port, &pki, orthanc.dicom_port, "ORTHANC", limits, ""),
    );
    let q = [
        "-k",
        "PatientID=RATE1",
        "-k",
        "StudyInstanceUID=",
        "--repeat",
        "200",
    ];
    let out = run(&args("find", port, &pki, "clinician", PASSWORD, &q));
    let queries = out["queries"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(queries.len(), 200, "{out}");
    let refused = queries
        .iter()
        .filter(|r| r["status"] == json!(0xA700))
        .count();
    let served: Vec<&Value> = queries.iter().filter(|r| r["status"] == json!(0)).collect();
    assert!(refused > 0, "no query was refused");
    assert!(served.len() >= 5, "the burst was not served");
    assert_eq!(refused + served.len(), 200, "{out}");
    assert!(
        served.iter().all(|r| r["matches"] == json!(1)),
        "served queries return the match: {out}"
    );
    assert!(gw.log().contains("query rate limit reached"));

    // Another user is not affected; after the window the first user is served again.
    let other = run(&args(
        "find",
        port,
        &pki,
        "analyst",
        PASSWORD,
        &["-k", "PatientID=RATE1"],
    ));
    assert_eq!(
        other["statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0)),
        "{other}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let again = run(&args(
        "find",
        port,
        &pki,
        "clinician",
        PASSWORD,
        &["-k", "PatientID=RATE1", "-k", "StudyInstanceUID="],
    ));
    assert_eq!(again["statuses"], json!([0xFF00, 0]), "{again}");
}

#[test]
fn failed_logins_lock_the_user_at_that_address_only_and_the_lock_expires() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    // Long enough that the steps between the lock and its end fit in it on a loaded machine.
    let limits = "failed_logins = 5\nfailed_logins_per_address = 50\nlockout_seconds = 12";
    let gw = Gateway::start(
        port,
        &config(port, &pki, archive.port, "PYARCHIVE", limits, ""),
    );
    let echo = |user: &str, password: &str, bind: &str| {
        run(&args("echo", port, &pki, user, password, &["--bind", bind]))
    };
    let mut locked_at = std::time::Instant::now();
    for i in 1..=6 {
        let out = echo("clinician", "wrong", "127.0.0.1");
        if i == 5 {
            locked_at = std::time::Instant::now(); // the lock began before this
        }
        let expected = if i <= 5 { (1, 2, 1) } else { (2, 3, 2) };
        assert_eq!(
            rejection(&out),
            Some(expected),
            "wrong password #{i}: {out}"
        );
    }
    let locked = echo("clinician", PASSWORD, "127.0.0.1");
    assert_eq!(
        rejection(&locked),
        Some((2, 3, 2)),
        "right password while locked out: {locked}"
    );
    let elsewhere = echo("clinician", PASSWORD, "127.0.0.2");
    assert_eq!(
        elsewhere["statuses"],
        json!([0]),
        "same user from another address: {elsewhere}"
    );
    let other_user = echo("reader", PASSWORD, "127.0.0.1");
    assert_eq!(
        other_user["statuses"],
        json!([0]),
        "another user from the same address: {other_user}"
    );
    std::thread::sleep(
        (locked_at + Duration::from_millis(12_500))
            .saturating_duration_since(std::time::Instant::now()),
    );
    let after = echo("clinician", PASSWORD, "127.0.0.1");
    assert_eq!(after["statuses"], json!([0]), "after the lockout: {after}");
    let log = gw.log();
    assert!(
        log.contains("lockout") && log.contains("locked out after repeated failed logins"),
        "{log}"
    );
}

#[test]
fn failures_of_any_kind_lock_a_whole_address() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    let limits = "failed_logins = 100\nfailed_logins_per_address = 4\nlockout_seconds = 30";
    let _gw = Gateway::start(
        port,
        &config(port, &pki, archive.port, "PYARCHIVE", limits, ""),
    );
    for name in ["a", "b", "c", "d"] {
        let out = run(&args(
            "echo",
            port,
            &pki,
            name,
            "x",
            &["--bind", "127.0.0.3"],
        ));
        assert_eq!(rejection(&out), Some((1, 2, 1)), "{out}");
    }
    let out = run(&args(
        "echo",
        port,
        &pki,
        "reader",
        PASSWORD,
        &["--bind", "127.0.0.3"],
    ));
    assert_eq!(rejection(&out), Some((2, 3, 2)), "address locked: {out}");
    let out = run(&args(
        "echo",
        port,
        &pki,
        "reader",
        PASSWORD,
        &["--bind", "127.0.0.4"],
    ));
    assert_eq!(out["statuses"], json!([0]), "other address: {out}");
}

#[test]
fn wildcard_queries_are_refused_unless_the_role_is_unrestricted() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    for f in make_instances(
        data.path(),
        &[("G1", "GUARD^ONE", 1), ("G2", "GUARD^TWO", 1)],
    ) {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(port, &pki, orthanc.dicom_port, "ORTHANC", "", ""),
    );
    let wildcard = ["-k", "PatientName=*", "-k", "StudyInstanceUID="];
    let out = run(&args("find", port, &pki, "clinician", PASSWORD, &wildcard));
    assert_eq!(
        out["statuses"],
        json!([0xA700]),
        "PatientName=* alone: {out}"
    );
    let out = run(&args(
        "find",
        port,
        &pki,
        "clinician",
        PASSWORD,
        &["-k", "PatientName=G*", "-k", "PatientID="],
    ));
    assert_eq!(
        out["statuses"],
        json!([0xA700]),
        "one character before the wildcard: {out}"
    );
    let out = run(&args(
        "find",
        port,
        &pki,
        "clinician",
        PASSWORD,
        &["-k", "PatientID=G1", "-k", "StudyInstanceUID="],
    ));
    assert_eq!(out["statuses"], json!([0xFF00, 0]), "by PatientID: {out}");
    let out = run(&args("find", port, &pki, "analyst", PASSWORD, &wildcard));
    assert_eq!(
        out["matches"].as_array().map(Vec::len),
        Some(2),
        "unrestricted role: {out}"
    );

    // findscu (DCMTK) gets the same refusal.
    let (cert, key) = pki.client("clinician");
    let out = dcmtk(
        "findscu",
        &[
            "-aec",
            "ARCHIVE",
            "+tls",
            key.to_str().expect("p"),
            cert.to_str().expect("p"),
            "+cf",
            pki.ca_cert.to_str().expect("p"),
            "-v",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=*",
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    assert!(
        output_text(&out).contains("Final Find Response (Refused: OutOfResources)"),
        "{}",
        output_text(&out)
    );
    assert!(gw.log().contains("query names no patient or study"));
}

#[test]
fn the_result_cap_cancels_at_the_archive_and_ends_with_fe00() {
    let pki = Pki::generate();
    let archive = PyArchive::start_with(
        "PYARCHIVE",
        &["--find-matches", "6", "--match-delay", "0.2"],
    );
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            archive.port,
            "PYARCHIVE",
            "max_query_results = 2",
            "",
        ),
    );
    let out = run(&args(
        "find",
        port,
        &pki,
        "clinician",
        PASSWORD,
        &["-k", "PatientID=FIXED*", "-k", "StudyInstanceUID="],
    ));
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(
        out["statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0xFE00)),
        "{out}"
    );
    // The archive got the C-CANCEL (pynetdicom records it when its handler sees is_cancelled).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while archive.records().iter().all(|r| r["kind"] != "cancel")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let cancels: Vec<Value> = archive
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "cancel")
        .collect();
    assert_eq!(cancels.len(), 1, "{:?}", archive.records());
    assert!(gw.log().contains("C-FIND truncated"), "{}", gw.log());

    // A query with fewer matches than the cap is untouched.
    let archive2 = PyArchive::start_with("PYARCHIVE", &["--find-matches", "1"]);
    let port2 = free_port();
    let _gw2 = Gateway::start(
        port2,
        &config(
            port2,
            &pki,
            archive2.port,
            "PYARCHIVE",
            "max_query_results = 2",
            "",
        ),
    );
    let out = run(&args(
        "find",
        port2,
        &pki,
        "clinician",
        PASSWORD,
        &["-k", "PatientID=FIXED1"],
    ));
    assert_eq!(out["statuses"], json!([0xFF00, 0]), "{out}");
}

#[test]
fn a_device_stores_without_credentials_only_from_its_ae_and_address() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let device_port = free_port();
    let extra = "[[device]]\nae_title = \"CT_SCANNER_1\"\naddresses = [\"127.0.0.1/32\"]\nroles = [\"modality\"]\n".to_string();
    let mut text = config(port, &pki, orthanc.dicom_port, "ORTHANC", "", &extra);
    text = text.replacen(
        "[gateway]\n",
        &format!("[gateway]\ndevice_listen = \"127.0.0.1:{device_port}\"\n"),
        1,
    );
    let mut gw = Gateway::start(port, &text);
    gw.wait_listening(device_port);
    let data = common::tempdir("data");
    let files = make_instances(data.path(), &[("CT1", "SCANNED^PATIENT", 2)]);
    let f0 = files[0].to_str().expect("path");

    // The right AE from the right address, plain DICOM, no credentials: stored.
    let out = dcmtk(
        "storescu",
        &[
            "-aet",
            "CT_SCANNER_1",
            "-aec",
            "ARCHIVE",
            "127.0.0.1",
            &device_port.to_string(),
            f0,
        ],
    );
    assert_success(&out, "storescu as the device");
    assert_eq!(orthanc.instance_count(), 1);

    // Another AE title from the same address: rejected.
    let out = dcmtk(
        "storescu",
        &[
            "-aet",
            "CT_SCANNER_2",
            "-aec",
            "ARCHIVE",
            "127.0.0.1",
            &device_port.to_string(),
            f0,
        ],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("Rejected"),
        "{}",
        output_text(&out)
    );

    // The right AE title from another address: rejected.
    let out = pyscu(&[
        "store",
        "--port",
        &device_port.to_string(),
        "--aec",
        "ARCHIVE",
        "--aet",
        "CT_SCANNER_1",
        "--bind",
        "127.0.0.2",
        files[1].to_str().expect("path"),
    ]);
    assert_eq!(rejection(&out), Some((1, 2, 1)), "{out}");

    // The device role does not include find, and passwords are refused on the plain listener.
    let out = pyscu(&[
        "find",
        "--port",
        &device_port.to_string(),
        "--aec",
        "ARCHIVE",
        "--aet",
        "CT_SCANNER_1",
        "-k",
        "PatientID=CT1",
    ]);
    assert_eq!(out["statuses"], json!([0x0124]), "{out}");
    let out = pyscu(&[
        "echo",
        "--port",
        &device_port.to_string(),
        "--aec",
        "ARCHIVE",
        "--user",
        "clinician",
        "--password",
        PASSWORD,
    ]);
    assert_eq!(rejection(&out), Some((1, 2, 1)), "{out}");
    assert_eq!(orthanc.instance_count(), 1);
    let log = gw.log();
    assert!(log.contains("method=\"device\""), "{log}");
    assert!(!log.contains(PASSWORD));
}
