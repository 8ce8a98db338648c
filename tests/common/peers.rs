//! DICOM peers and data for the tests: DCMTK tools, the pynetdicom client and archive (tests/peers/*.py), and generated instances.

use super::{Spawned, free_port, is_listening, peers_dir, python, run_bounded};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// stdout and stderr of a finished command, for messages and `contains` checks.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics with `what`, the status and both output streams unless `out` succeeded; returns
/// [`output_text`] for further checks.
pub fn assert_success(out: &Output, what: &str) -> String {
    let text = output_text(out);
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Runs DCMTK's `/usr/bin/<tool>` (never pynetdicom's same-named scripts) with TCP_NODELAY=1,
/// killed after 120 s.
pub fn dcmtk(tool: &str, args: &[&str]) -> Output {
    dcmtk_with_timeout(tool, args, Duration::from_secs(120))
}

/// [`dcmtk`] with a chosen time limit.
pub fn dcmtk_with_timeout(tool: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(Path::new("/usr/bin").join(tool));
    cmd.args(args).env("TCP_NODELAY", "1");
    run_bounded(&mut cmd, None, timeout)
}

/// Runs `tests/peers/scu.py ARGS...` (killed after 120 s) and returns its JSON report:
/// `connected`, `associated`, `rejection` ({result, source, reason} or null), `aborted`,
/// `statuses` (ints; null for a request without response), `matches`, `received`,
/// `user_identity_response` (hex or null), `log`. Panics with stderr if it printed no JSON.
///
/// Example: `pyscu(&["echo", "--port", &port.to_string(), "--aec", "ORTHANC"])`.
pub fn pyscu(args: &[&str]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("scu.py")).args(args);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(v) if out.status.success() => v,
        _ => panic!(
            "scu.py {args:?} gave no JSON report:\n{}",
            output_text(&out)
        ),
    }
}

/// One generated instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub path: PathBuf,
    pub patient_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub sop_class_uid: String,
}

fn make_dicom(args: &[&str]) -> Vec<Instance> {
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("make_dicom.py")).args(args);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(300));
    let text = assert_success(&out, "make_dicom.py");
    let list: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("make_dicom.py printed no JSON ({e}):\n{text}"));
    let field = |v: &Value, k: &str| -> String {
        v[k].as_str()
            .unwrap_or_else(|| panic!("make_dicom.py: no {k} in {v}"))
            .to_string()
    };
    list.as_array()
        .expect("make_dicom.py prints an array")
        .iter()
        .map(|v| Instance {
            path: PathBuf::from(field(v, "path")),
            patient_id: field(v, "patient_id"),
            study_uid: field(v, "study_uid"),
            series_uid: field(v, "series_uid"),
            sop_uid: field(v, "sop_uid"),
            sop_class_uid: field(v, "sop_class_uid"),
        })
        .collect()
}

/// Writes small CT instances (128 x 160 x 16 bit, ~42 kB files, Explicit VR Little Endian)
/// into `dir`. Each `(patient_id, patient_name, n)` entry is one new study with one series of
/// `n` instances; UIDs are random (`2.25.<uuid>`), so every call makes new instances.
pub fn make_instances_with_uids(dir: &Path, spec: &[(&str, &str, usize)]) -> Vec<Instance> {
    let spec: Vec<Value> = spec
        .iter()
        .map(|(id, name, n)| json!({"patient_id": id, "patient_name": name, "instances": n}))
        .collect();
    let spec = Value::Array(spec).to_string();
    make_dicom(&[
        "small",
        "--out",
        dir.to_str().expect("UTF-8 path"),
        "--spec",
        &spec,
    ])
}

/// [`make_instances_with_uids`], paths only.
pub fn make_instances(dir: &Path, spec: &[(&str, &str, usize)]) -> Vec<PathBuf> {
    make_instances_with_uids(dir, spec)
        .into_iter()
        .map(|i| i.path)
        .collect()
}

/// One multi-frame grayscale word secondary capture instance (patient LARGE1) with at least
/// `mb` MiB of pixel data (512 x 512 x 16-bit frames).
pub fn make_large_instance(dir: &Path, mb: usize) -> PathBuf {
    let mb = mb.to_string();
    let mut made = make_dicom(&[
        "large",
        "--out",
        dir.to_str().expect("UTF-8 path"),
        "--mb",
        &mb,
    ]);
    made.pop().expect("make_dicom.py large made one file").path
}

