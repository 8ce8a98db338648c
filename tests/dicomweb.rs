//! The web door with real peers: Orthanc with its DICOMweb plugin behind the gateway, curl and the
//! dicomweb-client Python library in front.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PASSWORD: &str = "correct horse battery staple";

/// What goes into the gateway's configuration besides the defaults.
#[derive(Default, Clone, Copy)]
struct Opts {
    /// Lines for `[limits]`, `[timeouts]` and `[http]`.
    limits: &'static str,
    timeouts: &'static str,
    http: &'static str,
    /// An `[audit] file` in the gateway's directory.
    audit: bool,
    large_mb: Option<usize>,
    /// Users' hashes that take about 0.8 s to check here, whatever the machine and build
    /// (common::password_hash_taking), so that a burst of at most 240 outlasts the 5 s wait.
    slow_checks: bool,
}

/// The archive, its data and what a gateway in front of it is configured from.
struct Base {
    pki: Pki,
    orthanc: Orthanc,
    dimse_port: u16,
    port: u16,
    files: Vec<PathBuf>,
    instances: Vec<Instance>,
    study: String,
    hash: String,
    audit: PathBuf,
    _data: tempfile::TempDir,
}

/// A [`Base`] with the gateway under test in front of it.
struct Web {
    base: Base,
    gateway: Gateway,
}

impl std::ops::Deref for Web {
    type Target = Base;
    fn deref(&self) -> &Base {
        &self.base
    }
}

/// Roles: `reader` (find, get), `writer` (find, get, store, unrestricted), `harvester` (find, get, unrestricted,
/// cap 2). Users `reader` and `writer` (Basic, PASSWORD).
fn start(opts: Opts) -> Web {
    let pki = Pki::generate();
    let orthanc = Orthanc::start_with("ORTHANC", &[], Orthanc::dicomweb_config());
    let data = common::tempdir("web");
    let instances = make_instances_with_uids(
        data.path(),
        &[
            ("WEB1", "WEB^ONE", 1),
            ("WEB2", "WEB^TWO", 1),
            ("WEB3", "WEB^THREE", 1),
        ],
    );
    let study = instances[0].study_uid.clone();
    let mut files: Vec<PathBuf> = instances.iter().map(|i| i.path.clone()).collect();
    if let Some(mb) = opts.large_mb {
        files.push(make_large_instance_in(data.path(), mb, "WEB1", &study));
    }
    for f in &files {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let base = Base {
        pki,
        orthanc,
        dimse_port: free_port(),
        port: free_port(),
        files,
        instances,
        study,
        hash: if opts.slow_checks {
            password_hash_taking(PASSWORD, Duration::from_millis(800))
        } else {
            password_hash(PASSWORD)
        },
        audit: data.path().join("audit.jsonl"),
        _data: data,
    };
    let gateway = base.start_gateway(opts, base.dimse_port, base.port);
    Web { base, gateway }
}

impl Base {
    /// The gateway's configuration with these options, ports and users.
    fn config(&self, opts: Opts, dimse_port: u16, port: u16, users: &[&str]) -> String {
        let mut config = GatewayConfig::new(dimse_port)
            .tls(&self.pki)
            .client_ca(&self.pki)
            .set("http", &format!("listen = \"127.0.0.1:{port}\""))
            .set(
                "http",
                &format!("upstream = \"http://127.0.0.1:{}\"", self.orthanc.http_port),
            )
            .set("http", "dicomweb_path = \"/dicom-web\"")
            .set("http", "wado_uri_path = \"/wado\"")
            .set("http", opts.http)
            .set("limits", opts.limits)
            .set("timeouts", opts.timeouts);
        if opts.audit {
            config = config.path("audit", "file", &self.audit);
        }
        config = config
            .jwt(&self.pki)
            .upstream("ARCHIVE", self.orthanc.dicom_port, "ORTHANC")
            .role("reader", &["echo", "find", "get"])
            .role_with(
                "writer",
                &["echo", "find", "get", "store"],
                &["unrestricted_queries = true"],
            )
            .role_with(
                "harvester",
                &["find", "get"],
                &["unrestricted_queries = true", "max_query_results = 2"],
            );
        for u in users {
            config = config.user(u, &self.hash, &[u]);
        }
        config.to_toml()
    }

    /// A gateway in front of this archive, listening on both ports.
    fn start_gateway(&self, opts: Opts, dimse_port: u16, port: u16) -> Gateway {
        let mut g = Gateway::start(
            dimse_port,
            &self.config(opts, dimse_port, port, &["reader", "writer"]),
        );
        g.wait_listening(port);
        g
    }

    /// The audit trail so far, one JSON object per line.
    fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn token(pki: &Pki, sub: &str, roles: &[&str]) -> String {
    let now = now() as i64;
    mint_jwt(
        &pki.jwt_private_pem,
        &json!({"iss": "https://idp.test", "aud": "pacsgate", "sub": sub, "exp": now + 600, "roles": roles}),
    )
}

/// curl through the gateway: returns (status, headers, body).
fn curl(w: &Web, args: &[&str], path: &str) -> (u16, String, Vec<u8>) {
    let dir = common::tempdir("curl");
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let url = format!("https://localhost:{}{path}", w.port);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "120", "--cacert"])
        .arg(&w.pki.ca_cert)
        .arg("-D")
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(&url);
    let out: Output = run_bounded(&mut cmd, None, Duration::from_secs(150));
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<u16>()
        .unwrap_or_else(|_| panic!("curl {url}: {}", output_text(&out)));
    (
        code,
        std::fs::read_to_string(&headers).unwrap_or_default(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

fn direct_json(w: &Web, path: &str) -> Value {
    w.orthanc.get_json(path)
}

/// QIDO results without the RetrieveURL (its host is whoever asked), sorted by StudyInstanceUID.
fn normalized(v: &Value) -> Vec<Value> {
    let mut items: Vec<Value> = v.as_array().cloned().unwrap_or_default();
    for i in &mut items {
        if let Some(o) = i.as_object_mut() {
            o.remove("00081190");
        }
    }
    items.sort_by_key(|i| i["0020000D"]["Value"][0].as_str().unwrap_or("").to_string());
    items
}

#[test]
fn qido_with_a_token_equals_a_direct_query_and_without_one_is_401_before_the_archive() {
    let w = start(Opts::default());
    let t = token(&w.pki, "carol", &["reader"]);
    let (code, _, body) = curl(
        &w,
        &["-H", &bearer(&t)],
        "/dicom-web/studies?PatientID=WEB2",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let through: Value = serde_json::from_slice(&body).expect("JSON");
    let direct = direct_json(&w, "/dicom-web/studies?PatientID=WEB2");
    assert_eq!(normalized(&through), normalized(&direct));
    assert_eq!(normalized(&through).len(), 1);

    // dicomweb-client (Python) through the gateway, with the same token.
    let script = format!(
        "import json,requests\nfrom dicomweb_client.api import DICOMwebClient\ns=requests.Session()\ns.verify='{1}'\nc=DICOMwebClient(url='https://localhost:{0}/dicom-web', session=s, headers={{'Authorization':'Bearer {t}'}})\nprint(json.dumps(c.search_for_studies(search_filters={{'PatientID':'WEB3'}})))",
        w.port,
        w.pki.ca_cert.display()
    );
    let mut cmd = Command::new(python());
    cmd.args(["-c", &script])
        .env("NO_PROXY", "*")
        .env("REQUESTS_CA_BUNDLE", &w.pki.ca_cert);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
    assert!(out.status.success(), "{}", output_text(&out));
    let found: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        normalized(&found),
        normalized(&direct_json(&w, "/dicom-web/studies?PatientID=WEB3"))
    );

    // No token, a bad token, a wrong password: 401 with WWW-Authenticate, and Orthanc sees nothing.
    let before = w.orthanc.http_requests_logged();
    let (code, headers, _) = curl(&w, &[], "/dicom-web/studies?PatientID=WEB2");
    assert_eq!(code, 401);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{headers}"
    );
    let (code, _, _) = curl(
        &w,
        &["-H", "Authorization: Bearer not.a.token"],
        "/dicom-web/studies?PatientID=WEB2",
    );
    assert_eq!(code, 401);
    let (code, _, _) = curl(
        &w,
        &["-u", "reader:wrong"],
        "/dicom-web/studies?PatientID=WEB2",
    );
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.orthanc.http_requests_logged(),
        before,
        "the archive saw an unauthenticated request"
    );
    // Basic with the right password works; the gateway log never shows the password or the token.
    let (code, _, _) = curl(
        &w,
        &["-u", &format!("reader:{PASSWORD}")],
        "/dicom-web/studies?PatientID=WEB1",
    );
    assert_eq!(code, 200);
    let log = w.gateway.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains(&t),
        "a secret is in the log"
    );
}

