//! Smoke tests of the integration-test harness itself (tests/common, tests/peers), without the gateway.

mod common;

use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

fn tmp() -> tempfile::TempDir {
    common::tempdir("harness")
}

#[test]
fn orthanc_takes_dcmtk_and_pynetdicom_traffic() {
    let data = tmp();
    let made = make_instances_with_uids(
        data.path(),
        &[("PAT1", "DOE^JANE", 3), ("PAT2", "ROE^RICHARD", 2)],
    );
    assert_eq!(made.len(), 5);
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = orthanc.dicom_port.to_string();

    let out = dcmtk("echoscu", &["-aec", "ORTHANC", "127.0.0.1", &port]);
    assert_success(&out, "echoscu to Orthanc");

    let mut args = vec!["-aec", "ORTHANC", "127.0.0.1", &port];
    let paths: Vec<String> = made.iter().map(|i| i.path.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    assert_success(&dcmtk("storescu", &args), "storescu to Orthanc");
    assert_eq!(
        orthanc.instance_count(),
        5,
        "Orthanc log:\n{}",
        orthanc.log()
    );
    assert_eq!(orthanc.instance_ids().len(), 5);

    // Over DICOM, Orthanc keeps the data set byte for byte but writes its own file meta group.
    for inst in &made {
        let stored = orthanc
            .file_by_sop_instance_uid(&inst.sop_uid)
            .unwrap_or_else(|| panic!("Orthanc lacks {}", inst.sop_uid));
        let source = std::fs::read(&inst.path).expect("read source file");
        assert!(
            dataset_bytes(&stored) == dataset_bytes(&source),
            "data set of {} changed",
            inst.sop_uid
        );
    }
    assert!(orthanc.file_by_sop_instance_uid("1.2.3.4.5").is_none());

    let out = dcmtk(
        "findscu",
        &[
            "-S",
            "-aec",
            "ORTHANC",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=*",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            &port,
        ],
    );
    let text = assert_success(&out, "findscu to Orthanc");
    assert!(
        text.contains("DOE^JANE") && text.contains("ROE^RICHARD"),
        "{text}"
    );

    let report = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        "ORTHANC",
        "--level",
        "STUDY",
        "-k",
        "PatientName=*",
        "-k",
        "StudyInstanceUID=",
    ]);
    assert_eq!(report["associated"], true, "{report}");
    assert_eq!(
        report["matches"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert_eq!(
        report["statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0)),
        "{report}"
    );
    let names: Vec<&str> = report["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .filter_map(|m| m["PatientName"].as_str())
        .collect();
    assert!(
        names.contains(&"DOE^JANE") && names.contains(&"ROE^RICHARD"),
        "{report}"
    );

    // pynetdicom store sends the file's own encoding; upload over REST is stored verbatim.
    let more = make_instances_with_uids(
        data.path(),
        &[("PAT3", "POE^EDGAR", 1), ("PAT4", "LOE^LISA", 1)],
    );
    let path = more[0].path.display().to_string();
    let report = pyscu(&["store", "--port", &port, "--aec", "ORTHANC", &path]);
    assert_eq!(report["statuses"], json!([0]), "{report}");
    let source = std::fs::read(&more[1].path).expect("read source file");
    let id = orthanc.upload(&source);
    assert!(
        orthanc.instance_file(&id) == source,
        "uploaded file not stored verbatim"
    );
    assert_eq!(orthanc.instance_count(), 7);

    let report = pyscu(&["echo", "--port", &port, "--aec", "ORTHANC"]);
    assert_eq!(report["statuses"], json!([0]), "{report}");
}

#[test]
fn orthanc_keeps_a_large_instance() {
    let data = tmp();
    let big = make_large_instance(data.path(), 24);
    let size = std::fs::metadata(&big).expect("large file").len();
    assert!(size >= 24 << 20, "large instance is only {size} bytes");
    let orthanc = Orthanc::start("BIGARCHIVE", &[]);
    let port = orthanc.dicom_port.to_string();
    let path = big.display().to_string();
    assert_success(
        &dcmtk(
            "storescu",
            &["-aec", "BIGARCHIVE", "127.0.0.1", &port, &path],
        ),
        "storescu large",
    );
    let ids = orthanc.instance_ids();
    assert_eq!(ids.len(), 1);
    let source = std::fs::read(&big).expect("read large file");
    assert!(dataset_bytes(&orthanc.instance_file(&ids[0])) == dataset_bytes(&source));
}

#[test]
fn pyarchive_records_identity_and_stores() {
    let data = tmp();
    let made = make_instances_with_uids(data.path(), &[("PAT9", "ARCH^TEST", 2)]);
    let archive = PyArchive::start("PYARCHIVE");
    let port = archive.port.to_string();

    let p0 = made[0].path.display().to_string();
    let p1 = made[1].path.display().to_string();
    let report = pyscu(&[
        "store",
        "--port",
        &port,
        "--aec",
        "PYARCHIVE",
        "--aet",
        "MODALITY1",
        "--jwt",
        "a.b.c",
        &p0,
        &p1,
    ]);
    assert_eq!(report["statuses"], json!([0, 0]), "{report}");
    let report = pyscu(&["echo", "--port", &port, "--aec", "PYARCHIVE"]);
    assert_eq!(report["statuses"], json!([0]), "{report}");
    let report = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        "PYARCHIVE",
        "-k",
        "PatientName=*",
    ]);
    assert_eq!(
        report["matches"][0]["PatientName"], "ARCHIVE^FIXED",
        "{report}"
    );

    let assocs = archive.associations();
    assert_eq!(assocs.len(), 3, "{assocs:?}");
    assert_eq!(assocs[0]["calling_aet"], "MODALITY1");
    assert_eq!(assocs[0]["called_aet"], "PYARCHIVE");
    assert_eq!(assocs[0]["user_identity"], true);
    assert_eq!(assocs[0]["user_identity_type"], 5);
    assert_eq!(assocs[1]["user_identity"], false);
    assert_eq!(
        archive.stored_sop_uids(),
        vec![made[0].sop_uid.clone(), made[1].sop_uid.clone()]
    );

    // DCMTK storescu sends User Identity (type 2) too; the archive sees it.
    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "PYARCHIVE",
            "-usr",
            "alice",
            "-pwd",
            "secret",
            "127.0.0.1",
            &port,
            &p0,
        ],
    );
    assert_success(&out, "storescu with -usr/-pwd to archive.py");
    assert_eq!(archive.associations()[3]["user_identity_type"], 2);

    // Nothing listening: the report says so instead of failing the script.
    let closed = free_port().to_string();
    let report = pyscu(&["echo", "--port", &closed]);
    assert_eq!(report["connected"], false, "{report}");
    assert_eq!(report["associated"], false, "{report}");
}

