//! Operating the gateway with real peers: the audit trail, /metrics and /readyz, SIGHUP reload during a
//! transfer, and SIGTERM with a grace period.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A config with users `alice` (reader: echo+find) and `writer` (store); `extra` is appended.
fn config(port: u16, pki: &Pki, upstream_port: u16, extra: &str) -> String {
    let h = password_hash(PASSWORD);
    GatewayConfig::new(port)
        .tls(pki)
        .set("timeouts", "shutdown_grace = 20")
        .upstream("ARCHIVE", upstream_port, "ORTHANC")
        .role("reader", &["echo", "find"])
        .role("writer", &["echo", "store"])
        .user("alice", &h, &["reader"])
        .user("writer", &h, &["writer"])
        .raw(extra)
        .to_toml()
}

fn scu(cmd: &str, port: u16, pki: &Pki, user: &str, rest: &[&str]) -> Value {
    let port = port.to_string();
    let ca = pki.ca_cert.display().to_string();
    let mut args = vec![
        cmd,
        "--port",
        &port,
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        &ca,
        "--user",
        user,
        "--password",
        PASSWORD,
    ];
    args.extend_from_slice(rest);
    pyscu(&args)
}

/// `storescu` as the `writer` user, over TLS, of `files` on one association, in a thread.
fn store_in_background(
    port: u16,
    pki: &Pki,
    files: &[std::path::PathBuf],
) -> std::thread::JoinHandle<std::process::Output> {
    let files = files.to_vec();
    let ca = pki.ca_cert.clone();
    std::thread::spawn(move || {
        let port = port.to_string();
        let mut args = vec![
            "-aec",
            "ARCHIVE",
            "+tla",
            "+cf",
            ca.to_str().expect("p"),
            "-usr",
            "writer",
            "-pwd",
            PASSWORD,
            "127.0.0.1",
            &port,
        ];
        args.extend(files.iter().map(|f| f.to_str().expect("p")));
        dcmtk("storescu", &args)
    })
}

fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut r) => {
            let status = r.status().as_u16();
            (status, r.body_mut().read_to_string().unwrap_or_default())
        }
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// Samples of the Prometheus text, parsed by prometheus_client (Python).
fn prometheus(text: &str) -> Vec<Value> {
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("prom_parse.py"));
    let out = run_bounded(&mut cmd, Some(text.as_bytes()), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "the exposition does not parse:\n{}\n{text}",
        output_text(&out)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("parser JSON")
}

fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum()
}

