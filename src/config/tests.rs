//! The configuration's unit tests: parsing, every validation error's key and text, warnings, secret files.

use super::*;

const MINIMAL: &str = r#"
[gateway]
listen = "127.0.0.1:2762"
[tls]
certificate = "server.crt"
private_key = "server.key"
[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:4242"
ae_title = "ORTHANC"
[[role]]
name = "reader"
allow = ["echo", "find"]
[[user]]
name = "alice"
roles = ["reader"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/pacsgate/pacsgate.toml"))
}

#[test]
fn minimal_config_validates_and_resolves_paths() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.tls.certificate, Path::new("/etc/pacsgate/server.crt"));
    assert_eq!(
        c.upstream_for("ARCHIVE").map(|u| u.ae_title.as_str()),
        Some("ORTHANC")
    );
    assert!(c.upstream_for("OTHER").is_none());
    assert_eq!(c.timeouts.idle, Duration::from_secs(300));
}

#[test]
fn unknown_key_is_named() {
    let text = MINIMAL.replace(
        "ae_title = \"ORTHANC\"",
        "ae_title = \"ORTHANC\"\naetitle = \"X\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("aetitle"), "{err}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            MINIMAL.replace("127.0.0.1:2762", "nowhere"),
            "gateway.listen",
        ),
        (
            MINIMAL.replace("\"ORTHANC\"", "\"WAY_TOO_LONG_AE_TITLE\""),
            "upstream[0].ae_title",
        ),
        (MINIMAL.replace("\"find\"]", "\"fnd\"]"), "role[0].allow"),
        (
            MINIMAL.replace("roles = [\"reader\"]", "roles = [\"admin\"]"),
            "user[0].roles",
        ),
        (
            format!("{MINIMAL}\n[timeouts]\nidle = -1\n"),
            "timeouts.idle",
        ),
        (
            MINIMAL.replace(
                "[[upstream]]",
                "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n[[upstream]]",
            ),
            "auth.jwt",
        ),
    ];
    for (text, key) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(key), "expected {key} in {err}");
    }
}

#[test]
fn two_listen_keys_on_one_address_are_refused_naming_both() {
    let with = |gateway: &str, rest: &str| {
        MINIMAL.replace(
            "listen = \"127.0.0.1:2762\"",
            &format!("listen = \"127.0.0.1:2762\"\n{gateway}"),
        ) + rest
    };
    let err = |text: String| {
        parse(&text)
            .map(|_| ())
            .expect_err("two listeners on one address")
            .to_string()
    };
    let e = err(with("", "\n[admin]\nlisten = \"127.0.0.1:2762\"\n"));
    assert!(
        e.contains("admin.listen") && e.contains("gateway.listen") && e.contains("127.0.0.1:2762"),
        "{e}"
    );
    let e = err(with("device_listen = \"0.0.0.0:2762\"", ""));
    assert!(
        e.contains("gateway.device_listen") && e.contains("gateway.listen"),
        "{e}"
    );
    // Another port, or the same port on another loopback address: fine.
    parse(&with("", "\n[admin]\nlisten = \"127.0.0.1:9090\"\n")).expect("another port");
    parse(&with("", "\n[admin]\nlisten = \"127.0.0.2:2762\"\n")).expect("another address");
}

#[test]
fn the_example_configs_published_password_hash_is_refused() {
    let example = include_str!("../../config/pacsgate.toml");
    assert!(
        example.contains(EXAMPLE_PASSWORD_HASH),
        "the example's hash changed"
    );
    let err = Config::parse(example, Path::new("/etc/pacsgate/pacsgate.toml"))
        .expect_err("the example's hash")
        .to_string();
    assert!(
        err.contains("password_hash")
            && err.contains("\"dr.house\"")
            && err.contains("pacsgate hash-password"),
        "{err}"
    );
    // The same file with a hash of its own loads.
    let own = example.replace(
            EXAMPLE_PASSWORD_HASH,
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s",
        );
    Config::parse(&own, Path::new("/etc/pacsgate/pacsgate.toml")).expect("own hash");
}