#[test]
fn wado_retrieves_a_50_mb_instance_byte_identical_with_the_gateway_memory_far_below_it() {
    let w = start(Opts {
        large_mb: Some(50),
        ..Opts::default()
    });
    let t = token(&w.pki, "carol", &["reader"]);
    let large = std::fs::read(w.files.last().expect("large")).expect("read");
    let id = w
        .orthanc
        .instance_ids()
        .into_iter()
        .find(|id| w.orthanc.instance_file(id).len() == large.len())
        .expect("stored");
    let tags = w
        .orthanc
        .get_json(&format!("/instances/{id}/simplified-tags"));
    let (series, sop) = (
        tags["SeriesInstanceUID"].as_str().expect("series"),
        tags["SOPInstanceUID"].as_str().expect("sop"),
    );
    let stored = w.orthanc.instance_file(&id);
    let rss_before = vm_hwm_kib(w.gateway.pid());

    // WADO-RS: a multipart/related answer with the instance as its one part.
    let path = format!(
        "/dicom-web/studies/{}/series/{series}/instances/{sop}",
        w.study
    );
    let (code, headers, body) = curl(
        &w,
        &[
            "-H",
            &bearer(&t),
            "-H",
            "Accept: multipart/related; type=\"application/dicom\"",
        ],
        &path,
    );
    assert_eq!(code, 200, "{headers}");
    let part = single_part(&headers, &body);
    assert!(
        dataset_bytes(part) == dataset_bytes(&stored),
        "WADO-RS data set differs ({} vs {} bytes)",
        part.len(),
        stored.len()
    );

    // WADO-URI: the file itself.
    let uri = format!(
        "/wado?requestType=WADO&studyUID={}&seriesUID={series}&objectUID={sop}&contentType=application/dicom",
        w.study
    );
    let (code, _, body) = curl(&w, &["-H", &bearer(&t)], &uri);
    assert_eq!(code, 200);
    assert!(
        dataset_bytes(&body) == dataset_bytes(&stored),
        "WADO-URI data set differs"
    );

    let peak = vm_hwm_kib(w.gateway.pid());
    eprintln!("gateway peak RSS: {rss_before} KiB before, {peak} KiB after two 50 MB retrieves");
    assert!(
        peak < rss_before + 20 * 1024,
        "the gateway buffered the instance: peak {peak} KiB, before {rss_before} KiB"
    );
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The body of the one part of a multipart/related response.
fn single_part<'a>(headers: &str, body: &'a [u8]) -> &'a [u8] {
    let ct = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .expect("content-type");
    let boundary = ct
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .expect("boundary")
        .trim_matches('"');
    let open = format!("--{boundary}");
    let start = find(body, open.as_bytes()).expect("opening boundary") + open.len();
    let header_end = find(&body[start..], b"\r\n\r\n").expect("part headers") + start + 4;
    let close = format!("\r\n--{boundary}");
    let end = find(&body[header_end..], close.as_bytes()).expect("closing boundary") + header_end;
    &body[header_end..end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn stow_body(dir: &Path, file: &Path) -> PathBuf {
    let mut body = b"--pacsgate-boundary\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&std::fs::read(file).expect("read"));
    body.extend_from_slice(b"\r\n--pacsgate-boundary--\r\n");
    let path = dir.join("stow.body");
    std::fs::write(&path, body).expect("write");
    path
}

#[test]
fn stow_needs_store_and_stores_byte_identical() {
    let w = start(Opts::default());
    let data = common::tempdir("stow");
    let new = make_instances_with_uids(data.path(), &[("STOW1", "STOW^ME", 1)]).remove(0);
    let body = stow_body(data.path(), &new.path);
    let at = format!("@{}", body.display());
    let args = |user: &str| -> Vec<String> {
        vec!["-u".into(), format!("{user}:{PASSWORD}"), "-X".into(), "POST".into(), "-H".into(),
             "Content-Type: multipart/related; type=\"application/dicom\"; boundary=pacsgate-boundary".into(),
             "--data-binary".into(), at.clone()]
    };
    let a: Vec<String> = args("reader");
    let (code, _, text) = curl(
        &w,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "/dicom-web/studies",
    );
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&text));
    assert!(String::from_utf8_lossy(&text).contains("store is not allowed"));
    assert!(
        w.orthanc.file_by_sop_instance_uid(&new.sop_uid).is_none(),
        "stored without the store right"
    );

    let a: Vec<String> = args("writer");
    let (code, _, text) = curl(
        &w,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "/dicom-web/studies",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&text));
    let stored = w
        .orthanc
        .file_by_sop_instance_uid(&new.sop_uid)
        .expect("stored");
    let original = std::fs::read(&new.path).expect("read");
    assert!(
        dataset_bytes(&stored) == dataset_bytes(&original),
        "stored copy differs"
    );
}

