//! The other doors, with real peers (issue 19 items 7, 8, 12, 13; issue 15 item 13): client
//! certificates held to their purpose (DCMTK echoscu, openssl s_client), no TLS resumption on the
//! DICOM door and ALPN on HTTPS, JWT lifetimes, the admin port flooded under a small descriptor
//! limit while DICOM associations go on, /readyz generic and cached, the uniform 401 body (curl).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A gateway config in front of `upstream_port`: client certificates from the test CA, user
/// alice (password), certificate user bob, JWTs from the test key; `extra` is appended.
fn config(port: u16, pki: &Pki, upstream_port: u16, extra: &str) -> String {
    GatewayConfig::new(port)
        .set("gateway", "ae_title = \"PACSGATE\"")
        .tls(pki)
        .client_ca(pki)
        .set("timeouts", "association_request = 5")
        .set("timeouts", "upstream_connect = 2")
        .upstream("ARCHIVE", upstream_port, "ARCHIVE")
        .jwt_es256(pki)
        .role("reader", &["echo", "find"])
        .user("alice", &password_hash(PASSWORD), &["reader"])
        .user_cert("bob", &["reader"])
        .raw(extra)
        .to_toml()
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// DCMTK echoscu over TLS with a client certificate, called AE ARCHIVE.
fn echoscu_cert(port: u16, pki: &Pki, cert: &std::path::Path, key: &std::path::Path) -> String {
    let out = dcmtk(
        "echoscu",
        &[
            "-aec",
            "ARCHIVE",
            "+tls",
            path(key),
            path(cert),
            "+cf",
            path(&pki.ca_cert),
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    if out.status.success() {
        "ok".to_string()
    } else {
        format!("failed: {}", output_text(&out))
    }
}

/// The log lines of the `association` outcome, in order.
fn association_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" association") && l.contains("outcome="))
        .map(str::to_string)
        .collect()
}

#[test]
fn client_certificates_without_client_auth_or_a_signing_key_usage_are_refused_at_the_handshake() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let gw = Gateway::start(port, &config(port, &pki, archive.port, ""));

    // The good certificate: clientAuth, digitalSignature.
    let (cert, key) = pki.client("bob");
    assert_eq!(echoscu_cert(port, &pki, &cert, &key), "ok", "{}", gw.log());
    assert_eq!(archive.associations().len(), 1);

    let cases: [(&str, &[Eku], &[Ku], &str); 4] = [
        (
            "no extended key usage",
            &[],
            &[Ku::DigitalSignature],
            "client certificate refused: its extended key usage must include clientAuth",
        ),
        (
            "serverAuth only",
            &[Eku::ServerAuth],
            &[Ku::DigitalSignature],
            "extended key usage",
        ),
        (
            "key usage without digitalSignature",
            &[Eku::ClientAuth],
            &[Ku::KeyEncipherment],
            "client certificate refused: client certificate's key usage does not include digitalSignature",
        ),
        (
            "anyExtendedKeyUsage alone",
            &[Eku::Any],
            &[Ku::DigitalSignature],
            "extended key usage",
        ),
    ];
    for (i, (what, ekus, kus, reason)) in cases.iter().enumerate() {
        let before = association_lines(&gw.log()).len();
        let (cert, key) = pki.client_with_usages(&format!("case{i}"), "bob", ekus, kus);
        let said = echoscu_cert(port, &pki, &cert, &key);
        assert!(said.starts_with("failed"), "{what}: accepted");
        let deadline = Instant::now() + Duration::from_secs(5);
        let line = loop {
            let lines = association_lines(&gw.log());
            if lines.len() > before {
                break lines[before].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no log line\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            line.contains("outcome=\"tls_failed\"") && line.contains(reason),
            "{what}: {line}"
        );
    }
    assert_eq!(
        archive.associations().len(),
        1,
        "a refused certificate reached the archive"
    );
}

