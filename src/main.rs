//! pacsgate command line: subcommands and logging setup; the only place for anyhow.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use pacsgate::config::Config;
use pacsgate::gateway::{Gateway, State};
use pacsgate::listeners::{Kind, Listeners};

const DEFAULT_CONFIG: &str = "config/pacsgate.toml";

/// `pacsgate --version`: the version and the commit the binary was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PACSGATE_COMMIT"),
    ")"
);

/// jemalloc with its background threads on (the `background_threads` feature): freed memory goes back to the
/// system even while the gateway is idle (argon2id's 19 MiB block, above jemalloc's 8 MiB oversize threshold,
/// at once; the rest after `dirty_decay_ms`, 10 s). With glibc's malloc each check's block stayed in the arena of
/// the blocking-pool thread that ran it (the dynamic mmap threshold): 3 rounds of 24 logins left 680 MiB resident.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "pacsgate",
    version = VERSION,
    about = "An authenticating DICOM gateway in front of a legacy PACS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    ///
    /// Example: pacsgate run --config /etc/pacsgate/pacsgate.toml
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a configuration: everything `run` and a reload open, one `ok:` line per section
    ///
    /// Syntax and keys, key and configuration file modes, certificates, CRLs, JWT keys, users and roles
    /// (with warnings), destinations, the audit file and syslog CA; then (unless --offline) that every
    /// listen address can be bound and every archive, DICOMweb upstream and collector answers.
    /// Exit status: 0 ready; 1 `run` or a reload would refuse it; 2 it loads, but a peer did not answer.
    ///
    /// Examples:
    ///   pacsgate check --config /etc/pacsgate/pacsgate.toml && systemctl reload pacsgate
    ///   pacsgate check --offline --config /etc/pacsgate/pacsgate.toml    # systemd ExecStartPre
    #[command(verbatim_doc_comment)]
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The configuration and its files only: bind nothing, contact no archive or collector.
        #[arg(long)]
        offline: bool,
    },
    /// Read a password on standard input and print its argon2id hash for a [[user]] password_hash.
    ///
    /// Example: printf '%s' 'correct horse' | pacsgate hash-password
    HashPassword,
    /// Make development certificates: a local CA, a server certificate and client certificates.
    ///
    /// An existing ca.crt + ca.key in DIR is reused, so clients can be added later. For trying pacsgate
    /// out and for tests; in production use your own CA (certs/README.md).
    /// Example: pacsgate certs --out certs --host pacs.example.org --host 10.0.0.5 --client dr.house
    Certs {
        /// Folder for the PEM files (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Host name or IP address the server certificate is valid for (repeatable). Without it, an
        /// existing server.crt / server.key in --out is kept (a run that adds clients); when there is
        /// none, it is issued for localhost, 127.0.0.1 and ::1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Client certificate to issue, with this name as subject CN (repeatable).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Folder of the development CA (ca.crt, ca.key) [default: --out]. Keep it off the gateway
        /// host: --out then gets a copy of ca.crt only, never the CA's key.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
    /// Mint a JWT for testing, signed with a PEM private key (EC, RSA or Ed25519).
    ///
    /// Example: pacsgate token --key certs/jwt-signing.key --sub dr.house --roles reader --ttl 8h
    Token {
        /// Signing key, PEM.
        #[arg(long)]
        key: PathBuf,
        /// Subject: the user name.
        #[arg(long)]
        sub: String,
        /// Roles, comma separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime: seconds, or a number with s, m, h or d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Issuer (iss); must equal [auth.jwt] issuer.
        #[arg(long, default_value = "pacsgate-dev")]
        iss: String,
        /// Audience (aud); must equal [auth.jwt] audience.
        #[arg(long, default_value = "pacsgate")]
        aud: String,
        /// Name of the roles claim; must equal [auth.jwt] roles_claim.
        #[arg(long, default_value = "roles")]
        roles_claim: String,
    },
    /// Run pacsgate in front of an embedded demo archive, on loopback, with development certificates
    ///
    /// Starts an in-memory archive with a few synthetic patients and the gateway in front of it,
    /// writes certificates, keys, a token and a pacsgate.toml into --dir (reused on the next run),
    /// and prints exactly what to type to connect with pacsgate, DCMTK and pynetdicom.
    /// Runs until Ctrl-C. For trying pacsgate out: the credentials are demo ones.
    ///
    /// Examples:
    ///   pacsgate demo
    ///   pacsgate demo --dir /tmp/pacsgate-demo --listen 127.0.0.1:2762
    #[command(verbatim_doc_comment)]
    Demo {
        /// Folder for the demo's certificates, keys, token and pacsgate.toml.
        #[arg(long, default_value = "pacsgate-demo")]
        dir: PathBuf,
        /// Where the gateway listens (loopback addresses only) [default: 127.0.0.1:11112 when
        /// free, otherwise a free loopback port].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Send a C-ECHO over TLS with a user identity: check that a deployment lets you in
    ///
    /// Prints the TLS and association result, the A-ASSOCIATE-RJ codes in words when rejected,
    /// and the C-ECHO status. Exit status: 0 success, 3 rejected or aborted, 4 a failure status,
    /// 1 anything else.
    ///
    /// Examples:
    ///   PW='the password' pacsgate echo --ca ca.crt --user dr.house --password-env PW --aec PACS pacs-gw:2762
    ///   pacsgate echo --ca ca.crt --cert me.crt --key me.key --aec PACS pacs-gw:2762
    ///   pacsgate echo --ca ca.crt --token-file my.jwt --aec PACS pacs-gw:2762
    ///   pacsgate echo --plain --aec ORTHANC 127.0.0.1:4242
    #[command(verbatim_doc_comment)]
    Echo {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send a C-FIND over TLS with a user identity, keys given like DCMTK's findscu
    ///
    /// Study Root by default (--patient-root for Patient Root); --level sets the Query/Retrieve
    /// Level. -k Keyword=Value (or gggg,eeee=Value) sets a matching key; -k Keyword alone asks for
    /// the attribute back. Matches are printed as they arrive, or all at once with --json.
    /// Exit status: 0 success, 3 rejected or aborted, 4 a failure status, 1 anything else.
    ///
    /// Examples:
    ///   pacsgate find --ca ca.crt --token-file my.jwt --aec PACS -k PatientID=123 -k StudyDate -k StudyInstanceUID pacs-gw:2762
    ///   pacsgate find --ca ca.crt --cert me.crt --key me.key --aec PACS --level PATIENT --json -k 'PatientName=DOE^*' -k PatientID pacs-gw:2762
    #[command(verbatim_doc_comment)]
    Find {
        #[command(flatten)]
        client: ClientArgs,
        /// Query/Retrieve Level: PATIENT, STUDY, SERIES or IMAGE.
        #[arg(long, default_value = "STUDY")]
        level: String,
        /// Use the Patient Root information model (default: Study Root).
        #[arg(long)]
        patient_root: bool,
        /// A key: Keyword=Value, gggg,eeee=Value, or a keyword alone to have it returned (repeatable).
        #[arg(short = 'k', value_name = "TAG=VALUE")]
        keys: Vec<String>,
        /// Print the matches and the final status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    Connect(pacsgate::connect::cli::ConnectArgs),
    /// Check whether an archive answers without credentials, the way an attacker would
    ///
    /// ONLY RUN THIS AGAINST SYSTEMS YOU ARE RESPONSIBLE FOR.
    /// Without changing anything, it checks over plain TCP and over TLS: whether an association
    /// without credentials is accepted with a made-up calling AE title, whether C-ECHO is answered,
    /// whether a Study Root C-FIND for PatientName=* returns matches (counted, never shown), whether
    /// a made-up called AE title is accepted, and whether the port speaks TLS. It prints OPEN or
    /// CLOSED with the reasons. Exit status: 0 CLOSED, 3 OPEN, 1 could not probe.
    ///
    /// Examples:
    ///   pacsgate probe 10.0.0.20:104
    ///   pacsgate probe --aec PACS --tls-ca ca.crt pacs-gw.example.org:2762
    #[command(verbatim_doc_comment)]
    Probe {
        /// host:port of the archive or gateway.
        address: String,
        /// Calling AE title (default: a made-up one, to see whether any is accepted).
        #[arg(long)]
        aet: Option<String>,
        /// Called AE title (default: ANY-SCP, and a made-up one too).
        #[arg(long)]
        aec: Option<String>,
        /// Verify the server's TLS certificate against this CA (default: not verified; nothing secret is sent).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Seconds to wait for each step.
        #[arg(long, default_value = "10")]
        timeout: f64,
    },
    /// Write the man pages (one per command) and the bash, zsh and fish completions; for packaging
    /// (scripts/package.sh), hidden from --help, the man pages and the completions.
    #[command(hide = true)]
    PackageAssets {
        /// Folder to write into: man/*.1 and completions/{pacsgate.bash,_pacsgate,pacsgate.fish}.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where and how `echo` and `find` connect, and who they say they are.
#[derive(clap::Args)]
struct ClientArgs {
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { dir, listen } => {
            init_logging();
            demo(&dir, listen)
        }
        Command::Echo { client } => return tool_exit(echo(&client)),
        Command::Find {
            client,
            level,
            patient_root,
            keys,
            json,
        } => return tool_exit(find(&client, &level, patient_root, &keys, json)),
        Command::Probe {
            address,
            aet,
            aec,
            tls_ca,
            timeout,
        } => return tool_exit(probe(address, aet, aec, tls_ca, timeout)),
        Command::Connect(args) => {
            init_logging();
            runtime().and_then(|rt| Ok(rt.block_on(pacsgate::connect::cli::run(args))?))
        }
        Command::Run { config } => {
            init_logging();
            run(&config)
        }
        Command::Check { config, offline } => {
            return match check(&config, offline) {
                Ok(Verdict::Ready) => std::process::ExitCode::SUCCESS,
                Ok(Verdict::Unreachable) => std::process::ExitCode::from(2),
                Ok(Verdict::Refused(n)) => {
                    eprintln!(
                        "pacsgate: error: {n} problem(s) above: `run` and a reload would refuse {}",
                        config.display()
                    );
                    std::process::ExitCode::FAILURE
                }
                Err(e) => {
                    print_error(&e);
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::PackageAssets { out } => package_assets(&out),
        Command::HashPassword => hash_password(),
        Command::Certs {
            out,
            hosts,
            clients,
            ca_dir,
        } => certs(&out, ca_dir.as_deref(), &hosts, &clients),
        Command::Token {
            key,
            sub,
            roles,
            ttl,
            iss,
            aud,
            roles_claim,
        } => token(&key, &sub, &roles, &ttl, &iss, &aud, &roles_claim),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .fmt_fields(pacsgate::logfmt::fields())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // Only with allow_readable_keys = true does a readable key get this far.
    for file in config.readable_secret_files() {
        tracing::warn!("allow_readable_keys = true, and {}", file.describe());
    }
    runtime()?.block_on(async move {
        let gateway = Gateway::new(State::new(config)?);
        let mut listeners = Listeners::start(&gateway).await?;
        // Rate-limit buckets of addresses and users not seen for a while are forgotten (bounded memory).
        let sweeper = {
            let g = gateway.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    g.current().limiter.rates.sweep();
                }
            })
        };
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let mut term =
            signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hangup.recv() => listeners.reload(&gateway).await,
            }
        }
        // Stop accepting; the return path stays open while the moves in flight finish.
        listeners.close_except(&[Kind::Return]);
        sweeper.abort();
        let grace = gateway.current().config.timeouts.shutdown_grace;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: no new associations"
        );
        gateway.drain(grace).await;
        listeners.close_except(&[]);
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What `check` found, beyond a file that does not load (an error).
enum Verdict {
    /// Everything `run` and a reload open opened, every address binds, every peer answered.
    Ready,
    /// The configuration loads and every file opens, but these peers did not answer (exit status 2).
    Unreachable,
    /// `run` or a reload would refuse this configuration (exit status 1); each problem was printed.
    Refused(usize),
}

/// `pacsgate check`: open (or test) everything `run` and a reload open, one `ok:` line per section.
/// `--offline`: the configuration and its files only; nothing is contacted and nothing is bound.
fn check(path: &Path, offline: bool) -> anyhow::Result<Verdict> {
    let config = Config::load(path)?;
    println!("ok: {} parses and validates", path.display());
    let mut failures = 0usize;
    let mut fail = |what: &str, e: &dyn std::error::Error| {
        failures += 1;
        println!("error: {what}: {}", error_chain(e));
    };
    for warning in config.warnings() {
        println!("warning: {warning}");
    }

    // Files holding secrets (refused by `load` unless allow_readable_keys).
    let readable = config.readable_secret_files();
    if readable.is_empty() {
        println!(
            "ok: private keys{} not readable by other users",
            if config.users.values().any(|u| u.password_hash.is_some()) {
                " and the configuration file (it holds password hashes)"
            } else {
                ""
            }
        );
    }
    for file in readable {
        println!(
            "warning: allow_readable_keys = true, and {}",
            file.describe()
        );
    }

    // [tls]
    match pacsgate::tls::server_config(&config.tls) {
        Ok(_) => println!(
            "ok: [tls] certificate {} and key {} load{}",
            config.tls.certificate.display(),
            config.tls.private_key.display(),
            match &config.tls.client_ca {
                Some(ca) => format!(", client CA {}", ca.display()),
                None => String::new(),
            }
        ),
        Err(e) => fail("[tls]", &e),
    }
    if !config.tls.client_crl.is_empty() {
        match pacsgate::tls::load_crls(&config.tls.client_crl) {
            Ok(crls) => println!("ok: [tls] {} client CRLs load", crls.len()),
            Err(e) => fail("[tls] client_crl", &e),
        }
    }

    // [auth.jwt], users and roles
    if let Some(jwt) = &config.jwt {
        match pacsgate::auth::jwt::JwtVerifier::load(jwt) {
            Ok(_) => println!(
                "ok: [auth.jwt] keys load (issuer {:?}, audience {:?})",
                jwt.issuer, jwt.audience
            ),
            Err(e) => fail("[auth.jwt]", &e),
        }
    }
    let with_password = config
        .users
        .values()
        .filter(|u| u.password_hash.is_some())
        .count();
    println!(
        "ok: {} users ({with_password} with a password), {} roles, {} devices",
        config.users.len(),
        config.roles.len(),
        config.devices.len()
    );

    // [[destination]]: their TLS settings load like the reload loads them.
    if !config.destinations.is_empty() {
        match pacsgate::moves::DestinationConnectors::new(&config) {
            Ok(_) => println!(
                "ok: [[destination]] {} load",
                config
                    .destinations
                    .iter()
                    .map(|d| d.ae_title.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => fail("[[destination]]", &e),
        }
    }

    // [admin]: the bearer token file and the client CA load as `run` and a reload load them.
    if config.admin.is_some() {
        match pacsgate::admin::AdminAccess::load(&config) {
            Ok(_) => println!("ok: [admin] access settings load"),
            Err(e) => fail("[admin]", &e),
        }
        for warning in pacsgate::admin::warnings(&config) {
            println!("warning: {warning}");
        }
    }

    // [audit]: the file (or the folder it will be created in) and the syslog CA, as `run` opens them.
    if let Some(audit) = &config.audit {
        if let Some(file) = &audit.file {
            match audit_file_writable(file) {
                Ok(how) => println!("ok: [audit] file {}: {how}", file.display()),
                Err(e) => fail(&format!("[audit] file {}", file.display()), &e),
            }
        }
        if let Some(pacsgate::config::SyslogTarget::Tls { ca, .. }) = &audit.syslog {
            match pacsgate::tls::client_config(ca, None, None) {
                Ok(_) => println!("ok: [audit] syslog_ca {} loads", ca.display()),
                Err(e) => fail("[audit] syslog_ca", &e),
            }
        }
    }

    if offline {
        return Ok(if failures > 0 {
            Verdict::Refused(failures)
        } else {
            println!(
                "configuration is ready (offline: no address was bound, no archive or collector contacted)"
            );
            Verdict::Ready
        });
    }

    let rt = runtime()?;
    // Listeners: every address this file names must be free, or be held by the pacsgate about to be reloaded.
    for kind in Kind::ALL {
        let Some(address) = kind.address(&config) else {
            continue;
        };
        match rt.block_on(tokio::net::TcpListener::bind(address)) {
            Ok(_) => println!("ok: {} {address} can be bound", kind.key()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                match listening_process(address.port()) {
                    Some((pid, name)) if name == "pacsgate" => println!(
                        "ok: {} {address} is held by the running pacsgate (pid {pid}): a reload keeps it",
                        kind.key()
                    ),
                    Some((pid, name)) => {
                        failures += 1;
                        println!(
                            "error: {}: cannot listen on {address}: {e} (by pid {pid}, {name:?})",
                            kind.key()
                        );
                    }
                    None => {
                        failures += 1;
                        println!(
                            "error: {}: cannot listen on {address}: {e} (if that is this gateway running, a reload keeps it)",
                            kind.key()
                        );
                    }
                }
            }
            Err(e) => {
                failures += 1;
                println!("error: {}: cannot listen on {address}: {e}", kind.key());
            }
        }
    }

    // Reachability: reported; it does not make the file unusable (exit status 2, not 1).
    let within = config.timeouts.upstream_connect;
    let mut unreachable = 0usize;
    let mut reach = |what: String, address: &str| {
        let reached = rt.block_on(async {
            tokio::time::timeout(within, tokio::net::TcpStream::connect(address)).await
        });
        match reached {
            Ok(Ok(_)) => println!("ok: {what} at {address} accepts connections"),
            Ok(Err(e)) => {
                unreachable += 1;
                println!("unreachable: {what} at {address}: {e}");
            }
            Err(_) => {
                unreachable += 1;
                println!("unreachable: {what} at {address}: no answer within {within:?}");
            }
        }
    };
    for u in &config.upstreams {
        reach(
            format!("[[upstream]] {} ({})", u.called_ae, u.ae_title),
            &u.address,
        );
    }
    if let Some(http) = &config.http {
        let authority = http.upstream.trim_start_matches("http://");
        let address = if authority.starts_with('[') || authority.matches(':').count() == 1 {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        reach(
            format!("[http] upstream {}{}", http.upstream, http.dicomweb_path),
            &address,
        );
    }
    for d in &config.destinations {
        reach(format!("[[destination]] {}", d.ae_title), &d.address);
    }
    if let Some(audit) = &config.audit {
        match &audit.syslog {
            Some(pacsgate::config::SyslogTarget::Tls { address, .. }) => {
                reach("[audit] syslog collector".to_string(), address)
            }
            Some(pacsgate::config::SyslogTarget::Udp(address)) => println!(
                "ok: [audit] syslog udp://{address} (datagrams: whether the collector listens cannot be seen)"
            ),
            None => {}
        }
    }

    Ok(if failures > 0 {
        Verdict::Refused(failures)
    } else if unreachable > 0 {
        println!(
            "configuration is ready, but {unreachable} peer(s) did not answer (reported, not fatal: `run` starts without them)"
        );
        Verdict::Unreachable
    } else {
        println!("configuration is ready");
        Verdict::Ready
    })
}

/// Can the audit file be appended to, as `run` opens it? An existing file is opened for appending
/// (nothing written); a missing one is tested by creating and removing a scratch file in its folder,
/// so `check` run as root does not leave a root-owned audit file the service cannot open.
fn audit_file_writable(file: &Path) -> std::io::Result<&'static str> {
    match std::fs::OpenOptions::new().append(true).open(file) {
        Ok(_) => return Ok("exists and can be appended to"),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let folder = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let scratch = folder.join(format!(".pacsgate-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&scratch)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot be created in {}: {e}", folder.display()),
            )
        })?;
    let _ = std::fs::remove_file(&scratch);
    Ok("does not exist yet; its folder lets it be created")
}

/// The process listening on TCP `port` (pid and command name), from /proc; `None` when it cannot be
/// seen (another user's process without privileges, or no /proc).
fn listening_process(port: u16) -> Option<(u32, String)> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let local = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local == Some(port) {
                inodes.insert(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|t| inodes.contains(t.to_string_lossy().as_ref()))
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            return Some((pid, name));
        }
    }
    None
}

/// An error and its causes joined with ": ", leaving out a cause whose text the message already
/// carries (`{source}` in a message, then the same source as the next cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !next.is_empty() && !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// Print an error of `run`, `check` and the other commands: one line naming the problem; a TOML
/// error then gets toml's own rendering (the line quoted, the column marked).
fn print_error(e: &anyhow::Error) {
    let error: &dyn std::error::Error = e.as_ref();
    eprintln!("pacsgate: error: {}", error_chain(error));
    if let Some(pacsgate::config::ConfigError::Parse { rendering, .. }) =
        e.downcast_ref::<pacsgate::config::ConfigError>()
    {
        eprintln!("{rendering}");
    }
}

/// Man pages from the clap definitions (clap_mangen) and shell completions (clap_complete).
fn package_assets(out: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The command as users see it: without hidden subcommands (clap_complete would offer them).
    let full = Cli::command();
    let mut public = clap::Command::new("pacsgate")
        .version(VERSION)
        .about(full.get_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    clap_mangen::generate_to(public.clone(), &man)
        .with_context(|| format!("cannot write the man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut public, "pacsgate", &completions)
            .with_context(|| format!("cannot write the {shell} completions"))?;
        println!("{}", path.display());
    }
    println!("{}/*.1", man.display());
    Ok(())
}

fn hash_password() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("cannot read the password from standard input")?;
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password on standard input");
    }
    let hash = pacsgate::auth::password::hash_password(password).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(())
}

fn certs(
    out: &Path,
    ca_dir: Option<&Path>,
    hosts: &[String],
    clients: &[String],
) -> anyhow::Result<()> {
    let made = pacsgate::devcerts::generate_with_ca(out, ca_dir.unwrap_or(out), hosts, clients)?;
    let ca = if made.reused_ca { "reused" } else { "new" };
    println!(
        "CA ({ca}):      {}  (key {})",
        made.ca_cert.display(),
        made.ca_key.display()
    );
    if made.reused_server {
        println!(
            "server:        {}  (key {}) kept (no --host given)",
            made.server_cert.display(),
            made.server_key.display()
        );
    } else {
        let default_hosts = pacsgate::devcerts::DEFAULT_HOSTS.join(", ");
        println!(
            "server:        {}  (key {}) for {}",
            made.server_cert.display(),
            made.server_key.display(),
            if hosts.is_empty() {
                default_hosts
            } else {
                hosts.join(", ")
            }
        );
    }
    for (name, cert, key) in &made.clients {
        println!("client {name}: {}  (key {})", cert.display(), key.display());
    }
    println!(
        "Private keys are mode 600, owned by you: for a service user, chown root:pacsgate KEY && chmod 640 KEY \
         (docs/operations.md). Keep ca.key off the gateway host. These are development certificates: see \
         certs/README.md for production."
    );
    if ca_dir.is_none_or(|d| d == out) {
        println!(
            "The CA's key {} can issue certificates the gateway trusts: keep it off the gateway host \
             (next time: --ca-dir on the machine where you issue certificates).",
            made.ca_key.display()
        );
    }
    Ok(())
}

/// Parse "3600", "90s", "15m", "8h" or "2d" into seconds.
fn parse_ttl(ttl: &str) -> anyhow::Result<u64> {
    let ttl = ttl.trim();
    let (digits, unit) = match ttl.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => ttl.split_at(i),
        None => (ttl, "s"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("--ttl {ttl:?}: expected e.g. 3600, 90s, 15m, 8h, 2d"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => bail!("--ttl {ttl:?}: unknown unit {other:?} (use s, m, h or d)"),
    };
    Ok(n.saturating_mul(factor))
}

fn token(
    key: &Path,
    sub: &str,
    roles: &[String],
    ttl: &str,
    iss: &str,
    aud: &str,
    roles_claim: &str,
) -> anyhow::Result<()> {
    let ttl = parse_ttl(ttl)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let mut claims = serde_json::json!({
        "iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + ttl,
    });
    claims[roles_claim] = serde_json::json!(roles);
    println!("{}", pacsgate::auth::jwt::mint(key, &claims)?);
    Ok(())
}

fn demo(dir: &Path, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut progress = |line: &str| eprintln!("pacsgate demo: {line}");
        let demo = pacsgate::demo::start(dir, listen, &mut progress).await?;
        let exe = std::env::current_exe()
            .ok()
            .map(|exe| {
                std::env::current_dir()
                    .ok()
                    .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf))
                    .unwrap_or(exe)
            })
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "pacsgate".to_string());
        print!("{}", pacsgate::demo::instructions(&demo, &exe));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut demo = demo;
        let mut show = |lines: &str| {
            print!("{lines}");
            let _ = std::io::stdout().flush();
        };
        tokio::select! {
            _ = demo.serve_showing_the_guard(&mut show) => {}
            _ = shutdown_signal() => eprintln!("pacsgate demo: stopped"),
        }
        Ok(())
    })
}

