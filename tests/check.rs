//! `pacsgate check`: it opens (or tests) what `run` and a reload open, says `ok:` per section, warns
//! about doors nobody can pass and quiet switches, has an offline mode for the systemd unit; key and
//! configuration file modes refuse a start and a reload; TOML errors and error chains read well.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

/// A gateway configuration for `check`: the TLS listener on `port`, one archive at `upstream`,
/// a reader with a password; `extra` is appended.
fn config(pki: &Pki, port: u16, upstream: u16, extra: &str) -> String {
    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s";
    GatewayConfig::new(port)
        .tls(pki)
        .client_ca(pki)
        .upstream("ARCHIVE", upstream, "ORTHANC")
        .role("reader", &["echo", "find"])
        .user("alice", HASH, &["reader"])
        .raw(extra)
        .to_toml()
}

fn check(path: &Path, offline: bool) -> (Option<i32>, String) {
    let p = path.to_str().expect("path");
    let out: Output = if offline {
        Gateway::run_command(&["check", "--offline", "--config", p], None)
    } else {
        Gateway::run_command(&["check", "--config", p], None)
    };
    (out.status.code(), output_text(&out))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    common::write_config(&path, text);
    path
}

/// `cmd` started, once it listens on `port` (within 20 s; panics with its log otherwise).
fn listening(cmd: std::process::Command, log: &Path, port: u16) -> Spawned {
    let mut started = Spawned::spawn(cmd, log);
    started
        .wait_until(Duration::from_secs(20), "listening", |p| {
            is_listening(p.pid(), port)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    started
}

/// A port nothing listens on (bound, then closed).
fn dead_port() -> u16 {
    free_port()
}

#[test]
fn check_opens_what_run_and_a_reload_open_with_one_ok_line_per_section() {
    let pki = Pki::generate();
    let dir = common::tempdir("check-sections");
    let archive = TcpListener::bind("127.0.0.1:0").expect("archive");
    let archive_port = archive.local_addr().expect("addr").port();
    let web_archive = TcpListener::bind("127.0.0.1:0").expect("web archive");
    let web_port = web_archive.local_addr().expect("addr").port();
    let (port, http, admin) = (free_port(), free_port(), free_port());
    let audit = dir.path().join("audit.jsonl");
    let good = format!(
        "[audit]\nfile = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\nupstream = \"http://127.0.0.1:{web_port}/dicom-web\"\n",
        audit.display()
    );
    let path = write(
        dir.path(),
        "good.toml",
        &config(&pki, port, archive_port, &good),
    );
    let (code, text) = check(&path, false);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "ok: private keys and the configuration file (it holds password hashes) not readable by other users".to_string(),
        "ok: [tls] certificate".to_string(),
        format!("ok: [audit] file {}: does not exist yet", audit.display()),
        format!("ok: gateway.listen 127.0.0.1:{port} can be bound"),
        format!("ok: http.listen 127.0.0.1:{http} can be bound"),
        format!("ok: admin.listen 127.0.0.1:{admin} can be bound"),
        format!("ok: [[upstream]] ARCHIVE (ORTHANC) at 127.0.0.1:{archive_port} accepts connections"),
        format!("ok: [http] upstream http://127.0.0.1:{web_port}/dicom-web at 127.0.0.1:{web_port} accepts connections"),
        "configuration is ready".to_string(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    assert!(
        !audit.exists(),
        "check created the audit file (a root-owned file the service could not open)"
    );

    // The audit file in a folder that does not exist: `run` refuses it, and so does check.
    let missing = dir.path().join("no-such-folder/audit.jsonl");
    let text_missing = config(
        &pki,
        port,
        archive_port,
        &good.replace(&audit.display().to_string(), &missing.display().to_string()),
    );
    let bad = write(dir.path(), "missing-audit.toml", &text_missing);
    let (code, text) = check(&bad, false);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("error: [audit] file {}", missing.display())),
        "{text}"
    );
    let out = Gateway::run_command(&["run", "--config", bad.to_str().expect("p")], None);
    assert!(!out.status.success(), "run started: {}", output_text(&out));
    assert!(
        output_text(&out).contains("cannot open audit file"),
        "{}",
        output_text(&out)
    );

    // The admin port taken by another program: refused, naming the key and the holder.
    let squatter = TcpListener::bind(("127.0.0.1", admin)).expect("take the admin port");
    let (code, text) = check(&path, false);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "error: admin.listen: cannot listen on 127.0.0.1:{admin}"
        )),
        "{text}"
    );
    drop(squatter);

    // The DICOMweb archive (or the DIMSE archive) on a dead port: reported, exit status 2.
    drop(web_archive);
    let (code, text) = check(&path, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "unreachable: [http] upstream http://127.0.0.1:{web_port}/dicom-web at 127.0.0.1:{web_port}"
        )),
        "{text}"
    );

    // A syslog collector over TLS whose CA file is missing: `run` could not open it.
    let syslog = config(
        &pki,
        port,
        archive_port,
        &format!(
            "[audit]\nsyslog = \"tls://127.0.0.1:{}\"\nsyslog_ca = \"{}\"\n",
            dead_port(),
            dir.path().join("nope.crt").display()
        ),
    );
    let (code, text) = check(&write(dir.path(), "syslog.toml", &syslog), false);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("error: [audit] syslog_ca"), "{text}");

    // While the gateway runs on this very file, its own ports are fine: `check && kill -HUP` works.
    let live = TcpListener::bind("127.0.0.1:0").expect("web archive again");
    let live_port = live.local_addr().expect("addr").port();
    let running = config(
        &pki,
        port,
        archive_port,
        &good.replace(&web_port.to_string(), &live_port.to_string()),
    );
    let mut gw = Gateway::start(port, &running);
    gw.wait_listening(http);
    gw.wait_listening(admin);
    let (code, text) = check(gw.config_path(), false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "ok: admin.listen 127.0.0.1:{admin} is held by the running pacsgate (pid {})",
            gw.pid()
        )),
        "{text}"
    );
    // ... and the file check passed is the file a reload takes.
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    drop(archive);
}

