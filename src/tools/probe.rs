//! `pacsgate probe`: check an archive the way an attacker would, without changing anything.
//!
//! Over plain TCP and then over TLS, each without credentials: is an association accepted with a
//! made-up calling AE, is C-ECHO answered, does a Study Root C-FIND for PatientName=* return
//! matches (counted, never shown), is a made-up called AE accepted too. Only C-ECHO and C-FIND are
//! ever sent. The verdict is OPEN when anything was answered without credentials.

use std::path::PathBuf;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::ToolError;
use super::client::{self, Identity, Request, STUDY_ROOT_FIND, TlsClient, VERIFICATION};

/// Matches counted before the probe cancels the query: enough to prove the point.
const MAX_COUNTED: usize = 10_000;

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// host:port
    pub address: String,
    /// Calling AE title; a made-up one when `None`.
    pub calling_ae: Option<String>,
    /// Called AE title; `ANY-SCP` when `None`.
    pub called_ae: Option<String>,
    /// Verify a TLS server against this CA; without it any certificate is accepted (nothing secret is sent).
    pub tls_ca: Option<PathBuf>,
    pub timeout: Duration,
}

/// One observation: `open` when it shows the door open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub open: bool,
    pub text: String,
}

/// All observations and the verdict.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub address: String,
    pub findings: Vec<Finding>,
    /// Whether the port completed a TLS handshake.
    pub speaks_tls: bool,
}

impl ProbeReport {
    /// Open when anything was answered without credentials.
    pub fn open(&self) -> bool {
        self.findings.iter().any(|f| f.open)
    }

    /// "OPEN" or "CLOSED" and the reasons, one per line.
    pub fn verdict(&self) -> String {
        let mut out = if self.open() {
            format!(
                "OPEN: {} answers without credentials; anyone who can reach it can read from it\n",
                self.address
            )
        } else {
            format!(
                "CLOSED: {} answered nothing without credentials\n",
                self.address
            )
        };
        for f in &self.findings {
            out.push_str(&format!(
                "  {} {}\n",
                if f.open { "-" } else { "+" },
                f.text
            ));
        }
        out
    }
}

/// A made-up AE title, different on each call: `PREFIX-` and 6 hex digits.
fn made_up_ae(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = nanos.wrapping_mul(2_654_435_761) ^ std::process::id();
    format!("{prefix}-{:06X}", mixed & 0xFF_FFFF)
}

/// What one association attempt without credentials showed.
enum Attempt {
    /// Accepted; what C-ECHO and C-FIND gave.
    Accepted {
        echo: Option<u16>,
        find: Find,
    },
    Rejected(client::Rejection),
    /// Anything else: aborted, not DICOM, closed, timed out.
    Failed(ToolError),
}

enum Find {
    NotOffered,
    Matches { count: usize, capped: bool },
    Refused(u16),
    Failed(String),
}

fn wildcard_query() -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr, value) in [
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_NAME, VR::PN, "*"),
        (tags::STUDY_INSTANCE_UID, VR::UI, ""),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    }
    obj
}

async fn attempt(
    settings: &ProbeSettings,
    tls: Option<&TlsClient>,
    calling_ae: &str,
    called_ae: &str,
    query: bool,
) -> Result<Attempt, ToolError> {
    let conn = client::connect(&settings.address, tls, settings.timeout).await?;
    let request = Request {
        calling_ae: calling_ae.to_string(),
        called_ae: called_ae.to_string(),
        identity: Identity::None,
        abstract_syntaxes: vec![VERIFICATION, STUDY_ROOT_FIND],
        timeout: settings.timeout,
    };
    let mut assoc = match client::associate(conn, &request).await {
        Ok(a) => a,
        Err(ToolError::Rejected(r)) => return Ok(Attempt::Rejected(r)),
        Err(e) => return Ok(Attempt::Failed(e)),
    };
    let echo = match assoc.context_for(VERIFICATION) {
        Some(_) => assoc.echo().await.ok(),
        None => None,
    };
    let find = if !query || assoc.context_for(STUDY_ROOT_FIND).is_none() {
        Find::NotOffered
    } else {
        let mut count = 0usize;
        // Each identifier is dropped unread: the probe counts, it never shows patient data.
        match assoc
            .find(STUDY_ROOT_FIND, &wildcard_query(), |_| {
                count += 1;
                count < MAX_COUNTED
            })
            .await
        {
            Ok(o) if o.status == 0 || o.status == 0xFE00 || o.matches > 0 => Find::Matches {
                count: o.matches,
                capped: o.cancelled,
            },
            Ok(o) => Find::Refused(o.status),
            Err(e) => Find::Failed(e.to_string()),
        }
    };
    if assoc.release().await.is_err() {
        // Nothing to do: the answers are what matters.
    }
    Ok(Attempt::Accepted { echo, find })
}