#[test]
fn a_bad_password_hash_is_refused_at_load() {
    let text = MINIMAL.replace(
        "name = \"alice\"",
        "name = \"alice\"\npassword_hash = \"plaintext\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("user[0].password_hash"), "{err}");
}

fn with_device(addresses: &str) -> String {
    format!(
        "{MINIMAL}\n[[device]]\nae_title = \"CT1\"\naddresses = {addresses}\nroles = [\"reader\"]\n"
    )
}

#[test]
fn a_device_cidr_that_covers_every_address_is_refused() {
    for everything in [
        r#"["0.0.0.0/0"]"#,
        r#"["::/0"]"#,
        r#"["::0/0"]"#,
        r#"["0:0:0:0:0:0:0:0/0"]"#,
        r#"["10.1.2.3/0"]"#,
        r#"["::ffff:0.0.0.0/96"]"#,
        r#"["::ffff:0:0/96"]"#,
        r#"["0.0.0.0/1", "128.0.0.0/1"]"#,
        r#"["10.0.0.5", "::/1", "8000::/1"]"#,
    ] {
        let err = parse(&with_device(everything)).unwrap_err().to_string();
        assert!(
            err.contains("device[0].addresses") && err.contains("every address"),
            "{everything}: {err}"
        );
    }
    // Two entries for the same AE title, each half of the space.
    let text = format!(
        "{}\n[[device]]\nae_title = \"CT1\"\naddresses = [\"128.0.0.0/1\"]\n",
        with_device(r#"["0.0.0.0/1"]"#)
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("device[1].addresses"), "{err}");
    // Real networks are fine, and an IPv4-mapped block is the IPv4 block (and matches).
    let c = parse(&with_device(
        r#"["10.0.0.0/8", "::ffff:192.168.0.0/112", "fd00::/8"]"#,
    ))
    .expect("valid");
    let d = &c.devices[0];
    assert_eq!(d.addresses[1].to_string(), "192.168.0.0/16");
    assert!(d.matches("CT1", "192.168.3.4".parse().expect("ip")));
    assert!(d.matches("CT1", "::ffff:10.9.8.7".parse().expect("ip")));
    assert!(!d.matches("CT1", "11.0.0.1".parse().expect("ip")));
}

#[test]
fn return_path_address_lists_follow_the_same_rule() {
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:2762\"",
        "listen = \"127.0.0.1:2762\"\nreturn_allowed_addresses = [\"::/0\"]",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("gateway.return_allowed_addresses"), "{err}");
    let text = MINIMAL.replace(
        "ae_title = \"ORTHANC\"",
        "ae_title = \"ORTHANC\"\nreturn_addresses = [\"0.0.0.0/0\"]",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("upstream[0].return_addresses"), "{err}");
    let text = MINIMAL.replace(
        "ae_title = \"ORTHANC\"",
        "ae_title = \"ORTHANC\"\nreturn_addresses = [\"10.0.0.21\", \"10.0.0.22\"]",
    );
    let c = parse(&text).expect("valid");
    assert_eq!(
        c.upstreams[0].return_addresses.as_ref().map(Vec::len),
        Some(2)
    );
}

#[test]
fn client_identity_and_crls_are_read_and_checked() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.tls.client_identity, None, "default: CN, then SANs");
    assert!(c.tls.client_crl.is_empty());
    for (value, want) in [
        ("cn", ClientIdentity::Cn),
        ("san_dns", ClientIdentity::SanDns),
        ("san_email", ClientIdentity::SanEmail),
    ] {
        let text = MINIMAL.replace(
                "private_key = \"server.key\"",
                &format!(
                    "private_key = \"server.key\"\nclient_ca = \"ca.crt\"\nclient_identity = \"{value}\"\nclient_crl = [\"ca.crl\"]"
                ),
            );
        let c = parse(&text).expect("valid");
        assert_eq!(c.tls.client_identity, Some(want));
        assert_eq!(
            c.tls.client_crl,
            vec![PathBuf::from("/etc/pacsgate/ca.crl")]
        );
    }
    let text = MINIMAL.replace(
        "private_key = \"server.key\"",
        "private_key = \"server.key\"\nclient_identity = \"subject\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("client_identity") && err.contains("san_dns"),
        "{err}"
    );
    let text = MINIMAL.replace(
        "private_key = \"server.key\"",
        "private_key = \"server.key\"\nclient_crl = [\"ca.crl\"]",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("tls.client_crl"), "{err}");
}

#[test]
fn jwt_leeway_has_an_upper_bound() {
    let jwt = |leeway: u64| {
        MINIMAL.replace(
                "[[upstream]]",
                &format!(
                    "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\npublic_key = \"jwt.pem\"\nleeway = {leeway}\n[[upstream]]"
                ),
            )
    };
    assert_eq!(
        parse(&jwt(300)).expect("valid").jwt.map(|j| j.leeway),
        Some(300)
    );
    let err = parse(&jwt(301)).unwrap_err().to_string();
    assert!(
        err.contains("auth.jwt.leeway") && err.contains("300"),
        "{err}"
    );
}

fn with_http(http: &str) -> String {
    format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:8443\"\n{http}\n")
}

