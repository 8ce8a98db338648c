//! The README's quick start and docs/dicomweb.md's walkthrough, run as written (host names, ports,
//! folders and UIDs mapped to the test's) against Orthanc through the gateway, checking what the
//! archive received.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const PASSPHRASE: &str = "a long passphrase for dr.house";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The fenced blocks of `lang` in the section of `doc` whose heading starts with `heading`.
fn blocks(doc: &str, heading: &str, lang: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo(doc)).expect("read doc");
    let start = text
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("{doc}: no section {heading:?}"));
    let level = heading.split(' ').next().unwrap_or("##");
    let section = &text[start + 1..];
    let end = section[heading.len()..]
        .find(&format!("\n{level} "))
        .map_or(section.len(), |i| i + heading.len());
    let mut out = Vec::new();
    let mut rest = &section[..end];
    let fence = format!("```{lang}\n");
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let close = body.find("```").expect("closed block");
        out.push(body[..close].to_string());
        rest = &body[close..][3..];
    }
    out
}

/// Shell lines of a block: comments and blank lines dropped, `\` continuations joined.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim_end();
        if current.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            continue;
        }
        current.push_str(line);
        out.push(std::mem::take(&mut current));
    }
    out
}

/// Run one documented command with bash in `cwd`, the DCMTK binaries first on PATH and `PW` set.
fn sh(cmd: &str, cwd: &Path, stdin: Option<&str>) -> Output {
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .env("PATH", path)
        .env("PW", PASSPHRASE)
        .env("TCP_NODELAY", "1")
        .env("NO_COLOR", "1");
    run_bounded(&mut c, stdin.map(str::as_bytes), Duration::from_secs(60))
}

fn ok(out: &Output, what: &str) -> String {
    assert_success(out, what)
}

