//! `pacsgate connect` with real peers: DCMTK findscu, getscu and movescu (no TLS, no identity) through
//! connect's loopback port, the gateway over TLS, and Orthanc behind it; move-as-get into DCMTK
//! storescp; rejections (wrong password, expired token, a gateway certificate from another CA).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";
const ISSUER: &str = "https://idp.test";

/// A gateway in front of `archive_port` (ARCHIVE -> ORTHANC): user clinician (password) and JWTs
/// from the test key, with a role that may echo, find and get, but not move.
fn gateway(pki: &Pki, archive_port: u16) -> Gateway {
    gateway_with(pki, archive_port, "")
}

/// [`gateway`] with extra TOML (e.g. a `[timeouts]` section).
fn gateway_with(pki: &Pki, archive_port: u16, extra: &str) -> Gateway {
    let out = Gateway::run_command(&["hash-password"], Some(PASSWORD));
    assert!(out.status.success(), "hash-password: {}", output_text(&out));
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let port = free_port();
    let config = format!(
        r#"
[gateway]
listen = "127.0.0.1:{port}"

[tls]
certificate = "{cert}"
private_key = "{key}"

[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:{archive_port}"
ae_title = "ORTHANC"

[auth.jwt]
issuer = "{ISSUER}"
audience = "pacsgate"
public_key = "{jwt}"
algorithms = ["ES256"]

[[role]]
name = "clinician"
allow = ["echo", "find", "get"]
unrestricted_queries = true

[[user]]
name = "clinician"
password_hash = "{hash}"
roles = ["clinician"]

{extra}
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        jwt = pki.jwt_public_pem.display(),
    );
    Gateway::start(port, &config)
}

/// A running `pacsgate connect` child process on a free loopback port; killed on drop.
struct Connect {
    port: u16,
    proc: Spawned,
    _dir: tempfile::TempDir,
}

impl Connect {
    /// Starts `pacsgate connect --gateway 127.0.0.1:GW --listen 127.0.0.1:PORT ARGS...` with `env`,
    /// and waits (≤ 20 s) until it listens.
    fn start(gateway_port: u16, args: &[&str], env: &[(&str, &str)]) -> Connect {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = common::tempdir("connect");
            let port = free_port();
            let mut cmd = Command::new(common::gateway::BIN);
            cmd.arg("connect")
                .args(["--gateway", &format!("127.0.0.1:{gateway_port}")])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(args)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .current_dir(dir.path());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut proc = Spawned::spawn(cmd, &dir.path().join("connect.log"));
            match proc.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return Connect {
                        port,
                        proc,
                        _dir: dir,
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("pacsgate connect did not start: {last}");
    }

    fn port(&self) -> String {
        self.port.to_string()
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    /// Polls the log (≤ `timeout`) until it contains every needle; returns the log.
    fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if needles.iter().all(|n| log.contains(n)) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- pacsgate connect log -----\n{}\n----- end -----",
                self.log()
            );
        }
    }
}

/// The data sets of the DICOM files in `dir` (file meta group stripped), sorted.
fn data_sets_in(dir: &Path) -> Vec<Vec<u8>> {
    let mut sets: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<PathBuf>>())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| b.len() >= 144 && &b[128..132] == b"DICM")
        .map(|b| dataset_bytes(&b).to_vec())
        .collect();
    sets.sort();
    sets
}

