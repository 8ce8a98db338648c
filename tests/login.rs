//! The login rule with real peers (policy::login): one normalized user name for the lock check,
//! the password check, the count, the audit and the log, on both doors; and password checks that
//! are busy answer 2/3/2 (DICOM) or 503 (web) within a bound, without counting as failed logins.
//!
//! The peer is pynetdicom (User Identity type 2 over TLS) and Python's http.client (Basic), driven
//! by a small script below so that a user name can carry a NUL byte, which no command line can.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// Runs attempts given as JSON, each `{"door": "dicom"|"web", "user", "password", "bind", "delay"}`;
/// `"parallel": true` starts them together (a barrier, then each waits its `delay` seconds), otherwise
/// one after another. Prints one JSON list: per attempt `associated`, `rejection` [r, s, reason] or
/// null, `echo` (status) for DICOM; `status` and `retry_after` for the web; `elapsed` seconds.
const PEER: &str = r#"
import base64, http.client, json, logging, ssl, sys, threading, time
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
spec = json.loads(sys.argv[1])
attempts = spec["attempts"]
results = [None] * len(attempts)
barrier = threading.Barrier(len(attempts)) if spec.get("parallel") else None

def context():
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx

def dicom(a):
    ae = AE(ae_title="LOGINSCU")
    for t in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, t, spec.get("timeout", 30))
    ae.add_requested_context(Verification)
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.primary_field = a["user"].encode("utf-8")
    item.secondary_field = a["password"].encode("utf-8")
    rj = {}
    def on_pdu(event):
        if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
            rj.update(r=[event.pdu.result, event.pdu.source, event.pdu.reason_diagnostic])
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", spec["port"], ae_title="ARCHIVE", ext_neg=[item],
                         bind_address=(a["bind"], 0), tls_args=(context(), "localhost"),
                         evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
    out = {"door": "dicom", "associated": False, "rejection": rj.get("r"), "echo": None}
    if assoc.is_established:
        out["associated"] = True
        rsp = assoc.send_c_echo()
        if rsp is not None and "Status" in rsp:
            out["echo"] = int(rsp.Status)
        assoc.release()
    out["elapsed"] = time.monotonic() - started
    return out

def web(a):
    ctx = context()
    ctx.check_hostname = False  # the chain is still verified against the test CA
    started = time.monotonic()
    conn = http.client.HTTPSConnection("127.0.0.1", spec["web_port"], context=ctx,
                                       timeout=spec.get("timeout", 30), source_address=(a["bind"], 0))
    creds = base64.b64encode((a["user"] + ":" + a["password"]).encode("utf-8")).decode()
    try:
        conn.request("GET", "/dicom-web/studies?PatientID=LOGIN12345", headers={"Authorization": "Basic " + creds})
        r = conn.getresponse()
        r.read()
        out = {"door": "web", "status": r.status, "retry_after": r.getheader("Retry-After")}
    except Exception as e:
        out = {"door": "web", "status": None, "error": repr(e)}
    out["elapsed"] = time.monotonic() - started
    return out

def run(i):
    a = attempts[i]
    if barrier is not None:
        barrier.wait()
    time.sleep(a.get("delay", 0))
    try:
        results[i] = dicom(a) if a["door"] == "dicom" else web(a)
    except Exception as e:
        results[i] = {"door": a["door"], "error": repr(e)}

if barrier is None:
    for i in range(len(attempts)):
        run(i)