/// `openssl s_client` once, saving or reusing a session; its output.
fn s_client(port: u16, pki: &Pki, extra: &[&str]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", path(&pki.ca_cert), "-servername", "localhost"])
        .args(extra);
    // Sleep a little before closing stdin so TLS 1.3 tickets (sent after the handshake) arrive.
    let out = run_bounded(
        cmd.arg("-ign_eof"),
        Some(b""),
        Duration::from_secs(2), // killed after 2 s: the session file is written by then
    );
    output_text(&out)
}

#[test]
fn the_dicom_door_never_resumes_a_tls_session_and_the_web_door_speaks_alpn_http_1_1() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let web = free_port();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:{}\"\n",
        archive.port
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(web);
    let (cert, key) = pki.client("bob");
    let dir = common::tempdir("sessions");
    for (version, door) in [("-tls1_3", port), ("-tls1_2", port), ("-tls1_2", web)] {
        let session = dir.path().join(format!("{door}{version}.pem"));
        let client = [
            version,
            "-cert",
            path(&cert),
            "-key",
            path(&key),
            "-sess_out",
            path(&session),
        ];
        let first = s_client(door, &pki, &client);
        assert!(first.contains("Verify return code: 0"), "{first}");
        if !session.exists() {
            continue; // nothing to resume: what the DICOM door means
        }
        let second = s_client(
            door,
            &pki,
            &[
                version,
                "-cert",
                path(&cert),
                "-key",
                path(&key),
                "-sess_in",
                path(&session),
            ],
        );
        assert!(
            !second.contains("Reused,"),
            "port {door} {version}: a session was resumed\n{second}"
        );
    }
    // ALPN: the web door picks http/1.1 from what a browser offers; the DICOM door negotiates none.
    let alpn = s_client(web, &pki, &["-alpn", "h2,http/1.1"]);
    assert!(alpn.contains("ALPN protocol: http/1.1"), "{alpn}");
    let alpn = s_client(port, &pki, &["-alpn", "h2,http/1.1"]);
    assert!(alpn.contains("No ALPN negotiated"), "{alpn}");
}

fn token(pki: &Pki, claims: Value) -> String {
    mint_jwt_exact(&pki.jwt_private_pem, &claims)
}

#[test]
fn tokens_need_iat_and_a_lifetime_within_max_lifetime() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    // The default max_lifetime: 24 h.
    let gw = Gateway::start(port, &config(port, &pki, archive.port, ""));
    let now = now() as i64;
    let claims = |iat: Option<i64>, exp: i64| {
        let mut c = json!({"iss": "https://idp.test", "aud": "pacsgate", "sub": "carol",
                           "exp": exp, "roles": ["reader"]});
        if let Some(iat) = iat {
            c["iat"] = iat.into();
        }
        c
    };
    let echo = |jwt: &str| {
        pyscu(&[
            "echo",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            path(&pki.ca_cert),
            "--jwt",
            jwt,
        ])
    };
    let ok = echo(&token(&pki, claims(Some(now - 60), now + 3600)));
    assert_eq!(ok["associated"], true, "a 1 h token: {ok}\n{}", gw.log());
    for (what, c) in [
        (
            "100-year token",
            claims(Some(now), now + 100 * 365 * 86_400),
        ),
        ("no iat", claims(None, now + 600)),
        ("25 h token", claims(Some(now), now + 25 * 3600)),
        (
            "iat in the future",
            claims(Some(now + 30 * 86_400), now + 30 * 86_400 + 600),
        ),
    ] {
        let v = echo(&token(&pki, c));
        let r = &v["rejection"];
        assert_eq!(
            (
                r["result"].as_i64(),
                r["source"].as_i64(),
                r["reason"].as_i64()
            ),
            (Some(1), Some(2), Some(1)),
            "{what}: {v}"
        );
    }
    let log = gw.log();
    assert!(
        log.contains("JWT lifetime is not bounded: exp - iat is") && log.contains("no iat"),
        "{log}"
    );
    assert_eq!(archive.associations().len(), 1, "only the 1 h token passed");
}