#[test]
fn the_audit_file_records_each_event_in_order_as_json_lines() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    let files = make_instances_with_uids(data.path(), &[("AUD1", "AUDIT^PATIENT", 1)]);
    orthanc.upload(&std::fs::read(&files[0].path).expect("read"));
    let audit_dir = common::tempdir("audit");
    let audit = audit_dir.path().join("audit.jsonl");
    let port = free_port();
    let extra = format!("[audit]\nfile = \"{}\"\n", audit.display());
    let _gw = Gateway::start(port, &config(port, &pki, orthanc.dicom_port, &extra));

    // 1. an accepted association with a C-FIND
    let out = scu(
        "find",
        port,
        &pki,
        "alice",
        &["-k", "PatientID=AUD1", "-k", "StudyInstanceUID="],
    );
    assert_eq!(out["statuses"], json!([0xFF00, 0]), "{out}");
    // 2. a failed login
    let out = pyscu(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        pki.ca_cert.to_str().expect("p"),
        "--user",
        "alice",
        "--password",
        "nope",
    ]);
    assert!(out["rejection"].is_object(), "{out}");
    // 3. a refused operation (alice may not store)
    let more = make_instances_with_uids(data.path(), &[("AUD2", "AUDIT^TWO", 1)]);
    let out = scu(
        "store",
        port,
        &pki,
        "alice",
        &[more[0].path.to_str().expect("p")],
    );
    assert_eq!(out["statuses"], json!([0x0124]), "{out}");
    // 4. a C-STORE
    let out = scu(
        "store",
        port,
        &pki,
        "writer",
        &[more[0].path.to_str().expect("p")],
    );
    assert_eq!(out["statuses"], json!([0]), "{out}");

    let text = std::fs::read_to_string(&audit).expect("audit file");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // The first line is the gateway's own start (DICOM Application Start), then the associations.
    assert_eq!(
        events.first().map(|e| &e["event"]),
        Some(&json!("started")),
        "{text}"
    );
    let events = &events[1..];
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let expected = [
        "association.accepted",
        "find",
        "association.ended",
        "login.failed",
        "association.rejected",
        "association.accepted",
        "refused",
        "association.ended",
        "association.accepted",
        "store",
        "association.ended",
    ];
    assert_eq!(names, expected, "{text}");
    let find = &events[1];
    assert_eq!(find["user"], "alice");
    assert_eq!(find["query"]["PatientID"], "AUD1", "{find}");
    assert_eq!(find["matches"], 1);
    assert_eq!(find["status"], "0x0000");
    assert_eq!(events[3]["user"], "alice");
    assert!(
        events[3]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("wrong password"))
    );
    assert_eq!(events[6]["rule"], "not_authorized");
    assert_eq!(events[6]["op"], "store");
    let store = &events[9];
    assert_eq!(store["user"], "writer");
    assert_eq!(store["sop_instance_uid"], json!(more[0].sop_uid));
    assert!(
        store["bytes"].as_u64().is_some_and(|b| b > 30_000),
        "{store}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["time"].is_string() && e["peer"].is_string())
    );
    assert!(
        !text.contains(PASSWORD) && !text.contains("nope"),
        "a password is in the audit trail"
    );
}

#[test]
fn metrics_move_with_traffic_and_readiness_follows_the_archive() {
    let pki = Pki::generate();
    // The "archive" is a listener this test opens and closes: readiness only needs a TCP answer,
    // and the echo goes to a real pynetdicom archive on a second upstream.
    let archive = PyArchive::start("PYARCHIVE");
    let fake = TcpListener::bind("127.0.0.1:0").expect("bind");
    let fake_port = fake.local_addr().expect("addr").port();
    let port = free_port();
    let admin = free_port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[upstream]]\ncalled_ae = \"PY\"\naddress = \"127.0.0.1:{}\"\nae_title = \"PYARCHIVE\"\n",
        archive.port
    );
    let mut gw = Gateway::start(port, &config(port, &pki, fake_port, &extra));
    gw.wait_listening(admin);
    let base = format!("http://127.0.0.1:{admin}");
    assert_eq!(http_get(&format!("{base}/healthz")).0, 200);
    assert_eq!(http_get(&format!("{base}/readyz")).0, 200);

    let before = prometheus(&http_get(&format!("{base}/metrics")).1);
    let echo = |user: &str, password: &str| {
        pyscu(&[
            "echo",
            "--port",
            &port.to_string(),
            "--aec",
            "PY",
            "--tls-ca",
            pki.ca_cert.to_str().expect("p"),
            "--user",
            user,
            "--password",
            password,
        ])
    };
    assert_eq!(echo("alice", PASSWORD)["statuses"], json!([0]));
    assert!(echo("alice", "wrong")["rejection"].is_object());
    let after = prometheus(&http_get(&format!("{base}/metrics")).1);
    let released =
        |s: &[Value]| sample(s, "pacsgate_associations_total", &[("outcome", "released")]);
    let rejected = |s: &[Value]| {
        sample(
            s,
            "pacsgate_associations_total",
            &[("outcome", "rejected"), ("reason", "not_authenticated")],
        )
    };
    let echoes = |s: &[Value]| {
        sample(
            s,
            "pacsgate_operations_total",
            &[("op", "echo"), ("status", "success")],
        )
    };
    assert_eq!(released(&after) - released(&before), 1.0);
    assert_eq!(rejected(&after) - rejected(&before), 1.0);
    assert_eq!(echoes(&after) - echoes(&before), 1.0);
    assert!(
        sample(
            &after,
            "pacsgate_bytes_total",
            &[("direction", "from_client")]
        ) > 0.0
    );
    assert!(sample(&after, "pacsgate_association_setup_seconds_count", &[]) >= 1.0);

    // The archive goes away: not ready within a check interval or two (/readyz answers from a
    // cached check), the answer names nothing, the log names the archive. It comes back: ready again.
    drop(fake);
    let until = |want: u16| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = http_get(&format!("{base}/readyz"));
            if status == want {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz never {want}: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(until(503), "not ready\n");
    assert!(
        gw.log()
            .lines()
            .any(|l| l.contains("readiness: not ready") && l.contains("ARCHIVE")),
        "{}",
        gw.log()
    );
    let _back = TcpListener::bind(("127.0.0.1", fake_port)).expect("rebind the archive port");
    assert_eq!(until(200), "ready\n");
}