#[test]
fn the_guard_the_cap_and_the_shared_rate_limit_apply_to_qido() {
    let w = start(Opts {
        limits: "queries_per_minute = 6\nqueries_burst = 3",
        ..Opts::default()
    });
    // The anti-enumeration guard: a reader may not list every study.
    let reader = token(&w.pki, "carol", &["reader"]);
    let (code, _, body) = curl(&w, &["-H", &bearer(&reader)], "/dicom-web/studies");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("query names no patient or study"));
    // The result cap: the harvester (cap 2) gets 2 of 3 studies and a Warning.
    let harvester = token(&w.pki, "hugo", &["harvester"]);
    let (code, headers, body) = curl(&w, &["-H", &bearer(&harvester)], "/dicom-web/studies");
    assert_eq!(code, 200);
    let got: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(got.as_array().map(Vec::len), Some(2), "{got}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("warning: 299 pacsgate"),
        "{headers}"
    );

    // A user who spent their C-FIND budget over DIMSE gets 429 on QIDO-RS.
    let out = pyscu(&[
        "find",
        "--port",
        &w.dimse_port.to_string(),
        "--aec",
        "ARCHIVE",
        "--tls-ca",
        w.pki.ca_cert.to_str().expect("p"),
        "--user",
        "writer",
        "--password",
        PASSWORD,
        "-k",
        "PatientID=WEB1",
        "--repeat",
        "5",
    ]);
    let refused = out["queries"]
        .as_array()
        .map(|q| q.iter().filter(|r| r["status"] == json!(0xA700)).count())
        .unwrap_or(0);
    assert!(refused >= 1, "the DIMSE budget was not spent: {out}");
    let (code, headers, _) = curl(
        &w,
        &["-u", &format!("writer:{PASSWORD}")],
        "/dicom-web/studies?PatientID=WEB1",
    );
    assert_eq!(code, 429, "{headers}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after:"),
        "{headers}"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw HTTPS client: TCP from a chosen loopback address, TLS with rustls, the request bytes exactly
// as written (curl and Python normalise paths; the gateway must see `..`, `%2e`, `\`, `#` as sent).

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
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

async fn tcp_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source address"))?;
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// TLS to the gateway from `source`; an error when the gateway drops the connection.
async fn tls_from(source: &str, port: u16, ca: &Path) -> Result<Tls, String> {
    let tcp = tcp_from(source, port).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name").to_owned();
    tokio::time::timeout(
        Duration::from_secs(20),
        tls_connector(ca).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| e.to_string())
}

/// One HTTP answer as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A request: `lines` are whole header lines; Host is `localhost:PORT` unless a line sets one.
fn request(method: &str, target: &str, lines: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\n");
    if !lines
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("host:"))
    {
        r.push_str("Host: localhost\r\n");
    }
    for l in lines {
        r.push_str(l);
        r.push_str("\r\n");
    }
    if !body.is_empty() {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// Read one answer: the head, then Content-Length bytes (or up to the close).
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Result<Answer, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return Err("no answer in time".into()),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Ok(Ok(0)) => return Err(format!("closed after {} bytes", buf.len())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let mut answer = Answer {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let length = answer
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    while length.is_none_or(|l| answer.body.len() < l) {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.body.extend_from_slice(&chunk[..n]),
            Err(_) if length.is_none() => break,
            Err(_) => return Err("the body did not arrive in time".into()),
        }
    }
    Ok(answer)
}

/// True when the peer closes the connection within `within`.
async fn closes<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// One request on its own connection from `source`, with `Connection: close`.
async fn exchange(port: u16, ca: &Path, source: &str, req: &[u8]) -> Result<Answer, String> {
    let mut tls = tls_from(source, port, ca).await?;
    tls.write_all(req).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    read_answer(&mut tls, Duration::from_secs(60)).await
}

/// [`exchange`] from 127.0.0.1 to the gateway under test; panics when there is no answer.
fn raw(w: &Web, method: &str, target: &str, lines: &[&str], body: &str) -> Answer {
    let mut all = lines.to_vec();
    all.push("Connection: close");
    let req = request(method, target, &all, body);
    runtime()
        .block_on(exchange(w.port, &w.pki.ca_cert, "127.0.0.1", &req))
        .unwrap_or_else(|e| panic!("{method} {target:?}: {e}"))
}

/// Orthanc's HTTP log lines (`--verbose`), read as bytes: a request with raw bytes in its path must
/// not empty the log we look at.
fn archive_lines(w: &Base) -> Vec<String> {
    let bytes = std::fs::read(w.orthanc.dir().join("orthanc.log")).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| l.contains("(http) "))
        .map(str::to_string)
        .collect()
}

