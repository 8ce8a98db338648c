//! Load on a busy machine (issue 13): 40 TLS clients storing 25 small CT objects each, all at once, through
//! the gateway to a `storescp --fork` sink, with a CPU hog on every core, several rounds. A slow machine may
//! make the relay slow, never stuck: every store must succeed and the sink must hold every object.
//! Bursts from one address (issue 17): more associations at once from one client address than any
//! default per-address bound, with the default admission limits, all served.
//!
//! The clients are DCMTK's storescu (one process per association, TLS with a client certificate: no argon2id
//! per login, which takes ~1 s in a debug build). pynetdicom 3.0.4 clients are not used here: under CPU
//! starvation its reactor thread now and then takes the C-STORE-RSP that `send_c_store` waits for ("Received
//! unexpected C-STORE service message", then a DIMSE timeout), through stunnel exactly as through the gateway.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 40;
const STORES_PER_CLIENT: usize = 25;
const ROUNDS: usize = 5;
/// A client that takes longer than this is stuck (a round takes seconds, even with the hogs).
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// How long the sink may take to have written the last file after the last response.
const SINK_SETTLE: Duration = Duration::from_secs(10);

/// Busy loops (`yes > /dev/null`), one per core plus one; killed by their own handles on drop.
struct CpuHogs(Vec<Child>);

