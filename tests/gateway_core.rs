//! Gateway core with real peers: TLS, User Identity (password, JWT), client certificates, rejections,
//! and the relay to Orthanc and to a pynetdicom archive.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A gateway config in front of `upstream_port` with user alice (password + certificate),
/// certificate-only user bob, and JWTs from the test PKI's key.
fn config(port: u16, pki: &Pki, upstream_port: u16, upstream_ae: &str) -> String {
    GatewayConfig::new(port)
        .set("gateway", "ae_title = \"PACSGATE\"")
        .tls(pki)
        .client_ca(pki)
        .set("timeouts", "association_request = 5")
        .set("timeouts", "upstream_connect = 3")
        .upstream("ARCHIVE", upstream_port, upstream_ae)
        .jwt_es256(pki)
        .role_with(
            "reader",
            &["echo", "find", "get", "move", "store"],
            &["unrestricted_queries = true"],
        )
        .user("alice", &password_hash(PASSWORD), &["reader"])
        .user_cert("bob", &["reader"])
        .to_toml()
}

fn token(key: &std::path::Path, exp_offset: i64, aud: &str) -> String {
    let now = now() as i64;
    mint_jwt(
        key,
        &json!({"iss": "https://idp.test", "aud": aud, "sub": "carol", "exp": now + exp_offset,
                "nbf": now - 5, "roles": ["reader"]}),
    )
}

fn tls_args(pki: &Pki) -> Vec<String> {
    vec!["--tls-ca".into(), pki.ca_cert.display().to_string()]
}

fn pyscu_s(args: &[String]) -> Value {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pyscu(&refs)
}

fn rejection(v: &Value) -> (i64, i64, i64) {
    let r = &v["rejection"];
    assert!(r.is_object(), "expected an A-ASSOCIATE-RJ, got {v}");
    (
        r["result"].as_i64().unwrap_or(-1),
        r["source"].as_i64().unwrap_or(-1),
        r["reason"].as_i64().unwrap_or(-1),
    )
}

/// A TCP listener that only counts connections: the archive that must never be reached.
fn counting_upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind counting upstream");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            c.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, count)
}

fn find_args(port: u16, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "find",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--level",
        "STUDY",
        "-k",
        "PatientName=*",
        "-k",
        "PatientID=",
        "-k",
        "StudyInstanceUID=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend_from_slice(extra);
    a
}

fn sorted_matches(v: &Value) -> Vec<String> {
    let mut m: Vec<String> = v["matches"]
        .as_array()
        .unwrap_or_else(|| panic!("no matches in {v}"))
        .iter()
        .map(|m| format!("{}|{}", m["PatientID"], m["StudyInstanceUID"]))
        .collect();
    m.sort();
    m
}

#[test]
fn password_and_jwt_users_echo_and_find_exactly_what_the_archive_returns() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    let files = make_instances(
        data.path(),
        &[
            ("P1", "ONE^PATIENT", 1),
            ("P2", "TWO^PATIENT", 2),
            ("P3", "THREE", 1),
        ],
    );
    for f in &files {
        orthanc.upload(&std::fs::read(f).expect("read instance"));
    }
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, orthanc.dicom_port, "ORTHANC"));

    // Direct, with no gateway: what the archive itself answers.
    let direct = pyscu_s(
        &find_args(orthanc.dicom_port, &[])
            .into_iter()
            .map(|s| if s == "ARCHIVE" { "ORTHANC".into() } else { s })
            .collect::<Vec<_>>(),
    );
    assert_eq!(sorted_matches(&direct).len(), 3, "{direct}");

    let password = [
        tls_args(&pki),
        vec![
            "--user".into(),
            "alice".into(),
            "--password".into(),
            PASSWORD.into(),
        ],
    ]
    .concat();
    let jwt = [
        tls_args(&pki),
        vec!["--jwt".into(), token(&pki.jwt_private_pem, 600, "pacsgate")],
    ]
    .concat();
    for identity in [&password, &jwt] {
        let echo = pyscu_s(
            &[
                vec![
                    "echo".into(),
                    "--port".into(),
                    port.to_string(),
                    "--aec".into(),
                    "ARCHIVE".into(),
                ],
                identity.clone(),
            ]
            .concat(),
        );
        assert_eq!(echo["statuses"], json!([0]), "echo: {echo}");
        let found = pyscu_s(&find_args(port, identity));
        assert_eq!(
            sorted_matches(&found),
            sorted_matches(&direct),
            "find through the gateway: {found}"
        );
        assert_eq!(
            found["statuses"].as_array().and_then(|s| s.last()),
            Some(&json!(0))
        );
    }
    let log = gw.log();
    assert!(
        log.contains("user=\"alice\"") && log.contains("method=\"password\""),
        "{log}"
    );
    assert!(
        log.contains("user=\"carol\"") && log.contains("method=\"jwt\""),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "the password leaked into the log");
}