#[test]
fn check_warns_when_nobody_can_pass_about_unheld_roles_and_quiet_switches() {
    let pki = Pki::generate();
    let dir = common::tempdir("check-warnings");
    let nobody = config(&pki, free_port(), dead_port(), "").replace(
        "[[user]]\nname = \"alice\"",
        "[[ignored]]\nname = \"alice\"",
    );
    // No [[user]] at all (the replaced table would be an unknown key): cut the user out.
    let nobody = nobody[..nobody.find("[[ignored]]").expect("cut")].to_string();
    let (code, text) = check(&write(dir.path(), "nobody.toml", &nobody), true);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(
            "warning: nobody can pass: there is no [[user]], no [auth.jwt] and no [[device]]"
        ),
        "{text}"
    );
    assert!(
        text.contains("warning: role \"reader\": nobody holds it"),
        "{text}"
    );

    let quiet = config(
        &pki,
        free_port(),
        dead_port(),
        "[limits]\nfailed_logins = 0\n",
    )
    .replace(
        "allow = [\"echo\", \"find\"]",
        "allow = [\"echo\", \"find\"]\nunrestricted_queries = true",
    );
    let (code, text) = check(&write(dir.path(), "quiet.toml", &quiet), true);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("warning: role \"reader\" has unrestricted_queries = true")
            && text.contains("(user \"alice\")"),
        "{text}"
    );
    assert!(
        text.contains("warning: [limits] failed_logins = 0: no user name is ever locked out"),
        "{text}"
    );
    let plain = config(&pki, free_port(), dead_port(), "");
    let (_, text) = check(&write(dir.path(), "plain.toml", &plain), true);
    assert!(!text.contains("warning:"), "{text}");
}

#[test]
fn check_offline_contacts_nothing_and_the_systemd_unit_uses_it() {
    let pki = Pki::generate();
    let dir = common::tempdir("check-offline");
    // The archive is down and the listen port is taken: offline, neither matters.
    let squatter = TcpListener::bind("127.0.0.1:0").expect("squat");
    let port = squatter.local_addr().expect("addr").port();
    let archive = dead_port();
    let path = write(dir.path(), "p.toml", &config(&pki, port, archive, ""));
    let (code, text) = check(&path, true);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("configuration is ready (offline: no address was bound, no archive or collector contacted)"),
        "{text}"
    );
    assert!(
        !text.contains("unreachable") && !text.contains("can be bound"),
        "{text}"
    );
    // Offline still refuses what `run` would refuse.
    let broken = write(
        dir.path(),
        "broken.toml",
        &config(&pki, port, archive, "").replace(
            &pki.server_key.display().to_string(),
            "/nonexistent/server.key",
        ),
    );
    let (code, text) = check(&broken, true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("/nonexistent/server.key"), "{text}");
    // Online, the unreachable archive is reported (2), not a broken file (1).
    drop(squatter);
    let (code, text) = check(&path, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "unreachable: [[upstream]] ARCHIVE (ORTHANC) at 127.0.0.1:{archive}"
        )),
        "{text}"
    );
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/pacsgate.service"),
    )
    .expect("unit");
    assert!(
        unit.lines().any(|l| l
            == "ExecStartPre=/usr/bin/pacsgate check --offline --config /etc/pacsgate/pacsgate.toml"),
        "{unit}"
    );
}

