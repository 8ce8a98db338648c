//! The `echo`, `find` and `probe` command lines: their arguments into a [`Target`], the run, and the
//! exit code with the error on stderr (main.rs only dispatches to them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{Target, ToolError, client, probe, query, secret};

/// Where and how `echo` and `find` connect, and who they say they are.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// host:port of the gateway (or archive).
    address: String,
    /// Calling AE title: who we are.
    #[arg(long, default_value = "PACSGATE-SCU")]
    aet: String,
    /// Called AE title: the archive we ask for.
    #[arg(long, default_value = "ANY-SCP")]
    aec: String,
    /// CA certificate (PEM) the server certificate must be signed by: turns TLS on.
    #[arg(long, required_unless_present = "plain")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) to present in the TLS handshake.
    #[arg(long, requires = "key", requires = "ca")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Name the server certificate must carry (default: the host of ADDRESS).
    #[arg(long)]
    server_name: Option<String>,
    /// Plain TCP without TLS (no credentials can be sent then), e.g. to check an archive directly.
    #[arg(long, conflicts_with_all = ["ca", "user", "token_file", "token_env"])]
    plain: bool,
    /// User name for a username + password identity; the password comes from --password-env,
    /// --password-file or a prompt.
    #[arg(long, conflicts_with_all = ["token_file", "token_env"])]
    user: Option<String>,
    /// Environment variable holding the password.
    #[arg(long, requires = "user")]
    password_env: Option<String>,
    /// File holding the password (one line).
    #[arg(long, requires = "user", conflicts_with = "password_env")]
    password_file: Option<PathBuf>,
    /// File holding a JWT to send as the identity.
    #[arg(long, conflicts_with = "token_env")]
    token_file: Option<PathBuf>,
    /// Environment variable holding a JWT to send as the identity.
    #[arg(long)]
    token_env: Option<String>,
    /// Seconds to wait for each step (connect, handshake, each answer).
    #[arg(long, default_value = "30")]
    timeout: f64,
}

/// A setup step of a tool that failed before any DICOM: printed as `pacsgate: error: ...`, exit 1.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{option} {value}: expected seconds above 0 and at most 3600")]
    Seconds { option: &'static str, value: f64 },
    #[error("{0:?} is not host:port")]
    Address(String),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// How a tool ended when it did not succeed.
#[derive(Debug)]
pub enum Failure {
    Tool(ToolError),
    Setup(SetupError),
    /// `probe` found the door open.
    Open,
}

impl From<ToolError> for Failure {
    fn from(e: ToolError) -> Self {
        Failure::Tool(e)
    }
}

impl From<SetupError> for Failure {
    fn from(e: SetupError) -> Self {
        Failure::Setup(e)
    }
}

/// The multi-threaded tokio runtime every command that needs one runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime, SetupError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(SetupError::Runtime)
}

/// Exit code of a tool: 0 on success; otherwise the error (and its meaning) on stderr.
pub fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Tool(e)) => {
            eprintln!("pacsgate: {}", e.explain());
            ExitCode::from(e.exit_code())
        }
        Err(Failure::Setup(e)) => {
            eprintln!("pacsgate: error: {}", crate::check::error_chain(&e));
            ExitCode::FAILURE
        }
        Err(Failure::Open) => ExitCode::from(3),
    }
}

fn seconds(value: f64, option: &'static str) -> Result<Duration, SetupError> {
    if value.is_finite() && value > 0.0 && value <= 3600.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(SetupError::Seconds { option, value })
    }
}

/// The target, TLS settings and identity of `echo` / `find`.
fn client_setup(args: &ClientArgs) -> Result<(Target, Option<client::TlsClient>), Failure> {
    let timeout = seconds(args.timeout, "--timeout")?;
    let identity = if let Some(user) = &args.user {
        let password = secret::password(
            user,
            args.password_env.as_deref(),
            args.password_file.as_deref(),
        )?;
        client::Identity::Password {
            user: user.clone(),
            password,
        }
    } else if let Some(token) =
        secret::token(args.token_env.as_deref(), args.token_file.as_deref())?
    {
        client::Identity::Jwt(token)
    } else {
        client::Identity::None
    };
    let tls = match &args.ca {
        Some(ca) => {
            let host = match &args.server_name {
                Some(name) => name.clone(),
                None => args
                    .address
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .ok_or_else(|| SetupError::Address(args.address.clone()))?,
            };
            let client_cert = args.cert.as_deref().zip(args.key.as_deref());
            Some(client::TlsClient::new(ca, client_cert, &host)?)
        }
        None => None,
    };
    let target = Target {
        address: args.address.clone(),
        calling_ae: args.aet.clone(),
        called_ae: args.aec.clone(),
        identity,
        timeout,
    };
    Ok((target, tls))
}

/// `pacsgate echo`.
pub fn echo(args: &ClientArgs) -> Result<(), Failure> {
    let (target, tls) = client_setup(args)?;
    let mut out = std::io::stdout();
    runtime()?.block_on(super::run_echo(&target, tls.as_ref(), &mut out))?;
    Ok(())
}

/// `pacsgate find`.
pub fn find(
    args: &ClientArgs,
    level: &str,
    patient_root: bool,
    keys: &[String],
    json: bool,
) -> Result<(), Failure> {
    let query = query::Find::new(patient_root, level, keys)?;
    let (target, tls) = client_setup(args)?;
    let mut out = std::io::stdout();
    runtime()?.block_on(super::run_find(
        &target,
        tls.as_ref(),
        &query,
        json,
        &mut out,
    ))?;
    Ok(())
}

/// `pacsgate probe`.
pub fn probe(
    address: String,
    aet: Option<String>,
    aec: Option<String>,
    tls_ca: Option<PathBuf>,
    timeout: f64,
) -> Result<(), Failure> {
    let settings = probe::ProbeSettings {
        address,
        calling_ae: aet,
        called_ae: aec,
        tls_ca,
        timeout: seconds(timeout, "--timeout")?,
    };
    eprintln!(
        "pacsgate probe {}: checking without changing anything (C-ECHO and C-FIND only)",
        settings.address
    );
    let mut progress = |line: &str| eprintln!("probe: {line} ...");
    let report = runtime()?.block_on(probe::probe(&settings, &mut progress))?;
    print!("{}", report.verdict());
    if report.open() {
        Err(Failure::Open)
    } else {
        Ok(())
    }
}