/// A TCP listener that counts connections and closes them.
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
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

/// One plain HTTP/1.1 GET on the admin port: (status, body).
fn admin_get(port: u16, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    // A write the server cut short (a TLS port closing on plain text) is an answer of nothing:
    // status 0, which the callers' assertions then judge.
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

#[test]
fn readyz_answers_one_word_from_a_cached_check_that_includes_the_dicomweb_upstream() {
    let pki = Pki::generate();
    let (archive_port, archive_connects) = counting_listener();
    let dead_web = free_port(); // nothing listens: the DICOMweb upstream is down
    let port = free_port();
    let admin = free_port();
    let web = free_port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:{dead_web}\"\n"
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive_port, &extra));
    gw.wait_listening(admin);
    assert!(
        gw.wait_for_log("readiness: not ready", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let before = archive_connects.load(Ordering::SeqCst);
    for _ in 0..20 {
        let (status, body) = admin_get(admin, "/readyz", &[]);
        assert_eq!((status, body.as_str()), (503, "not ready\n"));
    }
    let after = archive_connects.load(Ordering::SeqCst);
    assert!(
        after - before <= 1,
        "20 /readyz requests opened {} connections to the archive",
        after - before
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("readiness: not ready"))
        .expect("line");
    assert!(
        line.contains("DICOMweb upstream (http.upstream)")
            && line.contains(&format!("127.0.0.1:{dead_web}")),
        "{line}"
    );
    // The body names no AE title or address.
    let (_, body) = admin_get(admin, "/readyz", &[]);
    assert!(
        !body.contains("ARCHIVE") && !body.contains("127.0.0.1"),
        "{body}"
    );
    // The DICOMweb upstream comes up: ready within a check interval or two.
    let _up = TcpListener::bind(("127.0.0.1", dead_web)).expect("bind the DICOMweb upstream");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = admin_get(admin, "/readyz", &[]);
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(Instant::now() < deadline, "never ready\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        gw.log()
            .contains("readiness: every upstream accepts connections")
    );
}

/// Open `n` idle TCP connections to `port` (bounded by count and 20 s); the ones that connected.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut held = Vec::new();
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        if let Ok(s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(50))
        {
            held.push(s);
        }
    }
    held
}

fn set_nofile(pid: u32, n: u32) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {}", output_text(&out));
}