/// Exit code of a tool: 0 on success; otherwise the error (and its meaning) on stderr.
fn tool_exit(result: Result<(), ToolFailure>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(ToolFailure::Tool(e)) => {
            eprintln!("pacsgate: {}", e.explain());
            std::process::ExitCode::from(e.exit_code())
        }
        Err(ToolFailure::Other(e)) => {
            print_error(&e);
            std::process::ExitCode::FAILURE
        }
        Err(ToolFailure::Open) => std::process::ExitCode::from(3),
    }
}

/// How a tool ended when it did not succeed.
enum ToolFailure {
    Tool(pacsgate::tools::ToolError),
    Other(anyhow::Error),
    /// `probe` found the door open.
    Open,
}

impl From<pacsgate::tools::ToolError> for ToolFailure {
    fn from(e: pacsgate::tools::ToolError) -> Self {
        ToolFailure::Tool(e)
    }
}

impl From<anyhow::Error> for ToolFailure {
    fn from(e: anyhow::Error) -> Self {
        ToolFailure::Other(e)
    }
}

fn seconds(value: f64, option: &str) -> anyhow::Result<std::time::Duration> {
    if value.is_finite() && value > 0.0 && value <= 3600.0 {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        bail!("{option} {value}: expected seconds above 0 and at most 3600")
    }
}