/// The data sets Orthanc holds for `study`, keyed by SOP Instance UID.
fn archived(orthanc: &Orthanc, study: &str) -> BTreeMap<String, Vec<u8>> {
    orthanc
        .instance_ids()
        .into_iter()
        .filter_map(|id| {
            let tags = orthanc.get_json(&format!("/instances/{id}/simplified-tags"));
            (tags["StudyInstanceUID"] == json!(study)).then(|| {
                let file = orthanc.instance_file(&id);
                (
                    tags["SOPInstanceUID"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    dataset_bytes(&file).to_vec(),
                )
            })
        })
        .collect()
}

fn findscu(port: &str, aec: &str, out: &Path) -> String {
    let out_dir = out.to_str().expect("path");
    let result = dcmtk(
        "findscu",
        &[
            "-S",
            "-aec",
            aec,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=*",
            "-k",
            "PatientID",
            "-k",
            "StudyInstanceUID",
            "-k",
            "StudyDescription",
            "-X",
            "-od",
            out_dir,
            "127.0.0.1",
            port,
        ],
    );
    assert_success(&result, "findscu")
}

#[test]
fn dcmtk_find_get_and_move_as_get_through_connect_match_the_archive() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("connect-data");
    let made = make_instances_with_uids(
        data.path(),
        &[("CONN1", "CONNECT^ONE", 3), ("CONN2", "CONNECT^TWO", 2)],
    );
    for i in &made {
        orthanc.upload(&std::fs::read(&i.path).expect("read instance"));
    }
    let study = made[0].study_uid.clone();
    let gw = gateway(&pki, orthanc.dicom_port);
    let viewer = StoreScp::start("VIEWER");
    let store = format!("VIEWER@127.0.0.1:{}", viewer.port);
    let connect = Connect::start(
        gw.port(),
        &[
            "--ca",
            pki.ca_cert.to_str().expect("path"),
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
            "--move-as-get",
            "--local-store",
            &store,
        ],
        &[("CONNECT_TEST_PW", PASSWORD)],
    );
    let port = connect.port();

    // C-FIND: what findscu gets through connect equals what Orthanc answers directly.
    let direct_dir = common::tempdir("find-direct");
    let tunnel_dir = common::tempdir("find-connect");
    findscu(
        &orthanc.dicom_port.to_string(),
        "ORTHANC",
        direct_dir.path(),
    );
    findscu(&port, "ARCHIVE", tunnel_dir.path());
    let direct = data_sets_in(direct_dir.path());
    assert_eq!(direct.len(), 2, "two studies in the archive");
    // The gateway answers RetrieveAETitle (0008,0054) with the AE title the client called (issue 15
    // item 15): Orthanc's "ORTHANC" becomes "ARCHIVE" (same length); the rest is byte for byte.
    let (theirs, ours) = (
        &b"\x08\x00\x54\x00AE\x08\x00ORTHANC "[..],
        &b"\x08\x00\x54\x00AE\x08\x00ARCHIVE "[..],
    );
    let mut expected: Vec<Vec<u8>> = direct
        .iter()
        .map(|set| {
            let at = set
                .windows(theirs.len())
                .position(|w| w == theirs)
                .expect("Orthanc answers RetrieveAETitle ORTHANC");
            let mut set = set.clone();
            set[at..at + ours.len()].copy_from_slice(ours);
            set
        })
        .collect();
    expected.sort();
    assert_eq!(
        data_sets_in(tunnel_dir.path()),
        expected,
        "C-FIND through connect differs from the archive's own answer"
    );

    // C-GET of one study: the received data sets are the archived ones, byte for byte.
    let archive = archived(&orthanc, &study);
    assert_eq!(archive.len(), 3);
    let get_dir = common::tempdir("getscu");
    let out = dcmtk(
        "getscu",
        &[
            "-S",
            "-aec",
            "ARCHIVE",
            "+B",
            "-od",
            get_dir.path().to_str().expect("path"),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={study}"),
            "127.0.0.1",
            &port,
        ],
    );
    assert_success(&out, "getscu through connect");
    let mut expected: Vec<Vec<u8>> = archive.values().cloned().collect();
    expected.sort();
    assert_eq!(
        data_sets_in(get_dir.path()),
        expected,
        "getscu's files differ from the archive"
    );

    // C-MOVE to the viewer's own storage SCP: performed as a C-GET, delivered to storescp.
    let out = dcmtk(
        "movescu",
        &[
            "-S",
            "-aec",
            "ARCHIVE",
            "-aem",
            "VIEWER",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={study}"),
            "127.0.0.1",
            &port,
        ],
    );
    let text = assert_success(&out, "movescu through connect");
    assert!(!text.contains("Failed"), "{text}");
    assert_eq!(
        data_sets_in(viewer.dir.path()),
        expected,
        "storescp's files differ from the archive:\n{}",
        viewer.log()
    );
    let log = connect.wait_for_log(&["move-as-get finished"], Duration::from_secs(5));
    assert!(
        log.contains("move-as-get finished") && log.contains("completed=3"),
        "{log}"
    );
    assert!(
        log.contains("destination=VIEWER@127.0.0.1") && log.contains(&study),
        "{log}"
    );
    // The gateway saw a C-GET, never a C-MOVE (the role has no `move`).
    let gw_log = gw.log();
    assert!(gw_log.contains("op=\"get\""), "{gw_log}");
    assert!(!gw_log.contains("op=\"move\""), "{gw_log}");
    assert!(!log.contains(PASSWORD) && !gw_log.contains(PASSWORD));
}