#[test]
fn the_readme_quick_start_works_as_written_in_front_of_orthanc() {
    let section = "## Quick start in front of an archive";
    let sh_blocks = blocks("README.md", section, "sh");
    let toml_blocks = blocks("README.md", section, "toml");
    assert_eq!(
        (sh_blocks.len(), toml_blocks.len()),
        (2, 1),
        "the quick start's blocks changed"
    );
    let orthanc = Orthanc::start("PACS", &[]);
    let root = common::tempdir("quickstart");
    let etc = root.path().join("etc/pacsgate");
    std::fs::create_dir_all(root.path().join("etc")).expect("mkdir etc");
    let port = free_port();
    let ca_dir = root.path().join("pacsgate-ca");
    let gateway_side = |cmd: &str| {
        cmd.replace("/etc/pacsgate", &etc.display().to_string())
            .replace("/root/pacsgate-ca", &ca_dir.display().to_string())
            .replace("target/release/pacsgate", gateway::BIN)
            .replace(
                "config/pacsgate.toml",
                &repo("config/pacsgate.toml").display().to_string(),
            )
            .replace("pacs-gw.example.org", "localhost")
    };

    // On the gateway machine.
    let mut hash = String::new();
    let mut gateway: Option<Spawned> = None;
    let mut edited = false;
    for cmd in commands(&sh_blocks[0]) {
        if cmd.starts_with("cargo build") {
            continue; // the test binary is built
        }
        if cmd.starts_with("read -rs PW") {
            continue; // PW is in the environment, as `read` would leave it
        }
        let cmd = gateway_side(&cmd);
        if (cmd.contains(" check --config") || cmd.contains(" run --config")) && !edited {
            // The edits the quick start asks for: listen, [[upstream]] as shown, dr.house's hash.
            let file = etc.join("pacsgate.toml");
            let text = std::fs::read_to_string(&file).expect("config");
            let upstream = toml_blocks[0].replace(
                "10.0.0.20:104",
                &format!("127.0.0.1:{}", orthanc.dicom_port),
            );
            let start = text
                .find("[[upstream]]")
                .expect("[[upstream]] in the example");
            let end = start + text[start..].find("\n\n").expect("end of [[upstream]]");
            let mut text = format!("{}{}{}", &text[..start], upstream.trim_end(), &text[end..]);
            text = text.replace("0.0.0.0:2762", &format!("127.0.0.1:{port}"));
            let old_hash = text
                .lines()
                .find(|l| l.starts_with("password_hash"))
                .expect("dr.house's password_hash")
                .to_string();
            text = text.replace(&old_hash, &format!("password_hash = \"{hash}\""));
            std::fs::write(&file, text).expect("edit config"); // keeps the file's mode 640
            edited = true;
        }
        if cmd.contains(" run --config") {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(format!("exec {cmd}"))
                .env("RUST_LOG", "info");
            let mut g = Spawned::spawn(c, &root.path().join("pacsgate.log"));
            g.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            })
            .unwrap_or_else(|e| panic!("{e}"));
            gateway = Some(g);
            continue;
        }
        if cmd.contains(" check --config") {
            let said = ok(&sh(&cmd, root.path(), None), &cmd);
            assert!(said.contains("configuration is ready"), "{said}");
            assert!(!said.contains("warning:"), "{said}");
            continue;
        }
        let out = sh(&cmd, root.path(), None);
        let said = ok(&out, &cmd);
        if cmd.contains("hash-password") {
            hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(hash.starts_with("$argon2id$"), "{said}");
        }
    }
    let gateway = gateway.expect("the quick start runs the gateway");

    // On the clients: ca.crt and each one's certificate and key, and an image to store.
    let client = root.path().join("client");
    std::fs::create_dir_all(&client).expect("client dir");
    for f in [
        "ca.crt",
        "dr.house.crt",
        "dr.house.key",
        "ct-scanner-1.crt",
        "ct-scanner-1.key",
    ] {
        std::fs::copy(etc.join("certs").join(f), client.join(f))
            .unwrap_or_else(|e| panic!("certs issued no {f}: {e}"));
    }
    let data = common::tempdir("quickstart-data");
    let there = make_instances_with_uids(data.path(), &[("123", "DOE^JOHN", 1)]);
    orthanc.upload(&std::fs::read(&there[0].path).expect("read"));
    let image = make_instances_with_uids(data.path(), &[("QS-STORED", "NEW^IMAGE", 1)]);
    std::fs::copy(&image[0].path, client.join("image.dcm")).expect("image.dcm");
    let before = orthanc.instance_count();

    for cmd in commands(&sh_blocks[1]) {
        if cmd.starts_with("read -rs PW") {
            continue;
        }
        let cmd = cmd
            .replace("pacs-gw.example.org 2762", &format!("localhost {port}"))
            .replace("pacs-gw.example.org:2762", &format!("localhost:{port}"))
            .replace("pacsgate echo", &format!("{} echo", gateway::BIN));
        let said = ok(&sh(&cmd, &client, None), &cmd);
        if cmd.starts_with("findscu") {
            assert!(
                said.contains(&there[0].study_uid),
                "findscu as dr.house did not find patient 123's study: {said}"
            );
        }
    }
    // What the archive received: the modality's image.
    assert_eq!(orthanc.instance_count(), before + 1);
    assert!(
        orthanc
            .file_by_sop_instance_uid(&image[0].sop_uid)
            .is_some(),
        "the stored image is not in the archive"
    );
    let log = gateway.log();
    for user in ["user=\"dr.house\"", "user=\"ct-scanner-1\""] {
        assert!(log.contains(user), "no association of {user}: {log}");
    }
}

