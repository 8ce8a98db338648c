//! Shared integration-test harness: ports, bounded child processes, and re-exports of the peers.
//!
//! Every test file says `mod common;` and uses what it needs:
//! - [`Orthanc`]: a throwaway Orthanc archive (orthanc.rs)
//! - [`Pki`], [`mint_jwt`], [`jwt_alg_none`]: test certificates and tokens (pki.rs)
//! - [`Gateway`]: the pacsgate binary under test (gateway.rs)
//! - [`GatewayConfig`], [`password_hash`]: its configuration file, built (config.rs)
//! - [`dcmtk`], [`pyscu`], [`PyArchive`], [`make_instances`]: DICOM peers and data (peers.rs)
//!
//! Everything talks to loopback only, and every process started here is killed by its own
//! handle when the value that owns it is dropped.
#![allow(dead_code, unused_imports)]

pub mod config;
pub mod gateway;
pub mod orthanc;
pub mod peers;
pub mod pki;

pub use config::GatewayConfig;
pub use gateway::{Gateway, password_hash, password_hash_taking, write_config};
pub use orthanc::Orthanc;
pub use peers::{
    Instance, PyArchive, StoreScp, assert_success, dataset_bytes, dcmtk, dcmtk_with_timeout,
    make_instances, make_instances_with_uids, make_large_instance, make_large_instance_in,
    output_text, pyscu,
};
pub use pki::{Pki, jwt_alg_none, mint_jwt, mint_jwt_exact, now};

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A loopback TCP port that was free a moment ago (bound to 127.0.0.1:0, then released).
/// Another process may still take it before the caller binds it; the starters retry on that.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// A temp dir named `pacsgate-<what>-XXXX`, removed on drop unless `PACSGATE_KEEP_TMP=1`
/// is set (then its path is printed, to read logs after a failed test).
pub fn tempdir(what: &str) -> tempfile::TempDir {
    let keep = std::env::var_os("PACSGATE_KEEP_TMP").is_some_and(|v| v == "1");
    let dir = tempfile::Builder::new()
        .prefix(&format!("pacsgate-{what}-"))
        .disable_cleanup(keep)
        .tempdir()
        .unwrap_or_else(|e| panic!("create a temp dir for {what}: {e}"));
    if keep {
        eprintln!("[harness] keeping {}", dir.path().display());
    }
    dir
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The folder of the Python peers and data scripts (tests/peers).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// The Python interpreter that has pydicom and pynetdicom: `$PACSGATE_PYTHON`, else the real
/// executable behind `python3` (resolved once, so a pyenv shim adds no start-up time per call
/// and the child's PID is the interpreter's own).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(p) = std::env::var_os("PACSGATE_PYTHON") {
            return PathBuf::from(p);
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys, pydicom, pynetdicom; print(sys.executable)",
            ])
            .output()
            .expect("run python3 (needed for the pydicom / pynetdicom peers)");
        assert!(
            out.status.success(),
            "python3 cannot import pydicom and pynetdicom:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Runs `cmd` to completion with piped stdout/stderr and optional stdin, killing it after
/// `timeout`. A killed command returns a non-success status and its stderr ends with a
/// `[harness] killed after ...` line, so callers and assert messages see what happened.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out_reader = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err_reader = reader(Box::new(child.stderr.take().expect("piped stderr")));

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait for a killed child");
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.join().expect("stdout reader thread");
    let mut stderr = err_reader.join().expect("stderr reader thread");
    if timed_out {
        stderr.extend_from_slice(format!("\n[harness] killed after {timeout:?}\n").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// True when process `pid` owns a TCP socket in LISTEN state on `port` (IPv4 or IPv6, any
/// address). Read from /proc, so no probe connection disturbs the server under test.
pub fn is_listening(pid: u32, port: u16) -> bool {
    let listening = pacsgate::procnet::listening_inodes(port);
    !listening.is_empty() && pacsgate::procnet::holds_socket(pid, &listening)
}

/// A child process whose stdout and stderr go to one log file; killed (SIGKILL) and reaped on
/// drop. The building block of [`Orthanc`], [`Gateway`] and [`PyArchive`].
pub struct Spawned {
    child: Child,
    log_path: PathBuf,
    what: String,
}

impl Spawned {
    /// Spawns `cmd` with stdin closed and output appended to `log_path`.
    pub fn spawn(mut cmd: Command, log_path: &Path) -> Spawned {
        let log = File::create(log_path)
            .unwrap_or_else(|e| panic!("create log file {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Spawned {
            child,
            log_path: log_path.to_path_buf(),
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls `ready` every 20 ms until it returns true (Ok), the process exits or `timeout`
    /// passes (Err with a message that includes the log).
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&mut Spawned) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before {what}; log {}:\n{}",
                    self.what,
                    self.log_path.display(),
                    self.log()
                ));
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not {what} after {timeout:?}; log {}:\n{}",
                    self.what,
                    self.log_path.display(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name ("TERM", "HUP", "INT", ...) to this process only.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit; None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