#[test]
fn sighup_adds_a_user_without_dropping_a_transfer_and_a_broken_config_keeps_the_old() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let base = config(port, &pki, orthanc.dicom_port, "");
    let gw = Gateway::start(port, &base);
    let data = common::tempdir("large");
    let large: Vec<std::path::PathBuf> = (0..3)
        .map(|_| make_large_instance(data.path(), 50))
        .collect();

    // The new file is made first: hashing its password (argon2, a debug build) takes seconds, in which
    // the transfer could finish before the reload.
    let newcomer = format!(
        "{base}\n[[user]]\nname = \"newcomer\"\npassword_hash = \"{}\"\nroles = [\"reader\"]\n",
        password_hash(PASSWORD)
    );
    let transfer = store_in_background(port, &pki, &large);
    // Wait until the transfer is under way (its association is accepted), then reload.
    assert!(
        gw.wait_for_log("association accepted", Duration::from_secs(20)),
        "{}",
        gw.log()
    );
    std::fs::write(gw.config_path(), &newcomer).expect("write config");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let out = scu("echo", port, &pki, "newcomer", &[]);
    assert_eq!(out["statuses"], json!([0]), "the new user: {out}");

    let out = transfer.join().expect("storescu thread");
    assert_success(&out, "storescu across the reload");
    let log = gw.log();
    let reloaded = log.find("configuration reloaded").expect("reload line");
    let ended = log
        .find("user=\"writer\" method=")
        .expect("transfer's association line");
    assert!(
        reloaded < ended,
        "the reload happened while the transfer ran:\n{log}"
    );
    assert_eq!(orthanc.instance_count(), 3);
    for f in &large {
        let original = std::fs::read(f).expect("read");
        let uid = {
            // The stored copy with the same data set.
            orthanc
                .instance_ids()
                .into_iter()
                .map(|id| orthanc.instance_file(&id))
                .find(|s| dataset_bytes(s) == dataset_bytes(&original))
        };
        assert!(
            uid.is_some(),
            "{} was not stored byte-identical",
            f.display()
        );
    }

    // A broken configuration is refused; the old one (with newcomer) stays in force.
    std::fs::write(
        gw.config_path(),
        newcomer.replace("[gateway]", "[gateway]\nbogus_key = 1"),
    )
    .expect("write");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reload refused", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("bogus_key"), "the log names the bad key");
    assert_eq!(
        scu("echo", port, &pki, "newcomer", &[])["statuses"],
        json!([0])
    );
}

