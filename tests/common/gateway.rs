//! Starts the pacsgate binary under test with a given TOML config, and runs its other subcommands.

use super::{Spawned, is_listening, run_bounded};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Path of the binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_pacsgate");

/// The gateway binary the tests start: this build's, or `PACSGATE_TEST_BIN` (to show that a regression
/// test fails on an older build: `PACSGATE_TEST_BIN=/old/pacsgate cargo test --test bypass`).
pub fn gateway_bin() -> std::path::PathBuf {
    std::env::var_os("PACSGATE_TEST_BIN").map_or_else(|| BIN.into(), Into::into)
}

/// A running `pacsgate run --config <tempdir>/pacsgate.toml`; killed (SIGKILL) on drop.
pub struct Gateway {
    port: u16,
    config_path: PathBuf,
    proc: Spawned,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Writes `config_toml` to a temp dir as pacsgate.toml, starts the gateway with
    /// RUST_LOG=info,pacsgate=debug (or the caller's RUST_LOG) and output to a log file, and waits (≤ 20 s)
    /// until the gateway process listens on `port` (checked in /proc, so no probe connection
    /// reaches the gateway). Panics with the log if it exits first or never listens.
    pub fn start(port: u16, config_toml: &str) -> Gateway {
        let dir = super::tempdir("gateway");
        let config_path = dir.path().join("pacsgate.toml");
        write_config(&config_path, config_toml);
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,pacsgate=debug".into()),
            )
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG_STYLE");
        let proc = Spawned::spawn(cmd, &dir.path().join("pacsgate.log"));
        let mut gw = Gateway {
            port,
            config_path,
            proc,
            dir,
        };
        gw.wait_listening(port);
        gw
    }

    /// Waits (≤ 20 s) until the gateway listens on `port` too (e.g. its TLS port); panics
    /// with the log otherwise.
    pub fn wait_listening(&mut self, port: u16) {
        if let Err(e) = self.proc.wait_until(
            Duration::from_secs(20),
            &format!("listening on {port}"),
            |p| is_listening(p.pid(), port),
        ) {
            panic!("{e}");
        }
    }

    /// The port passed to [`Gateway::start`].
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The gateway's log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The config file it was started with (rewrite it, then [`Gateway::signal`] "HUP").
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The gateway's temp dir (its working directory; removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Polls the log until it contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name ("TERM", "INT", "HUP") to the gateway process.
    pub fn signal(&self, signal: &str) {
        self.proc.signal(signal);
    }

    /// The exit status if the gateway has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// SIGTERM, then wait up to `timeout` for the exit status (None: still running; drop kills it).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.proc.exited() {
            return Some(status);
        }
        self.proc.signal("TERM");
        self.proc.wait_exit(timeout)
    }

    /// Runs `pacsgate ARGS...` (e.g. `check --config F`, `hash-password`) with optional stdin,
    /// killed after 60 s. Check `status`, `stdout`, `stderr` yourself (see [`super::output_text`]).
    pub fn run_command(args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(gateway_bin());
        cmd.args(args).env("NO_COLOR", "1");
        run_bounded(&mut cmd, stdin.map(str::as_bytes), Duration::from_secs(60))
    }
}

impl Drop for Gateway {
    /// A failing test shows the gateway's whole log (cargo prints a failed test's output).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- pacsgate log ({}) -----\n{}\n----- end of pacsgate log -----",
                self.proc.log_path().display(),
                self.log()
            );
        }
    }
}

/// Write a configuration file with mode 600: one that holds password hashes and that other users
/// can read is refused by `run`, `check` and a reload (unless `allow_readable_keys = true`).
pub fn write_config(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}

/// An argon2id hash of `password` made by the binary under test (`pacsgate hash-password`), once per
/// password and test process (a debug build's argon2id takes about a second).
pub fn password_hash(password: &str) -> String {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static HASHES: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let hashes = HASHES.get_or_init(Default::default);
    if let Some(hash) = hashes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(password)
    {
        return hash.clone();
    }
    let out = Gateway::run_command(&["hash-password"], Some(password));
    assert!(
        out.status.success(),
        "hash-password: {}",
        super::output_text(&out)
    );
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    hashes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(password.to_string(), hash.clone());
    hash
}

/// An argon2id hash of `password` whose check takes about `check` here: the default memory cost
/// (19 MiB) with as many passes as make it that slow, timed in this process when the hash is made
/// (a busier machine then gives fewer passes). This process is built like the gateway under test
/// (a debug build's argon2 is ten times slower than a release build's), unless `PACSGATE_TEST_BIN`
/// names another build. For tests that must keep the four password-check slots busy for seconds
/// with a burst of bounded size: the default hash checks in ~25 ms in a release build, too fast for
/// such a burst to outlast `auth::PASSWORD_CHECK_WAIT` (5 s) on a fast machine. The gateway verifies
/// with the cost the hash names.
pub fn password_hash_taking(password: &str, check: Duration) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Algorithm, Argon2, Params, Version};
    let hash = |passes: u32| {
        let params = Params::new(Params::DEFAULT_M_COST, passes, 1, None).expect("argon2 params");
        let salt = SaltString::encode_b64(b"pacsgate-test-salt").expect("salt");
        let started = Instant::now();
        let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .expect("argon2 hash")
            .to_string();
        (hash, started.elapsed())
    };
    // Time grows with the passes, plus a fixed part (the 19 MiB, first touched): scale from 2
    // passes, then correct from what that gave, at most three times.
    let (mut hash_of, mut took) = hash(2);
    let mut passes = 2u32;
    for _ in 0..3 {
        let ratio = check.as_secs_f64() / took.as_secs_f64().max(1e-4);
        if (0.85..1.25).contains(&ratio) {
            break;
        }
        let next = ((f64::from(passes) * ratio).ceil() as u32).clamp(2, 2000);
        if next == passes {
            break;
        }
        passes = next;
        (hash_of, took) = hash(passes);
    }
    eprintln!("password_hash_taking: {passes} passes, {took:?} here");
    hash_of
}
