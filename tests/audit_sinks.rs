//! The audit sinks when things go wrong, with real peers: a syslog collector that stops reading, one that
//! cannot be reached across reloads, an audit file on a full filesystem (`[audit] on_failure`), hostile
//! text from the wire in the DICOM audit messages (parsed by Python's XML parser), the syslog HOSTNAME and
//! AuditSourceID, and the counters an alert needs, at 0 from start-up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A config with user `alice` (reader: echo + find) in front of the archive at `upstream_port`;
/// `extra` is appended (an `[audit]` section, `[admin]`, `[http]`).
fn config(port: u16, pki: &Pki, upstream_port: u16, extra: &str) -> String {
    GatewayConfig::new(port)
        .tls(pki)
        .upstream("ARCHIVE", upstream_port, "PYARCHIVE")
        .role_with(
            "reader",
            &["echo", "find"],
            &["unrestricted_queries = true"],
        )
        .user("alice", &password_hash(PASSWORD), &["reader"])
        .set("limits", "failed_logins = 1000")
        .set("limits", "failed_logins_per_address = 1000")
        .set("limits", "queries_per_minute = 60000")
        .raw(extra)
        .to_toml()
}

/// `tests/peers/syslog_collector.py MODE --port P --out FILE ARGS...`, killed on drop.
struct Collector {
    port: u16,
    out: PathBuf,
    _proc: Spawned,
    _dir: tempfile::TempDir,
}

impl Collector {
    fn start(mode: &str, args: &[&str]) -> Collector {
        let dir = tempdir("collector");
        let out = dir.path().join("messages.jsonl");
        let port = free_port();
        let mut cmd = Command::new(python());
        cmd.arg(peers_dir().join("syslog_collector.py"))
            .args([mode, "--port", &port.to_string(), "--out"])
            .arg(&out)
            .args(args);
        let mut proc = Spawned::spawn(cmd, &dir.path().join("collector.log"));
        let ready = out.with_extension("jsonl.ready");
        proc.wait_until(Duration::from_secs(20), "listening", |_| ready.exists())
            .unwrap_or_else(|e| panic!("{e}"));
        Collector {
            port,
            out,
            _proc: proc,
            _dir: dir,
        }
    }

    /// Every line the collector wrote so far.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every message so far, parsed by Python's XML parser (see the script's `parse`).
    fn parsed(&self) -> Vec<Value> {
        let mut cmd = Command::new(python());
        cmd.arg(peers_dir().join("syslog_collector.py"))
            .args(["parse", "--port", "0", "--out"])
            .arg(&self.out);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
        assert!(out.status.success(), "parse: {}", output_text(&out));
        serde_json::from_slice(&out.stdout).expect("parse JSON")
    }

    /// Waits (bounded) until `want` holds for the records; returns them either way.
    fn wait_for(&self, within: Duration, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.records();
            if want(&r) || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn echo(port: u16, pki: &Pki, calling: &str, password: &str) -> Value {
    pyscu(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aet",
        calling,
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        pki.ca_cert.to_str().expect("p"),
        "--user",
        "alice",
        "--password",
        password,
    ])
}

/// `bench/lib/dicom_ul.py ARGS` (raw PDUs: any calling AE title, any user name), its JSON answer.
fn dicom_ul(args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/lib/dicom_ul.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).args(args);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(120));
    assert!(out.status.success(), "dicom_ul.py: {}", output_text(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dicom_ul.py JSON ({e}): {}", output_text(&out)))
}

fn metrics(admin: u16) -> Vec<Value> {
    let text = http_get(&format!("http://127.0.0.1:{admin}/metrics")).1;
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("prom_parse.py"));
    let out = run_bounded(&mut cmd, Some(text.as_bytes()), Duration::from_secs(30));
    assert!(out.status.success(), "{}\n{text}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("parser JSON")
}

/// The value of the one sample named `name` with `labels`; None when there is no such series.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line ({e}): {l}")))
        .collect()
}

/// A tmpfs of 64 KiB mounted on `dir` (unmounted on drop), to fill up.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path) -> SmallFs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount(8)");
        assert!(
            out.status.success(),
            "mount a tmpfs (the tests run as root): {}",
            output_text(&out)
        );
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// Fill the filesystem with `filler` until a write fails for lack of space.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = [0u8; 4096];
        for _ in 0..1000 {
            if f.write_all(&block).and_then(|()| f.flush()).is_err() {
                return path;
            }
        }
        panic!("a 64 KiB tmpfs took 4 MB");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics at start-up