/// The target, TLS settings and identity of `echo` / `find`.
fn client_setup(
    args: &ClientArgs,
) -> Result<
    (
        pacsgate::tools::Target,
        Option<pacsgate::tools::client::TlsClient>,
    ),
    ToolFailure,
> {
    use pacsgate::tools::{Target, client, secret};
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
                    .ok_or_else(|| anyhow::anyhow!("{:?} is not host:port", args.address))?,
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

fn echo(args: &ClientArgs) -> Result<(), ToolFailure> {
    let (target, tls) = client_setup(args)?;
    let mut out = std::io::stdout();
    runtime()?.block_on(pacsgate::tools::run_echo(&target, tls.as_ref(), &mut out))?;
    Ok(())
}

fn find(
    args: &ClientArgs,
    level: &str,
    patient_root: bool,
    keys: &[String],
    json: bool,
) -> Result<(), ToolFailure> {
    let query = pacsgate::tools::query::Find::new(patient_root, level, keys)?;
    let (target, tls) = client_setup(args)?;
    let mut out = std::io::stdout();
    runtime()?.block_on(pacsgate::tools::run_find(
        &target,
        tls.as_ref(),
        &query,
        json,
        &mut out,
    ))?;
    Ok(())
}

fn probe(
    address: String,
    aet: Option<String>,
    aec: Option<String>,
    tls_ca: Option<PathBuf>,
    timeout: f64,
) -> Result<(), ToolFailure> {
    let settings = pacsgate::tools::probe::ProbeSettings {
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
    let report = runtime()?.block_on(pacsgate::tools::probe::probe(&settings, &mut progress))?;
    print!("{}", report.verdict());
    if report.open() {
        Err(ToolFailure::Open)
    } else {
        Ok(())
    }
}