#[test]
fn the_http_upstream_may_be_a_dicomweb_base_url() {
    let http = |text: &str| parse(&with_http(text)).map(|c| c.http.expect("[http]"));
    for (text, origin, root) in [
        (
            "upstream = \"http://pacs:8042\"",
            "http://pacs:8042",
            "/dicom-web",
        ),
        (
            "upstream = \"http://pacs:8042/\"",
            "http://pacs:8042",
            "/dicom-web",
        ),
        (
            "upstream = \"http://pacs:8042/dicom-web\"",
            "http://pacs:8042",
            "/dicom-web",
        ),
        (
            "upstream = \"http://pacs:8042/orthanc/dicom-web/\"",
            "http://pacs:8042",
            "/orthanc/dicom-web",
        ),
        (
            "upstream = \"http://pacs:8042/dicom-web\"\ndicomweb_path = \"/dicom-web/\"",
            "http://pacs:8042",
            "/dicom-web",
        ),
        (
            "upstream = \"http://pacs:8042\"\ndicomweb_path = \"/wado\"",
            "http://pacs:8042",
            "/wado",
        ),
        (
            "upstream = \"http://[::1]:8042/rs\"",
            "http://[::1]:8042",
            "/rs",
        ),
    ] {
        let h = http(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            (h.upstream.as_str(), h.dicomweb_path.as_str()),
            (origin, root),
            "{text}"
        );
    }
    for (text, key) in [
        (
            "upstream = \"http://pacs:8042/dicom-web\"\ndicomweb_path = \"/wado\"",
            "http.dicomweb_path",
        ),
        ("upstream = \"https://pacs:8042\"", "http.upstream"),
        (
            "upstream = \"http://pacs:8042/dicom-web?x=1\"",
            "http.upstream",
        ),
        ("upstream = \"http://user@pacs:8042\"", "http.upstream"),
        ("upstream = \"http:///dicom-web\"", "http.upstream"),
        ("upstream = \"http://pacs:8042/a/../b\"", "http.upstream"),
    ] {
        let err = http(text)
            .err()
            .unwrap_or_else(|| panic!("{text} accepted"))
            .to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn warnings_name_a_door_nobody_can_pass_and_quiet_switches() {
    let w = parse(MINIMAL).expect("valid").warnings().join("\n");
    assert!(
        w.contains("\"alice\" has no password_hash and [tls] client_ca is not set"),
        "{w}"
    );
    let base = MINIMAL.replace(
        "private_key = \"server.key\"",
        "private_key = \"server.key\"\nclient_ca = \"ca.crt\"",
    );
    assert_eq!(
        parse(&base).expect("valid").warnings(),
        Vec::<String>::new()
    );
    let nobody = base.replace("[[user]]\nname = \"alice\"\nroles = [\"reader\"]\n", "");
    let w = parse(&nobody).expect("valid").warnings().join("\n");
    assert!(w.contains("nobody can pass"), "{w}");
    assert!(w.contains("role \"reader\": nobody holds it"), "{w}");
    let quiet = base.replace(
        "allow = [\"echo\", \"find\"]",
        "allow = [\"echo\", \"find\"]\nunrestricted_queries = true",
    ) + "\n[limits]\nfailed_logins = 0\n";
    let w = parse(&quiet).expect("valid").warnings().join("\n");
    assert!(
        w.contains("role \"reader\" has unrestricted_queries = true")
            && w.contains("user \"alice\""),
        "{w}"
    );
    assert!(w.contains("failed_logins = 0"), "{w}");
}

#[test]
fn keys_and_a_config_with_password_hashes_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pacsgate-modes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let key = dir.join("server.key");
    std::fs::write(&key, "key").expect("write");
    let path = dir.join("pacsgate.toml");
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s";
    let text = MINIMAL.replace(
        "name = \"alice\"",
        &format!("name = \"alice\"\npassword_hash = \"{hash}\""),
    );
    std::fs::write(&path, &text).expect("write");
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    mode(&path, 0o640);
    for (key_mode, refused) in [(0o600, false), (0o640, false), (0o644, true), (0o602, true)] {
        mode(&key, key_mode);
        let got = Config::load(&path);
        assert_eq!(got.is_err(), refused, "key mode {key_mode:o}: {got:?}");
        if let Err(e) = got {
            assert!(e.to_string().contains("tls.private_key"), "{e}");
        }
    }
    mode(&key, 0o600);
    mode(&path, 0o644);
    let err = Config::load(&path)
        .expect_err("readable hashes")
        .to_string();
    assert!(
        err.contains("password hashes") && err.contains("644"),
        "{err}"
    );
    // In a folder others cannot enter, the same modes are safe.
    mode(&key, 0o644);
    mode(&dir, 0o750);
    assert!(Config::load(&path).is_ok());
    mode(&dir, 0o755);
    // Said on purpose: loads, and the files are listed (for check's warnings).
    std::fs::write(
        &path,
        text.replace(
            "listen = \"127.0.0.1:2762\"",
            "listen = \"127.0.0.1:2762\"\nallow_readable_keys = true",
        ),
    )
    .expect("write");
    let c = Config::load(&path).expect("allowed");
    assert_eq!(c.readable_secret_files().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