else:
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(attempts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
json.dump(results, sys.stdout)
"#;

struct Setup {
    pki: Pki,
    gateway: Gateway,
    port: u16,
    web_port: u16,
    audit: std::path::PathBuf,
    _archive: PyArchive,
    _dir: tempfile::TempDir,
}

/// A gateway with users `alice` and `bob` (role `reader`: echo), a pynetdicom archive behind the DICOM
/// door, a web door whose archive is a closed port (a request that gets through answers 502), an
/// audit file, and `limits` in `[limits]`.
fn start(limits: &str) -> Setup {
    start_with(limits, password_hash(PASSWORD))
}

/// [`start`] with `hash` (of PASSWORD) for both users.
fn start_with(limits: &str, hash: String) -> Setup {
    let pki = Pki::generate();
    let archive = PyArchive::start("PYARCHIVE");
    let dir = common::tempdir("login");
    let audit = dir.path().join("audit.jsonl");
    let port = free_port();
    let web_port = free_port();
    let closed = free_port();
    let config = GatewayConfig::new(port)
        .tls(&pki)
        .client_ca(&pki)
        .set("http", &format!("listen = \"127.0.0.1:{web_port}\""))
        .set("http", &format!("upstream = \"http://127.0.0.1:{closed}\""))
        .path("audit", "file", &audit)
        .upstream("ARCHIVE", archive.port, "PYARCHIVE")
        .set("limits", limits)
        .role("reader", &["echo", "find"])
        .user("alice", &hash, &["reader"])
        .user("bob", &hash, &["reader"])
        .to_toml();
    let mut gateway = Gateway::start(port, &config);
    gateway.wait_listening(web_port);
    Setup {
        pki,
        gateway,
        port,
        web_port,
        audit,
        _archive: archive,
        _dir: dir,
    }
}

fn attempt(door: &str, user: &str, password: &str, bind: &str) -> Value {
    json!({"door": door, "user": user, "password": password, "bind": bind})
}

/// Runs the peer script with these attempts; one result per attempt, in order.
fn drive(s: &Setup, attempts: &[Value], parallel: bool, timeout: u64) -> Vec<Value> {
    let dir = common::tempdir("login-peer");
    let script = dir.path().join("login_peer.py");
    std::fs::write(&script, PEER).expect("write the peer script");
    let spec = json!({
        "port": s.port,
        "web_port": s.web_port,
        "ca": s.pki.ca_cert.display().to_string(),
        "timeout": timeout,
        "parallel": parallel,
        "attempts": attempts,
    });
    let mut cmd = Command::new(python());
    cmd.arg(&script).arg(spec.to_string());
    let out = run_bounded(&mut cmd, None, Duration::from_secs(300));
    let text = output_text(&out);
    let results: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the peer printed no JSON ({e}):\n{text}"));
    assert_eq!(results.len(), attempts.len(), "{text}");
    results
}

fn one(s: &Setup, a: Value) -> Value {
    drive(s, &[a], false, 60).remove(0)
}

fn rejection(v: &Value) -> Option<(i64, i64, i64)> {
    let r = v["rejection"].as_array()?;
    let n = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(-1);
    Some((n(0), n(1), n(2)))
}

fn accepted(v: &Value) -> bool {
    v["associated"] == json!(true) && v["echo"] == json!(0)
}

fn audit_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line ({e}): {l}")))
        .collect()
}