/// Since line `before`, the archive received nothing but one request sent now through the gateway
/// (a fence: the refused requests were answered before it was sent, so anything they had caused
/// upstream would be logged before it).
fn archive_saw_nothing_since(w: &Web, before: usize, what: &str) {
    let t = token(&w.pki, "fence", &["writer"]);
    let a = raw(
        w,
        "GET",
        "/dicom-web/studies?PatientID=FENCE",
        &[&format!("Authorization: Bearer {t}")],
        "",
    );
    assert_eq!(a.status, 200, "the fence request: {a:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = archive_lines(w);
    while lines.len() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        lines = archive_lines(w);
    }
    let new = &lines[before.min(lines.len())..];
    assert!(
        new.len() == 1 && new[0].contains("(http) GET /dicom-web/studies"),
        "{what}: the archive received {new:#?}"
    );
}

/// A Basic credential header line.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

// ---------------------------------------------------------------------------------------------

#[test]
fn requests_that_decode_to_another_resource_never_reach_the_archive() {
    let w = start(Opts::default());
    let t = token(&w.pki, "wanda", &["writer"]);
    let auth = format!("Authorization: Bearer {t}");
    let auth = auth.as_str();
    let before = archive_lines(&w).len();

    // Encoded dot segments, encoded and raw separators, parameters, double and overlong encodings,
    // empty segments and absolute-form targets: 400, whatever the target resource would have been.
    let orthanc = format!("http://127.0.0.1:{}/patients", w.orthanc.http_port);
    let absolute = format!(
        "https://localhost:{}/dicom-web/studies?PatientID=WEB1",
        w.port
    );
    let (orthanc, absolute) = (orthanc.as_str(), absolute.as_str());
    let c1 = "/dicom-web/studies/\u{9b}31mX";
    for target in [
        "/dicom-web/studies/%2e%2e%2f%2e%2e%2fpatients",
        "/dicom-web/studies/%2E%2E%2F%2E%2E%2Fsystem",
        "/dicom-web/studies/%2e%2e/%2e%2e/patients",
        "/dicom-web/studies/.%2e/.%2e/instances",
        "/dicom-web/../patients",
        "/dicom-web/../instances",
        "/dicom-web/./studies",
        "/dicom-web/studies/..%5c..%5cpatients",
        "/dicom-web/studies/..\\..\\patients",
        "/dicom-web/studies;x/../../patients",
        "/dicom-web/studies/%3bx/%2e%2e/patients",
        "/dicom-web/studies/%252e%252e/%252e%252e/patients",
        "/dicom-web/studies/%c0%ae%c0%ae/%c0%ae%c0%ae/patients",
        "//patients",
        "/dicom-web//studies",
        "/dicom-web/studies/",
        c1,
        orthanc,
        absolute,
    ] {
        let a = raw(&w, "GET", target, &[auth], "");
        assert_eq!(a.status, 400, "{target:?}: {a:?}");
    }
    // The same through curl --path-as-is, the way the issue reproduced it.
    let (code, _, body) = curl(
        &w,
        &["--path-as-is", "-H", &bearer(&t)],
        "/dicom-web/studies/%2e%2e%2f%2e%2e%2fpatients",
    );
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    // POST /tools/find (every patient) by the same ways.
    let find = r#"{"Level":"Patient","Query":{}}"#;
    for target in [
        "/dicom-web/studies/%2e%2e%2f%2e%2e%2ftools%2ffind",
        "/dicom-web/%2e%2e/tools/find",
        "/dicom-web/studies/..%5C..%5Ctools%5Cfind",
    ] {
        let a = raw(
            &w,
            "POST",
            target,
            &[auth, "Content-Type: application/json"],
            find,
        );
        assert_eq!(a.status, 400, "POST {target}: {a:?}");
    }
    // A method override would make Orthanc run DELETE (it honours the header on POST).
    let a = raw(
        &w,
        "POST",
        &format!("/dicom-web/studies/{}", w.study),
        &[
            auth,
            "X-HTTP-Method-Override: DELETE",
            "Content-Type: application/dicom",
        ],
        "x",
    );
    assert_eq!(a.status, 400, "{a:?}");
    // A Host that is not a host (the archive builds its RetrieveURLs from it).
    for host in [
        "Host: evil.example/x?",
        "Host: a@evil.example",
        "Host: evil.example:port",
    ] {
        let a = raw(
            &w,
            "GET",
            "/dicom-web/studies?PatientID=WEB1",
            &[auth, host],
            "",
        );
        assert_eq!(a.status, 400, "{host}: {a:?}");
    }
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[auth, "Host: localhost", "Host: evil.example"],
        "",
    );
    assert_eq!(a.status, 400, "two Host headers: {a:?}");
    // Clean paths to the archive's own UI and REST API, other methods: 403.
    let delete = format!("/dicom-web/studies/{}", w.study);
    for (method, target) in [
        ("GET", "/app/explorer.html"),
        ("GET", "/instances"),
        ("GET", "/patients"),
        ("GET", "/system"),
        ("POST", "/tools/find"),
        ("GET", "/wado-rs"),
        ("GET", "/dicom-web/servers"),
        ("DELETE", delete.as_str()),
    ] {
        let a = raw(&w, method, target, &[auth], "");
        assert_eq!(a.status, 403, "{method} {target}: {a:?}");
    }
    let (code, _, _) = curl(&w, &["-H", &bearer(&t)], "/patients");
    assert_eq!(code, 403);
    // Attacker text in what is logged: a C1 control (CSI) in the path above, a newline in a user name.
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[&basic("mallory\nFORGED-LINE pacsgate: all is well", "x")],
        "",
    );
    assert_eq!(a.status, 401, "{a:?}");
    archive_saw_nothing_since(&w, before, "refused requests");

    // What does reach the archive is what the gateway judged. A fragment is cut by the HTTP parser
    // (never forwarded); client-supplied Forwarded / X-Forwarded-Host are replaced.
    let a = raw(
        &w,
        "GET",
        &format!(
            "/dicom-web/studies/{}/metadata#/../../../../patients",
            w.study
        ),
        &[auth],
        "",
    );
    assert_eq!(a.status, 200, "{a:?}");
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[
            auth,
            "Forwarded: host=evil.example;proto=http",
            "X-Forwarded-Host: evil.example",
        ],
        "",
    );
    assert_eq!(a.status, 200, "{a:?}");
    let url = a.json()[0]["00081190"]["Value"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The gateway's origin: the Host named (without a port: the [http] listen port).
    assert!(
        url.starts_with(&format!("https://localhost:{}/dicom-web/studies/", w.port)),
        "RetrieveURL {url}"
    );
    // (Before `before`, the harness itself asked Orthanc for /system and stored /instances.)
    for line in &archive_lines(&w)[before..] {
        for leak in [
            " /patients",
            " /system",
            " /tools/",
            " /instances",
            "faking",
            "Unknown HTTP method",
        ] {
            assert!(!line.contains(leak), "the archive saw {line:?}");
        }
    }
    let log = w.gateway.log();
    assert!(
        !log.contains('\u{9b}'),
        "a raw C1 control is in the gateway log"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED-LINE")),
        "a user name forged a log line"
    );
    assert!(log.contains("\\u{9b}31mX"), "the path is logged escaped");
}

