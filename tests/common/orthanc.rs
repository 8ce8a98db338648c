//! A throwaway Orthanc 1.10 archive (/usr/sbin/Orthanc) with its data in a temp dir, driven over its REST API.

use super::{Spawned, free_port, is_listening};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A running Orthanc. DICOM on `dicom_port` (Orthanc binds every interface; talk to 127.0.0.1
/// only), REST on `http_port` (loopback only). Killed on drop.
pub struct Orthanc {
    pub aet: String,
    pub dicom_port: u16,
    pub http_port: u16,
    http: ureq::Agent,
    proc: Spawned,
    dir: tempfile::TempDir,
}

impl Orthanc {
    /// Starts Orthanc with DICOM AE title `aet`. `modalities` are the peers it knows by
    /// (AE title, host, port), i.e. the C-MOVE destinations. Every DIMSE service is allowed from
    /// any calling AE, the called AE is not checked, C-MOVE is synchronous. Waits (≤ 30 s) until
    /// `GET /system` answers and the DICOM port listens; retries on a port clash.
    pub fn start(aet: &str, modalities: &[(&str, &str, u16)]) -> Orthanc {
        Self::start_with(aet, modalities, json!({}))
    }

    /// [`Orthanc::start`] with more configuration merged in (top-level keys replace the defaults),
    /// e.g. the DICOMweb plugin: see [`Orthanc::dicomweb_config`].
    pub fn start_with(aet: &str, modalities: &[(&str, &str, u16)], extra: Value) -> Orthanc {
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start(aet, modalities, &extra) {
                Ok(o) => return o,
                Err(e) => last_err = e,
            }
        }
        panic!("Orthanc did not start: {last_err}");
    }

    /// The Debian orthanc-dicomweb plugin, serving DICOMweb at /dicom-web/ and WADO-URI at /wado.
    pub fn dicomweb_config() -> Value {
        json!({
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado", "Ssl": false, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        })
    }

    /// Lines of Orthanc's log that record an HTTP request (logged with `--verbose`, which
    /// [`Orthanc::start_with`] turns on when plugins are configured).
    pub fn http_requests_logged(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("(http) GET ") || l.contains("(http) POST "))
            .count()
    }

    fn try_start(
        aet: &str,
        modalities: &[(&str, &str, u16)],
        extra: &Value,
    ) -> Result<Orthanc, String> {
        let dir = super::tempdir("orthanc");
        let storage = dir.path().join("storage");
        let dicom_port = free_port();
        let mut http_port = free_port();
        while http_port == dicom_port {
            http_port = free_port();
        }
        let mods: serde_json::Map<String, Value> = modalities
            .iter()
            .map(|(m_aet, host, port)| {
                (
                    m_aet.to_string(),
                    json!({"AET": m_aet, "Host": host, "Port": port}),
                )
            })
            .collect();
        let config = json!({
            "Name": format!("pacsgate-test-{aet}"),
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": true,
            "DicomAlwaysAllowFind": true,
            "DicomAlwaysAllowFindWorklist": true,
            "DicomAlwaysAllowGet": true,
            "DicomAlwaysAllowMove": true,
            "DicomModalities": mods,
            "SynchronousCMove": true,
            "Plugins": [],
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 30,
            "StableAge": 1,
            // Start and store fast; keep nothing we do not need.
            "SaveJobs": false,
            "SyncStorageArea": false,
            "StoreMD5ForAttachments": false,
            "StorageCompression": false,
            "OverwriteInstances": false,
            "DicomAssociationCloseDelay": 0,
            "OrthancExplorerEnabled": false,
            "WebDavEnabled": false,
            "MetricsEnabled": false,
            "LoadPrivateDictionary": false,
            "HttpThreadsCount": 8,
            "HttpProxy": "",
        });
        let mut config = config;
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("serialize Orthanc config"),
        )
        .expect("write Orthanc config");

        let mut cmd = Command::new("/usr/sbin/Orthanc");
        if extra.get("Plugins").is_some() {
            cmd.arg("--verbose");
        }
        cmd.arg(&config_path).current_dir(dir.path());
        let mut proc = Spawned::spawn(cmd, &dir.path().join("orthanc.log"));
        let http: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let system = format!("http://127.0.0.1:{http_port}/system");
        proc.wait_until(Duration::from_secs(30), "ready", |p| {
            is_listening(p.pid(), dicom_port) && http.get(&system).call().is_ok()
        })?;
        Ok(Orthanc {
            aet: aet.to_string(),
            dicom_port,
            http_port,
            http,
            proc,
            dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// GET a REST path and parse the JSON answer.
    pub fn get_json(&self, path: &str) -> Value {
        let mut rsp = self
            .http
            .get(&self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("Orthanc GET {path}: {e}\n{}", self.log()));
        let text = rsp
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("Orthanc GET {path} body: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("Orthanc GET {path}: {e}: {text}"))
    }

    /// POST a body to a REST path and parse the JSON answer.
    pub fn post_json(&self, path: &str, body: &[u8]) -> Value {
        let mut rsp = self
            .http
            .post(&self.url(path))
            .send(body)
            .unwrap_or_else(|e| panic!("Orthanc POST {path}: {e}\n{}", self.log()));
        let text = rsp
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("Orthanc POST {path} body: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("Orthanc POST {path}: {e}: {text}"))
    }

    /// Number of stored instances (`GET /statistics` → CountInstances).
    pub fn instance_count(&self) -> usize {
        let stats = self.get_json("/statistics");
        stats["CountInstances"]
            .as_u64()
            .unwrap_or_else(|| panic!("no CountInstances in {stats}")) as usize
    }

    /// Orthanc IDs of all stored instances.
    pub fn instance_ids(&self) -> Vec<String> {
        let ids = self.get_json("/instances");
        ids.as_array()
            .unwrap_or_else(|| panic!("GET /instances is not an array: {ids}"))
            .iter()
            .map(|v| v.as_str().expect("instance id string").to_string())
            .collect()
    }

    /// The stored DICOM file of an instance (`GET /instances/{id}/file`). Orthanc rewrites the
    /// file meta group of instances received over DICOM; compare data sets with
    /// [`super::dataset_bytes`]. Instances uploaded with [`Orthanc::upload`] come back byte-identical.
    pub fn instance_file(&self, id: &str) -> Vec<u8> {
        let path = format!("/instances/{id}/file");
        let mut rsp = self
            .http
            .get(&self.url(&path))
            .call()
            .unwrap_or_else(|e| panic!("Orthanc GET {path}: {e}"));
        rsp.body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("Orthanc GET {path} body: {e}"))
    }

    /// The stored file of the instance with this SOP Instance UID, if Orthanc has it.
    pub fn file_by_sop_instance_uid(&self, uid: &str) -> Option<Vec<u8>> {
        let query = json!({"Level": "Instance", "Query": {"SOPInstanceUID": uid}});
        let found = self.post_json("/tools/find", query.to_string().as_bytes());
        let id = found.as_array()?.first()?.as_str()?.to_string();
        Some(self.instance_file(&id))
    }

    /// Stores a DICOM file over REST (`POST /instances`), to preload data without DICOM.
    /// Returns Orthanc's instance ID.
    pub fn upload(&self, bytes: &[u8]) -> String {
        let rsp = self.post_json("/instances", bytes);
        rsp["ID"]
            .as_str()
            .unwrap_or_else(|| panic!("POST /instances answered {rsp}"))
            .to_string()
    }

    /// Orthanc's own log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The temp dir holding config, storage and log (removed on drop).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Orthanc {
    /// A failing test shows the end of Orthanc's log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- Orthanc {} log, last 40 lines -----\n{}",
                self.aet,
                super::tail(&self.log(), 40)
            );
        }
    }
}