// ---------------------------------------------------------------------------------------------

#[test]
fn alert_counters_exist_at_zero_right_after_start() {
    let pki = Pki::generate();
    let port = free_port();
    let admin = free_port();
    let dead = free_port();
    let dir = tempdir("metrics-audit");
    let extra = format!(
        "[audit]\nfile = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        dir.path().join("audit.jsonl").display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, dead, &extra));
    gw.wait_listening(admin);
    let samples = metrics(admin);
    let upstream = format!("127.0.0.1:{dead}");
    for (name, labels) in [
        ("pacsgate_audit_failures_total", vec![("sink", "file")]),
        ("pacsgate_audit_failures_total", vec![("sink", "syslog")]),
        (
            "pacsgate_upstream_connect_failures_total",
            vec![("upstream", upstream.as_str())],
        ),
        (
            "pacsgate_reloads_total",
            vec![("outcome", "ok"), ("reason", "sighup")],
        ),
        (
            "pacsgate_reloads_total",
            vec![("outcome", "refused"), ("reason", "sighup")],
        ),
    ] {
        assert_eq!(
            sample(&samples, name, &labels),
            Some(0.0),
            "{name}{labels:?} at 0 from start-up: {samples:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The audit file cannot be written
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_audit_filesystem_refuses_associations_and_web_requests_until_it_has_room() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let data = tempdir("audit-full");
    let fs = SmallFs::mount(&data.path().join("mnt"));
    let audit = fs.dir.join("audit.jsonl");
    let filler = fs.fill();
    let (port, admin, web, dead) = (free_port(), free_port(), free_port(), free_port());
    let extra = format!(
        "[audit]\nfile = \"{}\"\non_failure = \"refuse\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:{dead}\"\n",
        audit.display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(web);

    // DICOM: A-ASSOCIATE-RJ 2/3/1 (transient, presentation-related, temporary congestion), and the
    // archive never saw an association.
    let out = echo(port, &pki, "WS1", PASSWORD);
    assert_eq!(
        out["rejection"],
        json!({"result": 2, "source": 3, "reason": 1}),
        "{out}"
    );
    assert!(archive.associations().is_empty(), "{:?}", archive.records());
    // Web: 503 with Retry-After, before any credential is checked.
    let curl = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--max-time",
            "20",
            "--cacert",
        ])
        .arg(&pki.ca_cert)
        .args(["-u", &format!("alice:{PASSWORD}")])
        .arg(format!("https://127.0.0.1:{web}/dicom-web/studies"))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&curl.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    let log = gw.log();
    assert!(
        log.contains("rule=\"audit_unavailable\"") || log.contains("rule=audit_unavailable"),
        "the web refusal names the rule: {log}"
    );
    assert!(
        log.contains("cannot write the audit file"),
        "the association line says why: {log}"
    );
    assert!(log.contains("audit: events lost"), "{log}");
    let samples = metrics(admin);
    assert!(
        sample(
            &samples,
            "pacsgate_audit_failures_total",
            &[("sink", "file")]
        )
        .is_some_and(|n| n >= 3.0),
        "start, association and web refusal each lost: {samples:#?}"
    );
    assert!(
        sample(
            &samples,
            "pacsgate_refusals_total",
            &[("rule", "audit_unavailable")]
        )
        .is_some_and(|n| n >= 2.0),
        "{samples:#?}"
    );

    // Room again: the refusal's own record is the write that finds the file writable; the next
    // association goes through and is recorded.
    std::fs::remove_file(&filler).expect("remove the filler");
    let mut accepted = false;
    for _ in 0..3 {
        if echo(port, &pki, "WS1", PASSWORD)["associated"] == json!(true) {
            accepted = true;
            break;
        }
    }
    assert!(accepted, "{}", gw.log());
    let events = audit_lines(&audit);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "association.rejected" && e["rule"] == "audit_unavailable"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "association.accepted" && e["user"] == "alice"),
        "{events:#?}"
    );
    assert!(gw.log().contains("the audit file is writable again"));
}