impl CpuHogs {
    fn start() -> CpuHogs {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        CpuHogs(
            (0..=cores)
                .map(|_| {
                    Command::new("yes")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("start yes(1) as a CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// `storescp --fork` writing every object it receives into a temp dir; killed on drop.
struct ForkingSink {
    port: u16,
    dir: tempfile::TempDir,
    _proc: Spawned,
    _log: tempfile::TempDir,
}

impl ForkingSink {
    fn start() -> ForkingSink {
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempdir("load-sink");
            let log = tempdir("load-sink-log");
            let port = free_port();
            let mut cmd = Command::new("/usr/bin/storescp");
            cmd.env("TCP_NODELAY", "1")
                .args(["--fork", "-aet", "SINK", "-od"])
                .arg(dir.path())
                .arg(port.to_string());
            let mut proc = Spawned::spawn(cmd, &log.path().join("storescp.log"));
            match proc.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return ForkingSink {
                        port,
                        dir,
                        _proc: proc,
                        _log: log,
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("storescp --fork did not start: {last_err}");
    }

    fn file_count(&self) -> usize {
        std::fs::read_dir(self.dir.path()).map_or(0, |rd| rd.flatten().count())
    }

    /// Waits (bounded) until the sink holds `n` files; returns how many it holds.
    fn wait_for_files(&self, n: usize) -> usize {
        let deadline = Instant::now() + SINK_SETTLE;
        loop {
            let count = self.file_count();
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn config(port: u16, pki: &Pki, sink_port: u16) -> String {
    config_with(
        port,
        pki,
        sink_port,
        "associations_per_minute = 0\nmax_pending_per_address = 64\nmax_associations_per_user = 64\n",
    )
}

fn config_with(port: u16, pki: &Pki, sink_port: u16, limits: &str) -> String {
    GatewayConfig::new(port)
        .tls(pki)
        .client_ca(pki)
        .set("timeouts", "idle = 60")
        .upstream("SINK", sink_port, "SINK")
        .set("limits", limits)
        .role("modality", &["echo", "store"])
        .user_cert("loader", &["modality"])
        .to_toml()
}

/// One client's result: stores acknowledged with Success, and storescu's output when that is not all of them.
struct ClientRun {
    succeeded: usize,
    took: Duration,
    report: Option<String>,
}

fn store_all(port: u16, pki: &Pki, key: &Path, cert: &Path, files: &[PathBuf]) -> ClientRun {
    let port = port.to_string();
    let mut args: Vec<&str> = vec![
        "-v",
        "-aec",
        "SINK",
        "-aet",
        "LOADSCU",
        "+tls",
        key.to_str().expect("UTF-8 path"),
        cert.to_str().expect("UTF-8 path"),
        "+cf",
        pki.ca_cert.to_str().expect("UTF-8 path"),
        // The same 30 s the clients gave up after.
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "30",
        "127.0.0.1",
        &port,
    ];
    args.extend(files.iter().map(|f| f.to_str().expect("UTF-8 path")));
    let started = Instant::now();
    let out = dcmtk_with_timeout("storescu", &args, CLIENT_LIMIT);
    let took = started.elapsed();
    let text = output_text(&out);
    let succeeded = text.matches("Received Store Response (Success)").count();
    let complete = out.status.success() && succeeded == files.len();
    ClientRun {
        succeeded,
        took,
        report: (!complete).then(|| tail(&text, 15)),
    }
}

/// The largest `duration_ms` of the association log lines (accept to close, as the gateway saw it).
fn longest_association(log: &str) -> Duration {
    let ms = log
        .lines()
        .filter(|l| l.contains("outcome="))
        .filter_map(|l| {
            l.split_once("duration_ms=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0);
    Duration::from_millis(ms)
}

#[test]
fn forty_tls_clients_store_through_the_gateway_with_cpu_hogs_every_round() {
    let pki = Pki::generate();
    let (cert, key) = pki.client("loader");
    let data = tempdir("load-data");
    let spec: Vec<(String, String, usize)> = (0..CLIENTS)
        .map(|c| (format!("LOAD{c}"), format!("LOAD^{c}"), STORES_PER_CLIENT))
        .collect();
    let spec: Vec<(&str, &str, usize)> = spec
        .iter()
        .map(|(id, name, n)| (id.as_str(), name.as_str(), *n))
        .collect();
    let instances = make_instances_with_uids(data.path(), &spec);
    let per_client: Vec<Vec<PathBuf>> = (0..CLIENTS)
        .map(|c| {
            let id = format!("LOAD{c}");
            instances
                .iter()
                .filter(|i| i.patient_id == id)
                .map(|i| i.path.clone())
                .collect()
        })
        .collect();
    let expected = CLIENTS * STORES_PER_CLIENT;
    assert_eq!(
        per_client.iter().map(Vec::len).sum::<usize>(),
        expected,
        "test data"
    );

    let mut failures = Vec::new();
    for round in 1..=ROUNDS {
        // A fresh sink and gateway per round: each round counts its own files and log lines.
        let sink = ForkingSink::start();
        let port = free_port();
        let gw = Gateway::start(port, &config(port, &pki, sink.port));
        let hogs = CpuHogs::start();
        let started = Instant::now();
        let runs: Vec<ClientRun> = std::thread::scope(|s| {
            let handles: Vec<_> = per_client
                .iter()
                .map(|files| s.spawn(|| store_all(port, &pki, &key, &cert, files)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        let took = started.elapsed();
        drop(hogs);
        let succeeded: usize = runs.iter().map(|r| r.succeeded).sum();
        let slowest = runs.iter().map(|r| r.took).max().unwrap_or_default();
        let files = sink.wait_for_files(expected);
        let log = gw.log();
        let released = log.matches("outcome=\"released\"").count();
        eprintln!(
            "round {round}: {succeeded}/{expected} stores acknowledged, {files} files in the sink, \
             {released}/{CLIENTS} associations released, {took:.1?} (slowest client {slowest:.1?}); \
             longest association in the gateway's log {:.1?}",
            longest_association(&log)
        );
        for (c, run) in runs.iter().enumerate() {
            if let Some(report) = &run.report {
                failures.push(format!(
                    "round {round}, client {c}: {}/{STORES_PER_CLIENT} stores in {:.1?}\n{report}",
                    run.succeeded, run.took
                ));
            }
        }
        if files != expected || released != CLIENTS {
            failures.push(format!(
                "round {round}: the sink holds {files} of {expected} objects; {released} of {CLIENTS} \
                 associations released; gateway log:\n{}",
                tail(&gw.log(), 40)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The `admission_ms` of every association log line (accept to a handshake slot).
fn admission_waits(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("outcome="))
        .filter_map(|l| {
            l.split_once("admission_ms=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Issue 17: a reading room behind one NAT address, or a modality's batch, opens more associations at
/// once than the default per-address bound (32): every one is served, none is reset. The admission
/// bounds are the defaults; the only limit set is the per-user one (every client signs in as the same
/// certificate user, and the default allows a user 32 associations at once).
#[test]
fn a_burst_of_100_associations_from_one_address_is_served_with_the_default_admission_limits() {
    const BURST: usize = 100;
    const PER_CLIENT: usize = 2;
    let pki = Pki::generate();
    let (cert, key) = pki.client("loader");
    let data = tempdir("burst-data");
    let spec: Vec<(String, String, usize)> = (0..BURST)
        .map(|c| (format!("BURST{c}"), format!("BURST^{c}"), PER_CLIENT))
        .collect();
    let spec: Vec<(&str, &str, usize)> = spec
        .iter()
        .map(|(id, name, n)| (id.as_str(), name.as_str(), *n))
        .collect();
    let instances = make_instances_with_uids(data.path(), &spec);
    let per_client: Vec<Vec<PathBuf>> = (0..BURST)
        .map(|c| {
            let id = format!("BURST{c}");
            instances
                .iter()
                .filter(|i| i.patient_id == id)
                .map(|i| i.path.clone())
                .collect()
        })
        .collect();
    let expected = BURST * PER_CLIENT;
    let sink = ForkingSink::start();
    let port = free_port();
    let gw = Gateway::start(
        port,
        &config_with(port, &pki, sink.port, "max_associations_per_user = 200\n"),
    );
    // Every client starts at once (a barrier), from 127.0.0.1.
    let barrier = std::sync::Barrier::new(BURST);
    let runs: Vec<ClientRun> = std::thread::scope(|s| {
        let handles: Vec<_> = per_client
            .iter()
            .map(|files| {
                let barrier = &barrier;
                let (pki, key, cert) = (&pki, &key, &cert);
                s.spawn(move || {
                    barrier.wait();
                    store_all(port, pki, key, cert, files)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let files = sink.wait_for_files(expected);
    let log = gw.log();
    let released = log.matches("outcome=\"released\"").count();
    let waits = admission_waits(&log);
    let waited = waits.iter().filter(|w| **w > 0).count();
    eprintln!(
        "burst of {BURST}: {}/{expected} stores acknowledged, {files} files in the sink, {released} released; \
         {waited} associations waited for a handshake slot (longest {} ms)",
        runs.iter().map(|r| r.succeeded).sum::<usize>(),
        waits.iter().max().unwrap_or(&0)
    );
    let failed: Vec<String> = runs
        .iter()
        .enumerate()
        .filter_map(|(c, r)| r.report.as_ref().map(|t| format!("client {c}:\n{t}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {BURST} clients failed:\n{}\ngateway log:\n{}",
        failed.len(),
        failed
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&log, 30)
    );
    assert_eq!(files, expected, "the sink must hold every instance");
    assert_eq!(released, BURST, "{}", tail(&log, 30));
    assert!(
        !log.contains("outcome=\"dropped\""),
        "no connection may be dropped: {}",
        tail(&log, 30)
    );
}