#[test]
fn pki_certificates_and_tokens() {
    let pki = Pki::generate();
    let mode = std::fs::metadata(&pki.server_key)
        .expect("server key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let verify = |cert: &std::path::Path| {
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&pki.ca_cert)
            .arg(cert)
            .output()
            .expect("run openssl verify")
            .status
            .success()
    };
    assert!(
        verify(&pki.server_cert),
        "server cert does not chain to the CA"
    );
    let (client, client_key) = pki.client("alice");
    assert!(verify(&client));
    assert_eq!(
        std::fs::metadata(&client_key)
            .expect("client key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        !verify(&pki.other_ca_client("mallory").0),
        "other-CA cert must not verify"
    );
    assert!(
        !verify(&pki.expired_client("old").0),
        "expired cert must not verify"
    );
    assert!(
        verify(&pki.rsa_server().0),
        "RSA server cert does not chain to the CA"
    );
    let subject = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(&client)
        .output()
        .expect("run openssl x509");
    let subject = String::from_utf8_lossy(&subject.stdout);
    assert!(
        subject.contains("CN=alice") || subject.contains("CN = alice"),
        "{subject}"
    );
    assert!(subject.contains("DNS:alice"), "{subject}");

    let claims = json!({"sub": "alice", "iss": "test-idp", "aud": "pacsgate", "iat": now(), "exp": now() + 300});
    let token = mint_jwt(&pki.jwt_private_pem, &claims);
    let public = std::fs::read(&pki.jwt_public_pem).expect("read JWT public key");
    let key = jsonwebtoken::DecodingKey::from_ec_pem(&public).expect("SPKI PEM");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["pacsgate"]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
        .expect("token verifies");
    assert_eq!(decoded.claims["sub"], "alice");
    let forged = mint_jwt(&pki.other_jwt_private_pem, &claims);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&forged, &key, &validation).is_err());
    let none = jwt_alg_none(&claims);
    assert!(
        none.ends_with('.') && none.starts_with("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."),
        "{none}"
    );
    assert!(jsonwebtoken::decode::<serde_json::Value>(&none, &key, &validation).is_err());
}