/// Flood the admin port with 400 idle connections under a 256-descriptor limit; DICOM
/// associations (password and certificate) must go on. `admin` is the `[admin]` section.
fn flood_admin_while_dicom_goes_on(admin_extra: &str, expect_reserve_warning: bool) {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let admin = free_port();
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n{admin_extra}");
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);
    set_nofile(gw.pid(), 256);
    assert_eq!(admin_get(admin, "/healthz", &[]), (200, "ok\n".to_string()));

    // 400 idle connections tried: more than the descriptor limit. Those past the cap wait in the
    // kernel's backlog; once it is full, further connects time out (that is the cap working).
    let held = idle_connections(admin, 400);
    assert!(held.len() >= 100, "only {} connections opened", held.len());
    if expect_reserve_warning {
        assert!(
            gw.wait_for_log("admin port: not accepting", Duration::from_secs(10)),
            "{}",
            gw.log()
        );
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    // DICOM associations still succeed, by password and by certificate, one after another.
    for i in 0..10 {
        let v = pyscu(&[
            "echo",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            path(&pki.ca_cert),
            "--user",
            "alice",
            "--password",
            PASSWORD,
        ]);
        assert_eq!(
            v["associated"],
            true,
            "echo {i}: {v}\n{}",
            tail(&gw.log(), 30)
        );
    }
    let (cert, key) = pki.client("bob");
    assert_eq!(
        echoscu_cert(port, &pki, &cert, &key),
        "ok",
        "{}",
        tail(&gw.log(), 30)
    );
    assert_eq!(archive.associations().len(), 11);
    assert!(
        !gw.log().contains("Too many open files"),
        "{}",
        tail(&gw.log(), 40)
    );
    drop(held);
    // With the flood gone, the admin port answers again.
    let deadline = Instant::now() + Duration::from_secs(40);
    while admin_get(admin, "/healthz", &[]).0 != 200 {
        assert!(Instant::now() < deadline, "admin port never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(gw.exited().is_none());
}

#[test]
fn an_admin_port_flooded_with_idle_connections_leaves_the_dicom_door_accepting() {
    // The defaults: the connection cap (16) keeps the flood in the kernel's backlog.
    flood_admin_while_dicom_goes_on("", false);
    // A cap far above the descriptor limit: the reserve alone keeps the doors' descriptors.
    flood_admin_while_dicom_goes_on(
        "max_connections = 5000\nfd_reserve = 64\nheader_timeout = 30\n",
        true,
    );
}

#[test]
fn the_admin_port_caps_its_connections_and_times_out_idle_ones() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let admin = free_port();
    let token_dir = common::tempdir("admin-token");
    let token_file = token_dir.path().join("metrics.token");
    std::fs::write(&token_file, "s3cret-scraper-token\n").expect("write token");
    {
        // Mode 600, as a secret must be (one others can read refuses the start).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600");
    }
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nmax_connections = 4\nheader_timeout = 1\nbearer_token_file = \"{}\"\n",
        token_file.display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);

    // /metrics needs the token; /healthz does not.
    assert_eq!(admin_get(admin, "/metrics", &[]).0, 401);
    assert_eq!(
        admin_get(admin, "/metrics", &["Authorization: Bearer wrong"]).0,
        401
    );
    let (status, body) = admin_get(
        admin,
        "/metrics",
        &["Authorization: Bearer s3cret-scraper-token"],
    );
    assert_eq!(status, 200);
    assert!(body.contains("pacsgate_associations_active"), "{body}");
    assert_eq!(admin_get(admin, "/healthz", &[]), (200, "ok\n".to_string()));
    let count_admin_fds = || {
        // Sockets the gateway holds: listeners + accepted connections.
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let idle_fds = count_admin_fds();
    let held = idle_connections(admin, 50);
    assert_eq!(held.len(), 50, "the backlog takes them");
    std::thread::sleep(Duration::from_millis(300));
    let grown = count_admin_fds().saturating_sub(idle_fds);
    assert!(
        grown <= 5,
        "50 idle connections cost {grown} descriptors (cap 4)"
    );
    // Idle connections are closed after header_timeout: held ones see EOF, and a request gets through.
    let t = Instant::now();
    let mut first = held.into_iter().next().expect("one");
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    let n = first.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected EOF");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A plain TCP connection to the admin port from `source` (127.0.0.x), as a blocking std stream.
fn connect_from(source: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("source address"))
            .expect("bind the source address");
        tokio::time::timeout(
            Duration::from_secs(5),
            socket.connect(([127, 0, 0, 1], port).into()),
        )
        .await
        .expect("connect within 5 s")
        .expect("connect to the admin port")
    });
    let stream = stream.into_std().expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
}