#[test]
fn storescu_with_password_over_tls_stores_50_mb_byte_identical() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, orthanc.dicom_port, "ORTHANC"));
    let data = common::tempdir("large");
    let large = make_large_instance(data.path(), 50);
    let original = std::fs::read(&large).expect("read large instance");
    assert!(original.len() >= 50 * 1024 * 1024);

    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "ARCHIVE",
            "+tla",
            "+cf",
            pki.ca_cert.to_str().expect("path"),
            "-usr",
            "alice",
            "-pwd",
            PASSWORD,
            "-rsp",
            "127.0.0.1",
            &port.to_string(),
            large.to_str().expect("path"),
        ],
    );
    assert_success(&out, "storescu -usr -pwd over TLS");
    let ids = orthanc.instance_ids();
    assert_eq!(ids.len(), 1);
    let stored = orthanc.instance_file(&ids[0]);
    assert!(
        dataset_bytes(&stored) == dataset_bytes(&original),
        "stored data set differs from the sent one"
    );
    assert!(gw.log().contains("outcome=\"released\""), "{}", gw.log());
    // The line's target is the one log filters were written for (RUST_LOG=pacsgate::server=...),
    // whichever file logs it now.
    assert!(
        gw.log().contains("pacsgate::server: association"),
        "{}",
        gw.log()
    );
}

#[test]
fn findscu_with_a_trusted_client_certificate_needs_no_user_identity() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    for f in make_instances(data.path(), &[("CERT1", "CERT^PATIENT", 1)]) {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, orthanc.dicom_port, "ORTHANC"));
    let (cert, key) = pki.client("bob");
    let ca = pki.ca_cert.to_str().expect("path");
    let findscu = |key: &str, cert: &str| {
        dcmtk(
            "findscu",
            &[
                "-aec",
                "ARCHIVE",
                "+tls",
                key,
                cert,
                "+cf",
                ca,
                "-S",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                "PatientID=CERT1",
                "-k",
                "StudyInstanceUID",
                "127.0.0.1",
                &port.to_string(),
            ],
        )
    };
    let out = findscu(key.to_str().expect("path"), cert.to_str().expect("path"));
    let text = assert_success(&out, "findscu with a client certificate");
    assert!(
        text.contains("CERT1") || gw.log().contains("user=\"bob\""),
        "{text}"
    );
    assert!(
        gw.log().contains("user=\"bob\" method=\"certificate\""),
        "{}",
        gw.log()
    );

    // A certificate from a CA the gateway does not trust: the handshake fails, nothing reaches the archive.
    let (cert, key) = pki.other_ca_client("bob");
    let out = findscu(key.to_str().expect("path"), cert.to_str().expect("path"));
    assert!(
        !out.status.success(),
        "a foreign CA's certificate was accepted: {}",
        output_text(&out)
    );
    assert!(gw.log().contains("outcome=\"tls_failed\""), "{}", gw.log());

    // A trusted certificate whose name is no user: 1/2/1.
    let (cert, key) = pki.client("mallory");
    let out = pyscu(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        ca,
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
    ]);
    assert_eq!(rejection(&out), (1, 2, 1), "{out}");
}

