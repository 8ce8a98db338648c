//! C-MOVE and C-GET through the gateway with real peers: Orthanc as the archive, DCMTK storescp as the
//! move destination behind the return path, pynetdicom as the viewer.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

struct Setup {
    pki: Pki,
    orthanc: Orthanc,
    gateway: Gateway,
    port: u16,
    return_port: u16,
    study: String,
    originals: Vec<PathBuf>,
    _data: tempfile::TempDir,
}

/// Orthanc knows VIEWER (through the gateway's return path) and OTHER (directly, not through the
/// gateway); the clinician's role may move to VIEWER only. `viewer_port` is where the gateway finds VIEWER.
fn setup(viewer_port: u16, other_port: u16, large_mb: Option<usize>) -> Setup {
    setup_with(viewer_port, other_port, large_mb, "")
}

/// [`setup`] with more `[gateway]` keys.
fn setup_with(
    viewer_port: u16,
    other_port: u16,
    large_mb: Option<usize>,
    gateway_extra: &str,
) -> Setup {
    let pki = Pki::generate();
    let return_port = free_port();
    let orthanc = Orthanc::start(
        "ORTHANC",
        &[
            ("VIEWER", "127.0.0.1", return_port),
            ("OTHER", "127.0.0.1", other_port),
        ],
    );
    let data = common::tempdir("moves");
    let mut made = make_instances_with_uids(data.path(), &[("MOVE1", "MOVE^ME", 3)]);
    let study = made[0].study_uid.clone();
    let mut originals: Vec<PathBuf> = made.drain(..).map(|i| i.path).collect();
    if let Some(mb) = large_mb {
        originals.push(make_large_instance_in(data.path(), mb, "MOVE1", &study));
    }
    for f in &originals {
        orthanc.upload(&std::fs::read(f).expect("read instance"));
    }
    let hash = password_hash(PASSWORD);
    let port = free_port();
    let config = GatewayConfig::new(port)
        .set(
            "gateway",
            &format!("return_listen = \"127.0.0.1:{return_port}\""),
        )
        .set("gateway", gateway_extra)
        .tls(&pki)
        .upstream("ARCHIVE", orthanc.dicom_port, "ORTHANC")
        .destination("VIEWER", viewer_port)
        .role_with(
            "clinician",
            &["echo", "find", "get", "move"],
            &["move_destinations = [\"VIEWER\"]"],
        )
        .user("clinician", &hash, &["clinician"])
        .to_toml();
    let mut gateway = Gateway::start(port, &config);
    gateway.wait_listening(return_port);
    Setup {
        pki,
        orthanc,
        gateway,
        port,
        return_port,
        study,
        originals,
        _data: data,
    }
}