fn finding(open: bool, text: impl Into<String>) -> Finding {
    Finding {
        open,
        text: text.into(),
    }
}

/// Report what an accepted association without credentials gave.
fn accepted_findings(
    over: &str,
    calling_ae: &str,
    called_ae: &str,
    echo: Option<u16>,
    find: &Find,
    made_up_calling: bool,
    out: &mut Vec<Finding>,
) {
    out.push(finding(
        true,
        format!(
            "{over}: accepts an association without credentials (calling AE {calling_ae}, called AE {called_ae})"
        ),
    ));
    match echo {
        Some(0) => out.push(finding(
            true,
            format!("{over}: answers C-ECHO without credentials"),
        )),
        Some(s) => out.push(finding(
            false,
            format!("{over}: C-ECHO answered with status {s:#06x}"),
        )),
        None => out.push(finding(false, format!("{over}: C-ECHO not answered"))),
    }
    match find {
        Find::Matches { count, capped } => out.push(finding(
            *count > 0,
            format!(
                "{over}: Study Root C-FIND PatientName=* returned {}{count} study match{} (counted, not shown){}",
                if *capped { "at least " } else { "" },
                if *count == 1 { "" } else { "es" },
                if *count == 0 { "; the archive may be empty" } else { "" }
            ),
        )),
        Find::Refused(s) => out.push(finding(
            false,
            format!(
                "{over}: C-FIND PatientName=* refused with status {s:#06x} ({})",
                client::status_words(*s)
            ),
        )),
        Find::Failed(e) => out.push(finding(false, format!("{over}: C-FIND failed: {e}"))),
        Find::NotOffered => out.push(finding(
            false,
            format!("{over}: Study Root C-FIND not accepted"),
        )),
    }
    if made_up_calling {
        out.push(finding(
            true,
            format!("{over}: accepts a made-up calling AE title ({calling_ae})"),
        ));
    }
}

