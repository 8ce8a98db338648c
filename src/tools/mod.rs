//! The admin's commands: the DICOM clients `pacsgate echo`, `find` and `probe`, and `certs`, `token`,
//! `hash-password`.
//!
//! - `client.rs` echo's and find's association over `ul::requestor` (TLS in `client/tls.rs`, rejection
//!   and status words in `client/words.rs`): User Identity, C-ECHO, C-FIND, release
//! - `query.rs`  `-k Tag=Value` keys into an identifier, and matches printed readably or as JSON
//! - `secret.rs` passwords and tokens from an environment variable, a file or a prompt
//! - `probe.rs`  an archive checked the way an attacker would, without changing anything
//! - `commands.rs` the `echo`, `find`, `probe` command lines: arguments, runtime, exit code
//! - `credentials.rs` `certs`, `token`, `hash-password`: development certificates, test tokens, hashes
//! - `mod.rs`    errors, and the echo / find runs the command line calls

pub mod client;
pub mod commands;
pub mod credentials;
pub mod probe;
pub mod query;
pub mod secret;

use std::io::Write;
use std::time::Instant;

use client::{Abort, Association, Connection, Identity, Rejection, Request, TlsClient};

/// What went wrong in a tool; each variant says which phase.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Secret(String),
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error(transparent)]
    TlsFiles(#[from] crate::tls::TlsError),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} failed: {message}")]
    TlsHandshake { address: String, message: String },
    #[error("{phase} timed out after {after:?}")]
    Timeout {
        phase: &'static str,
        after: std::time::Duration,
    },
    #[error("association rejected: {0}")]
    Rejected(Rejection),
    #[error("association aborted: {0}")]
    Aborted(Abort),
    #[error("the connection closed while {phase}")]
    Closed { phase: &'static str },
    #[error("{0}")]
    NotDicom(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Dimse(#[from] crate::dimse::DimseError),
    #[error("the acceptor did not accept the presentation context for {0}")]
    ContextRejected(&'static str),
    #[error("{operation} failed: status {status:#06x} ({words}){comment}", words = client::status_words(*status))]
    Status {
        operation: &'static str,
        status: u16,
        comment: String,
    },
}

impl ToolError {
    /// The process exit code: 3 the association was rejected or aborted, 4 a DIMSE request
    /// failed, 1 anything else (2 is clap's, for usage errors on the command line).
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Rejected(_) | ToolError::Aborted(_) => 3,
            ToolError::Status { .. } => 4,
            _ => 1,
        }
    }

    /// The error and, for a rejection, what pacsgate means by it.
    pub fn explain(&self) -> String {
        match self {
            ToolError::Rejected(r) => match r.pacsgate_hint() {
                Some(hint) => format!("{self}\n  (from pacsgate this means: {hint})"),
                None => self.to_string(),
            },
            ToolError::NotDicom(_) => {
                format!("{self}\n  (a pacsgate listener speaks TLS only: give --ca FILE)")
            }
            _ => self.to_string(),
        }
    }
}

/// Where and how a tool connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// host:port
    pub address: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub identity: Identity,
    pub timeout: std::time::Duration,
}

/// Connect (TLS when `tls` is given), associate, and say so on `log` (progress goes to stderr).
async fn open(
    target: &Target,
    tls: Option<&TlsClient>,
    abstract_syntaxes: Vec<&'static str>,
    log: &mut dyn Write,
) -> Result<Association, ToolError> {
    eprintln!(
        "connecting to {}{} ...",
        target.address,
        if tls.is_some() {
            " (TLS)"
        } else {
            " (plain TCP)"
        }
    );
    let conn: Connection = client::connect(&target.address, tls, target.timeout).await?;
    let _ = writeln!(
        log,
        "connected to {} ({}){}",
        target.address,
        conn.peer,
        match &conn.tls_version {
            Some(v) => format!(", {v}, server certificate verified"),
            None => ", plain TCP (no TLS)".to_string(),
        }
    );
    let request = Request {
        calling_ae: target.calling_ae.clone(),
        called_ae: target.called_ae.clone(),
        identity: target.identity.clone(),
        abstract_syntaxes,
        timeout: target.timeout,
    };
    let assoc = client::associate(conn, &request).await?;
    let who = match (&target.identity, tls.is_some_and(|t| t.client_certificate)) {
        (Identity::None, true) => "identified by the client certificate".to_string(),
        (identity, _) => format!("{identity:?}"),
    };
    let _ = writeln!(
        log,
        "associated: {} -> {}, {who}{}",
        target.calling_ae,
        target.called_ae,
        if assoc.identity_confirmed {
            " (confirmed by the server)"
        } else {
            ""
        }
    );
    Ok(assoc)
}

/// `pacsgate echo`: associate, C-ECHO, release. Reports on `out`.
pub async fn run_echo(
    target: &Target,
    tls: Option<&TlsClient>,
    out: &mut dyn Write,
) -> Result<(), ToolError> {
    let mut assoc = open(target, tls, vec![client::VERIFICATION], out).await?;
    let started = Instant::now();
    let status = match assoc.echo().await {
        Ok(s) => s,
        Err(e) => {
            assoc.abort().await;
            return Err(e);
        }
    };
    let _ = writeln!(
        out,
        "C-ECHO: status {status:#06x} ({}) in {} ms",
        client::status_words(status),
        started.elapsed().as_millis()
    );
    assoc.release().await?;
    let _ = writeln!(out, "released");
    if status != 0 {
        return Err(ToolError::Status {
            operation: "C-ECHO",
            status,
            comment: String::new(),
        });
    }
    Ok(())
}

/// `pacsgate find`: associate, C-FIND, print each match as it arrives (or all as JSON), release.
pub async fn run_find(
    target: &Target,
    tls: Option<&TlsClient>,
    find: &query::Find,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ToolError> {
    let identifier = find.identifier()?;
    // In JSON mode stdout carries the JSON only; the association report goes to stderr.
    let mut stderr = std::io::stderr();
    let log: &mut dyn Write = if json { &mut stderr } else { out };
    let mut assoc = open(target, tls, vec![find.model()], log).await?;
    let mut matches = Vec::new();
    let result = assoc
        .find(find.model(), &identifier, |m| {
            if !json {
                let _ = write!(out, "{}", query::readable(matches.len() + 1, &m));
            }
            matches.push(m);
            true
        })
        .await;
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            assoc.abort().await;
            return Err(e);
        }
    };
    if json {
        let _ = writeln!(out, "{}", query::json(&matches, outcome.status));
    } else {
        let _ = writeln!(
            out,
            "C-FIND: {} match{}, final status {:#06x} ({}){}",
            outcome.matches,
            if outcome.matches == 1 { "" } else { "es" },
            outcome.status,
            client::status_words(outcome.status),
            if outcome.error_comment.is_empty() {
                String::new()
            } else {
                format!(": {}", outcome.error_comment)
            }
        );
    }
    assoc.release().await?;
    if !json {
        let _ = writeln!(out, "released");
    }
    // Success, or a warning status (0x0001, 0xBxxx).
    if outcome.status == 0 || outcome.status == 1 || outcome.status & 0xF000 == 0xB000 {
        Ok(())
    } else {
        Err(ToolError::Status {
            operation: "C-FIND",
            status: outcome.status,
            comment: if outcome.error_comment.is_empty() {
                String::new()
            } else {
                format!(": {}", outcome.error_comment)
            },
        })
    }
}