#[test]
fn bad_credentials_are_rejected_1_2_1_and_the_archive_sees_no_connection() {
    let pki = Pki::generate();
    let (upstream, connections) = counting_upstream();
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, upstream, "ORTHANC"));
    let now = now() as i64;
    let claims = |exp: i64, aud: &str| json!({"iss": "https://idp.test", "aud": aud, "sub": "carol", "exp": exp, "roles": ["reader"]});
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("no credential", vec![]),
        (
            "wrong password",
            vec![
                "--user".into(),
                "alice".into(),
                "--password".into(),
                "wrong".into(),
            ],
        ),
        (
            "unknown user",
            vec![
                "--user".into(),
                "nobody".into(),
                "--password".into(),
                PASSWORD.into(),
            ],
        ),
        (
            "certificate-only user with a password",
            vec![
                "--user".into(),
                "bob".into(),
                "--password".into(),
                PASSWORD.into(),
            ],
        ),
        (
            "username only (type 1)",
            vec!["--username-only".into(), "alice".into()],
        ),
        (
            "expired JWT",
            vec![
                "--jwt".into(),
                mint_jwt(&pki.jwt_private_pem, &claims(now - 120, "pacsgate")),
            ],
        ),
        (
            "JWT signed by another key",
            vec![
                "--jwt".into(),
                mint_jwt(&pki.other_jwt_private_pem, &claims(now + 600, "pacsgate")),
            ],
        ),
        (
            "JWT with alg none",
            vec!["--jwt".into(), jwt_alg_none(&claims(now + 600, "pacsgate"))],
        ),
        (
            "JWT for another audience",
            vec![
                "--jwt".into(),
                mint_jwt(&pki.jwt_private_pem, &claims(now + 600, "other-service")),
            ],
        ),
        (
            "JWT with no known role",
            vec![
                "--jwt".into(),
                mint_jwt(
                    &pki.jwt_private_pem,
                    &json!({"iss": "https://idp.test", "aud": "pacsgate", "sub": "eve", "exp": now + 600, "roles": ["admin"]}),
                ),
            ],
        ),
    ];
    for (what, identity) in &cases {
        let args = [
            vec![
                "echo".into(),
                "--port".into(),
                port.to_string(),
                "--aec".into(),
                "ARCHIVE".into(),
            ],
            tls_args(&pki),
            identity.clone(),
        ]
        .concat();
        let out = pyscu_s(&args);
        assert_eq!(rejection(&out), (1, 2, 1), "{what}: {out}");
    }
    // DCMTK's storescu with a wrong password, too.
    let data = common::tempdir("one");
    let file = make_instances(data.path(), &[("X", "X", 1)]).remove(0);
    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "ARCHIVE",
            "+tla",
            "+cf",
            pki.ca_cert.to_str().expect("path"),
            "-usr",
            "alice",
            "-pwd",
            "wrong",
            "127.0.0.1",
            &port.to_string(),
            file.to_str().expect("path"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("Rejected Permanent"),
        "{}",
        output_text(&out)
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the archive was contacted"
    );
    let log = gw.log();
    assert_eq!(
        log.matches("outcome=\"rejected\"").count(),
        cases.len() + 1,
        "{log}"
    );
    for secret in [PASSWORD, "wrong\""] {
        assert!(
            !log.contains(secret),
            "a secret leaked into the log: {secret}"
        );
    }
}

#[test]
fn plain_dicom_on_the_tls_port_gets_nowhere() {
    let pki = Pki::generate();
    let (upstream, connections) = counting_upstream();
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, upstream, "ORTHANC"));
    let out = dcmtk(
        "echoscu",
        &["-aec", "ARCHIVE", "127.0.0.1", &port.to_string()],
    );
    assert!(
        !out.status.success(),
        "plain echoscu succeeded: {}",
        output_text(&out)
    );
    let out = pyscu(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--user",
        "alice",
        "--password",
        PASSWORD,
    ]);
    assert_ne!(out["associated"], json!(true), "{out}");
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    assert!(gw.log().contains("outcome=\"tls_failed\""), "{}", gw.log());
}