fn peer_ip(event: &Value) -> String {
    let peer = event["peer"].as_str().unwrap_or("");
    peer.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

#[test]
fn a_padded_user_name_is_the_same_login_for_the_lock_the_check_and_the_audit() {
    let s = start("failed_logins = 3\nfailed_logins_per_address = 100\nlockout_seconds = 300");
    let (a, b, c) = ("127.0.0.21", "127.0.0.22", "127.0.0.23");

    // alice locked at A by three wrong passwords; then her name padded as DICOM pads (NUL, space)
    // is the same locked login: refused 2/3/2 with the right password and with a wrong one, and
    // the right padded password does not clear the lock.
    let steps: Vec<(&str, &str, (i64, i64, i64))> = vec![
        ("alice", "wrong", (1, 2, 1)),
        ("alice", "wrong", (1, 2, 1)),
        ("alice", "wrong", (1, 2, 1)),
        ("alice", PASSWORD, (2, 3, 2)),
        ("alice\0", PASSWORD, (2, 3, 2)),
        ("alice ", PASSWORD, (2, 3, 2)),
        ("alice\0 \0", "wrong", (2, 3, 2)),
        ("alice", PASSWORD, (2, 3, 2)),
    ];
    let attempts: Vec<Value> = steps
        .iter()
        .map(|(u, p, _)| attempt("dicom", u, p, a))
        .collect();
    let results = drive(&s, &attempts, false, 60);
    for (i, ((user, _, expected), got)) in steps.iter().zip(&results).enumerate() {
        assert_eq!(
            rejection(got),
            Some(*expected),
            "step {i} ({user:?}) from {a}: {got}"
        );
    }

    // At B the padded names do the guessing: they count toward alice, and once she is locked a
    // padded name cannot keep guessing.
    let steps: Vec<(&str, &str, (i64, i64, i64))> = vec![
        ("alice ", "wrong", (1, 2, 1)),
        ("alice\0", "wrong", (1, 2, 1)),
        ("alice\0\0", "wrong", (1, 2, 1)),
        ("alice", PASSWORD, (2, 3, 2)),
        ("alice\0", "wrong", (2, 3, 2)),
        ("alice   ", "wrong", (2, 3, 2)),
    ];
    let attempts: Vec<Value> = steps
        .iter()
        .map(|(u, p, _)| attempt("dicom", u, p, b))
        .collect();
    let results = drive(&s, &attempts, false, 60);
    for (i, ((user, _, expected), got)) in steps.iter().zip(&results).enumerate() {
        assert_eq!(
            rejection(got),
            Some(*expected),
            "step {i} ({user:?}) from {b}: {got}"
        );
    }

    // The web door uses the same name and the same table: padded Basic logins at A are locked out (429),
    // and at C, where alice is not locked, a padded Basic login is alice (the request goes through to
    // the web archive, here a closed port: 502).
    for user in ["alice ", "alice\0", "alice"] {
        let got = one(&s, attempt("web", user, PASSWORD, a));
        assert_eq!(got["status"], json!(429), "web {user:?} from {a}: {got}");
    }
    let got = one(&s, attempt("web", "alice\0", PASSWORD, c));
    assert_eq!(
        got["status"],
        json!(502),
        "web \"alice\\0\" from {c}: {got}"
    );

    // Names that cannot be a user fail like a wrong password (1/2/1), never as a lookup.
    let long = "x".repeat(200);
    for user in ["al\u{1}ice", " alice", long.as_str(), "\0\0"] {
        let got = one(&s, attempt("dicom", user, PASSWORD, c));
        assert_eq!(rejection(&got), Some((1, 2, 1)), "{user:?}: {got}");
    }
    // alice from C, unpadded and padded: served.
    for user in ["alice", "alice \0"] {
        let got = one(&s, attempt("dicom", user, PASSWORD, c));
        assert!(accepted(&got), "{user:?} from {c}: {got}");
    }

    // Every audit record and log line names the normalized user.
    let events = audit_events(&s.audit);
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "login.failed")
        .collect();
    // A: 3, B: 3, C: 4 unusable names.
    assert_eq!(failed.len(), 10, "{events:#?}");
    for e in &failed[..6] {
        assert_eq!(e["user"], json!("alice"), "{e}");
        assert_eq!(e["reason"], json!("wrong password"), "{e}");
    }
    for e in &failed[6..] {
        assert!(e["user"].is_null(), "an unusable name is not a user: {e}");
        assert_eq!(peer_ip(e), c, "{e}");
    }
    let locks: Vec<&Value> = events.iter().filter(|e| e["event"] == "lockout").collect();
    assert_eq!(locks.len(), 2, "{events:#?}");
    for (e, ip) in locks.iter().zip([a, b]) {
        assert_eq!(e["user"], json!("alice"), "{e}");
        assert_eq!(e["scope"], json!("UserAtAddress"), "{e}");
        assert_eq!(peer_ip(e), ip, "{e}");
    }
    let accepted_from: HashSet<String> = events
        .iter()
        .filter(|e| e["event"] == "association.accepted")
        .map(peer_ip)
        .collect();
    assert!(
        !accepted_from.contains(a) && !accepted_from.contains(b),
        "a password check reached success while alice was locked: {events:#?}"
    );
    for e in events.iter().filter(|e| e["user"].is_string()) {
        assert_eq!(e["user"], json!("alice"), "{e}");
    }
    let log = s.gateway.log();
    assert!(!log.contains(PASSWORD), "a password in the log");
    assert!(
        !log.contains("alice\\0") && !log.contains("alice \""),
        "a padded name in the log:\n{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("lockout"))
            .count(),
        2,
        "{log}"
    );
}