#[test]
fn keys_and_password_hashes_readable_by_others_refuse_start_reload_and_check() {
    let pki = Pki::generate();
    // A folder others can enter (as /etc/pacsgate is); test temp dirs are 0700.
    let dir = common::tempdir("check-modes");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let key = dir.path().join("server.key");
    std::fs::copy(&pki.server_key, &key).expect("copy key");
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let port = free_port();
    let text = config(&pki, port, dead_port(), "").replace(
        &pki.server_key.display().to_string(),
        &key.display().to_string(),
    );
    let path = write(dir.path(), "pacsgate.toml", &text);
    mode(&path, 0o640);

    // 640 (group pacsgate in production; here root's group) passes; 644 and 604 do not.
    mode(&key, 0o640);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(0), "640 key: {out}");
    for m in [0o644, 0o604] {
        mode(&key, m);
        let (code, out) = check(&path, true);
        assert_eq!(code, Some(1), "{m:o} key: {out}");
        assert!(
            out.contains(&format!(
                "tls.private_key {} can be read by other users (mode {m:o}",
                key.display()
            )) && out.contains("allow_readable_keys"),
            "{out}"
        );
        let run = Gateway::run_command(&["run", "--config", path.to_str().expect("p")], None);
        assert!(!run.status.success(), "run started with a {m:o} key");
        assert!(
            output_text(&run).contains("can be read by other users"),
            "{}",
            output_text(&run)
        );
    }
    // The configuration file, which holds a password hash.
    mode(&key, 0o600);
    mode(&path, 0o644);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the configuration file (it holds password hashes)"),
        "{out}"
    );
    // Said on purpose: starts, with a warning.
    std::fs::write(
        &path,
        text.replace(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{port}\"\nallow_readable_keys = true"),
        ),
    )
    .expect("write");
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: allow_readable_keys = true, and the configuration file"),
        "{out}"
    );

    // A running gateway refuses a reload that would make it read a loose key.
    let served = config(&pki, port, dead_port(), "");
    let gw = Gateway::start(port, &served);
    mode(&key, 0o644);
    std::fs::write(
        gw.config_path(),
        served.replace(
            &pki.server_key.display().to_string(),
            &key.display().to_string(),
        ),
    )
    .expect("rewrite");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reload refused", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert!(
        gw.log().contains("can be read by other users"),
        "{}",
        gw.log()
    );
}

#[test]
fn a_key_or_config_file_with_a_posix_acl_for_another_user_refuses_check_and_run() {
    let pki = Pki::generate();
    // In a 700 folder with mode 600: the mode bits alone would pass (the old rule did).
    let dir = common::tempdir("check-acl");
    let key = dir.path().join("server.key");
    std::fs::copy(&pki.server_key, &key).expect("copy key");
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let setfacl = |args: &[&str], p: &Path| {
        let out = std::process::Command::new("setfacl")
            .args(args)
            .arg(p)
            .output()
            .expect("setfacl (apt-get install acl)");
        assert!(out.status.success(), "setfacl {args:?}: {out:?}");
    };
    let port = free_port();
    let text = config(&pki, port, dead_port(), "").replace(
        &pki.server_key.display().to_string(),
        &key.display().to_string(),
    );
    let path = write(dir.path(), "pacsgate.toml", &text);
    mode(&path, 0o600);
    mode(&key, 0o600);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(0), "600 key, no ACL: {out}");

    // setfacl -m u:nobody:r server.key: ls -l shows 640+ (the mask); check and run refuse.
    setfacl(&["-m", "u:nobody:r"], &key);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(1), "key with an ACL: {out}");
    assert!(
        out.contains(&format!(
            "tls.private_key {} carries a POSIX ACL",
            key.display()
        )) && out.contains("setfacl -b")
            && out.contains("allow_readable_keys"),
        "{out}"
    );
    let run = Gateway::run_command(&["run", "--config", path.to_str().expect("p")], None);
    assert!(!run.status.success(), "run started with an ACL on the key");
    assert!(
        output_text(&run).contains("carries a POSIX ACL"),
        "{}",
        output_text(&run)
    );
    // An ACL entry that grants nothing (u:nobody:-) is not access.
    setfacl(&["-m", "u:nobody:-"], &key);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(0), "u:nobody:- key: {out}");
    setfacl(&["-b"], &key);

    // The configuration file, which holds a password hash: a named group with read.
    setfacl(&["-m", "g:nogroup:r"], &path);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the configuration file (it holds password hashes)")
            && out.contains("carries a POSIX ACL"),
        "{out}"
    );
    // Said on purpose: starts, with a warning.
    setfacl(&["-b"], &path);
    std::fs::write(
        &path,
        text.replace(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{port}\"\nallow_readable_keys = true"),
        ),
    )
    .expect("write");
    setfacl(&["-m", "u:nobody:r"], &key);
    let (code, out) = check(&path, true);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: allow_readable_keys = true, and tls.private_key"),
        "{out}"
    );
}