#[test]
fn path_uids_and_query_values_are_judged_decoded_and_forwarded_as_judged() {
    let w = start(Opts::default());
    let reader = format!(
        "Authorization: Bearer {}",
        token(&w.pki, "carol", &["reader"])
    );
    let harvester = format!(
        "Authorization: Bearer {}",
        token(&w.pki, "hugo", &["harvester"])
    );
    let (reader, harvester) = (reader.as_str(), harvester.as_str());
    let before = archive_lines(&w).len();
    let long = "1".repeat(65);
    let s = &w.study;

    // 400: UIDs that are not UIDs, on every route, in the path and in the query; keys given twice;
    // keys the gateway does not know; encodings it cannot read.
    for target in [
        "/dicom-web/studies/%2A/series".to_string(),
        "/dicom-web/studies/*/series".into(),
        "/dicom-web/studies/1..2/series".into(),
        format!("/dicom-web/studies/{s}/series/{long}/instances"),
        "/dicom-web/studies/1.2./metadata".into(),
        "/dicom-web/studies/2.25.x".into(),
        format!("/dicom-web/studies/{s}/series/1.2/instances/.3"),
        "/wado?requestType=WADO&studyUID=1.2*&seriesUID=1.3&objectUID=1.4".into(),
        "/wado?requestType=WADO&objectUID=%2A".into(),
        "/wado?requestType=WADO&objectUID=1.4&objectUID=1.5".into(),
        "/dicom-web/studies?StudyInstanceUID=2*".into(),
        "/dicom-web/studies?StudyInstanceUID=2%2A".into(),
        "/dicom-web/studies?00100020=*&PatientID=WEB1".into(),
        "/dicom-web/studies?PatientID=*&PatientID=WEB1".into(),
        "/dicom-web/studies?patientid=*&PatientID=WEB1".into(),
        "/dicom-web/studies?PatientID=WEB1&limit=1&limit=1000".into(),
        "/dicom-web/studies?PatientID=WEB1&%6Cimit=1&limit=1000".into(),
        "/dicom-web/studies?PatientID=WEB%zz".into(),
        "/dicom-web/studies?PatientID=WEB%c0%ae".into(),
        format!("/dicom-web/studies/{s}/series?StudyInstanceUID=1.2"),
    ] {
        let a = raw(&w, "GET", &target, &[reader], "");
        assert_eq!(a.status, 400, "{target}: {a:?}");
    }
    // 403: the guard judges decoded values, and a list by its least specific value.
    for target in [
        "/dicom-web/studies?PatientID=WEB1,*",
        "/dicom-web/studies?PatientID=WEB1%2C%2A",
        "/dicom-web/studies?PatientID=%2A",
        "/dicom-web/studies?PatientName=%2A",
    ] {
        let a = raw(&w, "GET", target, &[reader], "");
        assert_eq!(a.status, 403, "{target}: {a:?}");
    }
    // 406: an answer the gateway could not count (Orthanc sends multipart XML for these).
    for accept in [
        "Accept: application/dicom+xml",
        "Accept: multipart/related; type=\"application/dicom+xml\"",
    ] {
        let a = raw(&w, "GET", "/dicom-web/studies", &[harvester, accept], "");
        assert_eq!(a.status, 406, "{accept}: {a:?}");
    }
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?accept=application/dicom%2Bxml",
        &[harvester],
        "",
    );
    assert_eq!(a.status, 406, "{a:?}");
    archive_saw_nothing_since(&w, before, "refused searches");

    // The cap holds whatever the client asks for: gzip is not passed on, the matches are counted.
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies",
        &[
            harvester,
            "Accept-Encoding: gzip, deflate, br",
            "Accept: */*",
        ],
        "",
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-encoding"), None, "{}", a.head);
    assert_eq!(a.json().as_array().map(Vec::len), Some(2));
    assert!(
        a.header("warning")
            .is_some_and(|v| v.contains("299 pacsgate"))
    );
    // A decoded `limit` is the client's limit.
    let a = raw(&w, "GET", "/dicom-web/studies?%6Cimit=1", &[harvester], "");
    assert_eq!(a.json().as_array().map(Vec::len), Some(1), "{a:?}");
    // The archive gets the value the gateway judged: `%5E` is `^` to both (Orthanc does not decode
    // query values, so a value passed on as it came would have matched nothing).
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientName=WEB%5EONE",
        &[reader],
        "",
    );
    let found = a.json();
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found[0]["00100020"]["Value"][0], "WEB1");
    // A list of specific values passes; the archive matches each.
    let a = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientID=WEB1,WEB2",
        &[reader],
        "",
    );
    assert_eq!(a.json().as_array().map(Vec::len), Some(2), "{a:?}");
}