#[test]
fn the_dicomweb_walkthrough_runs_with_curl_and_dicomweb_client_and_retrieve_urls_point_at_the_gateway()
 {
    let section = "## Walkthrough: curl and dicomweb-client";
    let curl = blocks("docs/dicomweb.md", section, "sh");
    let python = blocks("docs/dicomweb.md", section, "python");
    assert_eq!(
        (curl.len(), python.len()),
        (1, 1),
        "the walkthrough's blocks changed"
    );
    let orthanc = Orthanc::start_with("PACS", &[], Orthanc::dicomweb_config());
    let pki = Pki::generate();
    let data = common::tempdir("walkthrough");
    let instances = make_instances_with_uids(data.path(), &[("123", "DOE^JOHN", 2)]);
    for i in &instances {
        orthanc.upload(&std::fs::read(&i.path).expect("read"));
    }
    let (dimse, web) = (free_port(), free_port());
    let config = GatewayConfig::new(dimse)
        .tls(&pki)
        .set("http", &format!("listen = \"127.0.0.1:{web}\""))
        .set(
            "http",
            &format!(
                "upstream = \"http://127.0.0.1:{}/dicom-web\"",
                orthanc.http_port
            ),
        )
        .set("http", "wado_uri_path = \"/wado\"")
        .upstream("PACS", orthanc.dicom_port, "PACS")
        .role("reader", &["echo", "find", "get"])
        .user("dr.house", &password_hash(PASSPHRASE), &["reader"])
        .to_toml();
    let mut gw = Gateway::start(dimse, &config);
    gw.wait_listening(web);
    let cwd = data.path().join("client");
    std::fs::create_dir_all(&cwd).expect("dir");
    std::fs::copy(&pki.ca_cert, cwd.join("ca.crt")).expect("ca");
    let first = &instances[0];
    let ours = |text: &str| {
        text.replace("pacs-gw.example.org:8443", &format!("localhost:{web}"))
            .replace("1.2.3.4.5.6", &first.sop_uid)
            .replace("1.2.3.4.5", &first.series_uid)
            .replace("1.2.3.4", &first.study_uid)
    };

    let mut said_403 = false;
    for cmd in commands(&curl[0]) {
        if cmd.starts_with("read -rs PW") {
            continue;
        }
        let cmd = ours(&cmd);
        let out = sh(&cmd, &cwd, None);
        let said = ok(&out, &cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if cmd.contains("/studies?PatientID=123") {
            let matches: serde_json::Value = serde_json::from_str(&stdout).expect("QIDO JSON");
            let url = matches[0]["00081190"]["Value"][0]
                .as_str()
                .unwrap_or_default();
            assert_eq!(
                url,
                format!(
                    "https://localhost:{web}/dicom-web/studies/{}",
                    first.study_uid
                ),
                "{stdout}"
            );
        }
        if cmd.contains("-o study.multipart") {
            let body = std::fs::read(cwd.join("study.multipart")).expect("multipart");
            assert!(body.len() > 1000, "{said}");
        }
        if cmd.contains("-o image.dcm") {
            let got = std::fs::read(cwd.join("image.dcm")).expect("image.dcm");
            let want = std::fs::read(&first.path).expect("original");
            assert_eq!(dataset_bytes(&got), dataset_bytes(&want), "WADO-URI object");
        }
        if cmd.contains("PatientName=*") {
            assert_eq!(stdout.trim(), "403", "{said}");
            said_403 = true;
        }
    }
    assert!(said_403, "the walkthrough shows a refused query");

    let script = cwd.join("walkthrough.py");
    std::fs::write(&script, ours(&python[0])).expect("script");
    let mut c = Command::new(common::python());
    // As on a clinician's machine: no CA bundle variable (requests lets one override session.verify).
    c.arg(&script)
        .current_dir(&cwd)
        .env("PW", PASSPHRASE)
        .env("NO_PROXY", "*")
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE");
    let out = run_bounded(&mut c, None, Duration::from_secs(60));
    let said = ok(&out, "the dicomweb-client example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{} https://localhost:{web}/dicom-web/studies/{}",
            first.study_uid, first.study_uid
        )),
        "{said}"
    );
    for i in &instances {
        assert!(
            stdout.contains(&i.sop_uid),
            "{} not retrieved: {said}",
            i.sop_uid
        );
    }
    // The archive saw the requests from the gateway (no client reaches it directly here).
    assert!(orthanc.http_requests_logged() > 0);
    let log = gw.log();
    assert!(
        log.contains("user=\"dr.house\"") || log.contains("user=dr.house"),
        "{log}"
    );
}
