//! The first-run and admin tools with real peers: `pacsgate demo` and the credentials it prints,
//! `pacsgate certs` with DCMTK and pynetdicom TLS, `pacsgate token` until its ttl, `pacsgate echo` /
//! `find`, and `pacsgate probe` against a bare Orthanc and against pacsgate in front of it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::gateway::BIN;
use common::*;
use serde_json::{Value, json};

/// `pacsgate ARGS...` with extra environment variables, killed after 60 s.
fn pacsgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(&mut cmd, None, Duration::from_secs(60))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A running `pacsgate demo --dir DIR --listen 127.0.0.1:PORT`; killed on drop.
struct Demo {
    proc: Spawned,
    port: u16,
    dir: PathBuf,
}

impl Demo {
    /// Starts the demo (working directory `cwd`) and waits until the gateway listens.
    fn start(cwd: &Path, dir: &Path) -> Demo {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(BIN);
            cmd.args([
                "demo",
                "--dir",
                p(dir),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
            let mut proc = Spawned::spawn(cmd, &cwd.join(format!("demo-{attempt}-{port}.log")));
            match proc.wait_until(Duration::from_secs(60), "listening", |s| {
                is_listening(s.pid(), port) && s.log().contains("Press Ctrl-C to stop")
            }) {
                Ok(()) => {
                    return Demo {
                        proc,
                        port,
                        dir: dir.to_path_buf(),
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("pacsgate demo did not start: {last}");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    /// The printed lines that run pacsgate's own clients (but the reader's, whose wildcard query is
    /// refused on purpose: tests/demo_archive.rs runs those).
    fn printed_pacsgate_commands(&self) -> Vec<String> {
        self.log()
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(BIN) && (l.contains(" echo ") || l.contains(" find ")))
            .filter(|l| !l.contains("--user reader"))
            .map(str::to_string)
            .collect()
    }

    fn printed_line(&self, starts_with: &str) -> String {
        self.log()
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(starts_with))
            .unwrap_or_else(|| {
                panic!(
                    "no printed line starting with {starts_with:?}:\n{}",
                    self.log()
                )
            })
            .to_string()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- pacsgate demo log -----\n{}\n-----", self.log());
        }
    }
}

/// Runs a printed shell command line in `cwd` (killed after 60 s).
fn sh(line: &str, cwd: &Path) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(line)
        .current_dir(cwd)
        .env("TCP_NODELAY", "1");
    run_bounded(&mut cmd, None, Duration::from_secs(60))
}

/// The DCMTK line as printed, with the tool called by its /usr/bin path (never pynetdicom's).
fn dcmtk_line(line: &str) -> String {
    format!("/usr/bin/{line}")
}

#[test]
fn demo_starts_and_the_printed_credentials_work_with_pacsgate_dcmtk_and_pynetdicom() {
    let work = common::tempdir("demo");
    let dir = work.path().join("pacsgate-demo");
    let mut demo = Demo::start(work.path(), &dir);
    let addr = demo.addr();
    let port = demo.port.to_string();

    // pacsgate's own clients, exactly as printed.
    let commands = demo.printed_pacsgate_commands();
    assert_eq!(commands.len(), 3, "{}", demo.log());
    for line in &commands {
        let out = sh(line, work.path());
        let text = assert_success(&out, line);
        if line.contains(" echo ") {
            assert!(text.contains("C-ECHO: status 0x0000 (Success)"), "{text}");
            assert!(text.contains("TLS 1.3"), "{text}");
        } else if line.contains("--json") {
            let v: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
            assert_eq!(v["count"], 4, "4 demo patients: {v}");
            assert_eq!(v["status"], 0);
        } else {
            assert!(
                text.contains("C-FIND: 6 matches, final status 0x0000"),
                "{text}"
            );
            assert!(text.contains("SMITH^JANE"), "{text}");
        }
    }

    // DCMTK as printed: echoscu and findscu with the client certificate, storescu with a password.
    let echoscu = demo.printed_line("echoscu ");
    assert_success(&sh(&dcmtk_line(&echoscu), work.path()), &echoscu);
    let storescu = demo.printed_line("storescu ");
    assert_success(&sh(&dcmtk_line(&storescu), work.path()), &storescu);
    let findscu = demo.printed_line("findscu ");
    let out = sh(&dcmtk_line(&findscu), work.path());
    let text = assert_success(&out, &findscu);
    assert!(
        text.contains("SAMPLE^STORED"),
        "the stored sample is found: {text}"
    );
    assert!(demo.log().contains("getscu"), "the getscu note is printed");

    // pynetdicom: the written client script, and scu.py with the password and the token.
    let mut cmd = Command::new(python());
    cmd.arg(demo.file("demo_client.py"))
        .current_dir(work.path());
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
    let text = assert_success(&out, "demo_client.py");
    assert!(
        stdout(&out).lines().count() >= 7,
        "6 studies + the sample: {text}"
    );
    let ca = demo.file("ca.crt");
    let echo = pyscu(&[
        "echo",
        "--port",
        &port,
        "--aec",
        "DEMO",
        "--tls-ca",
        p(&ca),
        "--user",
        "demo",
        "--password",
        "demo-password",
        "--positive-response",
    ]);
    assert_eq!(echo["statuses"], json!([0]), "{echo}");
    assert_eq!(echo["user_identity_response"], json!(""), "{echo}");
    let token = std::fs::read_to_string(demo.file("demo.jwt")).expect("demo.jwt");
    let found = pyscu(&[
        "find",
        "--port",
        &port,
        "--aec",
        "DEMO",
        "--tls-ca",
        p(&ca),
        "--jwt",
        token.trim(),
        "--level",
        "STUDY",
        "-k",
        "PatientName=*",
        "-k",
        "PatientID=",
    ]);
    assert_eq!(
        found["matches"].as_array().map(Vec::len),
        Some(7),
        "{found}"
    );
    let (cert, key) = (demo.file("demo-cert.crt"), demo.file("demo-cert.key"));
    let by_cert = pyscu(&[
        "echo",
        "--port",
        &port,
        "--aec",
        "DEMO",
        "--tls-ca",
        p(&ca),
        "--tls-cert",
        p(&cert),
        "--tls-key",
        p(&key),
    ]);
    assert_eq!(by_cert["statuses"], json!([0]), "{by_cert}");

    // Without credentials: 1/2/1 for pynetdicom, exit 3 and the codes in words for pacsgate echo.
    let anonymous = pyscu(&["echo", "--port", &port, "--aec", "DEMO", "--tls-ca", p(&ca)]);
    let r = &anonymous["rejection"];
    assert_eq!(
        (
            r["result"].as_i64(),
            r["source"].as_i64(),
            r["reason"].as_i64()
        ),
        (Some(1), Some(2), Some(1)),
        "{anonymous}"
    );
    let out = pacsgate(&["echo", "--ca", p(&ca), "--aec", "DEMO", &addr], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("A-ASSOCIATE-RJ 1/2/1: rejected permanently by the service provider (ACSE): no reason given"),
        "{}",
        output_text(&out)
    );
    // A wrong password from a file: also rejected.
    let wrong = work.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    let out = pacsgate(
        &[
            "echo",
            "--ca",
            p(&ca),
            "--user",
            "demo",
            "--password-file",
            p(&wrong),
            "--aec",
            "DEMO",
            &addr,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let log = demo.log();
    let association_lines: Vec<&str> = log.lines().filter(|l| l.contains("association")).collect();
    assert!(association_lines.len() >= 8, "{log}");
    for line in association_lines {
        assert!(
            !line.contains("demo-password") && !line.contains("not-the-password"),
            "a password in the log: {line}"
        );
    }

    // Ctrl-C / SIGTERM: exit 0.
    demo.proc.signal("TERM");
    let status = demo
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("demo exits on SIGTERM");
    assert!(status.success(), "{status}");

    // A second run reuses the CA, certificates and keys of the folder.
    let ca_before = std::fs::read(&ca).expect("ca");
    let again = Demo::start(work.path(), &dir);
    assert!(
        again.log().contains("reused from an earlier run"),
        "{}",
        again.log()
    );
    assert_eq!(std::fs::read(&ca).expect("ca"), ca_before);
    let out = sh(&again.printed_pacsgate_commands()[0], work.path());
    assert_success(&out, "echo after a restart");
}

#[test]
fn demo_refuses_non_loopback_addresses_and_foreign_folders() {
    let work = common::tempdir("demo-refuse");
    let dir = work.path().join("demo");
    let out = pacsgate(
        &["demo", "--dir", p(&dir), "--listen", "0.0.0.0:11112"],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("loopback only"),
        "{}",
        output_text(&out)
    );
    assert!(!dir.exists(), "nothing written for a refused address");

    let foreign = work.path().join("etc-pacsgate");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("server.key"), "precious").expect("write");
    let out = pacsgate(
        &[
            "demo",
            "--dir",
            p(&foreign),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not made by `pacsgate demo`"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("server.key")).expect("read"),
        "precious"
    );
}

/// A gateway config in front of `upstream` with TLS files from `certs` (ca.crt, server.crt/.key),
/// user alice (client certificate), JWTs from `jwt_public` with leeway 0.
fn gateway_config(port: u16, certs: &Path, jwt_public: &Path, upstream: u16) -> String {
    GatewayConfig::new(port)
        .path("tls", "certificate", &certs.join("server.crt"))
        .path("tls", "private_key", &certs.join("server.key"))
        .path("tls", "client_ca", &certs.join("ca.crt"))
        .upstream("ARCHIVE", upstream, "ORTHANC")
        .set("auth.jwt", "issuer = \"pacsgate-dev\"")
        .set("auth.jwt", "audience = \"pacsgate\"")
        .path("auth.jwt", "public_key", jwt_public)
        .set("auth.jwt", "leeway = 0")
        .role("reader", &["echo", "find"])
        .user_cert("alice", &["reader"])
        .to_toml()
}

#[test]
fn certificates_from_pacsgate_certs_work_with_dcmtk_pynetdicom_and_pacsgate_echo() {
    let work = common::tempdir("certs");
    let certs = work.path().join("certs");
    let out = pacsgate(
        &[
            "certs",
            "--out",
            p(&certs),
            "--client",
            "alice",
            "--client",
            "mallory",
        ],
        &[],
    );
    assert_success(&out, "pacsgate certs");
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let _gw = Gateway::start(
        port,
        &gateway_config(port, &certs, &pki.jwt_public_pem, orthanc.dicom_port),
    );
    let (ca, cert, key) = (
        certs.join("ca.crt"),
        certs.join("alice.crt"),
        certs.join("alice.key"),
    );
    let port_s = port.to_string();

    let out = dcmtk(
        "echoscu",
        &[
            "-aec",
            "ARCHIVE",
            "+tls",
            p(&key),
            p(&cert),
            "+cf",
            p(&ca),
            "127.0.0.1",
            &port_s,
        ],
    );
    assert_success(
        &out,
        "echoscu +tls with the certificate from pacsgate certs",
    );

    let echo = pyscu(&[
        "echo",
        "--port",
        &port_s,
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        p(&ca),
        "--tls-cert",
        p(&cert),
        "--tls-key",
        p(&key),
    ]);
    assert_eq!(echo["statuses"], json!([0]), "{echo}");

    let out = pacsgate(
        &[
            "echo",
            "--ca",
            p(&ca),
            "--cert",
            p(&cert),
            "--key",
            p(&key),
            "--aec",
            "ARCHIVE",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    let text = assert_success(&out, "pacsgate echo with a client certificate");
    assert!(
        text.contains("identified by the client certificate"),
        "{text}"
    );

    // A certificate of the same CA whose name is no user: rejected 1/2/1.
    let (cert, key) = (certs.join("mallory.crt"), certs.join("mallory.key"));
    let out = pacsgate(
        &[
            "echo",
            "--ca",
            p(&ca),
            "--cert",
            p(&cert),
            "--key",
            p(&key),
            "--aec",
            "ARCHIVE",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(output_text(&out).contains("1/2/1"), "{}", output_text(&out));
}

#[test]
fn tokens_from_pacsgate_token_are_accepted_until_their_ttl() {
    let work = common::tempdir("token");
    let certs = work.path().join("certs");
    assert_success(
        &pacsgate(&["certs", "--out", p(&certs)], &[]),
        "pacsgate certs",
    );
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let gw = Gateway::start(
        port,
        &gateway_config(port, &certs, &pki.jwt_public_pem, orthanc.dicom_port),
    );
    let out = pacsgate(
        &[
            "token",
            "--key",
            p(&pki.jwt_private_pem),
            "--sub",
            "carol",
            "--roles",
            "reader",
            "--ttl",
            "3s",
        ],
        &[],
    );
    let minted = Instant::now();
    assert_success(&out, "pacsgate token");
    let token = stdout(&out).trim().to_string();
    let ca = certs.join("ca.crt");
    let port_s = port.to_string();
    let addr = format!("127.0.0.1:{port}");

    let echo = pyscu(&[
        "echo",
        "--port",
        &port_s,
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        p(&ca),
        "--jwt",
        &token,
    ]);
    assert_eq!(echo["statuses"], json!([0]), "{echo}");
    let out = pacsgate(
        &[
            "echo",
            "--ca",
            p(&ca),
            "--token-env",
            "PACSGATE_TEST_TOKEN",
            "--aec",
            "ARCHIVE",
            &addr,
        ],
        &[("PACSGATE_TEST_TOKEN", &token)],
    );
    assert_success(&out, "pacsgate echo with the token");
    assert!(
        minted.elapsed() < Duration::from_secs(3),
        "too slow to test a 3 s token: {:?}",
        minted.elapsed()
    );

    // After the ttl (leeway 0): rejected.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(minted.elapsed()));
    let late = pyscu(&[
        "echo",
        "--port",
        &port_s,
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        p(&ca),
        "--jwt",
        &token,
    ]);
    let r = &late["rejection"];
    assert_eq!(
        (
            r["result"].as_i64(),
            r["source"].as_i64(),
            r["reason"].as_i64()
        ),
        (Some(1), Some(2), Some(1)),
        "{late}"
    );
    let token_file = work.path().join("carol.jwt");
    std::fs::write(&token_file, format!("{token}\n")).expect("write");
    let out = pacsgate(
        &[
            "echo",
            "--ca",
            p(&ca),
            "--token-file",
            p(&token_file),
            "--aec",
            "ARCHIVE",
            &addr,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        gw.log().contains("user=\"carol\" method=\"jwt\""),
        "{}",
        gw.log()
    );
}

#[test]
fn probe_reports_open_for_a_bare_orthanc_and_closed_for_pacsgate_in_front_of_it() {
    let work = common::tempdir("probe");
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("probe-data");
    for f in make_instances(
        data.path(),
        &[
            ("PROBE1", "SECRET^PATIENT", 1),
            ("PROBE2", "HIDDEN^NAME", 1),
        ],
    ) {
        orthanc.upload(&std::fs::read(f).expect("read instance"));
    }
    let before = orthanc.instance_count();

    let bare = format!("127.0.0.1:{}", orthanc.dicom_port);
    let out = pacsgate(&["probe", &bare], &[]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "OPEN exits 3: {text}");
    let report = stdout(&out);
    assert!(report.starts_with("OPEN"), "{report}");
    assert!(
        report.contains("answers C-ECHO without credentials"),
        "{report}"
    );
    assert!(report.contains("returned 2 study matches"), "{report}");
    assert!(
        report.contains("accepts a made-up calling AE title"),
        "{report}"
    );
    assert!(report.contains("accepts any called AE title"), "{report}");
    assert!(report.contains("does not speak TLS"), "{report}");
    for secret in ["SECRET", "HIDDEN", "PROBE1", "PROBE2"] {
        assert!(!text.contains(secret), "patient data printed: {text}");
    }
    assert_eq!(
        orthanc.instance_count(),
        before,
        "the probe changed nothing"
    );

    // pacsgate in front of the same Orthanc: closed, with and without the CA and the AE title.
    let certs = work.path().join("certs");
    assert_success(
        &pacsgate(&["certs", "--out", p(&certs)], &[]),
        "pacsgate certs",
    );
    let pki = Pki::generate();
    let port = free_port();
    let _gw = Gateway::start(
        port,
        &gateway_config(port, &certs, &pki.jwt_public_pem, orthanc.dicom_port),
    );
    let addr = format!("127.0.0.1:{port}");
    let ca = certs.join("ca.crt");
    for args in [
        vec!["probe", addr.as_str()],
        vec![
            "probe",
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            p(&ca),
            addr.as_str(),
        ],
    ] {
        let out = pacsgate(&args, &[]);
        let report = stdout(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "CLOSED exits 0: {}",
            output_text(&out)
        );
        assert!(report.starts_with("CLOSED"), "{report}");
        assert!(report.contains("this port expects TLS"), "{report}");
        assert!(report.contains("speaks TLS 1.3"), "{report}");
        if args.contains(&"ARCHIVE") {
            assert!(report.contains("A-ASSOCIATE-RJ 1/2/1"), "{report}");
            assert!(
                report.contains(&format!("verified against {}", ca.display())),
                "{report}"
            );
        }
    }
    let help = stdout(&pacsgate(&["probe", "--help"], &[]));
    assert!(
        help.contains("ONLY RUN THIS AGAINST SYSTEMS YOU ARE RESPONSIBLE FOR"),
        "{help}"
    );
}

#[test]
fn find_prints_json_and_readable_matches_from_a_plain_archive() {
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("find-data");
    for f in make_instances(
        data.path(),
        &[("FIND1", "DOE^JANE", 2), ("FIND2", "ROE^RICHARD", 1)],
    ) {
        orthanc.upload(&std::fs::read(f).expect("read instance"));
    }
    let addr = format!("127.0.0.1:{}", orthanc.dicom_port);
    let out = pacsgate(
        &[
            "find",
            "--plain",
            "--aec",
            "ORTHANC",
            "--json",
            "-k",
            "PatientName=DOE*",
            "-k",
            "PatientID",
            "-k",
            "0020,000D",
            &addr,
        ],
        &[],
    );
    assert_success(&out, "pacsgate find --json");
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON on stdout only");
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["matches"][0]["PatientID"], "FIND1", "{v}");
    assert!(
        v["matches"][0]["StudyInstanceUID"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{v}"
    );

    let out = pacsgate(
        &[
            "find",
            "--plain",
            "--aec",
            "ORTHANC",
            "--patient-root",
            "--level",
            "PATIENT",
            "-k",
            "PatientName",
            "-k",
            "PatientID",
            &addr,
        ],
        &[],
    );
    let text = assert_success(&out, "pacsgate find, patient root");
    assert!(
        text.contains("ROE^RICHARD") && text.contains("C-FIND: 2 matches"),
        "{text}"
    );

    // Usage errors name the problem; a password is never taken from the command line.
    let out = pacsgate(&["find", "--plain", "-k", "PatientNmae=X", &addr], &[]);
    assert!(
        !out.status.success() && output_text(&out).contains("PatientNmae"),
        "{}",
        output_text(&out)
    );
    let out = pacsgate(&["echo", "--plain", "--user", "alice", &addr], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--user with --plain is a usage error: {}",
        output_text(&out)
    );
}
