//! pacsgate command line: subcommands and logging setup; the only place for anyhow.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use pacsgate::config::Config;
use pacsgate::tools::commands::{self, ClientArgs};
use pacsgate::tools::credentials;

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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { dir, listen } => {
            init_logging();
            demo(&dir, listen)
        }
        Command::Echo { client } => return commands::exit_code(commands::echo(&client)),
        Command::Find {
            client,
            level,
            patient_root,
            keys,
            json,
        } => {
            return commands::exit_code(commands::find(&client, &level, patient_root, &keys, json));
        }
        Command::Probe {
            address,
            aet,
            aec,
            tls_ca,
            timeout,
        } => return commands::exit_code(commands::probe(address, aet, aec, tls_ca, timeout)),
        Command::Connect(args) => {
            init_logging();
            runtime().and_then(|rt| Ok(rt.block_on(pacsgate::connect::cli::run(args))?))
        }
        Command::Run { config } => {
            init_logging();
            run(&config)
        }
        Command::Check { config, offline } => return check(&config, offline),
        Command::PackageAssets { out } => package_assets(&out),
        Command::HashPassword => credentials::hash_password().map_err(anyhow::Error::from),
        Command::Certs {
            out,
            hosts,
            clients,
            ca_dir,
        } => credentials::certs(&out, ca_dir.as_deref(), &hosts, &clients)
            .map_err(anyhow::Error::from),
        Command::Token {
            key,
            sub,
            roles,
            ttl,
            iss,
            aud,
            roles_claim,
        } => credentials::token(&key, &sub, &roles, &ttl, &iss, &aud, &roles_claim)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

/// `pacsgate check`: exit 0 ready, 1 refused (or not loadable), 2 a peer did not answer.
fn check(config: &Path, offline: bool) -> std::process::ExitCode {
    use pacsgate::check::{CheckError, Verdict};
    match pacsgate::check::check(config, offline) {
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
            // A configuration error stays one (print_error renders its TOML context).
            print_error(&match e {
                CheckError::Config(e) => anyhow::Error::from(e),
                e => anyhow::Error::from(e),
            });
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
    Ok(commands::runtime()?)
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    Ok(runtime()?.block_on(pacsgate::service::run(config))?)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    pacsgate::service::shutdown_signal().await
}

/// Print an error of `run`, `check` and the other commands: one line naming the problem; a TOML
/// error then gets toml's own rendering (the line quoted, the column marked).
fn print_error(e: &anyhow::Error) {
    let error: &dyn std::error::Error = e.as_ref();
    eprintln!("pacsgate: error: {}", pacsgate::check::error_chain(error));
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