#[test]
fn tls_echo_against_dcmtk_storescp() {
    let pki = Pki::generate();
    let out_dir = tmp();
    let port = free_port();
    let mut cmd = Command::new("/usr/bin/storescp");
    cmd.env("TCP_NODELAY", "1")
        .arg("+tls")
        .arg(&pki.server_key)
        .arg(&pki.server_cert)
        .arg("+cf")
        .arg(&pki.ca_cert)
        .arg("-od")
        .arg(out_dir.path())
        .arg(port.to_string());
    let mut scp = common::Spawned::spawn(cmd, &out_dir.path().join("storescp.log"));
    scp.wait_until(Duration::from_secs(10), "listening", |p| {
        common::is_listening(p.pid(), port)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let port = port.to_string();
    let ca = pki.ca_cert.display().to_string();
    let (cert, key) = pki.client("alice");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());

    let report = pyscu(&[
        "echo",
        "--port",
        &port,
        "--aec",
        "STORESCP",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert_eq!(report["associated"], true, "{report}\n{}", scp.log());
    assert_eq!(report["statuses"], json!([0]), "{report}");

    // storescp requires a client certificate from its CA.
    let (bad_cert, bad_key) = pki.other_ca_client("mallory");
    let (bad_cert, bad_key) = (
        bad_cert.display().to_string(),
        bad_key.display().to_string(),
    );
    let report = pyscu(&[
        "echo",
        "--port",
        &port,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &bad_cert,
        "--tls-key",
        &bad_key,
    ]);
    assert_eq!(report["associated"], false, "{report}");

    // DCMTK as TLS client, ECDSA certificates both ways.
    let out = dcmtk(
        "echoscu",
        &["+tls", &key, &cert, "+cf", &ca, "127.0.0.1", &port],
    );
    assert_success(&out, "echoscu over TLS");
}

#[test]
fn gateway_binary_is_built() {
    assert!(
        std::path::Path::new(common::gateway::BIN).exists(),
        "{}",
        common::gateway::BIN
    );
}

#[test]
fn orthanc_moves_to_pyarchive_and_serves_c_get() {
    let data = tmp();
    let made = make_instances_with_uids(data.path(), &[("PATM", "MOVE^ME", 2)]);
    let archive = PyArchive::start("MOVEDEST");
    let orthanc = Orthanc::start("MOVESRC", &[("MOVEDEST", "127.0.0.1", archive.port)]);
    for inst in &made {
        orthanc.upload(&std::fs::read(&inst.path).expect("read instance"));
    }
    let port = orthanc.dicom_port.to_string();
    let study = format!("StudyInstanceUID={}", made[0].study_uid);

    let report = pyscu(&[
        "move", "--port", &port, "--aec", "MOVESRC", "--dest", "MOVEDEST", "-k", &study,
    ]);
    assert_eq!(
        report["statuses"].as_array().and_then(|s| s.last()),
        Some(&json!(0)),
        "{report}"
    );
    let mut moved = archive.stored_sop_uids();
    moved.sort();
    let mut expected: Vec<String> = made.iter().map(|i| i.sop_uid.clone()).collect();
    expected.sort();
    assert_eq!(moved, expected, "Orthanc log:\n{}", orthanc.log());
    assert_eq!(archive.associations()[0]["calling_aet"], "MOVESRC");

    let report = pyscu(&["get", "--port", &port, "--aec", "MOVESRC", "-k", &study]);
    let mut got: Vec<String> = report["received"]
        .as_array()
        .expect("received list")
        .iter()
        .map(|v| v.as_str().expect("uid").to_string())
        .collect();
    got.sort();
    assert_eq!(got, expected, "{report}");
}
