//! pacsgate command line: subcommands and logging setup; the only place for anyhow.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use pacsgate::config::Config;
use pacsgate::server::{Gateway, State};

const DEFAULT_CONFIG: &str = "config/pacsgate.toml";

#[derive(Parser)]
#[command(
    name = "pacsgate",
    version,
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
    /// Check a configuration: syntax, keys, certificates, users, JWT keys, upstream reachability.
    ///
    /// Exits non-zero naming the first problem found. Example: pacsgate check --config pacsgate.toml
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
        /// Host name or IP address the server certificate is valid for (repeatable).
        #[arg(long = "host", default_values_t = [String::from("localhost"), String::from("127.0.0.1"), String::from("::1")])]
        hosts: Vec<String>,
        /// Client certificate to issue, with this name as subject CN (repeatable).
        #[arg(long = "client")]
        clients: Vec<String>,
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => {
            init_logging();
            run(&config)
        }
        Command::Check { config } => check(&config),
        Command::HashPassword => hash_password(),
        Command::Certs {
            out,
            hosts,
            clients,
        } => certs(&out, &hosts, &clients),
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
            // One line naming the problem; the chain of causes joined with ": ".
            eprintln!("pacsgate: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
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
    for key in key_files(&config) {
        if let Some(warning) = pacsgate::tls::key_permission_warning(&key) {
            tracing::warn!("{warning}");
        }
    }
    let state = State::new(config)?;
    runtime()?.block_on(async move {
        let gateway = Gateway::new(state);
        let listener = gateway.bind().await?;
        let devices = gateway.bind_devices().await?;
        let cfg = &gateway.current().config;
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ae_title = %cfg.gateway.ae_title,
            upstreams = cfg.upstreams.len(),
            users = cfg.users.len(),
            "pacsgate listening (DICOM TLS)"
        );
        if let Some(devices) = devices {
            tracing::info!(
                listen = %devices.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                devices = cfg.devices.len(),
                "device listener (plain DICOM, [[device]] entries only)"
            );
            let g = gateway.clone();
            tokio::spawn(async move { g.serve(devices, false).await });
        }
        tokio::select! {
            _ = gateway.serve(listener, true) => {}
            _ = shutdown_signal() => tracing::info!("shutting down"),
        }
        Ok(())
    })
}

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

fn key_files(config: &Config) -> Vec<PathBuf> {
    vec![config.tls.private_key.clone()]
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("ok: {} parses and validates", path.display());
    pacsgate::tls::server_config(&config.tls)?;
    println!(
        "ok: TLS certificate {} and key {} load{}",
        config.tls.certificate.display(),
        config.tls.private_key.display(),
        match &config.tls.client_ca {
            Some(ca) => format!(", client CA {}", ca.display()),
            None => String::new(),
        }
    );
    for key in key_files(&config) {
        if let Some(warning) = pacsgate::tls::key_permission_warning(&key) {
            println!("warning: {warning}");
        }
    }
    if let Some(jwt) = &config.jwt {
        pacsgate::auth::jwt::JwtVerifier::load(jwt)?;
        println!(
            "ok: JWT keys load (issuer {:?}, audience {:?})",
            jwt.issuer, jwt.audience
        );
    }
    let with_password = config
        .users
        .values()
        .filter(|u| u.password_hash.is_some())
        .count();
    println!(
        "ok: {} users ({with_password} with a password), {} roles",
        config.users.len(),
        config.roles.len()
    );
    let mut unreachable = Vec::new();
    let rt = runtime()?;
    for upstream in &config.upstreams {
        let within = config.timeouts.upstream_connect;
        let reached = rt.block_on(async {
            tokio::time::timeout(within, tokio::net::TcpStream::connect(&upstream.address)).await
        });
        match reached {
            Ok(Ok(_)) => println!(
                "ok: upstream {} -> {} ({}) accepts connections",
                upstream.called_ae, upstream.address, upstream.ae_title
            ),
            Ok(Err(e)) => unreachable.push(format!(
                "upstream {} at {}: {e}",
                upstream.called_ae, upstream.address
            )),
            Err(_) => unreachable.push(format!(
                "upstream {} at {}: no answer within {:?}",
                upstream.called_ae, upstream.address, within
            )),
        }
    }
    if !unreachable.is_empty() {
        bail!("unreachable: {}", unreachable.join("; "));
    }
    println!("configuration is ready");
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

fn certs(out: &Path, hosts: &[String], clients: &[String]) -> anyhow::Result<()> {
    let made = pacsgate::devcerts::generate(out, hosts, clients)?;
    let ca = if made.reused_ca { "reused" } else { "new" };
    println!(
        "CA ({ca}):      {}  (key {})",
        made.ca_cert.display(),
        made.ca_key.display()
    );
    println!(
        "server:        {}  (key {}) for {}",
        made.server_cert.display(),
        made.server_key.display(),
        hosts.join(", ")
    );
    for (name, cert, key) in &made.clients {
        println!("client {name}: {}  (key {})", cert.display(), key.display());
    }
    println!(
        "Private keys are mode 600. These are development certificates: see certs/README.md for production."
    );
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