#[test]
fn the_archive_never_sees_a_user_identity_and_answers_are_relayed() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, archive.port, "PYARCHIVE"));
    let base = |cmd: &str| -> Vec<String> {
        [
            vec![
                cmd.into(),
                "--port".into(),
                port.to_string(),
                "--aec".into(),
                "ARCHIVE".into(),
                "--aet".into(),
                "VIEWER7".into(),
            ],
            tls_args(&pki),
        ]
        .concat()
    };
    let with_password = [
        base("echo"),
        vec![
            "--user".into(),
            "alice".into(),
            "--password".into(),
            PASSWORD.into(),
            "--positive-response".into(),
        ],
    ]
    .concat();
    let out = pyscu_s(&with_password);
    assert_eq!(out["statuses"], json!([0]), "{out}");
    assert_eq!(
        out["user_identity_response"],
        json!(""),
        "positive response requested: {out}"
    );

    let with_jwt = [
        base("echo"),
        vec!["--jwt".into(), token(&pki.jwt_private_pem, 600, "pacsgate")],
    ]
    .concat();
    let out = pyscu_s(&with_jwt);
    assert_eq!(out["statuses"], json!([0]), "{out}");
    assert_eq!(
        out["user_identity_response"],
        Value::Null,
        "no response was requested: {out}"
    );

    let data = common::tempdir("store");
    let files = make_instances(data.path(), &[("S1", "STORE^ME", 2)]);
    let store = [
        base("store"),
        vec![
            "--user".into(),
            "alice".into(),
            "--password".into(),
            PASSWORD.into(),
        ],
        files.iter().map(|f| f.display().to_string()).collect(),
    ]
    .concat();
    let out = pyscu_s(&store);
    assert_eq!(out["statuses"], json!([0, 0]), "{out}");
    assert_eq!(archive.stored_sop_uids().len(), 2);

    let associations = archive.associations();
    assert_eq!(associations.len(), 3, "{associations:?}");
    for a in &associations {
        assert_eq!(
            a["user_identity"],
            json!(false),
            "the archive saw a User Identity: {a}"
        );
        assert_eq!(
            a["calling_aet"],
            json!("VIEWER7"),
            "calling AE is kept: {a}"
        );
        assert_eq!(
            a["called_aet"],
            json!("PYARCHIVE"),
            "called AE is the upstream's: {a}"
        );
    }
    drop(gw);
}

#[test]
fn unknown_called_ae_and_a_dead_archive_are_rejected_with_their_codes() {
    let pki = Pki::generate();
    // Port 1 on loopback: nothing listens there, and no test peer can take it.
    let dead = 1;
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, dead, "ORTHANC"));
    let identity = [
        tls_args(&pki),
        vec![
            "--user".into(),
            "alice".into(),
            "--password".into(),
            PASSWORD.into(),
        ],
    ]
    .concat();

    let out = pyscu_s(
        &[
            vec![
                "echo".into(),
                "--port".into(),
                port.to_string(),
                "--aec".into(),
                "NOSUCHAE".into(),
            ],
            identity.clone(),
        ]
        .concat(),
    );
    assert_eq!(rejection(&out), (1, 1, 7), "unknown called AE: {out}");

    let out = pyscu_s(
        &[
            vec![
                "echo".into(),
                "--port".into(),
                port.to_string(),
                "--aec".into(),
                "ARCHIVE".into(),
            ],
            identity,
        ]
        .concat(),
    );
    assert_eq!(rejection(&out), (2, 3, 1), "archive down: {out}");
    let log = gw.log();
    assert!(
        log.contains("maps to no upstream") && log.contains("unreachable"),
        "{log}"
    );
}

#[test]
fn check_names_the_problem_and_hash_password_makes_a_usable_hash() {
    let pki = Pki::generate();
    let (upstream, _) = counting_upstream();
    let dir = common::tempdir("check");
    let good = dir.path().join("good.toml");
    common::write_config(&good, &config(free_port(), &pki, upstream, "ORTHANC"));
    let out = Gateway::run_command(&["check", "--config", good.to_str().expect("path")], None);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is ready"));

    let text = std::fs::read_to_string(&good).expect("read");
    let dead = "address = \"127.0.0.1:1\"".to_string();
    let cases = [
        (
            "typo.toml",
            text.replace("ae_title = \"PACSGATE\"", "ae_titel = \"PACSGATE\""),
            "ae_titel",
        ),
        (
            "dead.toml",
            text.lines()
                .map(|l| {
                    if l.starts_with("address") {
                        dead.clone()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            "unreachable",
        ),
        (
            "nokey.toml",
            text.replace("server.key", "missing.key"),
            "missing.key",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join(name);
        common::write_config(&path, &text);
        let out = Gateway::run_command(&["check", "--config", path.to_str().expect("path")], None);
        assert!(!out.status.success(), "{name} passed check");
        assert!(
            output_text(&out).contains(needle),
            "{name}: {}",
            output_text(&out)
        );
    }
}