fn retrieve(s: &Setup, cmd: &str, extra: &[&str]) -> Value {
    let port = s.port.to_string();
    let mut args = vec![
        cmd,
        "--port",
        &port,
        "--aec",
        "ARCHIVE",
        "--aet",
        "WORKSTATION",
        "--tls-ca",
        s.pki.ca_cert.to_str().expect("path"),
        "--user",
        "clinician",
        "--password",
        PASSWORD,
        "--level",
        "STUDY",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    args.push("-k".into());
    args.push(format!("StudyInstanceUID={}", s.study));
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pyscu(&refs)
}

/// The data sets Orthanc holds for the study, keyed by SOP Instance UID.
fn archived(s: &Setup) -> std::collections::BTreeMap<String, Vec<u8>> {
    s.orthanc
        .instance_ids()
        .into_iter()
        .map(|id| {
            let file = s.orthanc.instance_file(&id);
            let uid = s
                .orthanc
                .get_json(&format!("/instances/{id}/simplified-tags"))["SOPInstanceUID"]
                .as_str()
                .expect("SOPInstanceUID")
                .to_string();
            (uid, dataset_bytes(&file).to_vec())
        })
        .collect()
}

#[test]
fn a_move_to_an_allowed_destination_arrives_byte_identical_through_the_return_path() {
    let viewer = StoreScp::start("VIEWER");
    let other = StoreScp::start("OTHER");
    let s = setup(viewer.port, other.port, None);
    let out = retrieve(&s, "move", &["--dest", "VIEWER"]);
    assert_eq!(
        out["statuses"].as_array().and_then(|v| v.last()),
        Some(&json!(0)),
        "{out}"
    );
    let last = out["counts"]
        .as_array()
        .and_then(|c| c.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["completed"], json!(3), "{out}");
    let files = viewer.files();
    assert_eq!(
        files.len(),
        3,
        "storescp received {files:?}\n{}",
        viewer.log()
    );
    let archive = archived(&s);
    for f in &files {
        let bytes = std::fs::read(f).expect("read received file");
        let received = dataset_bytes(&bytes);
        assert!(
            archive.values().any(|a| a == received),
            "{} differs from every archived data set",
            f.display()
        );
    }
    let log = s.gateway.log();
    assert!(
        log.contains("return association") && log.contains("instances=3"),
        "{log}"
    );
    assert!(
        log.contains("retrieval finished") && log.contains("completed=3"),
        "{log}"
    );
    assert!(
        log.contains(&s.study),
        "the log names the study moved: {log}"
    );

    // A destination the archive knows but the role does not list: 0xA801, nothing arrives.
    let out = retrieve(&s, "move", &["--dest", "OTHER"]);
    assert_eq!(out["statuses"], json!([0xA801]), "{out}");
    assert!(other.files().is_empty(), "OTHER received files");
}

#[test]
fn a_dead_destination_makes_the_move_fail_visibly() {
    // Port 1: nothing listens there.
    let s = setup(1, 1, None);
    let out = retrieve(&s, "move", &["--dest", "VIEWER"]);
    eprintln!("dead destination: {out}");
    let statuses = out["statuses"].as_array().cloned().unwrap_or_default();
    let last = statuses.last().and_then(Value::as_i64).unwrap_or(0);
    assert!(
        last != 0 && last != 0xFF00,
        "the move must not report success: {out}"
    );
    let counts = out["counts"]
        .as_array()
        .and_then(|c| c.last())
        .cloned()
        .unwrap_or_default();
    let completed = counts["completed"].as_i64().unwrap_or(0);
    assert_eq!(completed, 0, "{out}");
    let failed = counts["failed"].as_i64().unwrap_or(0);
    assert!(
        failed >= 1 || last == 0xA801 || (last & 0xF000) == 0xA000 || (last & 0xF000) == 0xC000,
        "{out}"
    );
    assert!(
        s.gateway
            .log()
            .contains("destination VIEWER 127.0.0.1:1 unreachable"),
        "{}",
        s.gateway.log()
    );
}

#[test]
fn the_return_path_admits_only_expected_associations() {
    let viewer = StoreScp::start("VIEWER");
    let s = setup(viewer.port, 1, None);
    let return_port = s.return_port;
    // No C-MOVE in progress: an association to VIEWER on the return path is rejected.
    let file = &s.originals[0];
    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "VIEWER",
            "127.0.0.1",
            &return_port.to_string(),
            file.to_str().expect("p"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("Rejected"),
        "{}",
        output_text(&out)
    );
    // An AE title that is no destination: 1/1/7.
    let out = dcmtk(
        "storescu",
        &[
            "-aec",
            "NOBODY",
            "127.0.0.1",
            &return_port.to_string(),
            file.to_str().expect("p"),
        ],
    );
    assert!(
        output_text(&out).contains("Called AE Title Not Recognized"),
        "{}",
        output_text(&out)
    );
    assert!(viewer.files().is_empty());
}

#[test]
fn c_get_of_a_study_with_a_50_mb_instance_is_byte_identical() {
    let s = setup(1, 1, Some(50));
    let out_dir = common::tempdir("get");
    let out = retrieve(
        &s,
        "get",
        &["--out", out_dir.path().to_str().expect("path")],
    );
    assert_eq!(
        out["statuses"].as_array().and_then(|v| v.last()),
        Some(&json!(0)),
        "{out}"
    );
    let archive = archived(&s);
    assert_eq!(archive.len(), 4);
    let received = out["received"].as_array().cloned().unwrap_or_default();
    assert_eq!(received.len(), 4, "{out}");
    for (uid, bytes) in &archive {
        let got =
            std::fs::read(out_dir.path().join(format!("{uid}.raw"))).expect("received data set");
        assert!(
            &got == bytes,
            "instance {uid} differs ({} vs {} bytes)",
            got.len(),
            bytes.len()
        );
    }
    assert!(archive.values().any(|b| b.len() > 50 * 1024 * 1024));
    assert!(
        s.gateway.log().contains("op=\"get\""),
        "{}",
        s.gateway.log()
    );
}

/// DCMTK storescp that takes `seconds` over each C-STORE (so a C-MOVE stays in progress a while)
/// and serves each association in a process of its own. Killed on drop.
struct SlowStoreScp {
    port: u16,
    dir: tempfile::TempDir,
    _proc: common::Spawned,
}

impl SlowStoreScp {
    fn start(aet: &str, seconds: u32) -> SlowStoreScp {
        let dir = common::tempdir("slow-storescp");
        let port = free_port();
        let mut cmd = Command::new("/usr/bin/storescp");
        cmd.env("TCP_NODELAY", "1")
            .args([
                "--fork",
                "-aet",
                aet,
                "+B",
                "--sleep-during",
                &seconds.to_string(),
                "-od",
            ])
            .arg(dir.path())
            .arg(port.to_string());
        let log = dir.path().join("storescp.log");
        let mut proc = common::Spawned::spawn(cmd, &log);
        if let Err(e) = proc.wait_until(Duration::from_secs(20), "listening", |p| {
            is_listening(p.pid(), port)
        }) {
            panic!("slow storescp: {e}");
        }
        SlowStoreScp {
            port,
            dir,
            _proc: proc,
        }
    }

    /// The instances received (files other than the log).
    fn files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_none_or(|e| e != "log"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const VERIFICATION: &str = "1.2.840.10008.1.1";

/// On the return path as the archive (calling ORTHANC from 127.0.0.1, to VIEWER): associate, send
/// one `field` request on the context of `abstract_syntax`, and say how the gateway answered.
fn request_on_return_path(return_port: u16, field: u16, abstract_syntax: &'static str) -> String {
    use pacsgate::tools::client;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let timeout = Duration::from_secs(20);
        let conn = client::connect(&format!("127.0.0.1:{return_port}"), None, timeout)
            .await
            .expect("connect to the return listener");
        let request = client::Request {
            calling_ae: "ORTHANC".into(),
            called_ae: "VIEWER".into(),
            identity: client::Identity::None,
            abstract_syntaxes: vec![abstract_syntax],
            timeout,
        };
        let mut association = match client::associate(conn, &request).await {
            Ok(a) => a,
            Err(e) => return format!("not associated: {e}"),
        };
        let Some(context) = association.context_for(abstract_syntax).map(|c| c.id) else {
            return "context not accepted".into();
        };
        let command = client::request_command(field, abstract_syntax, 1, false);
        if let Err(e) = association.send_message(context, &command, None).await {
            return format!("send failed: {e}");
        }
        match association.read_message("the answer").await {
            Ok(m) => format!("answered with status {:?}", m.command.status),
            Err(e) => format!("no answer: {e}"),
        }
    })
}

#[test]
fn while_a_move_runs_only_its_archive_delivers_and_only_c_store() {
    // storescp sleeps during each C-STORE (about 15 s for the three here, of which the intruders
    // below take about 1): the move stays in progress while others try the return path.
    let viewer = SlowStoreScp::start("VIEWER", 1);
    // Every loopback address may connect to the return listener: what admits an association is
    // the move in progress and its archive, not the listener's address list.
    let s = setup_with(
        viewer.port,
        1,
        None,
        r#"return_allowed_addresses = ["127.0.0.0/8"]"#,
    );
    let data = common::tempdir("intruder");
    let intruder = make_instances_with_uids(data.path(), &[("INTRUDER", "NOT^MOVED", 1)]);
    let intruder_file = intruder[0].path.to_str().expect("path").to_string();
    let return_port = s.return_port.to_string();

    let (moved, tries) = std::thread::scope(|scope| {
        let mover = scope.spawn(|| retrieve(&s, "move", &["--dest", "VIEWER"]));
        assert!(
            s.gateway
                .wait_for_log("retrieval requested", Duration::from_secs(30)),
            "{}",
            s.gateway.log()
        );
        let started = Instant::now();
        // 1. From the archive's address, with another calling AE (and a quote to escape in the log).
        let other_ae = dcmtk(
            "storescu",
            &[
                "-aet",
                "IN\"TRUDER",
                "-aec",
                "VIEWER",
                "127.0.0.1",
                &return_port,
                &intruder_file,
            ],
        );
        // 2. From another host, calling as the archive.
        let other_host = pyscu(&[
            "store",
            "--bind",
            "127.0.0.2",
            "--port",
            &return_port,
            "--aet",
            "ORTHANC",
            "--aec",
            "VIEWER",
            &intruder_file,
        ]);
        // 3. As the archive, but not a C-STORE.
        let echo = request_on_return_path(s.return_port, 0x0030, VERIFICATION);
        let find = request_on_return_path(s.return_port, 0x0020, CT_IMAGE_STORAGE);
        let tries_took = started.elapsed();
        let moved = mover.join().expect("mover thread");
        (moved, (other_ae, other_host, echo, find, tries_took))
    });
    let (other_ae, other_host, echo, find, tries_took) = tries;
    let log = s.gateway.log();
    assert!(
        !other_ae.status.success() && output_text(&other_ae).contains("Rejected"),
        "another calling AE: {}",
        output_text(&other_ae)
    );
    assert_eq!(
        other_host["rejection"],
        json!({"result": 1, "source": 1, "reason": 1}),
        "another host: {other_host}"
    );
    assert!(
        echo.contains("no answer") && echo.contains("abort"),
        "C-ECHO: {echo}"
    );
    assert!(
        find.contains("no answer") && find.contains("abort"),
        "C-FIND: {find}"
    );
    // One log line each, naming why; the attacker's AE title escaped.
    for needle in [
        r#"calling_ae="IN\"TRUDER""#,
        r#"calling AE \"IN\\\"TRUDER\" at 127.0.0.1 is not the archive of a C-MOVE to VIEWER"#,
        r#"calling AE \"ORTHANC\" at 127.0.0.2 is not the archive of a C-MOVE to VIEWER"#,
        "sent a C-ECHO-RQ on the return path",
        "sent a C-FIND-RQ on the return path",
    ] {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("return association") && l.contains(needle))
                .count(),
            1,
            "one return association line with {needle}:\n{log}"
        );
    }
    // The move itself delivered everything, and nothing else arrived.
    assert_eq!(
        moved["statuses"].as_array().and_then(|v| v.last()),
        Some(&json!(0)),
        "{moved}"
    );
    let files = viewer.files();
    assert_eq!(files.len(), 3, "storescp received {files:?}");
    let intruder_uid = &intruder[0].sop_uid;
    assert!(
        !files
            .iter()
            .any(|f| f.to_string_lossy().contains(intruder_uid.as_str())),
        "the intruder's instance arrived: {files:?}"
    );
    eprintln!("the intruders took {tries_took:?} while the move ran");
    assert!(
        log.contains("return association") && log.contains("instances=3"),
        "{log}"
    );
}