/// [`make_large_instance`] for a given patient, in an existing study.
pub fn make_large_instance_in(dir: &Path, mb: usize, patient_id: &str, study_uid: &str) -> PathBuf {
    let mb = mb.to_string();
    let mut made = make_dicom(&[
        "large",
        "--out",
        dir.to_str().expect("UTF-8 path"),
        "--mb",
        &mb,
        "--patient-id",
        patient_id,
        "--study-uid",
        study_uid,
    ]);
    made.pop().expect("make_dicom.py large made one file").path
}

/// The data set of a DICOM Part 10 file: the bytes after the preamble, "DICM" and the file
/// meta group. Orthanc rewrites the meta group of what it receives over DICOM, so compare this.
pub fn dataset_bytes(file: &[u8]) -> &[u8] {
    assert!(
        file.len() >= 144 && &file[128..132] == b"DICM",
        "not a DICOM Part 10 file"
    );
    assert!(
        &file[132..138] == b"\x02\x00\x00\x00UL",
        "file meta group does not start with (0002,0000) UL"
    );
    let group_len = u32::from_le_bytes(file[140..144].try_into().expect("4 bytes")) as usize;
    &file[144 + group_len..]
}

/// tests/peers/archive.py: a pynetdicom Verification / Storage / C-FIND SCP on 127.0.0.1 that
/// accepts everything and records each association, C-STORE and C-FIND as a JSON line.
/// Killed on drop.
pub struct PyArchive {
    pub port: u16,
    pub aet: String,
    pub record: PathBuf,
    proc: Spawned,
    dir: tempfile::TempDir,
}

impl PyArchive {
    /// Starts the archive with AE title `aet` on a free port; waits (≤ 30 s) until it listens.
    pub fn start(aet: &str) -> PyArchive {
        Self::start_with(aet, &[])
    }

    /// Like [`PyArchive::start`] with extra arguments, e.g. TLS:
    /// `["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]` (with --tls-ca, client
    /// certificates signed by that CA are required).
    pub fn start_with(aet: &str, extra: &[&str]) -> PyArchive {
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = super::tempdir("pyarchive");
            let port = free_port();
            let record = dir.path().join("record.jsonl");
            std::fs::write(&record, "").expect("create record file");
            let mut cmd = Command::new(python());
            cmd.arg(peers_dir().join("archive.py"))
                .args(["--port", &port.to_string(), "--aet", aet, "--record"])
                .arg(&record)
                .args(extra);
            let mut proc = Spawned::spawn(cmd, &dir.path().join("archive.log"));
            match proc.wait_until(Duration::from_secs(30), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return PyArchive {
                        port,
                        aet: aet.to_string(),
                        record,
                        proc,
                        dir,
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("archive.py did not start: {last_err}");
    }

    /// Every record line so far, in order.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .expect("read archive record file")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record line {l}: {e}")))
            .collect()
    }

    /// The `"kind": "association"` records: calling_aet, called_aet, user_identity (bool),
    /// user_identity_type.
    pub fn associations(&self) -> Vec<Value> {
        self.of_kind("association")
    }

    /// SOP Instance UIDs of the C-STOREs received, in order.
    pub fn stored_sop_uids(&self) -> Vec<String> {
        self.of_kind("store")
            .iter()
            .map(|r| {
                r["sop_instance_uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    /// The archive's stderr/stdout so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for PyArchive {
    /// A failing test shows the archive's records and the end of its log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- archive.py {} records -----\n{}\n----- log, last 40 lines -----\n{}",
                self.aet,
                std::fs::read_to_string(&self.record).unwrap_or_default(),
                super::tail(&self.log(), 40)
            );
        }
    }
}

/// DCMTK's storescp as a C-MOVE destination: bit-preserving (+B), files into a temp dir; killed on drop.
pub struct StoreScp {
    pub port: u16,
    pub aet: String,
    pub dir: tempfile::TempDir,
    proc: Spawned,
    _log: tempfile::TempDir,
}

impl StoreScp {
    /// Starts `/usr/bin/storescp -aet AET +B -od DIR PORT` on a free port; waits (≤ 20 s) until it listens.
    pub fn start(aet: &str) -> StoreScp {
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = super::tempdir("storescp");
            let port = free_port();
            let mut cmd = Command::new("/usr/bin/storescp");
            cmd.env("TCP_NODELAY", "1")
                .args(["-aet", aet, "+B", "-od"])
                .arg(dir.path())
                .arg(port.to_string());
            let log = super::tempdir("storescp-log");
            let mut proc = Spawned::spawn(cmd, &log.path().join("storescp.log"));
            match proc.wait_until(Duration::from_secs(20), "listening", |p| {
                is_listening(p.pid(), port)
            }) {
                Ok(()) => {
                    return StoreScp {
                        port,
                        aet: aet.to_string(),
                        dir,
                        proc,
                        _log: log,
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("storescp did not start: {last_err}");
    }

    /// The files received so far.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