fn echoscu(port: &str) -> String {
    let out = dcmtk("echoscu", &["-aec", "ARCHIVE", "127.0.0.1", port]);
    let text = output_text(&out);
    assert!(!out.status.success(), "echoscu succeeded:\n{text}");
    text
}

fn token(pki: &Pki, exp_offset: i64) -> String {
    let now = now() as i64;
    mint_jwt(
        &pki.jwt_private_pem,
        &json!({"iss": ISSUER, "aud": "pacsgate", "sub": "carol", "exp": now + exp_offset,
                "nbf": now - 120, "iat": now - 120, "roles": ["clinician"]}),
    )
}

#[test]
fn rejections_reach_the_local_client_and_connect_says_why() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let gw = gateway(&pki, orthanc.dicom_port);
    let ca = pki.ca_cert.to_str().expect("path");

    // A wrong password: the gateway's 1/2/1 reaches echoscu unchanged; connect's log explains it.
    let wrong = Connect::start(
        gw.port(),
        &[
            "--ca",
            ca,
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
        ],
        &[("CONNECT_TEST_PW", "not the password")],
    );
    let text = echoscu(&wrong.port());
    assert!(text.contains("Association Rejected"), "{text}");
    let log = wrong.wait_for_log(&["gateway rejected"], Duration::from_secs(5));
    assert!(
        log.contains("gateway rejected the association: rejected permanently")
            && log.contains("(1/2/1)")
            && log.contains("credentials"),
        "{log}"
    );
    assert!(!log.contains("not the password"), "{log}");

    // An expired token: rejected, and connect names the expiry. A fresh token in the same file
    // is picked up by the next association without a restart.
    let dir = common::tempdir("connect-token");
    let token_file = dir.path().join("token.jwt");
    std::fs::write(&token_file, token(&pki, -600)).expect("write token");
    let expired = Connect::start(
        gw.port(),
        &[
            "--ca",
            ca,
            "--token-file",
            token_file.to_str().expect("path"),
        ],
        &[],
    );
    let text = echoscu(&expired.port());
    assert!(text.contains("Association Rejected"), "{text}");
    let log = expired.wait_for_log(&["expired"], Duration::from_secs(5));
    assert!(
        log.contains("(1/2/1)") && log.contains("expired") && log.contains("refresh it"),
        "{log}"
    );
    std::fs::write(&token_file, token(&pki, 600)).expect("write token");
    let out = dcmtk(
        "echoscu",
        &["-aec", "ARCHIVE", "127.0.0.1", &expired.port()],
    );
    assert_success(&out, "echoscu with a refreshed token");
    let log = expired.wait_for_log(&["token file changed"], Duration::from_secs(5));
    assert!(log.contains("token file changed"), "{log}");

    // A gateway certificate from another CA: connect refuses to relay, the client is rejected,
    // and no credential ever left the machine.
    let stranger = Connect::start(
        gw.port(),
        &[
            "--ca",
            pki.other_ca_cert.to_str().expect("path"),
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
        ],
        &[("CONNECT_TEST_PW", PASSWORD)],
    );
    let text = echoscu(&stranger.port());
    assert!(
        text.contains("Association Rejected") || text.contains("Association Aborted"),
        "{text}"
    );
    let log = stranger.wait_for_log(&["does not verify"], Duration::from_secs(5));
    assert!(
        log.contains("the gateway's certificate does not verify against --ca")
            && log.contains("UnknownIssuer"),
        "{log}"
    );
    let gw_log = gw.log();
    assert!(gw_log.contains("tls_failed"), "{gw_log}");
}

