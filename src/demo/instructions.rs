//! What `pacsgate demo` prints: how to connect (dcmtk, pynetdicom, `pacsgate connect`, curl) and the
//! lines of the query guard tried as the reader.

use std::net::SocketAddr;
use std::path::Path;

use super::{
    CALLED_AE, CERTIFICATE_USER, Demo, PASSWORD, PASSWORD_USER, READER_PASSWORD, READER_ROLE,
    READER_USER, ROLE, TOKEN_USER,
};

/// The lines printed after the reader's two queries.
pub fn guard_lines(listen: SocketAddr, tried: &[Tried]) -> String {
    let mut text = format!(
        "The query guard, tried just now on {listen} as user {READER_USER} (role {READER_ROLE}, no unrestricted_queries):\n"
    );
    let width = tried
        .iter()
        .map(|t| t.keys_typed().len())
        .max()
        .unwrap_or(0);
    for t in tried {
        text.push_str(&format!("  {}\n", t.line(width)));
    }
    text
}

/// Quote a word for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn q(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

/// The pynetdicom client: `ca_expr` is the Python expression of the CA file's path.
pub(super) fn python_snippet(ca_expr: &str, listen: SocketAddr) -> String {
    let host = listen.ip();
    let port = listen.port();
    format!(
        r#"import ssl
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

tls = ssl.create_default_context(cafile={ca_expr})
identity = UserIdentityNegotiation()
identity.user_identity_type = 2  # username and password
identity.primary_field = b"{PASSWORD_USER}"
identity.secondary_field = b"{PASSWORD}"
ae = AE(ae_title="PYNETDICOM")
ae.add_requested_context(FIND)
assoc = ae.associate("{host}", {port}, ae_title="{CALLED_AE}", ext_neg=[identity], tls_args=(tls, "{host}"))
if not assoc.is_established:
    raise SystemExit("no association: rejected, or the demo is not running")
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.PatientName = "*"
query.PatientID = ""
query.StudyDescription = ""
for status, match in assoc.send_c_find(query, FIND):
    if status and status.Status in (0xFF00, 0xFF01):
        print(match.PatientID, match.PatientName, match.StudyDescription)
assoc.release()
"#
    )
}

fn utc(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| format!("unix time {unix}"))
}

/// What to type to connect, printed once the gateway listens. `exe` is how to call pacsgate.
pub fn instructions(demo: &Demo, exe: &str) -> String {
    let f = &demo.files;
    let (ca, cert, key) = (q(&f.ca_cert), q(&f.client_cert), q(&f.client_key));
    let host = demo.listen.ip().to_string();
    let port = demo.listen.port();
    let addr = demo.listen.to_string();
    let exe = shell_quote(exe);
    let snippet = python_snippet(
        &format!("{:?}", f.ca_cert.display().to_string()),
        demo.listen,
    );
    let snippet: String = snippet.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"pacsgate demo: pacsgate in front of an in-memory demo archive, on loopback only.
{note}
  gateway   {addr}  DICOM over TLS, called AE title {CALLED_AE}
  archive   {archive}  the embedded demo archive ({instances} synthetic instances; plain DICOM, reached through the gateway)
  folder    {dir}  certificates, keys, demo users, pacsgate.toml ({reused})

Demo credentials (for this demo only, never for real data):
  password      user {PASSWORD_USER}, password {PASSWORD} (role {ROLE}: may list every patient, demo data only)
  reader        user {READER_USER}, password {READER_PASSWORD} (role {READER_ROLE}: the query guard applies)
  certificate   user {CERTIFICATE_USER}: {cert} with key {key}
  token         user {TOKEN_USER}: {token} (valid until {expires})
  server CA     {ca} (the server certificate names localhost, 127.0.0.1 and ::1)

With pacsgate's own clients:
  DEMO_PASSWORD={PASSWORD} {exe} echo --ca {ca} --user {PASSWORD_USER} --password-env DEMO_PASSWORD --aec {CALLED_AE} {addr}
  {exe} find --ca {ca} --token-file {token} --aec {CALLED_AE} -k 'PatientName=*' -k PatientID -k StudyDescription {addr}
  {exe} find --ca {ca} --cert {cert} --key {key} --aec {CALLED_AE} --patient-root --level PATIENT --json -k 'PatientName=*' -k PatientID {addr}

As the reader, a wildcard query is refused (0xA700) and a query naming a patient works:
  DEMO_PASSWORD={READER_PASSWORD} {exe} find --ca {ca} --user {READER_USER} --password-env DEMO_PASSWORD --aec {CALLED_AE} -k 'PatientName=*' -k PatientID {addr}
  DEMO_PASSWORD={READER_PASSWORD} {exe} find --ca {ca} --user {READER_USER} --password-env DEMO_PASSWORD --aec {CALLED_AE} -k PatientID=DEMO-0002 -k PatientName -k StudyDescription {addr}

With DCMTK (apt-get install dcmtk):
  echoscu -aec {CALLED_AE} +tls {key} {cert} +cf {ca} {host} {port}
  findscu -aec {CALLED_AE} +tls {key} {cert} +cf {ca} -S -k QueryRetrieveLevel=STUDY -k 'PatientName=*' -k StudyInstanceUID {host} {port}
  storescu -aec {CALLED_AE} +tla +cf {ca} -usr {PASSWORD_USER} -pwd {PASSWORD} {host} {port} {sample}
  DCMTK's getscu and movescu have no TLS, so they cannot reach the gateway: use pynetdicom for C-GET.

With pynetdicom (pip install pynetdicom): python3 {script}, which is:
{snippet}
Press Ctrl-C to stop. One log line per association follows.
"#,
        note = match &demo.port_note {
            Some(n) => format!("  note      {n}\n"),
            None => String::new(),
        },
        archive = demo.archive_address,
        instances = demo.instances,
        dir = q(&f.dir),
        reused = if f.reused {
            "reused from an earlier run"
        } else {
            "new"
        },
        token = q(&f.token),
        expires = utc(f.token_expires),
        sample = q(&f.sample),
        script = q(&f.python_client),
    )
}

/// What one query of the reader gave.
#[derive(Debug, Clone)]
pub struct Tried {
    /// The -k keys, as typed.
    pub keys: Vec<String>,
    pub result: Result<crate::tools::client::FindOutcome, String>,
    /// PatientName of each match.
    pub names: Vec<String>,
}

impl Tried {
    /// The -k words as typed.
    fn keys_typed(&self) -> String {
        self.keys
            .iter()
            .map(|k| format!("-k {}", shell_quote(k)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One line: the keys (padded to `width`), then the status in words and what matched.
    pub fn line(&self, width: usize) -> String {
        use crate::tools::client::status_words;
        let keys = self.keys_typed();
        let result = match &self.result {
            Ok(o) if o.status == 0 => {
                let mut names = self.names.clone();
                names.dedup();
                format!(
                    "works: {} match{} ({}), status 0x0000",
                    o.matches,
                    if o.matches == 1 { "" } else { "es" },
                    names.join(", ")
                )
            }
            Ok(o) => format!(
                "refused 0x{:04X} ({}){}",
                o.status,
                status_words(o.status),
                if o.error_comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", o.error_comment)
                }
            ),
            Err(e) => format!("failed: {e}"),
        };
        format!("{keys:<width$}  {result}")
    }
}