#[test]
fn sigterm_lets_a_transfer_finish_refuses_new_connections_and_exits_0() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let mut gw = Gateway::start(port, &config(port, &pki, orthanc.dicom_port, ""));
    let data = common::tempdir("large");
    let large: Vec<std::path::PathBuf> = (0..3)
        .map(|_| make_large_instance(data.path(), 50))
        .collect();
    let transfer = store_in_background(port, &pki, &large);
    assert!(
        gw.wait_for_log("association accepted", Duration::from_secs(20)),
        "{}",
        gw.log()
    );
    let stop_sent = Instant::now();
    gw.signal("TERM");
    assert!(
        gw.wait_for_log("shutting down: no new associations", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    // New connections are refused while the transfer finishes.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener still accepts"
    );
    let out = transfer.join().expect("storescu thread");
    assert_success(&out, "storescu during shutdown");
    let status = gw
        .terminate(Duration::from_secs(25))
        .expect("the gateway exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(stop_sent.elapsed() < Duration::from_secs(25));
    assert_eq!(orthanc.instance_count(), 3);
    let log = gw.log();
    assert!(
        log.contains("outcome=\"released\"") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn sigterm_aborts_what_is_left_after_the_grace_period() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    let text =
        config(port, &pki, archive.port, "").replace("shutdown_grace = 20", "shutdown_grace = 1");
    let mut gw = Gateway::start(port, &text);
    // An association that stays open doing nothing (a viewer left connected).
    let idle = {
        let ca = pki.ca_cert.clone();
        std::thread::spawn(move || {
            let port = port.to_string();
            // find --repeat with a long pause is not available; an echo script that sleeps is: use
            // pynetdicom's network timeout to hold the association for up to 30 s.
            pyscu(&[
                "find",
                "--port",
                &port,
                "--aec",
                "ARCHIVE",
                "--tls-ca",
                ca.to_str().expect("p"),
                "--user",
                "alice",
                "--password",
                PASSWORD,
                "-k",
                "PatientID=X",
                "--repeat",
                "100000",
                "--timeout",
                "30",
            ])
        })
    };
    assert!(
        gw.wait_for_log("association accepted", Duration::from_secs(20)),
        "{}",
        gw.log()
    );
    gw.signal("TERM");
    let status = gw
        .terminate(Duration::from_secs(15))
        .expect("the gateway exits");
    assert!(status.success(), "exit status {status:?}");
    let out = idle.join().expect("client thread");
    assert!(
        out["aborted"] == json!(true)
            || out["queries"].as_array().is_some_and(|q| q.len() < 100_000),
        "{out}"
    );
    assert!(gw.log().contains("grace period over"), "{}", gw.log());
}

#[test]
fn audit_events_also_go_to_syslog_as_dicom_audit_messages() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP collector");
    collector
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let port = free_port();
    let extra = format!(
        "[audit]\nsyslog = \"udp://{}\"\n",
        collector.local_addr().expect("addr")
    );
    let _gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    let out = pyscu(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        pki.ca_cert.to_str().expect("p"),
        "--user",
        "alice",
        "--password",
        "wrong",
    ]);
    assert!(out["rejection"].is_object(), "{out}");
    let mut buf = vec![0u8; 65536];
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !messages.iter().any(|m: &String| m.contains("110114")) {
        match collector.recv(&mut buf) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    let login = messages
        .iter()
        .find(|m| m.contains("csd-code=\"110114\""))
        .unwrap_or_else(|| panic!("no User Authentication message: {messages:?}"));
    assert!(login.starts_with("<85>1 "), "RFC 5424 header: {login}");
    assert!(
        login.contains("<AuditMessage>") && login.contains("EventOutcomeIndicator=\"4\""),
        "{login}"
    );
    assert!(login.contains("UserID=\"alice\""), "{login}");
    assert!(
        !login.contains("wrong"),
        "the password is in the syslog message"
    );
}

// ---------------------------------------------------------------------------------------------
// Reload: what survives it, what listeners do; client certificates; what the loader refuses.
// ---------------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A C-ECHO through the gateway from `source` (a loopback address) as `user`.
fn echo_from(source: &str, port: u16, pki: &Pki, user: &str, password: &str) -> Value {
    pyscu(&[
        "echo",
        "--bind",
        source,
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        pki.ca_cert.to_str().expect("p"),
        "--user",
        user,
        "--password",
        password,
    ])
}

fn rejection_of(v: &Value) -> Option<(i64, i64, i64)> {
    let r = &v["rejection"];
    r.is_object().then(|| {
        (
            r["result"].as_i64().unwrap_or(-1),
            r["source"].as_i64().unwrap_or(-1),
            r["reason"].as_i64().unwrap_or(-1),
        )
    })
}

/// Reload with `text` as the configuration and wait for the outcome line (`reloaded` or `refused`),
/// the `n`-th of its kind.
fn reload(gw: &Gateway, text: &str, outcome: &str, n: usize) {
    std::fs::write(gw.config_path(), text).expect("write config");
    gw.signal("HUP");
    let line = match outcome {
        "reloaded" => "configuration reloaded",
        _ => "configuration reload refused",
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.log().matches(line).count() < n {
        assert!(Instant::now() < deadline, "no {line:?} #{n}:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_that_changes_limits_keeps_lockouts_rate_buckets_and_open_associations() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    // A burst of 3 associations per address that refills one a minute (or, after the reload, one
    // every 30 s): slow enough that no cell comes back while the test runs.
    let limits = |per_minute: u32, lockout: u32| {
        format!(
            "[limits]\nfailed_logins = 1\nlockout_seconds = {lockout}\nassociations_per_minute = {per_minute}\nassociations_burst = 3\nmax_associations_per_user = 1\nqueries_per_minute = {}\n",
            per_minute * 60
        )
    };
    let base = config(port, &pki, archive.port, &limits(1, 900));
    let gw = Gateway::start(port, &base);

    // One association of `writer` stays open (its user's only slot), from 127.0.0.1.
    let rt = runtime();
    let held = rt.block_on(async {
        use pacsgate::tools::client;
        let tls = client::TlsClient::new(&pki.ca_cert, None, "localhost").expect("TLS client");
        let timeout = Duration::from_secs(20);
        let conn = client::connect(&format!("127.0.0.1:{port}"), Some(&tls), timeout)
            .await
            .expect("connect");
        let request = client::Request {
            calling_ae: "HOLDER".into(),
            called_ae: "ARCHIVE".into(),
            identity: client::Identity::Password {
                user: "writer".into(),
                password: PASSWORD.into(),
            },
            abstract_syntaxes: vec!["1.2.840.10008.1.1"],
            timeout,
        };
        client::associate(conn, &request)
            .await
            .expect("writer's association")
    });

    // alice is locked out at 127.0.0.3 (one failure is enough here); 127.0.0.4 has used its
    // burst of associations. Each address stays within that burst otherwise.
    assert_eq!(
        rejection_of(&echo_from("127.0.0.3", port, &pki, "alice", "wrong")),
        Some((1, 2, 1))
    );
    let locked = echo_from("127.0.0.3", port, &pki, "alice", PASSWORD);
    assert_eq!(rejection_of(&locked), Some((2, 3, 2)), "{locked}");
    for _ in 0..3 {
        let out = echo_from("127.0.0.4", port, &pki, "alice", PASSWORD);
        assert_eq!(out["statuses"], json!([0]), "{out}");
    }
    let over = echo_from("127.0.0.4", port, &pki, "alice", PASSWORD);
    assert_eq!(rejection_of(&over), Some((2, 3, 2)), "{over}");
    let full = echo_from("127.0.0.5", port, &pki, "writer", PASSWORD);
    assert_eq!(rejection_of(&full), Some((2, 3, 2)), "{full}");

    // Every rate, the lockout length: [limits] changes.
    reload(
        &gw,
        &config(port, &pki, archive.port, &limits(2, 600)),
        "reloaded",
        1,
    );
    let mark = gw.log().len();
    let locked = echo_from("127.0.0.3", port, &pki, "alice", PASSWORD);
    assert_eq!(
        rejection_of(&locked),
        Some((2, 3, 2)),
        "still locked: {locked}"
    );
    let over = echo_from("127.0.0.4", port, &pki, "alice", PASSWORD);
    assert_eq!(
        rejection_of(&over),
        Some((2, 3, 2)),
        "no fresh burst: {over}"
    );
    let full = echo_from("127.0.0.5", port, &pki, "writer", PASSWORD);
    assert_eq!(
        rejection_of(&full),
        Some((2, 3, 2)),
        "still counted: {full}"
    );
    let after = gw.log()[mark..].to_string();
    for reason in [
        "locked out after repeated failed logins",
        "associations_per_minute exceeded",
        "user at their limit of 1 associations",
    ] {
        assert!(
            after.contains(reason),
            "no {reason:?} after the reload:\n{after}"
        );
    }
    // The held association still works, and once it is released its slot is free again.
    rt.block_on(async {
        let mut held = held;
        assert_eq!(held.echo().await.expect("echo on the held association"), 0);
        held.release().await.expect("release");
    });
    let free = echo_from("127.0.0.5", port, &pki, "writer", PASSWORD);
    assert_eq!(free["statuses"], json!([0]), "{free}");
    assert!(gw.log().contains("limits_changed=true"), "{}", gw.log());
}

#[test]
fn sighup_opens_moves_and_closes_listeners_and_refuses_an_address_it_cannot_bind() {
    let pki = Pki::generate();
    let port = free_port();
    let [device, admin, web, ret, admin2, ret2, admin3] = [(); 7].map(|_| free_port());
    let with = |gateway: &str, tail: &str| {
        config(port, &pki, 1, tail).replace(
            &format!("listen = \"127.0.0.1:{port}\"\n"),
            &format!("listen = \"127.0.0.1:{port}\"\n{gateway}"),
        )
    };
    let destination = "\n[[destination]]\nae_title = \"VIEWER\"\naddress = \"127.0.0.1:1\"\n";
    let first = with(
        &format!("device_listen = \"127.0.0.1:{device}\"\nreturn_listen = \"127.0.0.1:{ret}\"\n"),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:1\"\n{destination}"
        ),
    );
    let mut gw = Gateway::start(port, &first);
    for p in [device, admin, web, ret] {
        gw.wait_listening(p);
    }
    let pid = gw.pid();

    // Moved: admin and return path; removed: device listener and the DICOMweb door.
    let second = with(
        &format!("return_listen = \"127.0.0.1:{ret2}\"\n"),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin2}\"\n{destination}"),
    );
    reload(&gw, &second, "reloaded", 1);
    gw.wait_listening(admin2);
    gw.wait_listening(ret2);
    for (p, what) in [
        (device, "device"),
        (web, "http"),
        (admin, "old admin"),
        (ret, "old return"),
    ] {
        assert!(!is_listening(pid, p), "the {what} port {p} still listens");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "the {what} port {p} still accepts"
        );
    }
    assert!(is_listening(pid, port), "the TLS listener stays");
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{admin2}/healthz")).0,
        200
    );
    let log = gw.log();
    for line in [
        format!("listener=\"admin.listen\" from=127.0.0.1:{admin} to=127.0.0.1:{admin2}"),
        format!("listener=\"gateway.return_listen\" from=127.0.0.1:{ret} to=127.0.0.1:{ret2}"),
        format!("listener=\"gateway.device_listen\" address=127.0.0.1:{device}"),
        format!("listener=\"http.listen\" address=127.0.0.1:{web}"),
    ] {
        assert!(log.contains(&line), "no {line:?}:\n{log}");
    }
    assert!(!log.contains("listen addresses changed"), "{log}");

    // A new address that is taken: the whole reload is refused, naming the listener; nothing moves.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let third = with(
        &format!(
            "return_listen = \"127.0.0.1:{ret2}\"\ndevice_listen = \"127.0.0.1:{taken_port}\"\n"
        ),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin3}\"\n{destination}"),
    );
    reload(&gw, &third, "refused", 1);
    let log = gw.log();
    assert!(
        log.contains(&format!(
            "gateway.device_listen: cannot listen on 127.0.0.1:{taken_port}"
        )),
        "{log}"
    );
    assert!(
        is_listening(pid, admin2),
        "the admin listener stays where it was"
    );
    assert!(
        !is_listening(pid, admin3),
        "nothing of the refused file is in force"
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{admin2}/healthz")).0,
        200
    );
    drop(taken);
    assert!(gw.exited().is_none());
}