/// Run the probe; `progress` gets a line before each step.
pub async fn probe(
    settings: &ProbeSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<ProbeReport, ToolError> {
    let made_up_calling = settings.calling_ae.is_none();
    let aes = Titles {
        calling: settings
            .calling_ae
            .clone()
            .unwrap_or_else(|| made_up_ae("PROBE")),
        called: settings
            .called_ae
            .clone()
            .unwrap_or_else(|| "ANY-SCP".to_string()),
        made_up_calling,
    };
    let mut findings = Vec::new();
    let plain_accepted = probe_plain(settings, &aes, progress, &mut findings).await?;
    let speaks_tls = probe_tls(settings, &aes, plain_accepted, progress, &mut findings).await?;
    Ok(ProbeReport {
        address: settings.address.clone(),
        findings,
        speaks_tls,
    })
}

/// The AE titles a probe uses; `made_up_calling` when the calling one is made up.
struct Titles {
    calling: String,
    called: String,
    made_up_calling: bool,
}

/// The first step, plain DICOM: an association without credentials (and, when accepted and no
/// --aec was given, one to a made-up called AE title). True when the first was accepted.
async fn probe_plain(
    settings: &ProbeSettings,
    aes: &Titles,
    progress: &mut dyn FnMut(&str),
    findings: &mut Vec<Finding>,
) -> Result<bool, ToolError> {
    let (calling_ae, called_ae) = (&aes.calling, &aes.called);
    progress(&format!(
        "plain DICOM: association without credentials, calling AE {calling_ae}, called AE {called_ae}"
    ));
    let plain = attempt(settings, None, calling_ae, called_ae, true).await?;
    let plain_accepted = matches!(plain, Attempt::Accepted { .. });
    collect(
        "plain TCP",
        plain,
        calling_ae,
        called_ae,
        aes.made_up_calling,
        findings,
    );
    if plain_accepted && settings.called_ae.is_none() {
        let other = made_up_ae("NOSUCH");
        progress(&format!("plain DICOM: calling a made-up AE title {other}"));
        match attempt(settings, None, calling_ae, &other, false).await? {
            Attempt::Accepted { .. } => findings.push(finding(
                true,
                format!("plain TCP: accepts any called AE title (also the made-up {other})"),
            )),
            Attempt::Rejected(r) => findings.push(finding(
                false,
                format!("plain TCP: a made-up called AE title is rejected ({r})"),
            )),
            Attempt::Failed(e) => findings.push(finding(
                false,
                format!("plain TCP: a made-up called AE title fails: {e}"),
            )),
        }
    }
    Ok(plain_accepted)
}

/// The second step, TLS: a handshake, then an association without credentials over it. True
/// when the port speaks TLS.
async fn probe_tls(
    settings: &ProbeSettings,
    aes: &Titles,
    plain_accepted: bool,
    progress: &mut dyn FnMut(&str),
    findings: &mut Vec<Finding>,
) -> Result<bool, ToolError> {
    let host = settings
        .address
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&settings.address);
    progress("TLS: handshake");
    let tls = match &settings.tls_ca {
        Some(ca) => TlsClient::new(ca, None, host)?,
        None => TlsClient::accept_any_server(host)?,
    };
    let verified = match &settings.tls_ca {
        Some(ca) => format!("server certificate verified against {}", ca.display()),
        None => "server certificate not checked: no --tls-ca".to_string(),
    };
    match client::connect(&settings.address, Some(&tls), settings.timeout).await {
        Ok(conn) => {
            findings.push(finding(
                false,
                format!(
                    "speaks {} on this port ({verified})",
                    conn.tls_version.as_deref().unwrap_or("TLS")
                ),
            ));
            // close_notify, so the server logs a clean close rather than a truncated stream.
            let mut stream = conn.stream;
            let _ = tokio::time::timeout(settings.timeout, async {
                use tokio::io::AsyncWriteExt;
                stream.shutdown().await
            })
            .await;
            progress("TLS: association without credentials");
            let over_tls = attempt(settings, Some(&tls), &aes.calling, &aes.called, true).await?;
            collect(
                "TLS",
                over_tls,
                &aes.calling,
                &aes.called,
                aes.made_up_calling,
                findings,
            );
            Ok(true)
        }
        Err(ToolError::TlsHandshake { message, .. }) if message.contains("alert") => {
            findings.push(finding(
                false,
                format!("speaks TLS on this port, but the handshake was refused: {message}"),
            ));
            Ok(true)
        }
        Err(e @ (ToolError::TlsHandshake { .. } | ToolError::Timeout { .. })) => {
            findings.push(finding(
                false,
                format!("does not speak TLS on this port ({e})"),
            ));
            if plain_accepted {
                findings.push(finding(
                    true,
                    "no TLS: queries, images and any password travel in clear".to_string(),
                ));
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn collect(
    over: &str,
    attempt: Attempt,
    calling_ae: &str,
    called_ae: &str,
    made_up_calling: bool,
    findings: &mut Vec<Finding>,
) {
    match attempt {
        Attempt::Accepted { echo, find } => accepted_findings(
            over,
            calling_ae,
            called_ae,
            echo,
            &find,
            made_up_calling,
            findings,
        ),
        Attempt::Rejected(r) => {
            let hint = match (r.source, r.reason) {
                (1, 7) => " (give the archive's AE title with --aec to check further)",
                (1, 3) => " (the calling AE title is checked)",
                _ => "",
            };
            findings.push(finding(
                false,
                format!("{over}: an association without credentials is rejected: {r}{hint}"),
            ));
        }
        Attempt::Failed(e) => findings.push(finding(
            false,
            format!("{over}: no DICOM association without credentials: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_titles_are_valid_ae_titles() {
        let ae = made_up_ae("NOSUCH");
        assert!(ae.len() <= 16 && ae.starts_with("NOSUCH-"), "{ae}");
    }

    #[test]
    fn the_verdict_is_open_when_any_finding_is() {
        let mut r = ProbeReport {
            address: "127.0.0.1:104".into(),
            findings: vec![finding(false, "speaks TLS 1.3")],
            speaks_tls: true,
        };
        assert!(r.verdict().starts_with("CLOSED"));
        r.findings.push(finding(true, "answers C-ECHO"));
        assert!(r.verdict().starts_with("OPEN"));
    }
}
