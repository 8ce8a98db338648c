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
    let port = free_port();
    let config = GatewayConfig::new(port)
        .tls(pki)
        .upstream("ARCHIVE", archive_port, "ORTHANC")
        .set("auth.jwt", &format!("issuer = \"{ISSUER}\""))
        .set("auth.jwt", "audience = \"pacsgate\"")
        .path("auth.jwt", "public_key", &pki.jwt_public_pem)
        .set("auth.jwt", "algorithms = [\"ES256\"]")
        .role_with(
            "clinician",
            &["echo", "find", "get"],
            &["unrestricted_queries = true"],
        )
        .user("clinician", &password_hash(PASSWORD), &["clinician"])
        .raw(extra)
        .to_toml();
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
        log.contains("outcome=\"released\" reason=\"released\""),
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

/// The second local user of the tests (created once, idempotent): its UID.
fn other_user() -> u32 {
    const NAME: &str = "pacsgate-test-other";
    let id = |name: &str| {
        Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(uid) = id(NAME) {
        return uid;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            NAME,
        ])
        .output()
        .expect("run useradd (the tests run as root)");
    // Another test may have created it meanwhile (exit 9: already exists).
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd: {}",
        output_text(&out)
    );
    id(NAME).expect("the test user exists")
}

/// `program ARGS...` run as the other local user (runuser), killed after 60 s.
fn as_other(program: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "pacsgate-test-other", "--", program])
        .args(args)
        .env("TCP_NODELAY", "1")
        .current_dir("/");
    run_bounded(&mut cmd, None, Duration::from_secs(60))
}

