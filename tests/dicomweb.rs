//! The web door with real peers: Orthanc with its DICOMweb plugin behind the gateway, curl and the
//! dicomweb-client Python library in front.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

struct Web {
    pki: Pki,
    orthanc: Orthanc,
    gateway: Gateway,
    dimse_port: u16,
    port: u16,
    files: Vec<PathBuf>,
    study: String,
    _data: tempfile::TempDir,
}

/// Roles: `reader` (find, get), `writer` (find, get, store, unrestricted), `harvester` (find, get, unrestricted,
/// cap 2). `limits` goes into [limits].
fn start(limits: &str, large_mb: Option<usize>) -> Web {
    let pki = Pki::generate();
    let orthanc = Orthanc::start_with("ORTHANC", &[], Orthanc::dicomweb_config());
    let data = common::tempdir("web");
    let made = make_instances_with_uids(
        data.path(),
        &[
            ("WEB1", "WEB^ONE", 1),
            ("WEB2", "WEB^TWO", 1),
            ("WEB3", "WEB^THREE", 1),
        ],
    );
    let study = made[0].study_uid.clone();
    let mut files: Vec<PathBuf> = made.into_iter().map(|i| i.path).collect();
    if let Some(mb) = large_mb {
        files.push(make_large_instance_in(data.path(), mb, "WEB1", &study));
    }
    for f in &files {
        orthanc.upload(&std::fs::read(f).expect("read"));
    }
    let hash = password_hash(PASSWORD);
    let dimse_port = free_port();
    let port = free_port();
    let config = format!(
        r#"
[gateway]
listen = "127.0.0.1:{dimse_port}"

[tls]
certificate = "{cert}"
private_key = "{key}"
client_ca = "{ca}"

[http]
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{http}"
dicomweb_path = "/dicom-web"
wado_uri_path = "/wado"

[limits]
{limits}

[auth.jwt]
issuer = "https://idp.test"
audience = "pacsgate"
public_key = "{jwt}"

[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:{dicom}"
ae_title = "ORTHANC"

[[role]]
name = "reader"
allow = ["echo", "find", "get"]

[[role]]
name = "writer"
allow = ["echo", "find", "get", "store"]
unrestricted_queries = true

[[role]]
name = "harvester"
allow = ["find", "get"]
unrestricted_queries = true
max_query_results = 2

[[user]]
name = "reader"
password_hash = "{hash}"
roles = ["reader"]

[[user]]
name = "writer"
password_hash = "{hash}"
roles = ["writer"]
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_cert.display(),
        jwt = pki.jwt_public_pem.display(),
        http = orthanc.http_port,
        dicom = orthanc.dicom_port,
    );
    let mut gateway = Gateway::start(dimse_port, &config);
    gateway.wait_listening(port);
    Web {
        pki,
        orthanc,
        gateway,
        dimse_port,
        port,
        files,
        study,
        _data: data,
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
    let w = start("", None);
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
    let w = start("", Some(50));
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
    let w = start("", None);
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
fn the_archives_own_web_ui_and_rest_api_are_403() {
    let w = start("", None);
    let t = token(&w.pki, "carol", &["writer"]);
    let before = w.orthanc.http_requests_logged();
    for path in [
        "/app/explorer.html",
        "/instances",
        "/patients",
        "/tools/find",
        "/system",
        "/dicom-web/../instances",
        "/wado-rs",
    ] {
        let (code, _, body) = curl(&w, &["-H", &bearer(&t)], path);
        assert_eq!(code, 403, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (code, _, _) = curl(
        &w,
        &["-H", &bearer(&t), "-X", "DELETE"],
        &format!("/dicom-web/studies/{}", w.study),
    );
    assert_eq!(code, 403, "DELETE must not pass");
    assert_eq!(w.orthanc.http_requests_logged(), before);
}

#[test]
fn the_guard_the_cap_and_the_shared_rate_limit_apply_to_qido() {
    let w = start("queries_per_minute = 6\nqueries_burst = 3", None);
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