#[test]
fn an_audit_file_that_cannot_be_written_is_logged_and_counted_and_continue_keeps_serving() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let (port, admin) = (free_port(), free_port());
    let extra =
        format!("[audit]\nfile = \"/dev/full\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);
    let out = echo(port, &pki, "WS1", PASSWORD);
    assert_eq!(out["associated"], json!(true), "{out}");
    assert_eq!(out["statuses"], json!([0]), "{out}");
    assert!(!archive.associations().is_empty());
    assert!(
        gw.wait_for_log("audit: events lost", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    let log = gw.log();
    assert!(log.contains("No space left on device"), "{log}");
    // Rate-limited: the start and the association lost four events, logged in one line.
    assert_eq!(log.matches("audit: events lost").count(), 1, "{log}");
    let lost = sample(
        &metrics(admin),
        "pacsgate_audit_failures_total",
        &[("sink", "file")],
    );
    assert!(lost.is_some_and(|n| n >= 4.0), "{lost:?}");
}

// ---------------------------------------------------------------------------------------------
// Syslog over TLS: a collector that stops reading; one that cannot be reached, across reloads
// ---------------------------------------------------------------------------------------------

#[test]
fn a_syslog_collector_that_stops_reading_is_noticed_and_the_gateway_reconnects() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let collector = Collector::start(
        "tls",
        &[
            "--cert",
            pki.server_cert.to_str().expect("p"),
            "--key",
            pki.server_key.to_str().expect("p"),
            "--stall-after",
            "5",
            "--rcvbuf",
            "4096",
            "--maxseg",
            "536",
        ],
    );
    let (port, admin) = (free_port(), free_port());
    let data = tempdir("stall");
    let audit = data.path().join("audit.jsonl");
    let extra = format!(
        "[audit]\nfile = \"{}\"\nsyslog = \"tls://127.0.0.1:{}\"\nsyslog_ca = \"{}\"\n\
         syslog_server_name = \"localhost\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        audit.display(),
        collector.port,
        pki.ca_cert.display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);
    // Enough C-FINDs on one association to fill the stalled connection's buffers (kept small by the
    // collector's receive buffer and MSS) several times over.
    let flood = dicom_ul(&[
        "find",
        "--port",
        &port.to_string(),
        "--called",
        "ARCHIVE",
        "--calling",
        "FLOOD",
        "--tls-ca",
        pki.ca_cert.to_str().expect("p"),
        "--user",
        "alice",
        "--password",
        PASSWORD,
        "--patient-id",
        "NOBODY",
        "-n",
        "800",
        "--warmup",
        "0",
        "--max-seconds",
        "90",
    ]);
    assert_eq!(flood["errors"], json!(0), "{flood}");
    // The stalled write is given up after syslog_timeout (default 10 s) and the gateway reconnects:
    // an event after the flood reaches the collector on a new connection.
    let out = echo(port, &pki, "MARKER", PASSWORD);
    assert_eq!(out["associated"], json!(true), "{out}");
    let records = collector.wait_for(Duration::from_secs(60), |r| {
        r.iter().any(|m| {
            m["conn"].as_u64().is_some_and(|c| c >= 1)
                && m["msg"].as_str().is_some_and(|s| s.contains("MARKER"))
        })
    });
    let delivered_later = records
        .iter()
        .filter(|m| m["conn"].as_u64().is_some_and(|c| c >= 1))
        .count();
    assert!(
        records
            .iter()
            .any(|m| m["conn"].as_u64().is_some_and(|c| c >= 1)
                && m["msg"].as_str().is_some_and(|s| s.contains("MARKER"))),
        "the event after the stall was delivered on a new connection ({} messages on later connections): {}",
        delivered_later,
        common::tail(&gw.log(), 40)
    );
    assert!(
        gw.wait_for_log("the collector is not reading", Duration::from_secs(5)),
        "the stalled write is noticed within syslog_timeout (default 10 s): {}",
        gw.log()
    );
    // What could not be queued is counted and said, not silent.
    let samples = metrics(admin);
    let lost = sample(
        &samples,
        "pacsgate_audit_failures_total",
        &[("sink", "syslog")],
    )
    .expect("the syslog series");
    if lost > 0.0 {
        assert!(gw.log().contains("audit: events lost"), "{}", gw.log());
    }
    // Nothing is missing: what sat unread in the stalled connection's buffers was written again.
    let written = audit_lines(&audit);
    let delivered: std::collections::HashSet<&str> = records
        .iter()
        .filter_map(|m| m["msg"].as_str()?.split(' ').nth(1))
        .collect();
    let missing: Vec<&Value> = written
        .iter()
        .filter(|e| e["time"].as_str().is_none_or(|t| !delivered.contains(t)))
        .collect();
    eprintln!(
        "audit events written: {}; delivered on the stalled connection: {}; after reconnecting: {delivered_later} \
         (duplicates included); missing at the collector: {}; counted lost: {lost}",
        written.len(),
        records.len() - delivered_later,
        missing.len()
    );
    assert_eq!(lost, 0.0, "nothing was dropped from the queue in this run");
    assert!(
        missing.is_empty(),
        "{} of {} events never reached the collector, e.g. {:?}",
        missing.len(),
        written.len(),
        missing.first()
    );
}

#[test]
fn no_syslog_sender_outlives_its_configuration_while_the_collector_is_unreachable() {
    let pki = Pki::generate();
    // Accepts TCP and closes at once: every TLS handshake fails, so each sender retries every 5 s.
    let collector = Collector::start("drop", &[]);
    let port = free_port();
    let extra = format!(
        "[audit]\nsyslog = \"tls://127.0.0.1:{}\"\nsyslog_ca = \"{}\"\nsyslog_server_name = \"localhost\"\n",
        collector.port,
        pki.ca_cert.display()
    );
    let gw = Gateway::start(port, &config(port, &pki, free_port(), &extra));
    assert!(
        gw.wait_for_log("collector unreachable", Duration::from_secs(15)),
        "{}",
        gw.log()
    );
    for n in 1..=9 {
        gw.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(20);
        while gw.log().matches("configuration reloaded").count() < n {
            assert!(Instant::now() < deadline, "reload {n}: {}", gw.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Each replaced sender ends at its next failed attempt (within 5 s); then only one is left.
    std::thread::sleep(Duration::from_secs(7));
    let before = collector.records().len();
    std::thread::sleep(Duration::from_secs(11));
    let attempts = collector.records().len() - before;
    assert!(
        attempts <= 3,
        "{attempts} connection attempts in 11 s after 9 reloads: one sender retries every 5 s, ten would make ~20"
    );
    assert!(
        attempts >= 1,
        "the current sender still retries: {}",
        gw.log()
    );
}

// ---------------------------------------------------------------------------------------------
// DICOM audit messages: hostile text, source and host
// ---------------------------------------------------------------------------------------------

#[test]
fn every_dicom_audit_message_parses_after_hostile_text_from_the_wire() {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let collector = Collector::start("udp", &[]);
    let port = free_port();
    let data = tempdir("hostile-xml");
    let audit = data.path().join("audit.jsonl");
    let extra = format!(
        "[audit]\nfile = \"{}\"\nsyslog = \"udp://127.0.0.1:{}\"\n",
        audit.display(),
        collector.port
    );
    let _gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    let attempts: [(&str, &str, &str); 3] = [
        // The review's case: a calling AE with BEL, a failed login.
        ("X\u{7}Y", "alice", "wrong"),
        // A control character in the calling AE, U+FFFE (not XML) in an unknown user's name.
        ("WS\u{1}", "mallory\u{FFFE}x", "wrong"),
        // A good login: accepted, echo, ended (the archive refuses a control character in an AE title).
        ("GOOD", "alice", PASSWORD),
    ];
    for (calling, user, password) in attempts {
        dicom_ul(&[
            "setup",
            "--port",
            &port.to_string(),
            "--called",
            "ARCHIVE",
            "--calling",
            calling,
            "--tls-ca",
            pki.ca_cert.to_str().expect("p"),
            "--user",
            user,
            "--password",
            password,
            "-n",
            "1",
            "--warmup",
            "0",
        ]);
    }
    // Every event in the file has its syslog message (UDP on loopback: wait, bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (events, parsed) = loop {
        let events = audit_lines(&audit);
        let parsed = collector.parsed();
        let ended = events
            .iter()
            .any(|e| e["event"] == "association.ended" && e["calling_ae"] == "GOOD");
        if (ended && parsed.len() >= events.len()) || Instant::now() >= deadline {
            break (events, parsed);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        events.len() >= 7,
        "two failed logins and one good association: {events:#?}"
    );
    assert_eq!(parsed.len(), events.len(), "{parsed:#?}");
    let broken: Vec<&Value> = parsed.iter().filter(|m| m["parsed"] != true).collect();
    assert!(broken.is_empty(), "unparseable audit messages: {broken:#?}");
    let ae = |want: &str| parsed.iter().any(|m| m["alternative_user_id"] == want);
    assert!(ae("X\u{FFFD}Y"), "{parsed:#?}");
    assert!(ae("WS\u{FFFD}"), "{parsed:#?}");
    assert!(
        parsed.iter().any(|m| m["user_id"] == "mallory\u{FFFD}x"),
        "{parsed:#?}"
    );
    // The JSON trail keeps the exact text.
    assert!(
        events.iter().any(|e| e["calling_ae"] == "X\u{7}Y"),
        "{events:#?}"
    );
}

/// Starts `pacsgate run` in a mount namespace where /proc/sys is hidden (as under systemd's
/// `ProcSubset=pid`); killed on drop.
fn start_without_proc_sys(port: u16, toml: &str) -> (Spawned, tempfile::TempDir) {
    let dir = tempdir("procsubset");
    let config_path = dir.path().join("pacsgate.toml");
    write_config(&config_path, toml);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /proc/sys && exec \"$0\" run --config \"$1\"")
        .arg(common::gateway::gateway_bin())
        .arg(&config_path)
        .env("RUST_LOG", "info,pacsgate=debug")
        .env("NO_COLOR", "1");
    let mut proc = Spawned::spawn(cmd, &dir.path().join("pacsgate.log"));
    proc.wait_until(Duration::from_secs(20), "listening", |p| {
        is_listening(p.pid(), port)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (proc, dir)
}

#[test]
fn syslog_hostname_comes_from_gethostname_and_the_audit_source_is_configurable() {
    let pki = Pki::generate();
    let host = String::from_utf8(
        Command::new("hostname")
            .output()
            .expect("hostname(1)")
            .stdout,
    )
    .expect("utf8")
    .trim()
    .to_string();
    assert!(!host.is_empty());
    for source_id in [None, Some("gw-east-1")] {
        let collector = Collector::start("udp", &[]);
        let port = free_port();
        let mut extra = format!("[audit]\nsyslog = \"udp://127.0.0.1:{}\"\n", collector.port);
        if let Some(id) = source_id {
            extra.push_str(&format!("source_id = \"{id}\"\n"));
        }
        let (proc, _dir) = start_without_proc_sys(port, &config(port, &pki, free_port(), &extra));
        // The start itself is an event (DICOM Application Start).
        let records = collector.wait_for(Duration::from_secs(15), |r| !r.is_empty());
        let parsed = collector.parsed();
        assert!(
            !records.is_empty() && !parsed.is_empty(),
            "no syslog message; gateway log:\n{}",
            proc.log()
        );
        let m = &parsed[0];
        assert_eq!(m["parsed"], json!(true), "{m}");
        assert_eq!(
            m["header"][2],
            json!(host),
            "HOSTNAME with /proc/sys hidden: {m}"
        );
        assert_eq!(
            m["source_id"],
            json!(source_id.unwrap_or(&host)),
            "AuditSourceID: {m}"
        );
        assert_eq!(m["event_id"], json!("110100"), "{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// The [audit] keys
// ---------------------------------------------------------------------------------------------

#[test]
fn the_audit_keys_are_checked_by_name() {
    use pacsgate::config::{Config, OnAuditFailure};
    let pki = Pki::generate();
    let dir = tempdir("audit-keys");
    let path = dir.path().join("pacsgate.toml");
    let load = |audit: &str| {
        write_config(
            &path,
            &config(free_port(), &pki, 1, &format!("[audit]\n{audit}\n")),
        );
        Config::load(&path)
    };
    let c = load("file = \"a.jsonl\"\non_failure = \"refuse\"\nsource_id = \"gw-east-1\"\nsyslog_timeout = 3")
        .expect("valid");
    let a = c.audit.expect("[audit]");
    assert_eq!(a.on_failure, OnAuditFailure::Refuse);
    assert_eq!(a.source_id.as_deref(), Some("gw-east-1"));
    assert_eq!(a.syslog_timeout, Duration::from_secs(3));
    let a = load("file = \"a.jsonl\"")
        .expect("valid")
        .audit
        .expect("[audit]");
    assert_eq!(a.on_failure, OnAuditFailure::Continue);
    assert_eq!(a.source_id, None);
    assert_eq!(a.syslog_timeout, Duration::from_secs(10));
    for (bad, key) in [
        (
            "file = \"a.jsonl\"\non_failure = \"block\"",
            "audit.on_failure",
        ),
        (
            "syslog = \"udp://127.0.0.1:514\"\non_failure = \"refuse\"",
            "audit.on_failure",
        ),
        ("file = \"a.jsonl\"\nsource_id = \"\"", "audit.source_id"),
        (
            "file = \"a.jsonl\"\nsource_id = \"a\\u0007b\"",
            "audit.source_id",
        ),
        (
            "file = \"a.jsonl\"\nsyslog_timeout = 0",
            "audit.syslog_timeout",
        ),
    ] {
        let e = load(bad).expect_err(bad).to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}