#[test]
fn toml_errors_quote_the_line_and_error_chains_say_each_cause_once() {
    let pki = Pki::generate();
    let dir = common::tempdir("check-errors");
    let text = config(&pki, free_port(), dead_port(), "") + "[limits]\nmax_associations = [\n";
    let path = write(dir.path(), "broken.toml", &text);
    let out = Gateway::run_command(&["check", "--config", path.to_str().expect("p")], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    let line_no = text.lines().count();
    assert!(
        lines[0].starts_with(&format!(
            "pacsgate: error: configuration file {}: ",
            path.display()
        )) && lines[0].contains(&format!("(line {line_no}, column")),
        "{stderr}"
    );
    // Then toml's own rendering: the line quoted, the column marked.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("TOML parse error at line {line_no}"))),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{line_no} | max_associations = ["))),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with('|') && l.contains('^')),
        "{stderr}"
    );

    // A port in use: the cause once, not "...: Address already in use (os error 98): Address already in use (os error 98)".
    let squatter = TcpListener::bind("127.0.0.1:0").expect("squat");
    let port = squatter.local_addr().expect("addr").port();
    let path = write(
        dir.path(),
        "taken.toml",
        &config(&pki, port, dead_port(), ""),
    );
    let out = Gateway::run_command(&["run", "--config", path.to_str().expect("p")], None);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert_eq!(
        said.matches("Address already in use").count(),
        1,
        "doubled: {said}"
    );
    assert!(
        said.contains(&format!(
            "pacsgate: error: gateway.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{said}"
    );
}

#[test]
fn a_reload_that_adds_http_and_admin_binds_them_and_names_them() {
    let pki = Pki::generate();
    let port = free_port();
    let (http, admin) = (free_port(), free_port());
    let base = config(&pki, port, dead_port(), "");
    let mut gw = Gateway::start(port, &base);
    let added = config(
        &pki,
        port,
        dead_port(),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\nupstream = \"http://127.0.0.1:8042/dicom-web\"\n"
        ),
    );
    std::fs::write(gw.config_path(), &added).expect("rewrite");
    let (code, text) = check(gw.config_path(), true);
    assert_eq!(code, Some(0), "{text}");
    gw.signal("HUP");
    assert!(
        gw.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    gw.wait_listening(http);
    gw.wait_listening(admin);
    let log = gw.log();
    for key in ["http.listen", "admin.listen"] {
        assert!(
            log.lines()
                .any(|l| l.contains("listener open") && l.contains(&format!("listener=\"{key}\""))),
            "no listener open line for {key}:\n{log}"
        );
    }
    assert!(!log.contains("next restart"), "{log}");
}

#[test]
fn a_port_held_by_a_program_that_only_calls_itself_pacsgate_is_an_error() {
    // Python under the name pacsgate listens on the gateway's port: through a link (its command
    // name is the link's, its executable python's), and as a copy at a path ending in /pacsgate.
    // `check` goes by the executable file (device and inode), not by a name or a path.
    let pki = Pki::generate();
    let dir = common::tempdir("check-impostor");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    for how in ["link", "copy"] {
        let folder = dir.path().join(how);
        std::fs::create_dir(&folder).expect("folder");
        let fake = folder.join("pacsgate");
        if how == "link" {
            std::os::unix::fs::symlink(&python, &fake).expect("link");
        } else {
            std::fs::copy(&python, &fake).expect("copy");
        }
        let port = free_port();
        let mut cmd = std::process::Command::new(&fake);
        cmd.args([
            "-c",
            &format!(
                "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)"
            ),
        ]);
        let impostor = listening(cmd, &folder.join("impostor.log"), port);
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", impostor.pid())).expect("comm");
        assert_eq!(comm.trim(), "pacsgate", "the test's premise ({how})");
        let program = if how == "link" { &python } else { &fake };
        let path = write(
            &folder,
            "impostor.toml",
            &config(&pki, port, dead_port(), ""),
        );
        let (code, text) = check(&path, false);
        assert_eq!(code, Some(1), "{how}: {text}");
        assert!(
            text.contains(&format!(
                "error: gateway.listen: cannot listen on 127.0.0.1:{port}"
            )) && text.contains(&format!(
                "(by pid {}, \"pacsgate\", program {})",
                impostor.pid(),
                program.display()
            )),
            "{how}: {text}"
        );
        assert!(
            !text.contains("held by the running pacsgate"),
            "{how}: {text}"
        );
    }
}

#[test]
fn a_gateway_whose_program_an_upgrade_replaced_is_still_the_running_pacsgate() {
    // The package manager renames a new file over /usr/bin/pacsgate while the old one runs: the
    // gateway's executable is then a deleted file, and `check` (the new one, at the same path)
    // must still know it. Here: a copy of the binary, started, then replaced by another copy.
    let pki = Pki::generate();
    let dir = common::tempdir("check-upgrade");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let program = bin.join("pacsgate");
    std::fs::copy(common::gateway::gateway_bin(), &program).expect("copy");
    let port = free_port();
    let path = write(
        dir.path(),
        "pacsgate.toml",
        &config(&pki, port, dead_port(), ""),
    );
    let mut cmd = std::process::Command::new(&program);
    cmd.args(["run", "--config"])
        .arg(&path)
        .current_dir(dir.path());
    let running = listening(cmd, &dir.path().join("pacsgate.log"), port);
    let upgrade = bin.join("pacsgate.new");
    std::fs::copy(common::gateway::gateway_bin(), &upgrade).expect("copy");
    std::fs::rename(&upgrade, &program).expect("rename over");
    let out = std::process::Command::new(&program)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    let text = output_text(&out);
    assert!(
        text.contains(&format!(
            "ok: gateway.listen 127.0.0.1:{port} is held by the running pacsgate (pid {}, the build an upgrade replaced at this path)",
            running.pid()
        )),
        "{text}"
    );
}

#[test]
fn a_metrics_token_other_users_can_read_is_refused_like_a_key() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::generate();
    let dir = common::tempdir("check-token");
    // A folder others may enter, as /etc/pacsgate is.
    let open = dir.path().join("etc");
    std::fs::create_dir(&open).expect("etc");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let token = open.join("metrics.token");
    std::fs::write(&token, "s3cret-token\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let admin = free_port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nbearer_token_file = \"{}\"\n",
        token.display()
    );
    let path = write(
        &open,
        "pacsgate.toml",
        &config(&pki, free_port(), dead_port(), &extra),
    );
    let (code, text) = check(&path, true);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("admin.bearer_token_file") && text.contains("can be read by other users"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret-token"),
        "the token in the output: {text}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (code, text) = check(&path, true);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok: private keys, the metrics token and the configuration file"),
        "{text}"
    );
}

#[test]
fn a_gateway_started_with_a_relative_config_path_names_it_absolutely() {
    let pki = Pki::generate();
    let dir = common::tempdir("relative-config");
    let port = free_port();
    let audit = dir.path().join("audit.jsonl");
    let text = config(
        &pki,
        port,
        dead_port(),
        &format!("[audit]\nfile = \"{}\"\n", audit.display()),
    );
    write(dir.path(), "pacsgate.toml", &text);
    let mut cmd = std::process::Command::new(common::gateway::gateway_bin());
    cmd.args(["run", "--config", "pacsgate.toml"])
        .current_dir(dir.path());
    let _running = listening(cmd, &dir.path().join("pacsgate.log"), port);
    let text = std::fs::read_to_string(&audit).expect("audit");
    let started: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|e: &serde_json::Value| e["event"] == "started")
        .expect("a started event");
    let path = dir.path().join("pacsgate.toml");
    assert_eq!(
        started["path"],
        serde_json::json!(path.display().to_string()),
        "{text}"
    );
}