/// One GET from `source` on a connection that asks for nothing about keep-alive (HTTP/1.1's default is
/// to keep it): the whole text read until the gateway closes, or what came within `within`.
fn admin_get_from(
    source: &str,
    port: u16,
    path: &str,
    headers: &[&str],
    within: Duration,
) -> String {
    let mut s = connect_from(source, port);
    s.set_read_timeout(Some(within)).expect("timeout");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").expect("write");
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn one_address_holding_admin_connections_does_not_stop_metrics_for_another_or_after_the_close() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let admin = free_port();
    // max_connections 8: one address may hold 2; header_timeout 10 s keeps slow heads for long.
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nmax_connections = 8\nheader_timeout = 10\n"
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);

    // A kept-alive /healthz (no `Connection: close` asked): answered with `Connection: close`, and the
    // gateway closes the connection at once (the old build kept it for the next request, up to 60 s).
    let t = Instant::now();
    let text = admin_get_from("127.0.0.1", admin, "/healthz", &[], Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{text}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );

    // 127.0.0.1 opens 20 slow connections (a request head begun, never finished).
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from("127.0.0.1", admin);
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc");
        slow.push(s);
    }
    // Past its share (2) they are closed at once.
    std::thread::sleep(Duration::from_millis(500));
    let mut closed = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if !timed_out(&e) => closed += 1,
            _ => {}
        }
    }
    assert!(
        closed >= 18,
        "{closed} of 20 slow connections closed at once"
    );
    // Another address reads /metrics at once (the old build: every slot held for header_timeout).
    let t = Instant::now();
    let text = admin_get_from("127.0.0.2", admin, "/metrics", &[], Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("pacsgate_associations_active"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // 127.0.0.1 itself: once it lets its held connections go, its next /metrics is served.
    drop(slow);
    std::thread::sleep(Duration::from_millis(300));
    let text = admin_get_from("127.0.0.1", admin, "/metrics", &[], Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        gw.log().contains("holds its share of admin connections"),
        "{}",
        tail(&gw.log(), 20)
    );
    assert!(gw.exited().is_none());
}

/// curl with Basic credentials to the web door: (status, body).
fn curl_basic(port: u16, pki: &Pki, user: &str, password: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
        path(&pki.ca_cert),
    ])
    .args(["-u", &format!("{user}:{password}")])
    .arg(format!(
        "https://localhost:{port}/dicom-web/studies?PatientID=X1"
    ));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn every_web_401_has_the_same_body_and_the_reason_is_in_the_log_and_the_audit() {
    let pki = Pki::generate();
    let (upstream, connects) = counting_listener();
    let port = free_port();
    let web = free_port();
    let audit_dir = common::tempdir("audit");
    let audit = audit_dir.path().join("audit.jsonl");
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:{upstream}\"\n\n[audit]\nfile = \"{}\"\n",
        audit.display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, upstream, &extra));
    gw.wait_listening(web);
    let cases = [
        ("unknown user", "nobody", PASSWORD),
        ("wrong password", "alice", "wrong"),
        ("certificate-only user", "bob", PASSWORD),
    ];
    let mut bodies = Vec::new();
    for (what, user, password) in cases {
        let (status, body) = curl_basic(web, &pki, user, password);
        assert_eq!(status, 401, "{what}: {body}");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| b == "authentication required\n"),
        "{bodies:?}"
    );
    assert_eq!(
        connects.load(Ordering::SeqCst),
        0,
        "the archive was reached"
    );
    let log = gw.log();
    let rejected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("web request") && l.contains("outcome=\"rejected\""))
        .collect();
    assert_eq!(rejected.len(), 3, "{log}");
    let reasons: std::collections::HashSet<String> = std::fs::read_to_string(&audit)
        .expect("audit")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "login.failed")
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        reasons.len(),
        3,
        "three different reasons audited: {reasons:?}"
    );
}