#[test]
fn connect_refuses_to_listen_beyond_loopback_without_the_flag() {
    let out = Gateway::run_command(
        &[
            "connect",
            "--gateway",
            "127.0.0.1:1",
            "--user",
            "u",
            "--password-env",
            "CONNECT_TEST_UNSET",
            "--listen",
            "0.0.0.0:1",
        ],
        None,
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not a loopback address") && text.contains("--allow-remote"),
        "{text}"
    );
}

/// DCMTK storescp that sleeps a second after each instance: a slow viewer. Killed on drop.
struct SlowStoreScp {
    port: u16,
    dir: tempfile::TempDir,
    _proc: Spawned,
    _log: tempfile::TempDir,
}

impl SlowStoreScp {
    fn start(aet: &str) -> SlowStoreScp {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = common::tempdir("slow-storescp");
            let log = common::tempdir("slow-storescp-log");
            let port = free_port();
            let mut cmd = Command::new("/usr/bin/storescp");
            cmd.env("TCP_NODELAY", "1")
                .args(["-aet", aet, "--sleep-after", "1", "+B", "-od"])
                .arg(dir.path())
                .arg(port.to_string());
            let mut proc = Spawned::spawn(cmd, &log.path().join("storescp.log"));
            match proc.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return SlowStoreScp {
                        port,
                        dir,
                        _proc: proc,
                        _log: log,
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("storescp did not start: {last}");
    }
}

#[test]
fn keepalives_carry_a_slow_move_as_get_past_the_gateways_idle_timeout() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("connect-slow");
    let made = make_instances_with_uids(data.path(), &[("SLOW1", "SLOW^VIEWER", 3)]);
    for i in &made {
        orthanc.upload(&std::fs::read(&i.path).expect("read instance"));
    }
    let study = made[0].study_uid.clone();
    // The gateway aborts an association after 1.5 s without a PDU; the viewer takes 3 s.
    let gw = gateway_with(&pki, orthanc.dicom_port, "[timeouts]\nidle = 1.5\n");
    let viewer = SlowStoreScp::start("VIEWER");
    let store = format!("VIEWER@127.0.0.1:{}", viewer.port);
    let ca = pki.ca_cert.to_str().expect("path");
    let movescu = |port: &str| {
        dcmtk(
            "movescu",
            &[
                "-S",
                "-aec",
                "ARCHIVE",
                "-aem",
                "VIEWER",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                &format!("StudyInstanceUID={study}"),
                "127.0.0.1",
                port,
            ],
        )
    };
    let args = |keepalive: &'static str| {
        vec![
            "--ca",
            ca,
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
            "--move-as-get",
            "--local-store",
            &store,
            "--keepalive",
            keepalive,
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<String>>()
    };

    let with = args("0.4");
    let with: Vec<&str> = with.iter().map(String::as_str).collect();
    let connect = Connect::start(gw.port(), &with, &[("CONNECT_TEST_PW", PASSWORD)]);
    let out = movescu(&connect.port());
    assert_success(&out, "movescu through connect with keep-alives");
    assert_eq!(data_sets_in(viewer.dir.path()).len(), 3);
    let log = connect.wait_for_log(&["move_as_get=true"], Duration::from_secs(5));
    assert!(
        log.contains("outcome=\"released\" reason=released"),
        "{log}"
    );

    // The same without keep-alives: the gateway idles the viewer's association out.
    let without = args("0");
    let without: Vec<&str> = without.iter().map(String::as_str).collect();
    let connect = Connect::start(gw.port(), &without, &[("CONNECT_TEST_PW", PASSWORD)]);
    let out = movescu(&connect.port());
    // movescu exits 0 even when its association is aborted: read what it says.
    let text = output_text(&out);
    assert!(text.contains("Peer aborted Association"), "{text}");
    assert!(
        gw.wait_for_log("idle timeout", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    let log = connect.wait_for_log(&["move-as-get failed"], Duration::from_secs(10));
    assert!(
        log.contains("the local client's association ended"),
        "{log}"
    );
}