#[test]
fn connections_that_do_not_authenticate_are_bounded() {
    let w = start(Opts {
        limits: "max_pending_connections = 32\nmax_pending_per_address = 8\nfailed_logins = 100\nfailed_logins_per_address = 100",
        http: "failed_logins_per_minute = 3",
        ..Opts::default()
    });
    let t = token(&w.pki, "carol", &["reader"]);
    let bearer_line = format!("Authorization: Bearer {t}");
    let (port, ca) = (w.port, w.pki.ca_cert.clone());
    let rt = runtime();

    // Pending connections: an address alone may go beyond its share of 8 but leaves a share free
    // (issue 17): holding 24 of the 32, its 25th waits its turn; another address is served at once;
    // slots come back when connections go.
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..24 {
            held.push(tcp_from("127.0.0.2", port).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // It waits (for at most tls_handshake, 10 s): not served while the address holds its 24.
        let ninth =
            tokio::time::timeout(Duration::from_secs(2), tls_from("127.0.0.2", port, &ca)).await;
        assert!(
            !matches!(ninth, Ok(Ok(_))),
            "a 25th pending connection from one address was served"
        );
        assert!(
            tls_from("127.0.0.3", port, &ca).await.is_ok(),
            "another address is refused"
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            tls_from("127.0.0.2", port, &ca).await.is_ok(),
            "slots did not come back"
        );
    });

    // A connection whose request did not authenticate is closed after the answer; one that
    // authenticated stays open for the next request.
    rt.block_on(async {
        let mut tls = tls_from("127.0.0.4", port, &ca).await.expect("tls");
        let req = request("GET", "/dicom-web/studies?PatientID=WEB1", &[], "");
        tls.write_all(&req).await.expect("write");
        let a = read_answer(&mut tls, Duration::from_secs(10))
            .await
            .expect("answer");
        assert_eq!(a.status, 401);
        assert_eq!(
            a.header("connection").as_deref(),
            Some("close"),
            "{}",
            a.head
        );
        assert!(
            closes(&mut tls, Duration::from_secs(3)).await,
            "kept alive without credentials"
        );

        let mut tls = tls_from("127.0.0.4", port, &ca).await.expect("tls");
        for _ in 0..2 {
            let req = request(
                "GET",
                "/dicom-web/studies?PatientID=WEB1",
                &[&bearer_line],
                "",
            );
            tls.write_all(&req).await.expect("write");
            let a = read_answer(&mut tls, Duration::from_secs(30))
                .await
                .expect("answer");
            assert_eq!(a.status, 200, "{a:?}");
        }
    });

    // Failed credential checks per address and minute: after 3, even the right password gets 429
    // (no password check runs); another address is not affected.
    let one = |source: &'static str, line: String| {
        let req = request(
            "GET",
            "/dicom-web/studies?PatientID=WEB1",
            &[&line, "Connection: close"],
            "",
        );
        let (ca, port) = (ca.clone(), port);
        async move { exchange(port, &ca, source, &req).await }
    };
    rt.block_on(async {
        for _ in 0..3 {
            let a = one("127.0.0.5", basic("reader", "wrong"))
                .await
                .expect("answer");
            assert_eq!(a.status, 401, "{a:?}");
        }
        let a = one("127.0.0.5", basic("reader", PASSWORD))
            .await
            .expect("answer");
        assert_eq!(a.status, 429, "{a:?}");
        assert!(a.header("retry-after").is_some(), "{}", a.head);
        let a = one("127.0.0.6", basic("reader", PASSWORD))
            .await
            .expect("answer");
        assert_eq!(a.status, 200, "{a:?}");
    });
    // Checks still running count too: of 8 at once (the address's pending connections), at most 3
    // reach a password check.
    let statuses: Vec<u16> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..8 {
            set.spawn(one("127.0.0.7", basic("reader", &format!("wrong{i}"))));
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("task").map(|a| a.status).unwrap_or(0));
        }
        out
    });
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(checked <= 3 && checked + limited == 8, "{statuses:?}");
    let failed = w.gateway.log().matches("wrong password").count();
    assert!(failed <= 3 + 3, "{failed} password checks ran");
}

/// One wrong password for "reader" from `source`, `Connection: close`: the answer and how long it
/// took from the request's first byte.
async fn wrong_password_from(
    source: String,
    port: u16,
    ca: PathBuf,
) -> Result<(Result<Answer, String>, Duration), String> {
    let req = request(
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[
            &basic("reader", &format!("wrong-{source}")),
            "Connection: close",
        ],
        "",
    );
    let mut tls = tls_from(&source, port, &ca).await?;
    let sent = Instant::now();
    tls.write_all(&req).await.map_err(|e| e.to_string())?;
    let a = read_answer(&mut tls, Duration::from_secs(60)).await;
    Ok((a, sent.elapsed()))
}

#[test]
fn a_password_check_that_cannot_start_in_time_is_503_not_a_queue() {
    let w = start(Opts {
        limits: "max_pending_connections = 512\nmax_pending_per_address = 8\nfailed_logins = 10000\nfailed_logins_per_address = 100",
        slow_checks: true,
        ..Opts::default()
    });
    let (port, ca) = (w.port, w.pki.ca_cert.clone());
    let rt = runtime();
    // How long one check takes here, alone: the fastest of three. The users' hash makes it about
    // 0.8 s; the burst below is sized from it so that, with 4 argon2 slots, the last of it would
    // wait twice auth::PASSWORD_CHECK_WAIT (5 s) in a queue. At most 240: one address each, and
    // fewer than auth::QUEUED_PASSWORD_CHECKS (256), so that no 503 is a full queue's (those answer
    // at once and would prove nothing about the wait).
    let alone = (1..=3)
        .map(|i| {
            let (a, took) = rt
                .block_on(wrong_password_from(
                    format!("127.0.2.{i}"),
                    port,
                    ca.clone(),
                ))
                .expect("connected");
            assert_eq!(a.as_ref().map(|a| a.status), Ok(401), "{a:?}");
            took
        })
        .min()
        .unwrap_or(Duration::from_millis(1));
    let rounds = Duration::from_secs(10).as_millis() / alone.as_millis().max(1) + 1;
    let burst = usize::try_from(4 * rounds)
        .unwrap_or(usize::MAX)
        .clamp(24, 240);
    eprintln!("one check alone: {alone:?}; burst of {burst}");
    // What saturation needs: the queue behind the 4 slots outlasts the 5 s wait by half again.
    let queued = u32::try_from(burst - 4).unwrap_or(u32::MAX);
    assert!(
        alone * queued / 4 >= Duration::from_millis(7500),
        "one check took {alone:?}: too fast for a burst of {burst} to outlast the 5 s wait"
    );
    // `burst` wrong passwords at once from as many addresses (each within its own budget).
    let answers: Vec<(Result<Answer, String>, Duration)> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 1..=burst {
            set.spawn(wrong_password_from(
                format!("127.0.1.{i}"),
                port,
                ca.clone(),
            ));
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("task").expect("connected"));
        }
        out
    });
    let statuses: Vec<_> = answers
        .iter()
        .map(|(a, d)| (a.as_ref().map(|a| a.status), d.as_millis()))
        .collect();
    eprintln!("(status, ms) of {burst}: {statuses:?}");
    assert!(
        answers
            .iter()
            .all(|(a, _)| a.as_ref().is_ok_and(|a| a.status == 401 || a.status == 503)),
        "{statuses:?}"
    );
    let busy: Vec<Duration> = answers
        .iter()
        .filter(|(a, _)| a.as_ref().is_ok_and(|a| a.status == 503))
        .map(|(_, waited)| *waited)
        .collect();
    assert!(
        !busy.is_empty(),
        "no 503 of {burst} (one check alone: {alone:?}): {statuses:?}"
    );
    for (a, _) in &answers {
        if let Ok(a) = a.as_ref()
            && a.status == 503
        {
            assert!(a.header("retry-after").is_some(), "{}", a.head);
        }
    }
    // Every 503 comes after the wait (5 s; the client's clock starts before the gateway's), not at
    // once (a full queue's) nor much later (a longer wait); a 401 was served within the wait and
    // one check, slowed by the others.
    for waited in &busy {
        assert!(
            *waited >= Duration::from_millis(4500),
            "a 503 before the 5 s wait was over ({waited:?}): {statuses:?}"
        );
        assert!(*waited < Duration::from_secs(8), "a 503 after {waited:?}");
    }
    let served = Duration::from_secs(9) + 4 * alone;
    for (a, took) in &answers {
        if a.as_ref().is_ok_and(|a| a.status == 401) {
            assert!(*took < served, "a 401 after {took:?}: {statuses:?}");
        }
    }
}