/// A CA of this test's own (the harness's keeps its key to itself), for client certificates and CRLs.
struct ClientCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl ClientCa {
    fn new() -> ClientCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = common::tempdir("client-ca");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "client CA for CRL tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign");
        let path = dir.path().join("client-ca.crt");
        std::fs::write(&path, cert.pem()).expect("write CA");
        ClientCa {
            issuer: rcgen::Issuer::new(params, key),
            cert: path,
            dir,
        }
    }

    /// A clientAuth certificate with subject CN `cn`, SAN DNS `san` and serial `serial`: (cert, key).
    fn client(&self, cn: &str, san: &str, serial: u64) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![san.to_string()]).expect("SAN");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial.into());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let c = self.dir.path().join(format!("{cn}.crt"));
        let k = self.dir.path().join(format!("{cn}.key"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c.display().to_string(), k.display().to_string())
    }

    /// A CRL (PEM) revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams};
        CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2090, 1, 1),
            crl_number: (serials.len() as u64 + 1).into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: (*s).into(),
                    revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .expect("sign CRL")
        .pem()
        .expect("CRL PEM")
    }
}

#[test]
fn client_certificates_pin_one_field_and_a_crl_reread_on_sighup_revokes_them_failing_closed() {
    let pki = Pki::generate();
    let ca = ClientCa::new();
    let archive = PyArchive::start("PYARCHIVE");
    let port = free_port();
    // alice's certificate names her in CN and SAN; mallory's CN is no user, but its SAN is "bob".
    let (alice_crt, alice_key) = ca.client("alice", "alice", 100);
    let (mallory_crt, mallory_key) = ca.client("mallory", "bob", 200);
    let crl = ca.dir.path().join("client.crl");
    std::fs::write(&crl, ca.crl(&[])).expect("write CRL");
    let text = |identity: &str| {
        config(
            port,
            &pki,
            archive.port,
            "\n[[user]]\nname = \"bob\"\nroles = [\"reader\"]\n",
        )
        .replace(
            "[timeouts]",
            &format!(
                "client_ca = \"{}\"\nclient_identity = \"{identity}\"\nclient_crl = [\"{}\"]\n\n[timeouts]",
                ca.cert.display(),
                crl.display()
            ),
        )
    };
    let gw = Gateway::start(port, &text("cn"));
    let echo = |crt: &str, key: &str| {
        pyscu(&[
            "echo",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            pki.ca_cert.to_str().expect("p"),
            "--tls-cert",
            crt,
            "--tls-key",
            key,
        ])
    };
    // Pinned to the CN: alice is alice; mallory's SAN does not make him bob.
    let out = echo(&alice_crt, &alice_key);
    assert_eq!(out["statuses"], json!([0]), "{out}");
    let out = echo(&mallory_crt, &mallory_key);
    assert_eq!(rejection_of(&out), Some((1, 2, 1)), "{out}");
    assert!(
        gw.log().contains("names no configured user (mallory)"),
        "{}",
        gw.log()
    );

    // Pinned to SAN DNS, and alice's certificate revoked: re-read on SIGHUP.
    std::fs::write(&crl, ca.crl(&[100])).expect("write CRL");
    reload(&gw, &text("san_dns"), "reloaded", 1);
    // With TLS 1.3 the client finishes its handshake before the server has judged its certificate:
    // it is connected, then told "certificate revoked", and never associated.
    let revoked = |out: &Value| {
        out["associated"] == json!(false)
            && out["statuses"] == json!([])
            && out["log"].to_string().contains("CERTIFICATE_REVOKED")
    };
    let out = echo(&alice_crt, &alice_key);
    assert!(revoked(&out), "revoked: {out}");
    assert!(gw.log().contains("Revoked"), "{}", gw.log());
    let out = echo(&mallory_crt, &mallory_key);
    assert_eq!(out["statuses"], json!([0]), "{out}");
    assert!(
        gw.log().contains("user=\"bob\" method=\"certificate\""),
        "{}",
        gw.log()
    );

    // A CRL that does not load refuses the reload (the last good one stays) and the start.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    )
    .expect("write CRL");
    reload(&gw, &text("san_dns"), "refused", 1);
    assert!(
        gw.log().contains(&format!("client CRL {}", crl.display())),
        "{}",
        gw.log()
    );
    let out = echo(&alice_crt, &alice_key);
    assert!(revoked(&out), "still revoked: {out}");
    let out = echo(&mallory_crt, &mallory_key);
    assert_eq!(out["statuses"], json!([0]), "{out}");
    std::fs::write(&crl, "").expect("empty CRL file");
    let check = Gateway::run_command(
        &["check", "--config", gw.config_path().to_str().expect("p")],
        None,
    );
    let text = output_text(&check);
    assert!(!check.status.success(), "{text}");
    assert!(
        text.contains(&format!("client CRL {} holds no X509 CRL", crl.display())),
        "{text}"
    );
}

