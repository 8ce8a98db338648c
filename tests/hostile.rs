//! Hostile peers and failing archives against the running gateway: garbage, oversized and truncated
//! PDUs, silent and slow clients, old TLS, archives that vanish, abort or dawdle; no data lost under
//! concurrent load; no secrets in logs, audit or metrics. See docs/security.md for the threat list.
//!
//! Timeouts are short here (`tls_handshake = 2`, `association_request = 2`, `idle = 3`,
//! `upstream_response = 2`): every hostile peer must be gone within its phase timeout, while a legitimate
//! client (pynetdicom, password over TLS) is served at the same time. Hostile peers connect from
//! 127.0.0.2.. so that the failed-login lockout of their address never touches the legitimate client's.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, UserIdentity, UserIdentityType,
    UserVariableItem, write_pdu,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PASSWORD: &str = "hostile-test passphrase 7";
/// `tls_handshake` and `association_request` in the test configs (seconds).
const PHASE: Duration = Duration::from_secs(2);
/// `idle` in the test configs, in milliseconds.
const IDLE_MS: u64 = 3000;
/// How long the gateway waits for a peer to close after its last A-ABORT / A-ASSOCIATE-RJ (src/ul/io.rs).
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// A gateway config with short phase timeouts, user alice (password), JWTs from the test PKI's key,
/// one `[[upstream]]` per (called AE, port), and `extra` appended.
fn config(port: u16, pki: &Pki, key: &Path, upstreams: &[(&str, u16)], extra: &str) -> String {
    let mut config = GatewayConfig::new(port)
        .tls_key(pki, key)
        .set("timeouts", "tls_handshake = 2")
        .set("timeouts", "association_request = 2")
        .set("timeouts", "idle = 3")
        .set("timeouts", "upstream_connect = 2")
        .set("timeouts", "upstream_response = 2");
    for (ae, p) in upstreams {
        config = config.upstream(ae, *p, ae);
    }
    config
        .jwt_es256(pki)
        .role_with(
            "clinician",
            &["echo", "find", "get", "move", "store"],
            &["unrestricted_queries = true"],
        )
        .user("alice", &password_hash(PASSWORD), &["clinician"])
        .raw(extra)
        .to_toml()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn pyscu_s(args: &[String]) -> Value {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pyscu(&refs)
}

/// pynetdicom echo (or another command) with alice's password over TLS, calling `aec`.
fn legit(cmd: &str, port: u16, aec: &str, pki: &Pki, extra: &[String]) -> Value {
    let mut args = s(&[
        cmd,
        "--port",
        &port.to_string(),
        "--aec",
        aec,
        "--tls-ca",
        pki.ca_cert.to_str().expect("path"),
        "--user",
        "alice",
        "--password",
        PASSWORD,
    ]);
    args.extend_from_slice(extra);
    pyscu_s(&args)
}

/// `duration_ms` of the gateway's association log line for called AE `called_ae` (the first one).
fn duration_ms(log: &str, called_ae: &str) -> u64 {
    log.lines()
        .filter(|l| {
            l.contains(" association ") && l.contains(&format!("called_ae=\"{called_ae}\" "))
        })
        .find_map(|l| {
            l.split("duration_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no association line for {called_ae}:\n{log}"))
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

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS from /proc).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

// ---------------------------------------------------------------------------------------------
// tests/peers/fake_archive.py: an archive that misbehaves on purpose.

struct FakeArchive {
    port: u16,
    record: PathBuf,
    _proc: Spawned,
    _dir: tempfile::TempDir,
}

impl FakeArchive {
    fn start(mode: &str) -> FakeArchive {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = common::tempdir(&format!("fake-{mode}"));
            let port = free_port();
            let record = dir.path().join("record.jsonl");
            std::fs::write(&record, "").expect("create record");
            let mut cmd = Command::new(python());
            cmd.arg(peers_dir().join("fake_archive.py"))
                .args(["--port", &port.to_string(), "--mode", mode, "--record"])
                .arg(&record)
                .args(["--delay", "10"]);
            let mut proc = Spawned::spawn(cmd, &dir.path().join("fake.log"));
            match proc.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return FakeArchive {
                        port,
                        record,
                        _proc: proc,
                        _dir: dir,
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("fake_archive.py {mode} did not start: {last}");
    }

    /// The PDU types received, over all connections, in order.
    fn pdu_types(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["type"].as_u64())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client: TCP from a chosen loopback address, TLS with rustls, hand-made PDUs.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn tcp_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind the source address");
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect to the gateway");
    let _ = stream.set_nodelay(true);
    stream
}

fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(source: &str, port: u16, ca: &Path) -> (Tls, Instant) {
    let tcp = tcp_from(source, port).await;
    let started = Instant::now();
    let name = ServerName::try_from("localhost").expect("name").to_owned();
    let tls = tls_connector(ca)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway");
    (tls, started)
}

/// What a client saw until the gateway closed the connection (or `limit` passed).
#[derive(Debug, Default)]
struct Seen {
    /// When the first byte arrived.
    first: Option<Duration>,
    /// When the connection was closed (EOF or error).
    closed: Option<Duration>,
    bytes: Vec<u8>,
}

impl Seen {
    fn abort(&self) -> bool {
        self.bytes.first() == Some(&0x07)
    }
    fn rejection(&self) -> Option<(u8, u8, u8)> {
        (self.bytes.len() >= 10 && self.bytes[0] == 0x03)
            .then(|| (self.bytes[7], self.bytes[8], self.bytes[9]))
    }
}

async fn watch<R: AsyncRead + Unpin>(reader: &mut R, started: Instant, limit: Duration) -> Seen {
    let mut seen = Seen::default();
    let mut buf = [0u8; 4096];
    loop {
        let Some(left) = limit.checked_sub(started.elapsed()) else {
            return seen;
        };
        match tokio::time::timeout(left, reader.read(&mut buf)).await {
            Err(_) => return seen,
            Ok(Ok(0)) | Ok(Err(_)) => {
                seen.closed = Some(started.elapsed());
                return seen;
            }
            Ok(Ok(n)) => {
                seen.first.get_or_insert(started.elapsed());
                if seen.bytes.len() < 1024 {
                    seen.bytes.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

/// Write `bytes` one per second (at most `max` of them) while watching for the close.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    bytes: &[u8],
    max: usize,
    started: Instant,
    limit: Duration,
) -> Seen {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        for b in bytes.iter().take(max) {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        seen = watch(&mut rd, started, limit) => seen,
        _ = writer => unreachable!(),
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn request(called: &str, contexts: usize, identity: Option<UserIdentity>) -> AssociationRQ {
    let mut user_variables = vec![
        UserVariableItem::MaxLength(16384),
        UserVariableItem::ImplementationClassUID("1.2.826.0.1.3680043.9.7433.99".into()),
    ];
    if let Some(id) = identity {
        user_variables.push(UserVariableItem::UserIdentityItem(id));
    }
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "HOSTILE".into(),
        called_ae_title: called.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: (0..contexts)
            .map(|i| PresentationContextProposed {
                id: ((2 * i + 1) % 256) as u8,
                abstract_syntax: VERIFICATION.into(),
                transfer_syntaxes: vec![IMPLICIT_LE.into()],
            })
            .collect(),
        user_variables,
    }
}

fn encode(rq: AssociationRQ) -> Vec<u8> {
    let mut out = Vec::new();
    write_pdu(&mut out, &Pdu::AssociationRQ(rq)).expect("encode A-ASSOCIATE-RQ");
    out
}

/// An A-ASSOCIATE-RQ whose User Information item ends with a raw JWT sub-item (0x58, type 5) of
/// `token_len` bytes. Lengths are written as a peer would: 16-bit fields wrap, the PDU length does not.
fn request_with_raw_jwt(called: &str, token_len: usize) -> Vec<u8> {
    let mut pdu = encode(request(called, 1, None));
    let ui = pdu
        .windows(2)
        .rposition(|w| w == [0x50, 0x00])
        .expect("user information item");
    let token: Vec<u8> = b"eyJhbGciOiJFUzI1NiJ9."
        .iter()
        .copied()
        .chain(std::iter::repeat_n(b'A', token_len.saturating_sub(21)))
        .collect();
    let mut item = vec![5u8, 0];
    item.extend_from_slice(&(token.len() as u16).to_be_bytes());
    item.extend_from_slice(&token);
    item.extend_from_slice(&[0, 0]);
    pdu.extend_from_slice(&[0x58, 0]);
    pdu.extend_from_slice(&(item.len() as u16).to_be_bytes());
    pdu.extend_from_slice(&item);
    let ui_len = (pdu.len() - ui - 4) as u16;
    pdu[ui + 2..ui + 4].copy_from_slice(&ui_len.to_be_bytes());
    let body = (pdu.len() - 6) as u32;
    pdu[2..6].copy_from_slice(&body.to_be_bytes());
    pdu
}

/// An Implicit VR Little Endian element.
fn element(group: u16, elem: u16, value: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&group.to_le_bytes());
    e.extend_from_slice(&elem.to_le_bytes());
    e.extend_from_slice(&(value.len() as u32).to_le_bytes());
    e.extend_from_slice(value);
    e
}

fn echo_command(message_id: u16) -> Vec<u8> {
    let rest = [
        element(0, 0x0002, b"1.2.840.10008.1.1\0"),
        element(0, 0x0100, &0x0030u16.to_le_bytes()),
        element(0, 0x0110, &message_id.to_le_bytes()),
        element(0, 0x0800, &0x0101u16.to_le_bytes()),
    ]
    .concat();
    [element(0, 0, &(rest.len() as u32).to_le_bytes()), rest].concat()
}

/// A P-DATA-TF PDU with one PDV item; `declared` overrides the PDV item length.
fn pdata(pc: u8, header: u8, value: &[u8], declared: Option<u32>) -> Vec<u8> {
    let item_len = declared.unwrap_or(value.len() as u32 + 2);
    let body_len = 4 + 2 + value.len();
    let mut pdu = vec![0x04, 0];
    pdu.extend_from_slice(&(body_len as u32).to_be_bytes());
    pdu.extend_from_slice(&item_len.to_be_bytes());
    pdu.push(pc);
    pdu.push(header);
    pdu.extend_from_slice(value);
    pdu
}

async fn read_pdu_within<R: AsyncRead + Unpin>(r: &mut R, within: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(within, async {
        let mut header = [0u8; 6];
        r.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        if len > 1 << 20 {
            return None;
        }
        let mut pdu = header.to_vec();
        pdu.resize(6 + len, 0);
        r.read_exact(&mut pdu[6..]).await.ok()?;
        Some(pdu)
    })
    .await
    .ok()
    .flatten()
}

/// A password-authenticated association to `called` over TLS; panics unless it is accepted.
async fn authenticated(source: &str, port: u16, ca: &Path, called: &str) -> Tls {
    let (mut tls, _) = tls_from(source, port, ca).await;
    let id = UserIdentity::new(
        false,
        UserIdentityType::UsernamePassword,
        b"alice".to_vec(),
        PASSWORD.as_bytes().to_vec(),
    );
    tls.write_all(&encode(request(called, 1, Some(id))))
        .await
        .expect("send A-ASSOCIATE-RQ");
    let answer = read_pdu_within(&mut tls, Duration::from_secs(10))
        .await
        .expect("an answer to the association request");
    assert_eq!(answer[0], 0x02, "not accepted: {answer:02x?}");
    tls
}

// ---------------------------------------------------------------------------------------------
// The hostile peers.

/// One hostile case's verdict: Ok(what was seen) or Err(what went wrong).
type Verdict = Result<String, String>;

fn within(what: &str, t: Option<Duration>, max: Duration) -> Result<Duration, String> {
    match t {
        Some(t) if t <= max => Ok(t),
        Some(t) => Err(format!("{what} after {t:?}, over {max:?}")),
        None => Err(format!("{what}: never (still open)")),
    }
}

/// The gateway answers at once with an A-ABORT and closes within CLOSE_WAIT.
fn aborted_at_once(seen: &Seen) -> Verdict {
    if !seen.abort() {
        return Err(format!("expected an A-ABORT, got {:02x?}", seen.bytes));
    }
    let first = within("A-ABORT", seen.first, SLACK)?;
    let closed = within("close", seen.closed, CLOSE_WAIT + SLACK)?;
    Ok(format!(
        "A-ABORT after {first:.1?}, closed after {closed:.1?}"
    ))
}

/// Closed by the phase timer: an A-ABORT (when TLS is up) at about PHASE, the close within CLOSE_WAIT.
fn dropped_by_phase_timer(seen: &Seen, tls_up: bool) -> Verdict {
    let closed = within("close", seen.closed, PHASE + CLOSE_WAIT + SLACK)?;
    if closed + Duration::from_millis(200) < PHASE {
        return Err(format!("closed after {closed:?}, before the phase timeout"));
    }
    if tls_up {
        if !seen.abort() {
            return Err(format!("expected an A-ABORT, got {:02x?}", seen.bytes));
        }
        let first = within("A-ABORT", seen.first, PHASE + SLACK)?;
        return Ok(format!(
            "A-ABORT after {first:.1?}, closed after {closed:.1?}"
        ));
    }
    Ok(format!("closed after {closed:.1?}"))
}

async fn hostile_cases(port: u16, ca: PathBuf) -> Vec<(&'static str, Verdict)> {
    let limit = PHASE + CLOSE_WAIT + SLACK + Duration::from_secs(1);
    let ca = &ca;
    let random_tcp = async {
        let mut tcp = tcp_from("127.0.0.2", port).await;
        let started = Instant::now();
        let _ = tcp.write_all(&noise(4096, 7)).await;
        let seen = watch(&mut tcp, started, limit).await;
        let closed = within("close", seen.closed, SLACK)?;
        Ok(format!("TLS refused it, closed after {closed:.1?}"))
    };
    let random_tls = async {
        let (mut tls, started) = tls_from("127.0.0.3", port, ca).await;
        let mut junk = noise(4096, 11);
        junk[0] = 0x09; // not a PDU type
        let _ = tls.write_all(&junk).await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let header_4gib = async {
        let (mut tls, started) = tls_from("127.0.0.4", port, ca).await;
        let _ = tls.write_all(&[0x01, 0, 0xff, 0xff, 0xff, 0xff]).await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let pdata_4gib = async {
        let (mut tls, started) = tls_from("127.0.0.5", port, ca).await;
        let _ = tls
            .write_all(&[0x04, 0, 0xff, 0xff, 0xff, 0xff, 0, 0])
            .await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let truncated_waiting = async {
        // The header promises the whole request; half of it comes, then nothing: the ARTIM timer.
        let (mut tls, started) = tls_from("127.0.0.6", port, ca).await;
        let rq = encode(request("ARCHIVE", 3, None));
        let _ = tls.write_all(&rq[..rq.len() / 2]).await;
        dropped_by_phase_timer(&watch(&mut tls, started, limit).await, true)
    };
    let truncated_item = async {
        // The PDU is complete but ends in the middle of a presentation context item.
        let (mut tls, started) = tls_from("127.0.0.7", port, ca).await;
        let mut rq = encode(request("ARCHIVE", 3, None));
        rq.truncate(74 + 40);
        let body = (rq.len() - 6) as u32;
        rq[2..6].copy_from_slice(&body.to_be_bytes());
        let _ = tls.write_all(&rq).await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let jwt_60k = async {
        let (mut tls, started) = tls_from("127.0.0.8", port, ca).await;
        let _ = tls
            .write_all(&request_with_raw_jwt("ARCHIVE", 60_000))
            .await;
        let seen = watch(&mut tls, started, limit).await;
        match seen.rejection() {
            Some((1, 2, 1)) => Ok(format!(
                "A-ASSOCIATE-RJ 1/2/1 after {:.1?}",
                seen.first.unwrap_or_default()
            )),
            other => Err(format!("expected 1/2/1, got {other:?} {:02x?}", seen.bytes)),
        }
    };
    let jwt_70k = async {
        let (mut tls, started) = tls_from("127.0.0.9", port, ca).await;
        let _ = tls
            .write_all(&request_with_raw_jwt("ARCHIVE", 70_000))
            .await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let contexts_1000 = async {
        let (mut tls, started) = tls_from("127.0.0.10", port, ca).await;
        let _ = tls.write_all(&encode(request("ARCHIVE", 1000, None))).await;
        let seen = watch(&mut tls, started, limit).await;
        match seen.rejection() {
            Some((1, 2, 1)) => Ok(format!(
                "no credential: A-ASSOCIATE-RJ 1/2/1 after {:.1?}",
                seen.first.unwrap_or_default()
            )),
            other => Err(format!("expected 1/2/1, got {other:?}")),
        }
    };
    let contexts_5000 = async {
        let (mut tls, started) = tls_from("127.0.0.11", port, ca).await;
        let _ = tls.write_all(&encode(request("ARCHIVE", 5000, None))).await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let pdata_first = async {
        let (mut tls, started) = tls_from("127.0.0.12", port, ca).await;
        let _ = tls.write_all(&pdata(1, 0x03, &echo_command(1), None)).await;
        aborted_at_once(&watch(&mut tls, started, limit).await)
    };
    let silent_tcp = async {
        let mut tcp = tcp_from("127.0.0.13", port).await;
        let started = Instant::now();
        dropped_by_phase_timer(&watch(&mut tcp, started, limit).await, false)
    };
    let silent_tls = async {
        let (mut tls, started) = tls_from("127.0.0.14", port, ca).await;
        dropped_by_phase_timer(&watch(&mut tls, started, limit).await, true)
    };
    let slowloris_tls = async {
        // A TLS ClientHello record header, one byte a second.
        let tcp = tcp_from("127.0.0.15", port).await;
        let started = Instant::now();
        let hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        dropped_by_phase_timer(&trickle(tcp, &hello, 10, started, limit).await, false)
    };
    let slowloris_rq = async {
        let (tls, started) = tls_from("127.0.0.16", port, ca).await;
        let rq = encode(request("ARCHIVE", 1, None));
        dropped_by_phase_timer(&trickle(tls, &rq, 10, started, limit).await, true)
    };
    let pdv_overrun = async {
        // Authenticated and accepted; then a PDV item that claims more than its PDU holds.
        let mut tls = authenticated("127.0.0.17", port, ca, "RECORDER").await;
        let started = Instant::now();
        let _ = tls
            .write_all(&pdata(1, 0x03, &echo_command(1), Some(0x0001_0000)))
            .await;
        let seen = watch(&mut tls, started, limit).await;
        let closed = within("close", seen.closed, SLACK)?;
        Ok(format!(
            "closed after {closed:.1?} (received {:02x?})",
            &seen.bytes[..seen.bytes.len().min(10)]
        ))
    };
    let (a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p) = tokio::join!(
        random_tcp,
        random_tls,
        header_4gib,
        pdata_4gib,
        truncated_waiting,
        truncated_item,
        jwt_60k,
        jwt_70k,
        contexts_1000,
        contexts_5000,
        pdata_first,
        silent_tcp,
        silent_tls,
        slowloris_tls,
        slowloris_rq,
        pdv_overrun
    );
    vec![
        ("random bytes instead of TLS", a),
        ("random bytes after TLS", b),
        ("A-ASSOCIATE-RQ header declaring 4 GiB", c),
        ("P-DATA-TF header declaring 4 GiB, first", d),
        ("A-ASSOCIATE-RQ truncated, rest never sent", e),
        ("A-ASSOCIATE-RQ ending mid-item", f),
        ("60 KB JWT", g),
        ("70 KB JWT (over 64 KiB)", h),
        ("1,000 presentation contexts", i),
        ("5,000 presentation contexts", j),
        ("P-DATA-TF before association", k),
        ("TCP connect, nothing sent", l),
        ("TLS handshake, nothing sent", m),
        ("slowloris: TLS ClientHello 1 byte/s", n),
        ("slowloris: A-ASSOCIATE-RQ 1 byte/s", o),
        ("PDV length overruns its PDU (after association)", p),
    ]
}

/// `openssl s_client` offering what the gateway must refuse, and one it must accept (to show the probe works).
fn openssl_probes(port: u16, ca: &Path) -> Vec<(&'static str, Verdict)> {
    let connect = format!("127.0.0.1:{port}");
    let probe = |args: &[&str]| -> (bool, String) {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &connect, "-servername", "localhost"])
            .arg("-CAfile")
            .arg(ca)
            .args(args);
        let out = run_bounded(&mut cmd, Some(b""), Duration::from_secs(15));
        let text = output_text(&out);
        let negotiated = text.contains("Cipher is ") && !text.contains("Cipher is (NONE)");
        (negotiated, text)
    };
    let refused = |args: &[&str]| -> Verdict {
        let (negotiated, text) = probe(args);
        if negotiated {
            return Err(format!("negotiated:\n{}", tail(&text, 30)));
        }
        let line = text
            .lines()
            .find(|l| l.contains("alert") || l.contains("no protocols") || l.contains("error"))
            .unwrap_or("no handshake")
            .trim()
            .to_string();
        Ok(format!(
            "refused: {}",
            line.chars().take(120).collect::<String>()
        ))
    };
    let accepted = |args: &[&str]| -> Verdict {
        let (negotiated, text) = probe(args);
        if !negotiated {
            return Err(format!("not negotiated:\n{}", tail(&text, 30)));
        }
        let line = text
            .lines()
            .find(|l| l.contains("Cipher is"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok(line)
    };
    vec![
        (
            "openssl s_client -tls1",
            refused(&["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        ),
        (
            "openssl s_client -tls1_1",
            refused(&["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        ),
        (
            "openssl s_client -tls1_2 -cipher AES128-SHA:ECDHE-ECDSA-AES128-SHA (CBC, SHA-1)",
            refused(&[
                "-tls1_2",
                "-cipher",
                "AES128-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256",
            ]),
        ),
        (
            "openssl s_client -tls1_2 ECDHE-ECDSA-AES128-GCM-SHA256 (control)",
            accepted(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
        ),
        ("openssl s_client -tls1_3 (control)", accepted(&["-tls1_3"])),
    ]
}

fn report(title: &str, results: &[(&str, Verdict)]) {
    eprintln!("---- {title} ----");
    for (name, v) in results {
        match v {
            Ok(what) => eprintln!("ok    {name}: {what}"),
            Err(why) => eprintln!("FAIL  {name}: {why}"),
        }
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(n, v)| v.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    assert!(failed.is_empty(), "{title}:\n{}", failed.join("\n"));
}

#[test]
fn hostile_peers_are_dropped_within_their_phase_timeouts_while_a_client_is_served() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let recorder = FakeArchive::start("record");
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            &pki.server_key,
            &[("ARCHIVE", archive.port), ("RECORDER", recorder.port)],
            "",
        ),
    );

    // The legitimate client: echo after echo (password over TLS) for as long as the hostile peers run.
    let done = Arc::new(AtomicBool::new(false));
    let served = {
        let done = done.clone();
        let ca = pki.ca_cert.clone();
        std::thread::spawn(move || {
            let pki_ca = ca.to_str().expect("path").to_string();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut results = Vec::new();
            while results.len() < 3 || (!done.load(Ordering::SeqCst) && results.len() < 12) {
                if Instant::now() > deadline {
                    break;
                }
                let out = pyscu(&[
                    "echo",
                    "--port",
                    &port.to_string(),
                    "--aec",
                    "ARCHIVE",
                    "--tls-ca",
                    &pki_ca,
                    "--user",
                    "alice",
                    "--password",
                    PASSWORD,
                ]);
                results.push(out);
            }
            results
        })
    };

    let started = Instant::now();
    let hostile = runtime().block_on(hostile_cases(port, pki.ca_cert.clone()));
    let tls = openssl_probes(port, &pki.ca_cert);
    done.store(true, Ordering::SeqCst);
    let served = served.join().expect("legitimate client thread");
    eprintln!("hostile phase took {:?}", started.elapsed());

    report("hostile peers", &hostile);
    report("TLS versions and suites", &tls);
    for out in &served {
        assert_eq!(out["statuses"], json!([0]), "legitimate echo: {out}");
    }
    // The archive saw the legitimate associations and nothing else.
    assert_eq!(archive.associations().len(), served.len());
    assert!(archive.stored_sop_uids().is_empty());
    // The recording archive saw the accepted association and an A-ABORT, never the bad P-DATA-TF.
    std::thread::sleep(Duration::from_millis(300));
    let types = recorder.pdu_types();
    assert!(
        !types.contains(&4) && types.first() == Some(&1),
        "{types:?}"
    );
    let (peak, now) = memory_kib(gw.pid());
    eprintln!("gateway memory: peak {peak} KiB, now {now} KiB");
    assert!(peak < 256 * 1024, "the gateway peaked at {peak} KiB");
    let log = gw.log();
    assert!(!log.contains("panicked"), "{log}");
    for outcome in ["tls_failed", "timeout", "protocol_error", "rejected"] {
        assert!(
            log.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome}: {log}"
        );
    }
}

#[test]
fn failing_archives_never_turn_into_success_and_the_gateway_stays_up() {
    let pki = Pki::generate();
    let modes = [
        ("DROP", "drop-on-data"),
        ("ABORT", "abort-on-data"),
        ("SLOW", "slow-accept"),
        ("SILENT", "silent"),
        ("NORELEASE", "no-release"),
        ("OK", "record"),
    ];
    let fakes: Vec<(&str, FakeArchive)> = modes
        .iter()
        .map(|(ae, mode)| (*ae, FakeArchive::start(mode)))
        .collect();
    let mut upstreams: Vec<(&str, u16)> = fakes.iter().map(|(ae, f)| (*ae, f.port)).collect();
    upstreams.push(("DOWN", 1)); // nothing listens on port 1 of loopback
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, &pki.server_key, &upstreams, ""));
    let data = common::tempdir("failing");
    let files = make_instances(data.path(), &[("FAIL1", "FAIL^ONE", 1)]);
    let file = files[0].to_str().expect("path").to_string();

    let timed = |f: &(dyn Fn() -> Value + Sync)| {
        let t = Instant::now();
        let v = f();
        (v, t.elapsed())
    };
    let ((down, t_down), (drop, abort, storescu), (slow, t_slow), (silent, t_silent), norelease) =
        std::thread::scope(|sc| {
            let down = sc.spawn(|| timed(&|| legit("echo", port, "DOWN", &pki, &[])));
            let stores = sc.spawn(|| {
                let drop = legit("store", port, "DROP", &pki, std::slice::from_ref(&file));
                let abort = legit("store", port, "ABORT", &pki, std::slice::from_ref(&file));
                let storescu = dcmtk(
                    "storescu",
                    &[
                        "-aec",
                        "DROP",
                        "+tla",
                        "+cf",
                        pki.ca_cert.to_str().expect("path"),
                        "-usr",
                        "alice",
                        "-pwd",
                        PASSWORD,
                        "127.0.0.1",
                        &port.to_string(),
                        &file,
                    ],
                );
                (drop, abort, storescu)
            });
            let slow = sc.spawn(|| timed(&|| legit("echo", port, "SLOW", &pki, &[])));
            let silent = sc.spawn(|| timed(&|| legit("echo", port, "SILENT", &pki, &[])));
            let norelease = sc.spawn(|| legit("echo", port, "NORELEASE", &pki, &[]));
            (
                down.join().expect("down"),
                stores.join().expect("stores"),
                slow.join().expect("slow"),
                silent.join().expect("silent"),
                norelease.join().expect("norelease"),
            )
        });
    eprintln!(
        "down {t_down:?}: {down}\ndrop: {drop}\nabort: {abort}\nslow {t_slow:?}: {slow}\n\
         silent {t_silent:?}: {silent}\nno-release: {norelease}"
    );

    // Down at connect: a transient rejection, logged.
    assert_eq!(rejection(&down), Some((2, 3, 1)), "{down}");
    // Gone in the middle of a C-STORE: never a success.
    for (what, out) in [("drop", &drop), ("abort", &abort)] {
        assert!(
            !out["statuses"]
                .as_array()
                .is_some_and(|s| s.contains(&json!(0))),
            "{what}: a store reported success: {out}"
        );
        assert_eq!(out["associated"], json!(true), "{what}: {out}");
        assert_eq!(out["aborted"], json!(true), "{what}: {out}");
    }
    let text = output_text(&storescu);
    assert!(
        !storescu.status.success() || !text.contains("Success"),
        "storescu claimed success through a vanishing archive:\n{text}"
    );
    // Slow to accept: bounded by upstream_response (2 s), a transient rejection. Durations are the
    // gateway's own (its log line), which include the argon2id check of a debug build.
    let log = gw.log();
    assert_eq!(rejection(&slow), Some((2, 3, 1)), "{slow}");
    let d_slow = duration_ms(&log, "SLOW");
    assert!(
        (2000..10_000).contains(&d_slow), // 2 s bound + argon2id of a debug build on a loaded machine
        "slow archive: {d_slow} ms ({t_slow:?} for the client)"
    );
    // Silent after accepting: the idle timeout aborts the client.
    assert_eq!(silent["statuses"], json!([null]), "{silent}");
    let d_silent = duration_ms(&log, "SILENT");
    assert!(
        (IDLE_MS..IDLE_MS + 4000).contains(&d_silent),
        "silent archive: {d_silent} ms ({t_silent:?} for the client)"
    );
    // Closes TCP instead of A-RELEASE-RP: the echo succeeded, the release becomes an abort, logged.
    assert_eq!(norelease["statuses"], json!([0]), "{norelease}");

    // The gateway is still up and serving.
    let ok = legit("echo", port, "OK", &pki, &[]);
    assert_eq!(ok["statuses"], json!([0]), "{ok}");
    let drop_types = fakes[0].1.pdu_types();
    assert!(
        drop_types.contains(&4),
        "the store reached DROP: {drop_types:?}"
    );
    let log = gw.log();
    for needle in [
        "unreachable",
        "did not answer the association in time",
        "idle timeout",
        "archive closed the connection without release",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn eight_clients_store_50_instances_each_concurrently_byte_identical() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            &pki.server_key,
            &[("ARCHIVE", orthanc.dicom_port)],
            "",
        ),
    );
    let data = common::tempdir("concurrent");
    let spec: Vec<(String, String, usize)> = (0..8)
        .map(|c| (format!("CONC{c}"), format!("CONCURRENT^{c}"), 50))
        .collect();
    let spec_ref: Vec<(&str, &str, usize)> = spec
        .iter()
        .map(|(a, b, n)| (a.as_str(), b.as_str(), *n))
        .collect();
    let instances = make_instances_with_uids(data.path(), &spec_ref);
    assert_eq!(instances.len(), 400);

    let started = Instant::now();
    let ca = pki.ca_cert.to_str().expect("path").to_string();
    let pki = &pki;
    let results: Vec<(usize, bool, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|c| {
                let mine: Vec<String> = instances
                    .iter()
                    .filter(|i| i.patient_id == format!("CONC{c}"))
                    .map(|i| i.path.display().to_string())
                    .collect();
                let ca = ca.clone();
                sc.spawn(move || {
                    if c % 2 == 0 {
                        // DCMTK storescu, password over TLS.
                        let mut args = vec![
                            "-aec",
                            "ARCHIVE",
                            "+tla",
                            "+cf",
                            &ca,
                            "-usr",
                            "alice",
                            "-pwd",
                            PASSWORD,
                            "127.0.0.1",
                        ];
                        let p = port.to_string();
                        args.push(&p);
                        args.extend(mine.iter().map(String::as_str));
                        let out = dcmtk("storescu", &args);
                        (c, out.status.success(), output_text(&out))
                    } else {
                        let out = legit("store", port, "ARCHIVE", pki, &mine);
                        let all_ok = out["statuses"]
                            .as_array()
                            .is_some_and(|s| s.len() == 50 && s.iter().all(|x| x == &json!(0)));
                        (c, all_ok, out.to_string())
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    eprintln!("8 x 50 stores took {:?}", started.elapsed());
    for (c, ok, text) in &results {
        assert!(ok, "client {c} failed:\n{text}");
    }
    assert_eq!(orthanc.instance_count(), 400);
    let mut differ = Vec::new();
    for i in &instances {
        let original = std::fs::read(&i.path).expect("read source");
        match orthanc.file_by_sop_instance_uid(&i.sop_uid) {
            Some(stored) if dataset_bytes(&stored) == dataset_bytes(&original) => {}
            Some(_) => differ.push(format!("{} differs", i.sop_uid)),
            None => differ.push(format!("{} missing", i.sop_uid)),
        }
    }
    assert!(differ.is_empty(), "{} of 400: {differ:?}", differ.len());
    let log = gw.log();
    assert_eq!(log.matches("outcome=\"released\"").count(), 8, "{log}");
}

#[test]
fn secrets_stay_out_of_logs_audit_and_metrics_and_a_loose_key_is_flagged() {
    let pki = Pki::generate();
    let recorder = FakeArchive::start("record");
    let dir = common::tempdir("secrets");
    // The server key with mode 0644: readable by others.
    let loose_key = dir.path().join("loose.key");
    std::fs::copy(&pki.server_key, &loose_key).expect("copy key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // ... in a folder others can enter (a 0644 key in a 0700 folder is safe), started on purpose
    // with allow_readable_keys (without it the start is refused: tests/check.rs).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let port = free_port();
    let admin = free_port();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!(
        "[audit]\nfile = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        audit.display()
    );
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            &loose_key,
            &[("ARCHIVE", recorder.port)],
            &extra,
        )
        .replacen(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{port}\"\nallow_readable_keys = true"),
            1,
        ),
    );
    assert!(
        gw.wait_for_log(
            "can be read by other users (mode 644",
            Duration::from_secs(5)
        ),
        "no warning about the 0644 key:\n{}",
        gw.log()
    );

    let now = now() as i64;
    let claims = json!({"iss": "https://idp.test", "aud": "pacsgate", "sub": "carol",
                        "exp": now + 600, "roles": ["clinician"]});
    let good_jwt = mint_jwt(&pki.jwt_private_pem, &claims);
    let foreign_jwt = mint_jwt(&pki.other_jwt_private_pem, &claims);
    let garbage_jwt =
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.R4nd0mS1gn4tureG4rbage".to_string();
    let wrong_password = "Wr0ng-but-still-s3cret!";
    let ca = pki.ca_cert.to_str().expect("path");
    let with = |identity: &[&str]| {
        let mut args = s(&[
            "echo",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            ca,
        ]);
        args.extend(s(identity));
        pyscu_s(&args)
    };
    let outs = [
        with(&["--user", "alice", "--password", PASSWORD]),
        with(&["--user", "alice", "--password", wrong_password]),
        with(&["--user", "mallory", "--password", wrong_password]),
        with(&["--jwt", &good_jwt]),
        with(&["--jwt", &foreign_jwt]),
        with(&["--jwt", &garbage_jwt]),
    ];
    assert_eq!(outs[0]["statuses"], json!([0]), "{}", outs[0]);
    assert_eq!(outs[3]["statuses"], json!([0]), "{}", outs[3]);
    for bad in [&outs[1], &outs[2], &outs[4], &outs[5]] {
        assert_eq!(rejection(bad), Some((1, 2, 1)), "{bad}");
    }

    // Each place is first shown to have been read and to hold these very events: a place that
    // could not be read (or stayed empty) must fail the test, not pass the "no secret" checks.
    let metrics = ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("GET /metrics on the admin port: {e}"))
        .body_mut()
        .read_to_string()
        .expect("read the metrics body");
    for needle in [
        "pacsgate_associations_total",
        "outcome=\"rejected\"",
        "reason=\"not_authenticated\"",
        "pacsgate_operations_total",
    ] {
        assert!(
            metrics.contains(needle),
            "no {needle} in the metrics:\n{metrics}"
        );
    }
    let count = |text: &str, event: &str| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .count()
    };
    // The audit trail is written as the events happen: wait (bounded) until all six are there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let audit_text = loop {
        let text = std::fs::read_to_string(&audit)
            .unwrap_or_else(|e| panic!("read the audit file {}: {e}", audit.display()));
        if count(&text, "login.failed") >= 4 && count(&text, "association.accepted") >= 2 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the audit file lacks the expected events (4 login.failed, 2 association.accepted):\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        audit_text.contains("\"mallory\""),
        "the unknown user's failed login is in the audit:\n{audit_text}"
    );
    let log = gw.log();
    assert!(log.contains("user=\"alice\""), "{log}");
    assert!(log.contains("user=\"mallory\""), "{log}");
    let signature = |t: &str| t.rsplit('.').next().unwrap_or_default().to_string();
    let secrets = [
        PASSWORD.to_string(),
        wrong_password.to_string(),
        good_jwt.clone(),
        foreign_jwt.clone(),
        garbage_jwt.clone(),
        signature(&good_jwt),
        signature(&foreign_jwt),
        signature(&garbage_jwt),
    ];
    for (place, text) in [("log", &log), ("audit", &audit_text), ("metrics", &metrics)] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a secret ({}...) is in the {place}",
                &secret[..secret.len().min(6)]
            );
        }
    }
    eprintln!(
        "checked {} bytes of log, {} of audit, {} of metrics",
        log.len(),
        audit_text.len(),
        metrics.len()
    );
}

/// A 41-byte command set found by the dimse_command fuzz target: (FFFF,FB00) with an undefined length
/// that `dimse::check_lengths` lets through and dicom-parser then reads as a ~4 GiB value.
const HOSTILE_COMMAND_SET: [u8; 41] = [
    64, 245, 126, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 23, 0, 0, 0, 0, 0, 0, 255, 255, 0,
    251, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
];

#[test]
fn a_hostile_command_set_does_not_make_the_gateway_allocate_gigabytes() {
    let pki = Pki::generate();
    let recorder = FakeArchive::start("record");
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            &pki.server_key,
            &[("RECORDER", recorder.port)],
            "",
        ),
    );
    let (before, _) = memory_kib(gw.pid());
    let seen = runtime().block_on(async {
        let mut tls = authenticated("127.0.0.1", port, &pki.ca_cert, "RECORDER").await;
        let started = Instant::now();
        let _ = tls
            .write_all(&pdata(1, 0x03, &HOSTILE_COMMAND_SET, None))
            .await;
        watch(&mut tls, started, Duration::from_secs(20)).await
    });
    let (peak, _) = memory_kib(gw.pid());
    eprintln!(
        "peak {before} -> {peak} KiB; closed after {:?}",
        seen.closed
    );
    assert!(peak < 512 * 1024, "the gateway peaked at {peak} KiB");
    assert!(
        seen.closed.is_some_and(|t| t < Duration::from_secs(2)),
        "{seen:?}"
    );
}

#[test]
fn one_address_holding_silent_connections_does_not_starve_another() {
    let pki = Pki::generate();
    let recorder = FakeArchive::start("record");
    let port = free_port();
    let extra = "[limits]\nmax_pending_connections = 16\nmax_pending_per_address = 8\n";
    let mut cfg = config(
        port,
        &pki,
        &pki.server_key,
        &[("RECORDER", recorder.port)],
        extra,
    );
    cfg = cfg.replace("tls_handshake = 2", "tls_handshake = 10");
    cfg = cfg.replace("association_request = 2", "association_request = 10");
    let _gw = Gateway::start(port, &cfg);
    let rt = runtime();
    // 127.0.0.2 opens 40 connections and sends nothing: more than every pending slot.
    let held: Vec<TcpStream> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..40 {
            v.push(tcp_from("127.0.0.2", port).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        v
    });
    let out = legit("echo", port, "RECORDER", &pki, &[]);
    drop(held);
    assert_eq!(out["statuses"], json!([0]), "127.0.0.1 was starved: {out}");
}

/// Issue 17: with the default admission limits, an address holding more silent connections than the
/// gateway has handshake slots (256) takes only its share (32); a burst of 40 pynetdicom clients
/// from another address at the same time (more than one address's share) is served in full, and
/// so is a password login.
#[test]
fn a_slow_address_holding_more_than_every_slot_does_not_starve_a_burst_from_another() {
    const HELD: usize = 300;
    const BURST: usize = 40;
    let pki = Pki::generate();
    let recorder = FakeArchive::start("record");
    let port = free_port();
    // Admission limits at their defaults; carol (JWT) opens BURST associations at once.
    let extra = "[limits]\nmax_associations_per_user = 100\n";
    let mut cfg = config(
        port,
        &pki,
        &pki.server_key,
        &[("RECORDER", recorder.port)],
        extra,
    );
    cfg = cfg.replace("tls_handshake = 2", "tls_handshake = 10");
    cfg = cfg.replace("association_request = 2", "association_request = 10");
    let gw = Gateway::start(port, &cfg);
    let claims = json!({"iss": "https://idp.test", "aud": "pacsgate", "sub": "carol",
                        "exp": now() + 600, "roles": ["clinician"]});
    let jwt = mint_jwt(&pki.jwt_private_pem, &claims);
    let rt = runtime();
    let held: Vec<TcpStream> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..HELD {
            v.push(tcp_from("127.0.0.2", port).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        v
    });
    let started = Instant::now();
    let (burst, password) = std::thread::scope(|s| {
        let burst: Vec<_> = (0..BURST)
            .map(|_| {
                let args = s_args(port, &pki, &jwt);
                s.spawn(move || pyscu_s(&args))
            })
            .collect();
        let password = s.spawn(|| legit("echo", port, "RECORDER", &pki, &[]));
        (
            burst
                .into_iter()
                .map(|h| h.join().expect("client"))
                .collect::<Vec<_>>(),
            password.join().expect("password client"),
        )
    });
    let took = started.elapsed();
    drop(held);
    let log = gw.log();
    let served = burst
        .iter()
        .filter(|out| out["statuses"] == json!([0]))
        .count();
    eprintln!(
        "{served}/{BURST} JWT echoes and the password echo in {took:.1?} while 127.0.0.2 held {HELD}"
    );
    assert_eq!(
        served,
        BURST,
        "127.0.0.1's burst was starved: {:?}\n{}",
        burst.iter().find(|o| o["statuses"] != json!([0])),
        tail(&log, 20)
    );
    assert_eq!(
        password["statuses"],
        json!([0]),
        "password login starved: {password}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("peer=127.0.0.1:") && l.contains("outcome=\"dropped\"")),
        "{}",
        tail(&log, 20)
    );
}

/// pynetdicom echo with a JWT over TLS, calling RECORDER.
fn s_args(port: u16, pki: &Pki, jwt: &str) -> Vec<String> {
    s(&[
        "echo",
        "--port",
        &port.to_string(),
        "--aec",
        "RECORDER",
        "--tls-ca",
        pki.ca_cert.to_str().expect("path"),
        "--jwt",
        jwt,
    ])
}

/// Issue 17: a connection that waits in vain for a handshake slot is told so after TLS with an
/// A-ASSOCIATE-RJ 2/3/2 (transient) and one log line, not a bare reset.
#[test]
fn a_connection_that_waits_in_vain_for_a_slot_is_refused_2_3_2_after_tls() {
    let pki = Pki::generate();
    let recorder = FakeArchive::start("record");
    let port = free_port();
    let extra = "[limits]\nmax_pending_connections = 2\nmax_pending_per_address = 1\n";
    let cfg = config(
        port,
        &pki,
        &pki.server_key,
        &[("RECORDER", recorder.port)],
        extra,
    )
    // The holder keeps its slot (TLS done, no association request) for 10 s; the waiter waits 2 s.
    .replace("association_request = 2", "association_request = 10");
    let gw = Gateway::start(port, &cfg);
    let rt = runtime();
    let seen = rt.block_on(async {
        let (_holder, _) = tls_from("127.0.0.2", port, &pki.ca_cert).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut tls, started) = tls_from("127.0.0.2", port, &pki.ca_cert).await;
        tls.write_all(&encode(request("RECORDER", 1, None)))
            .await
            .expect("write the A-ASSOCIATE-RQ");
        watch(&mut tls, started, Duration::from_secs(10)).await
    });
    assert_eq!(seen.rejection(), Some((2, 3, 2)), "{seen:?}");
    assert!(
        gw.wait_for_log(
            "no handshake slot came free in time",
            Duration::from_secs(5)
        ),
        "{}",
        tail(&gw.log(), 20)
    );
}

/// The C-FIND SOP class of the Study Root model (PS3.4 C.6.2.1).
const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// An Implicit VR Little Endian command set: its group length, then `elements`.
fn command_set(elements: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let rest: Vec<u8> = elements
        .iter()
        .flat_map(|(e, v)| element(0, *e, v))
        .collect();
    [element(0, 0, &(rest.len() as u32).to_le_bytes()), rest].concat()
}

/// Every PDU the gateway sends a raw client on `tls` after `request`, until it closes the
/// connection or nothing comes for 8 s (at most 64 PDUs).
async fn pdus_after(tls: &mut Tls, request: &[u8]) -> Vec<Vec<u8>> {
    tls.write_all(request).await.expect("send the request");
    let mut out = Vec::new();
    while out.len() < 64 {
        match read_pdu_within(tls, Duration::from_secs(8)).await {
            Some(pdu) => out.push(pdu),
            None => break,
        }
    }
    out
}

/// A raw client's C-FIND (Study Root, PatientID P1, message ID 7) through the gateway to `called`.
async fn raw_find(port: u16, ca: &Path, called: &str) -> Vec<Vec<u8>> {
    let (mut tls, _) = tls_from("127.0.0.1", port, ca).await;
    let id = UserIdentity::new(
        false,
        UserIdentityType::UsernamePassword,
        b"alice".to_vec(),
        PASSWORD.as_bytes().to_vec(),
    );
    let mut rq = request(called, 1, Some(id));
    rq.presentation_contexts[0].abstract_syntax = STUDY_ROOT_FIND.into();
    tls.write_all(&encode(rq))
        .await
        .expect("send A-ASSOCIATE-RQ");
    let answer = read_pdu_within(&mut tls, Duration::from_secs(10))
        .await
        .expect("an answer to the association request");
    assert_eq!(answer[0], 0x02, "not accepted: {answer:02x?}");
    let command = command_set(&[
        (0x0002, format!("{STUDY_ROOT_FIND}\0").into_bytes()),
        (0x0100, 0x0020u16.to_le_bytes().to_vec()),
        (0x0110, 7u16.to_le_bytes().to_vec()),
        (0x0700, 0u16.to_le_bytes().to_vec()),
        (0x0800, 0u16.to_le_bytes().to_vec()),
    ]);
    let identifier = [
        element(0x0008, 0x0052, b"STUDY "),
        element(0x0008, 0x0054, b""),
        element(0x0010, 0x0010, b""),
        element(0x0010, 0x0020, b"P1"),
        element(0x0020, 0x000D, b""),
    ]
    .concat();
    let request = [
        pdata(1, 0x03, &command, None),
        pdata(1, 0x02, &identifier, None),
    ]
    .concat();
    pdus_after(&mut tls, &request).await
}

fn contains(haystack: &[Vec<u8>], needle: &[u8]) -> bool {
    haystack
        .iter()
        .any(|p| p.windows(needle.len()).any(|w| w == needle))
}

/// Security review 2026-12-02, item 2: an archive's response whose MessageIDBeingRespondedTo is no
/// outstanding request of the association (another message ID, or after the final response) was
/// forwarded raw: no RetrieveAETitle rewrite, no max_query_results count, no audit. Now it is a protocol
/// violation: never forwarded, both peers get an A-ABORT, one log line names it, the gateway stays up.
#[test]
fn an_archive_response_to_no_outstanding_request_aborts_the_association_and_is_never_forwarded() {
    let pki = Pki::generate();
    let stray = FakeArchive::start("find-stray-id");
    let late = FakeArchive::start("find-after-final");
    let echo = FakeArchive::start("echo-stray-id");
    let ok = FakeArchive::start("record");
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(
            port,
            &pki,
            &pki.server_key,
            &[
                ("STRAY", stray.port),
                ("LATE", late.port),
                ("STRAYECHO", echo.port),
                ("OK", ok.port),
            ],
            "",
        ),
    );
    let ca = pki.ca_cert.clone();
    let (stray_seen, late_seen, echo_seen) = runtime().block_on(async {
        let stray_seen = raw_find(port, &ca, "STRAY").await;
        let late_seen = raw_find(port, &ca, "LATE").await;
        let mut tls = authenticated("127.0.0.1", port, &ca, "STRAYECHO").await;
        let echo_seen = pdus_after(&mut tls, &pdata(1, 0x03, &echo_command(5), None)).await;
        (stray_seen, late_seen, echo_seen)
    });
    let types = |seen: &[Vec<u8>]| seen.iter().map(|p| p[0]).collect::<Vec<u8>>();
    eprintln!(
        "stray: {:?}\nlate: {:?}\necho: {:?}",
        types(&stray_seen),
        types(&late_seen),
        types(&echo_seen)
    );

    // The tracked match reached the client, rewritten (RetrieveAETitle = the called AE).
    for (what, seen) in [("stray", &stray_seen), ("late", &late_seen)] {
        assert!(contains(seen, b"TRACKED^ONE"), "{what}: the tracked match");
        assert!(
            !contains(seen, b"ROGUE_A"),
            "{what}: RetrieveAETitle not rewritten"
        );
    }
    // The untracked ones never did, and the association ended in an A-ABORT.
    assert!(
        !contains(&stray_seen, b"UNTRACKED^MID"),
        "stray ID forwarded"
    );
    assert!(!contains(&stray_seen, b"ROGUE_B"), "stray ID forwarded");
    assert!(
        !contains(&late_seen, b"AFTER^FINAL"),
        "match after the final forwarded"
    );
    assert!(
        !contains(&late_seen, b"ROGUE_C"),
        "match after the final forwarded"
    );
    // P-DATA (however the gateway batches it), then the A-ABORT, then the close.
    for (what, seen) in [("stray", &stray_seen), ("late", &late_seen)] {
        let t = types(seen);
        assert!(
            t.len() >= 2 && t.last() == Some(&7) && t[..t.len() - 1].iter().all(|&x| x == 4),
            "{what}: {t:?}"
        );
    }
    assert_eq!(
        types(&echo_seen),
        vec![7],
        "the stray C-ECHO-RSP is not forwarded"
    );
    // The archive got an A-ABORT too (PS3.8 AA-8).
    let deadline = Instant::now() + Duration::from_secs(5);
    for (what, fake) in [("stray", &stray), ("late", &late), ("echo", &echo)] {
        while !fake.pdu_types().contains(&7) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            fake.pdu_types().contains(&7),
            "{what}: no A-ABORT at the archive: {:?}",
            fake.pdu_types()
        );
    }

    // One log line each, naming the violation; the gateway is still up and serving.
    let served = legit("echo", port, "OK", &pki, &[]);
    assert_eq!(served["statuses"], json!([0]), "{served}");
    let log = gw.log();
    for needle in [
        "protocol violation: C-FIND-RSP from the archive for message ID 107, which",
        "protocol violation: C-FIND-RSP from the archive for message ID 7, which",
        "protocol violation: C-ECHO-RSP from the archive for message ID 105, which",
    ] {
        assert_eq!(
            log.lines().filter(|l| l.contains(needle)).count(),
            1,
            "{needle:?} once in the log:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}