#[test]
fn a_user_removed_by_a_reload_is_refused_at_once_despite_the_basic_cache() {
    let w = start(Opts::default());
    let q = "/dicom-web/studies?PatientID=WEB1";
    let writer = basic("writer", PASSWORD);
    let reader = basic("reader", PASSWORD);
    assert_eq!(raw(&w, "GET", q, &[&writer], "").status, 200);
    assert_eq!(raw(&w, "GET", q, &[&writer], "").status, 200, "cached");
    std::fs::write(
        w.gateway.config_path(),
        w.config(Opts::default(), w.dimse_port, w.port, &["reader"]),
    )
    .expect("write config");
    w.gateway.signal("HUP");
    assert!(
        w.gateway
            .wait_for_log("configuration reloaded", Duration::from_secs(30)),
        "{}",
        w.gateway.log()
    );
    let a = raw(&w, "GET", q, &[&writer], "");
    assert_eq!(
        a.status, 401,
        "a removed user's cached login still works: {a:?}"
    );
    assert_eq!(raw(&w, "GET", q, &[&reader], "").status, 200);
}

#[test]
fn every_retrieve_and_store_is_audited_with_its_uids() {
    let w = start(Opts {
        audit: true,
        ..Opts::default()
    });
    let t = format!(
        "Authorization: Bearer {}",
        token(&w.pki, "carol", &["reader"])
    );
    let t = t.as_str();
    let i = &w.instances[0];
    let (s, se, sop) = (&i.study_uid, &i.series_uid, &i.sop_uid);
    let dicom = "Accept: multipart/related; type=\"application/dicom\"";
    for (target, accept) in [
        (format!("/dicom-web/studies/{s}"), dicom),
        (format!("/dicom-web/studies/{s}/series/{se}"), dicom),
        (
            format!("/dicom-web/studies/{s}/series/{se}/instances/{sop}"),
            dicom,
        ),
        (
            format!("/dicom-web/studies/{s}/series/{se}/instances/{sop}/metadata"),
            "Accept: application/dicom+json",
        ),
        (
            format!("/dicom-web/studies/{s}/series/{se}/instances/{sop}/frames/1"),
            "Accept: multipart/related; type=\"application/octet-stream\"",
        ),
        (
            format!(
                "/wado?requestType=WADO&studyUID={s}&seriesUID={se}&objectUID={sop}&contentType=application%2Fdicom"
            ),
            "Accept: */*",
        ),
    ] {
        // Whatever the archive makes of it (its frames support varies), the retrieve is audited.
        let a = raw(&w, "GET", &target, &[t, accept], "");
        assert_ne!(a.status, 403, "{target}: {a:?}");
    }
    // STOW-RS as writer.
    let data = common::tempdir("stow-audit");
    let new = make_instances_with_uids(data.path(), &[("STOW2", "STOW^AUDIT", 1)]).remove(0);
    let body = stow_body(data.path(), &new.path);
    let at = format!("@{}", body.display());
    let (code, _, text) = curl(
        &w,
        &[
            "-u",
            &format!("writer:{PASSWORD}"),
            "-H",
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary=pacsgate-boundary",
            "-H",
            "Accept: application/dicom+json",
            "--data-binary",
            &at,
        ],
        "/dicom-web/studies",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&text));

    let events = w.audit_events();
    let wado: Vec<&Value> = events.iter().filter(|e| e["event"] == "wado").collect();
    let find = |service: &str, resource: Option<&str>, series: bool, instance: bool| {
        wado.iter().any(|e| {
            e["user"] == "carol"
                && e["service"] == service
                && resource.is_none_or(|r| e["resource"] == r)
                && e["study_uid"] == json!(s)
                && (e.get("series_uid") == series.then(|| json!(se)).as_ref())
                && (e.get("sop_instance_uid") == instance.then(|| json!(sop)).as_ref())
        })
    };
    assert!(
        find("wado-rs", Some("instances"), false, false),
        "study: {wado:#?}"
    );
    assert!(
        find("wado-rs", Some("instances"), true, false),
        "series: {wado:#?}"
    );
    assert!(
        find("wado-rs", Some("instances"), true, true),
        "instance: {wado:#?}"
    );
    assert!(
        find("wado-rs", Some("metadata"), true, true),
        "metadata: {wado:#?}"
    );
    assert!(
        find("wado-rs", Some("frames"), true, true) && wado.iter().any(|e| e["frames"] == "1"),
        "frames: {wado:#?}"
    );
    assert!(find("wado-uri", None, true, true), "WADO-URI: {wado:#?}");
    let stow = events
        .iter()
        .find(|e| e["event"] == "stow")
        .unwrap_or_else(|| panic!("no stow event: {events:#?}"));
    assert_eq!(stow["user"], "writer");
    assert_eq!(stow["study_uid"], json!(new.study_uid), "{stow}");
    assert_eq!(stow["stored"], json!([new.sop_uid]), "{stow}");
}