#[test]
fn busy_password_checks_answer_2_3_2_or_503_within_the_bound_and_are_not_failed_logins() {
    // One failure would lock an address: a busy answer counted as a failed login shows at once.
    // The users' hash takes about 0.8 s to check on any machine and build (a default one ~25 ms in
    // a release build: too fast for a burst of bounded size to keep the slots busy for 5 s).
    let s = start_with(
        "failed_logins = 1\nfailed_logins_per_address = 1\nlockout_seconds = 300\n\
         max_associations_per_user = 200",
        password_hash_taking(PASSWORD, Duration::from_millis(800)),
    );
    // How long one sign-in takes here, alone: the fastest of three. Each door's burst is sized from
    // it so that, with 4 checks at a time, its own queue would last twice auth::PASSWORD_CHECK_WAIT
    // (5 s): the slots are shared and the queue is first come, first served, so the web logins
    // (1.5 s late, behind every DICOM one) reach its head only when the DICOM waiters ahead are
    // served or gone, and must then outlast their own wait by themselves. At most 120 each: both
    // bursts together stay below auth::QUEUED_PASSWORD_CHECKS (256), so no busy answer is a full
    // queue's.
    let alone: Vec<Value> = (1..=3)
        .map(|i| attempt("dicom", "alice", PASSWORD, &format!("127.0.3.{i}")))
        .collect();
    let alone = drive(&s, &alone, false, 60);
    assert!(alone.iter().all(accepted), "{alone:?}");
    let took = alone
        .iter()
        .filter_map(|r| r["elapsed"].as_f64())
        .fold(f64::MAX, f64::min)
        .max(0.001);
    let sized =
        |at_least: f64| (4.0 * ((10.0 / took).ceil() + 1.0)).clamp(at_least, 120.0) as usize;
    let (burst, web_burst) = (sized(64.0), sized(8.0));
    eprintln!("one sign-in alone: {took:.3} s; bursts of {burst} (DICOM) and {web_burst} (web)");
    // What saturation needs: each door's queue outlasts the 5 s wait by half again.
    assert!(
        (burst - 4) as f64 * took / 4.0 >= 7.5 && web_burst as f64 * took / 4.0 >= 7.5,
        "one sign-in took {took:.3} s: too fast for bursts of {burst} and {web_burst} to outlast \
         the 5 s wait"
    );
    let mut attempts: Vec<Value> = (1..=burst)
        .map(|i| attempt("dicom", "alice", PASSWORD, &format!("127.0.1.{i}")))
        .collect();
    for i in 1..=web_burst {
        let mut a = attempt("web", "bob", PASSWORD, &format!("127.0.2.{i}"));
        a["delay"] = json!(1.5);
        attempts.push(a);
    }
    let results = drive(&s, &attempts, true, 60);
    let (dicom, web) = results.split_at(burst);

    let mut busy = Vec::new();
    for (i, r) in dicom.iter().enumerate() {
        let bind = format!("127.0.1.{}", i + 1);
        if rejection(r) == Some((2, 3, 2)) {
            let elapsed = r["elapsed"].as_f64().unwrap_or(f64::MAX);
            // After the 5 s wait (the client's clock starts first), not at once (a full queue's),
            // plus a TLS handshake among a hundred others.
            assert!(
                (4.5..12.0).contains(&elapsed),
                "busy answered after {elapsed} s: {r}"
            );
            busy.push(bind);
        } else {
            assert!(accepted(r), "neither served nor busy from {bind}: {r}");
        }
    }
    let slowest = dicom
        .iter()
        .filter_map(|r| r["elapsed"].as_f64())
        .fold(0.0, f64::max);
    eprintln!(
        "{} of {burst} DICOM logins busy (2/3/2), {} of {web_burst} web logins busy (503); \
         slowest DICOM answer {slowest:.2} s",
        busy.len(),
        web.iter().filter(|r| r["status"] == json!(503)).count()
    );
    assert!(
        !busy.is_empty(),
        "no association was refused 2/3/2 while the password checks were saturated: {dicom:?}"
    );
    // Each 2/3/2 is the gateway's own busy answer after the wait (the archive behind it answers
    // 2/3/2 too when its own limit is reached): one log line per busy address says so.
    let log = s.gateway.log();
    for bind in &busy {
        let peer = format!("peer={bind}:");
        assert!(
            log.lines().any(|l| l.contains(&peer)
                && l.contains("password checks busy (password_check: no slot came free in time)")),
            "no busy line for {bind}:\n{log}"
        );
    }
    let mut web_busy = Vec::new();
    for (i, r) in web.iter().enumerate() {
        let bind = format!("127.0.2.{}", i + 1);
        match r["status"].as_u64() {
            Some(503) => {
                assert!(r["retry_after"].is_string(), "503 without Retry-After: {r}");
                let elapsed = r["elapsed"].as_f64().unwrap_or(0.0);
                assert!((4.5..12.0).contains(&elapsed), "503 after {elapsed} s: {r}");
                web_busy.push(bind);
            }
            Some(502) => {}
            _ => panic!("web login from {bind} neither served nor busy: {r}"),
        }
    }
    assert!(
        !web_busy.is_empty(),
        "no web login was answered 503 while the checks were saturated: {web:?}"
    );

    // Nothing was a failed login, so no address is locked: the busy ones sign in now.
    let events = audit_events(&s.audit);
    assert!(
        events
            .iter()
            .all(|e| e["event"] != "login.failed" && e["event"] != "lockout"),
        "{events:#?}"
    );
    for bind in busy.iter().take(3) {
        let got = one(&s, attempt("dicom", "alice", PASSWORD, bind));
        assert!(accepted(&got), "after busy, from {bind}: {got}");
    }
    let got = one(&s, attempt("web", "bob", PASSWORD, &web_busy[0]));
    assert_eq!(got["status"], json!(502), "after busy, web: {got}");
    let mut gw = s.gateway;
    assert!(gw.exited().is_none(), "the gateway exited");
    let log = gw.log();
    assert!(log.contains("password checks busy"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