#[test]
fn unrestricted_queries_lifts_the_guard_only_for_the_models_listed_and_the_roles_own_finds() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let hash = password_hash(PASSWORD);
    let extra = format!(
        r#"
[[role]]
name = "study-browser"
allow = ["echo", "find"]
unrestricted_queries = ["study"]

[[role]]
name = "worklister"
allow = ["worklist"]
unrestricted_queries = true

[[user]]
name = "stu"
password_hash = "{hash}"
roles = ["study-browser"]

[[user]]
name = "mixed"
password_hash = "{hash}"
roles = ["reader", "worklister"]
"#
    );
    let gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    let find = |user: &str, model: &str, level: &str| {
        let v = pyscu(&[
            "find",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--tls-ca",
            path(&pki.ca_cert),
            "--user",
            user,
            "--password",
            PASSWORD,
            "--model",
            model,
            "--level",
            level,
            "-k",
            "PatientName=*",
        ]);
        v["statuses"]
            .as_array()
            .and_then(|s| s.last())
            .and_then(Value::as_i64)
            .unwrap_or(-1)
    };
    let finds = || {
        archive
            .records()
            .iter()
            .filter(|r| r["kind"] == "find")
            .count()
    };
    // The study model is listed: PatientName=* passes to the archive.
    assert_eq!(find("stu", "study", "STUDY"), 0, "{}", gw.log());
    assert_eq!(finds(), 1);
    // The patient model is not: refused 0xA700 before the archive.
    assert_eq!(find("stu", "patient", "PATIENT"), 0xA700, "{}", gw.log());
    // A worklist role's `true` does not lift the guard for the reader role's C-FINDs.
    assert_eq!(find("mixed", "study", "STUDY"), 0xA700, "{}", gw.log());
    assert_eq!(finds(), 1, "a guarded query reached the archive");

    // `check` names both switches and the one without effect.
    let out = Gateway::run_command(&["check", "--config", path(gw.config_path())], None);
    let said = output_text(&out);
    assert!(
        said.contains("role \"study-browser\": unrestricted_queries lifts the anti-enumeration guard for the study model")
            && said.contains("role \"worklister\": unrestricted_queries has no effect"),
        "{said}"
    );
    let zero = std::fs::read_to_string(gw.config_path())
        .expect("config")
        .replace("[timeouts]", "[limits]\nfailed_logins = 0\n\n[timeouts]");
    let zero_path = gw.dir().join("zero.toml");
    write_config(&zero_path, &zero);
    let said = output_text(&Gateway::run_command(
        &["check", "--config", path(&zero_path)],
        None,
    ));
    assert!(
        said.contains("warning: [limits] failed_logins = 0: no user name is ever locked out"),
        "{said}"
    );
}

/// DCMTK findscu over TLS with bob's certificate (study root); its output.
fn findscu_cert(pki: &Pki, host_port: u16, aec: &str, tls: bool, keys: &[&str]) -> String {
    findscu_cert_with(pki, host_port, aec, tls, keys, "-v")
}