#[test]
fn every_web_request_has_one_outcome_line_and_no_credentials_is_not_a_failed_login() {
    let w = start(Opts {
        audit: true,
        ..Opts::default()
    });
    let q = "/dicom-web/studies?PatientID=WEB1";
    assert_eq!(raw(&w, "GET", q, &[], "").status, 401);
    let reader = basic("reader", PASSWORD);
    assert_eq!(raw(&w, "GET", q, &[&reader], "").status, 200);
    let log = w.gateway.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" web request "))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("outcome=\"rejected\"") && l.contains("reason=\"no credentials\"")),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l.contains("user=\"reader\"")
            && l.contains("op=\"qido\"")
            && l.contains("status=200")
            && l.contains("duration_ms=")),
        "{log}"
    );
    // Asking without credentials is how a browser starts: not a failed login.
    assert!(
        w.audit_events()
            .iter()
            .all(|e| e["event"] != json!("login.failed")),
        "{:?}",
        w.audit_events()
    );
}

#[test]
fn a_request_without_host_never_shows_the_archive_its_own_address() {
    let w = start(Opts {
        large_mb: Some(1),
        ..Opts::default()
    });
    let t = token(&w.pki, "wanda", &["writer"]);
    let auth = format!("Authorization: Bearer {t}");
    let rt = runtime();
    let send = |req: String| {
        rt.block_on(exchange(
            w.port,
            &w.pki.ca_cert,
            "127.0.0.1",
            req.as_bytes(),
        ))
        .expect("answer")
    };
    // HTTP/1.1 without Host: 400 (RFC 9112 3.2), nothing forwarded.
    let a = send(format!(
        "GET /dicom-web/studies?PatientID=WEB1 HTTP/1.1\r\n{auth}\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(a.status, 400, "{a:?}");
    // HTTP/1.0 may omit it: the archive builds its BulkDataURIs from the Host it is given, which
    // must be the gateway's, not the archive's own address (the port that is firewalled).
    let target = format!("/dicom-web/studies/{}/metadata", w.study);
    let a = send(format!("GET {target} HTTP/1.0\r\n{auth}\r\n\r\n"));
    assert_eq!(a.status, 200, "{a:?}");
    let body = String::from_utf8_lossy(&a.body);
    assert!(body.contains("BulkDataURI"), "the premise: {body:.400}");
    let archive = format!("127.0.0.1:{}", w.orthanc.http_port);
    assert!(
        !body.contains(&archive),
        "the archive's address in the answer: {body:.2000}"
    );
}

#[test]
fn one_user_cannot_hold_more_than_max_requests_per_user_answers_unread() {
    let w = start(Opts {
        large_mb: Some(20),
        http: "max_requests_per_user = 2",
        timeouts: "upstream_response = 2",
        ..Opts::default()
    });
    let carol = format!(
        "Authorization: Bearer {}",
        token(&w.pki, "carol", &["reader"])
    );
    let dave = format!(
        "Authorization: Bearer {}",
        token(&w.pki, "dave", &["reader"])
    );
    let study = format!("/dicom-web/studies/{}", w.study);
    let accept = "Accept: multipart/related; type=\"application/dicom\"";
    let rt = runtime();
    // Two retrieves of the study (20 MB) whose answers carol never reads: their heads come, then
    // the bodies stall in the socket buffers, and each holds its place until it is closed.
    let held: Vec<Tls> = (0..2)
        .map(|_| {
            rt.block_on(async {
                let mut tls = tls_from("127.0.0.1", w.port, &w.pki.ca_cert)
                    .await
                    .expect("tls");
                let req = request("GET", &study, &[&carol, accept], "");
                tls.write_all(&req).await.expect("write");
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    tokio::time::timeout(Duration::from_secs(20), tls.read_exact(&mut byte))
                        .await
                        .expect("the head in time")
                        .expect("read");
                    head.push(byte[0]);
                }
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                tls
            })
        })
        .collect();
    let before = archive_lines(&w).len();
    // A third waits its turn (upstream_response, 2 s here), then is refused.
    let asked = Instant::now();
    let third = raw(
        &w,
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[&carol],
        "",
    );
    assert_eq!(third.status, 429, "{third:?}");
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "no wait: {:?}",
        asked.elapsed()
    );
    assert!(third.header("retry-after").is_some(), "{}", third.head);
    assert!(
        String::from_utf8_lossy(&third.body).contains("max_requests_per_user"),
        "{third:?}"
    );
    // The refused request never reached the archive; another user has a count of their own.
    archive_saw_nothing_since(&w, before, "a request over max_requests_per_user");
    assert_eq!(
        raw(&w, "GET", "/dicom-web/studies?PatientID=WEB1", &[&dave], "").status,
        200
    );
    // Closed, the held answers give their places back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = raw(
            &w,
            "GET",
            "/dicom-web/studies?PatientID=WEB1",
            &[&carol],
            "",
        );
        if again.status == 200 {
            break;
        }
        assert_eq!(again.status, 429, "{again:?}");
        assert!(Instant::now() < deadline, "carol's places never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A burst of 8 with 2 places waits its turn: all are served.
    let qido = request(
        "GET",
        "/dicom-web/studies?PatientID=WEB1",
        &[&carol, "Connection: close"],
        "",
    );
    let statuses: Vec<u16> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (port, ca, req) = (w.port, w.pki.ca_cert.clone(), qido.clone());
            set.spawn(async move { exchange(port, &ca, "127.0.0.1", &req).await });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("task").expect("answer").status);
        }
        out
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let log = w.gateway.log();
    assert!(log.contains("rule=\"requests_in_flight\""), "{log}");
}