/// An A-ASSOCIATE-RQ for Verification over the Unix socket at `path`: "accepted" (then released),
/// "rejected R/S/REASON", or the error. `script` is where to write the client (readable by all).
fn unix_echo_association(script: &Path, path: &Path, other: bool) -> String {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/lib");
    std::fs::write(
        script,
        format!(
            r#"import socket, sys
sys.path.insert(0, {lib:?})
import dicom_ul as ul
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
    s.sendall(ul.associate_rq("ARCHIVE", "UNIXSCU", [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])], 16384))
    kind, body = ul.Reader(s).pdu()
except OSError as e:
    print("error", e)
    sys.exit(0)
if kind == 3:
    print("rejected %d/%d/%d" % (body[1], body[2], body[3]))
elif kind == 2:
    s.sendall(ul.pdu(5, bytes(4)))
    ul.Reader(s).pdu()
    print("accepted")
else:
    print("pdu", kind)
"#,
            lib = lib.display().to_string()
        ),
    )
    .expect("write the client");
    let args = [script.to_str().expect("path"), path.to_str().expect("path")];
    let out = if other {
        as_other("/usr/bin/python3", &args)
    } else {
        run_bounded(
            Command::new("/usr/bin/python3").args(args),
            None,
            Duration::from_secs(60),
        )
    };
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn connect_serves_only_the_user_who_started_it_unless_allow_user() {
    let other = other_user();
    let pki = Pki::generate();
    let archive = PyArchive::start("ORTHANC");
    let gw = gateway(&pki, archive.port);
    let ca = pki.ca_cert.to_str().expect("path");
    let shared = common::tempdir("connect-socket");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let socket = shared.path().join("connect.sock");
    let connect = Connect::start(
        gw.port(),
        &[
            "--ca",
            ca,
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
            "--socket",
            socket.to_str().expect("path"),
        ],
        &[("CONNECT_TEST_PW", PASSWORD)],
    );
    let port = connect.port();
    let find_args = [
        "-S",
        "-aec",
        "ARCHIVE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName=*",
        "127.0.0.1",
        &port,
    ];

    // Another local user, over TCP: rejected 1/1/1 by connect; neither gateway nor archive see it.
    for tool in ["/usr/bin/echoscu", "/usr/bin/findscu"] {
        let args: Vec<&str> = if tool.ends_with("echoscu") {
            vec!["-aec", "ARCHIVE", "127.0.0.1", &port]
        } else {
            find_args.to_vec()
        };
        let out = as_other(tool, &args);
        let text = output_text(&out);
        assert!(!out.status.success(), "{tool} as another user: {text}");
        assert!(
            text.contains("Association Rejected")
                && text.contains("Rejected Permanent")
                && text.contains("Service User")
                && text.contains("No Reason"),
            "{tool}: {text}"
        );
    }
    let log = connect.wait_for_log(&["refused_local_user"], Duration::from_secs(5));
    assert_eq!(log.matches("refused_local_user").count(), 2, "{log}");
    assert!(
        log.contains(&format!("local_uid={other} owner_uid=0")),
        "{log}"
    );
    assert!(log.contains("A-ASSOCIATE-RJ 1/1/1"), "{log}");
    assert!(archive.associations().is_empty(), "{:?}", archive.records());

    // The other user sends a whole association (RQ, C-ECHO, A-RELEASE-RQ) and closes at once, 20 times:
    // its end is then a TIME_WAIT/FIN_WAIT2 socket the kernel shows as UID 0 (the owner here). Unknown,
    // so refused; the archive sees nothing.
    let script = shared.path().join("send_and_close.py");
    std::fs::write(
        &script,
        format!(
            r#"import socket, sys
sys.path.insert(0, {lib:?})
import dicom_ul as ul
port = int(sys.argv[1])
rq = ul.associate_rq("ARCHIVE", "MALLORY", [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])], 16384)
cmd = ul.command([(0x0002, ul.ui("1.2.840.10008.1.1")), (0x0100, ul.us(0x30)), (0x0110, ul.us(1)), (0x0800, ul.us(0x0101))])
echo = ul.pdata(1, cmd, True, 16384)
rel = ul.pdu(5, bytes(4))
socks = []
for i in range(20):
    s = socket.socket(); s.connect(("127.0.0.1", port)); s.sendall(rq + echo + rel); socks.append(s)
for s in socks:
    s.close()
print("sent")
"#,
            lib = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("bench/lib")
                .display()
                .to_string()
        ),
    )
    .expect("write the client");
    let out = as_other("/usr/bin/python3", &[script.to_str().expect("path"), &port]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent",
        "{}",
        output_text(&out)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = connect.log();
        if log.matches("refused_local_user").count() >= 22 || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(log.matches("refused_local_user").count(), 22, "{log}");
    assert!(!log.contains("local_uid=Some"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("calling_ae=\"MALLORY\"") && !l.contains("refused_local_user")),
        "an orphaned socket was taken for the owner:\n{log}"
    );
    assert!(archive.associations().is_empty(), "{:?}", archive.records());
    eprintln!(
        "send-and-close: {} of 20 looked up after the close",
        log.matches("no longer held by a process").count()
    );
    assert!(
        !gw.log().contains("clinician"),
        "the gateway saw the clinician:\n{}",
        gw.log()
    );

    // The owner (root here), over TCP: accepted, the query reaches the archive, the log names the UID.
    let out = dcmtk("findscu", &find_args);
    assert_success(&out, "findscu as the owner");
    assert_eq!(archive.associations().len(), 1, "{:?}", archive.records());
    let log = connect.wait_for_log(&["local_uid=0"], Duration::from_secs(5));
    assert!(log.contains("local_uid=0 owner_uid=0"), "{log}");

    // The Unix socket: mode 0600; the owner is served, the other user cannot even connect.
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(&socket).expect("socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let script = shared.path().join("unix_echo.py");
    assert_eq!(unix_echo_association(&script, &socket, false), "accepted");
    assert_eq!(archive.associations().len(), 2);
    let text = unix_echo_association(&script, &socket, true);
    assert!(text.contains("Permission denied"), "{text}");
    // Even with the mode widened, the peer credentials (SO_PEERCRED) refuse the other user.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    }
    assert_eq!(
        unix_echo_association(&script, &socket, true),
        "rejected 1/1/1"
    );
    let log = connect.wait_for_log(&["peer=unix:"], Duration::from_secs(5));
    assert_eq!(log.matches("refused_local_user").count(), 23, "{log}");
    assert_eq!(archive.associations().len(), 2, "{:?}", archive.records());
    drop(connect);

    // --allow-user admits the other user on purpose.
    let uid = other.to_string();
    let widened = Connect::start(
        gw.port(),
        &[
            "--ca",
            ca,
            "--user",
            "clinician",
            "--password-env",
            "CONNECT_TEST_PW",
            "--allow-user",
            &uid,
        ],
        &[("CONNECT_TEST_PW", PASSWORD)],
    );
    let wport = widened.port();
    let out = as_other(
        "/usr/bin/echoscu",
        &["-aec", "ARCHIVE", "127.0.0.1", &wport],
    );
    assert_success(&out, "echoscu as the allowed user");
    assert_eq!(archive.associations().len(), 3, "{:?}", archive.records());
    let log = widened.wait_for_log(&[&format!("local_uid={other}")], Duration::from_secs(5));
    assert!(
        log.contains(&format!("allowed_uids=0,{other}"))
            && log.contains(&format!("local_uid={other} ")),
        "{log}"
    );
}

/// VmHWM (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn move_as_get_holds_at_most_its_buffer_and_refuses_a701_past_it() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ORTHANC");
    let gw = gateway(&pki, archive.port);
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
    let before = peak_rss_kib(connect.proc.pid());
    // 4 associations x 40 C-MOVE contexts x an identifier of 1,000,000 bytes left incomplete:
    // 160 MB if held; the default buffer (1 MiB per association, 16 MiB in all) holds one each.
    let (associations, contexts, chunk) = (4usize, 40usize, 1_000_000usize);
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("move_hold.py")).args([
        connect.port(),
        associations.to_string(),
        contexts.to_string(),
        chunk.to_string(),
        "VIEWER".to_string(),
    ]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(120));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("move_hold.py: {e}\n{}", output_text(&out)));
    assert!(report["error"].is_null(), "{report}");
    let peak = peak_rss_kib(connect.proc.pid());
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("connect peak RSS {before} KiB -> {peak} KiB (+{grown_mib} MiB)");
    assert!(
        grown_mib < 48,
        "connect grew by {grown_mib} MiB holding C-MOVE identifiers"
    );
    let statuses = report["statuses"].as_array().expect("statuses");
    assert_eq!(statuses.len(), associations, "{report}");
    for s in statuses {
        let s: Vec<u64> = s
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(s.len(), contexts, "{report}");
        let refused = s.iter().filter(|&&st| st == 0xA701).count();
        assert!(refused >= contexts - 1, "{s:x?}");
    }
    let log = connect.wait_for_log(&["refused 0xA701"], Duration::from_secs(5));
    assert!(
        log.contains("--move-buffer") && log.contains("move-as-get: C-MOVE refused 0xA701"),
        "{log}"
    );
}

#[test]
fn a_remote_local_store_needs_allow_remote_store_and_a_taken_default_port_says_use_listen() {
    let out = Gateway::run_command(
        &[
            "connect",
            "--gateway",
            "127.0.0.1:1",
            "--user",
            "u",
            "--password-env",
            "CONNECT_TEST_UNSET",
            "--move-as-get",
            "--local-store",
            "VIEWER@192.0.2.10:104",
        ],
        None,
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not on this machine") && text.contains("--allow-remote-store"),
        "{text}"
    );

    // The default port (11114) held by someone else: connect says to use --listen.
    let holder = std::net::TcpListener::bind("127.0.0.1:11114");
    let pki = Pki::generate();
    let mut cmd = Command::new(common::gateway::BIN);
    cmd.args([
        "connect",
        "--gateway",
        "127.0.0.1:1",
        "--ca",
        pki.ca_cert.to_str().expect("path"),
        "--user",
        "u",
        "--password-env",
        "CONNECT_TEST_PW",
    ])
    .env("CONNECT_TEST_PW", "x");
    let out = run_bounded(&mut cmd, None, Duration::from_secs(30));
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("127.0.0.1:11114") && text.contains("in use") && text.contains("--listen"),
        "{text}"
    );
    drop(holder);
}