/// [`findscu_cert`] with another verbosity (`-d` dumps the response command sets).
fn findscu_cert_with(
    pki: &Pki,
    host_port: u16,
    aec: &str,
    tls: bool,
    keys: &[&str],
    verbosity: &str,
) -> String {
    let (cert, key) = pki.client("bob");
    let mut args: Vec<String> = vec![verbosity.into(), "-aec".into(), aec.into()];
    if tls {
        args.extend(["+tls", path(&key), path(&cert), "+cf", path(&pki.ca_cert)].map(String::from));
    }
    args.push("-S".into());
    for k in keys {
        args.push("-k".into());
        args.push(k.to_string());
    }
    args.push("127.0.0.1".into());
    args.push(host_port.to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    output_text(&dcmtk("findscu", &refs))
}

/// The `(gggg,eeee) VR [value]` lines of findscu's dumps.
fn dump_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_start_matches(|c: char| c != '(').trim())
        .filter(|l| l.starts_with("(0008,") || l.starts_with("(0010,") || l.starts_with("(0020,"))
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn c_find_matches_carry_the_called_ae_as_retrieve_ae_title_and_refusal_comments_fit() {
    let pki = Pki::generate();
    let orthanc = Orthanc::start("ORTHANC", &[]);
    let data = common::tempdir("data");
    for f in make_instances(data.path(), &[("RAET1", "RETRIEVE^AE", 2)]) {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config(port, &pki, orthanc.dicom_port, "")
            .replace("ae_title = \"ARCHIVE\"", "ae_title = \"ORTHANC\""),
    );
    let keys = [
        "QueryRetrieveLevel=STUDY",
        "PatientID=RAET1",
        "StudyInstanceUID",
        "PatientName",
        "RetrieveAETitle",
    ];
    let through = findscu_cert(&pki, port, "ARCHIVE", true, &keys);
    let direct = findscu_cert(&pki, orthanc.dicom_port, "ORTHANC", false, &keys);
    let (through, direct) = (dump_lines(&through), dump_lines(&direct));
    // Orthanc 1.10 answers the key empty; others put their own AE title there. Either way the
    // client is to retrieve from the AE title it called.
    let answered = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| l.starts_with("(0008,0054)"))
            .skip(1) // the request's own key
            .cloned()
            .collect()
    };
    assert!(!answered(&direct).is_empty(), "{direct:?}");
    assert!(
        answered(&direct).iter().all(|l| !l.contains("[ARCHIVE")),
        "{direct:?}"
    );
    assert!(
        !answered(&through).is_empty()
            && answered(&through)
                .iter()
                .all(|l| l.starts_with("(0008,0054) AE [ARCHIVE")),
        "{through:?}\n{}",
        gw.log()
    );
    // Everything else as the archive answered it.
    let others = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| !l.starts_with("(0008,0054)"))
            .cloned()
            .collect()
    };
    assert_eq!(others(&through), others(&direct));
    assert!(others(&through).iter().any(|l| l.contains("RAET1")));

    // A guarded query: the Error Comment is a whole sentence within 64 characters.
    let refused = findscu_cert_with(
        &pki,
        port,
        "ARCHIVE",
        true,
        &["QueryRetrieveLevel=STUDY", "PatientName=*"],
        "-d",
    );
    let comment = refused
        .lines()
        .find(|l| l.contains("(0000,0902)"))
        .unwrap_or_else(|| panic!("no Error Comment in:\n{refused}"));
    let value = comment
        .split_once('[')
        .and_then(|(_, v)| v.split_once(']'))
        .map(|(v, _)| v)
        .unwrap_or_else(|| panic!("{comment}"));
    assert_eq!(
        value, "pacsgate: query too broad; give an identifying key (PatientID)",
        "{refused}"
    );
    // The full reason is in the log.
    assert!(
        gw.log()
            .lines()
            .any(|l| l.contains("query_guard") && l.contains("reason=")),
        "{}",
        gw.log()
    );
}