#[test]
fn the_loader_refuses_a_device_open_to_every_address_and_a_long_jwt_leeway() {
    let pki = Pki::generate();
    let dir = common::tempdir("refused-configs");
    let base = config(2762, &pki, 1, "");
    let device = |addresses: &str| {
        format!(
            "{base}\n[[device]]\nae_title = \"CT1\"\naddresses = {addresses}\nroles = [\"reader\"]\n"
        )
    };
    let jwt = |leeway: u32| {
        base.replace(
            "[[upstream]]",
            &format!(
                "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\npublic_key = \"{}\"\nleeway = {leeway}\n\n[[upstream]]",
                pki.jwt_public_pem.display()
            ),
        )
    };
    let cases = [
        (device(r#"["0.0.0.0/0"]"#), "device[0].addresses"),
        (device(r#"["::/0"]"#), "device[0].addresses"),
        (device(r#"["0:0::0/0"]"#), "device[0].addresses"),
        (device(r#"["::ffff:0.0.0.0/96"]"#), "device[0].addresses"),
        (
            device(r#"["0.0.0.0/1", "128.0.0.0/1"]"#),
            "device[0].addresses",
        ),
        (jwt(3600), "auth.jwt.leeway"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        common::write_config(&path, text);
        let out = Gateway::run_command(&["check", "--config", path.to_str().expect("p")], None);
        let said = output_text(&out);
        assert!(!out.status.success(), "case {i}: {said}");
        assert!(said.contains(key), "case {i}: no {key} in {said}");
    }
    // Within the rules, the same keys load (check then fails only on the unreachable upstream).
    for (i, text) in [device(r#"["10.0.0.0/8", "fd00::/8"]"#), jwt(300)]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("fine{i}.toml"));
        common::write_config(&path, text);
        let out = Gateway::run_command(&["check", "--config", path.to_str().expect("p")], None);
        let said = output_text(&out);
        assert!(said.contains("parses and validates"), "fine {i}: {said}");
    }
}

#[test]
fn attacker_text_is_escaped_in_the_log() {
    let pki = Pki::generate();
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, 1, ""));
    let rt = runtime();
    let answer = rt.block_on(async {
        use pacsgate::tools::client;
        let tls = client::TlsClient::new(&pki.ca_cert, None, "localhost").expect("TLS client");
        let timeout = Duration::from_secs(20);
        let conn = client::connect(&format!("127.0.0.1:{port}"), Some(&tls), timeout)
            .await
            .expect("connect");
        let request = client::Request {
            calling_ae: "A\nFORGED LINE".into(),
            called_ae: "B\"\x1b[2J".into(),
            identity: client::Identity::None,
            abstract_syntaxes: vec!["1.2.840.10008.1.1"],
            timeout,
        };
        client::associate(conn, &request)
            .await
            .err()
            .map(|e| e.to_string())
    });
    assert!(
        answer.is_some_and(|a| a.contains("rejected")),
        "the called AE maps to nothing"
    );
    assert!(gw.wait_for_log(" association ", Duration::from_secs(5)));
    let log = gw.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a peer wrote a line of its own into the log:\n{log}"
    );
    assert!(!log.contains('\x1b'), "a terminal escape reached the log");
    assert!(
        log.contains(r#"calling_ae="A\nFORGED LINE" called_ae="B\"\u{1b}[2J""#),
        "{log}"
    );
}