/// The fields of one log line (after the message): `Err` naming what does not parse. A value is a
/// bare token or one quoted, escaped string; nothing else may sit between fields.
fn parse_fields(line: &str) -> Result<Vec<(String, String)>, String> {
    let is_ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    // Fields start at the first " ident=" after the target.
    let body = line.split_once(": ").map(|x| x.1).unwrap_or(line);
    let start = body
        .match_indices(' ')
        .map(|(i, _)| i + 1)
        .find(|&i| body[i..].split_once('=').is_some_and(|(k, _)| is_ident(k)));
    let Some(start) = start else {
        return Ok(Vec::new());
    };
    let mut rest = &body[start..];
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .filter(|(k, _)| is_ident(k))
            .ok_or_else(|| format!("not a field at {rest:?}"))?;
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut escaped = false;
            let end = quoted
                .char_indices()
                .find(|&(_, c)| {
                    let stop = !escaped && c == '"';
                    escaped = !escaped && c == '\\';
                    stop
                })
                .map(|(i, _)| i)
                .ok_or_else(|| format!("unterminated quote in {after:?}"))?;
            (&after[..end + 2], &quoted[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        fields.push((key.to_string(), value.to_string()));
        rest = match tail.strip_prefix(' ') {
            Some(r) => r,
            None if tail.is_empty() => "",
            None => return Err(format!("junk after {key}={value}: {tail:?}")),
        };
    }
    Ok(fields)
}

#[test]
fn every_log_line_parses_as_fields_with_one_quoting_rule() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let web = free_port();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{web}\"\nupstream = \"http://127.0.0.1:{}\"\n",
        archive.port
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(web);
    // A wrong password, a hostile calling AE, a foreign certificate, a guarded query, a web 401, a refused reload.
    for (user, password, aet) in [("alice", "wrong", "PYSCU"), ("alice", PASSWORD, "A B\"=C")] {
        pyscu(&[
            "find",
            "--port",
            &port.to_string(),
            "--aec",
            "ARCHIVE",
            "--aet",
            aet,
            "--tls-ca",
            path(&pki.ca_cert),
            "--user",
            user,
            "--password",
            password,
            "-k",
            "PatientName=*",
        ]);
    }
    let (cert, key) = pki.other_ca_client("bob");
    let _ = echoscu_cert(port, &pki, &cert, &key);
    let _ = curl_basic(web, &pki, "nobody", "x y");
    let broken = std::fs::read_to_string(gw.config_path())
        .expect("config")
        .replace("[[role]]", "[[role]]\nnot_a_key = 1");
    std::fs::write(gw.config_path(), broken).expect("write");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reload refused", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let log = gw.log();
    let mut checked = 0;
    for line in log.lines().filter(|l| l.contains(" pacsgate")) {
        let fields = parse_fields(line).unwrap_or_else(|e| panic!("{e}\nin: {line}"));
        checked += fields.len();
    }
    assert!(checked > 20, "{log}");
    // The lines the issue named: a reason with spaces is quoted, and so is every user.
    let refused = log
        .lines()
        .find(|l| l.contains("configuration reload refused"))
        .expect("line");
    assert!(refused.contains(" reason=\""), "{refused}");
    assert!(
        log.lines()
            .filter(|l| l.contains("user="))
            .all(|l| l.contains("user=\"")),
        "{log}"
    );
}

#[test]
fn a_worklist_roles_unrestricted_flag_does_not_lift_a_readers_find_guard() {
    // The configuration of the build before the fix (no model list): only the scope changed.
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let hash = password_hash(PASSWORD);
    let extra = format!(
        "[[role]]\nname = \"worklister\"\nallow = [\"worklist\"]\nunrestricted_queries = true\n\n[[user]]\nname = \"mixed\"\npassword_hash = \"{hash}\"\nroles = [\"reader\", \"worklister\"]\n"
    );
    let gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    let v = pyscu(&[
        "find",
        "--port",
        &port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        path(&pki.ca_cert),
        "--user",
        "mixed",
        "--password",
        PASSWORD,
        "-k",
        "PatientName=*",
    ]);
    assert_eq!(v["statuses"], json!([0xA700]), "{v}\n{}", gw.log());
    assert!(
        archive.records().iter().all(|r| r["kind"] != "find"),
        "the guarded query reached the archive"
    );
}

#[test]
fn with_client_ca_the_admin_port_speaks_tls_and_metrics_needs_a_client_certificate() {
    let pki = Pki::generate();
    let archive = PyArchive::start("ARCHIVE");
    let port = free_port();
    let admin = free_port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nclient_ca = \"{}\"\n",
        pki.ca_cert.display()
    );
    let mut gw = Gateway::start(port, &config(port, &pki, archive.port, &extra));
    gw.wait_listening(admin);
    let (cert, key) = pki.client("prometheus");
    let curl = |path_: &str, with_cert: bool| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            path(&pki.ca_cert),
        ]);
        if with_cert {
            cmd.args(["--cert", path(&cert), "--key", path(&key)]);
        }
        cmd.arg(format!("https://localhost:{admin}{path_}"));
        let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(curl("/metrics", true), "200", "{}", gw.log());
    assert_eq!(curl("/metrics", false), "401");
    assert_eq!(curl("/healthz", false), "200");
    // Plain HTTP on a TLS port gets nothing.
    assert_eq!(admin_get(admin, "/healthz", &[]).0, 0);
}
