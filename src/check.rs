//! `pacsgate check`: open (or test) everything `run` and a reload open, one `ok:` / `warning:` /
//! `error:` / `unreachable:` line per section on standard output, and a [`Verdict`] for the exit status.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, SyslogTarget};
use crate::listeners::Kind;

/// Why `check` could not judge the file at all (exit status 1, printed by the binary).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file does not load: its text or a value in it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No async runtime for binding and connecting.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// What `check` found, beyond a file that does not load (an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything `run` and a reload open opened, every address binds, every peer answered.
    Ready,
    /// The configuration loads and every file opens, but these peers did not answer (exit status 2).
    Unreachable,
    /// `run` or a reload would refuse this configuration (exit status 1); each problem was printed.
    Refused(usize),
}

/// The problems found so far, each printed as `error: WHAT: CAUSES` when counted.
#[derive(Default)]
struct Problems(usize);

impl Problems {
    fn fail(&mut self, what: &str, e: &dyn std::error::Error) {
        self.0 += 1;
        println!("error: {what}: {}", error_chain(e));
    }
}

/// `pacsgate check`: open (or test) everything `run` and a reload open, one `ok:` line per section.
/// `--offline`: the configuration and its files only; nothing is contacted and nothing is bound.
pub fn check(path: &Path, offline: bool) -> Result<Verdict, CheckError> {
    let config = Config::load(path)?;
    println!("ok: {} parses and validates", path.display());
    let mut problems = Problems::default();
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
    secret_files(&config);
    tls(&config, &mut problems);
    identities(&config, &mut problems);
    destinations_and_admin(&config, &mut problems);
    audit(&config, &mut problems);

    if offline {
        return Ok(if problems.0 > 0 {
            Verdict::Refused(problems.0)
        } else {
            println!(
                "configuration is ready (offline: no address was bound, no archive or collector contacted)"
            );
            Verdict::Ready
        });
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    listeners(&config, &rt, &mut problems);
    let unreachable = reachability(&config, &rt);

    Ok(if problems.0 > 0 {
        Verdict::Refused(problems.0)
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

/// Files holding secrets (refused by `load` unless allow_readable_keys).
fn secret_files(config: &Config) {
    let readable = config.readable_secret_files();
    if readable.is_empty() {
        let token = config
            .admin
            .as_ref()
            .is_some_and(|a| a.bearer_token_file.is_some());
        println!(
            "ok: private keys{}{} not readable by other users",
            if token { ", the metrics token" } else { "" },
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
}

/// `[tls]`: the certificate, key, client CA and client CRLs, as the listener loads them.
fn tls(config: &Config, problems: &mut Problems) {
    match crate::tls::server_config(&config.tls) {
        Ok(_) => println!(
            "ok: [tls] certificate {} and key {} load{}",
            config.tls.certificate.display(),
            config.tls.private_key.display(),
            match &config.tls.client_ca {
                Some(ca) => format!(", client CA {}", ca.display()),
                None => String::new(),
            }
        ),
        Err(e) => problems.fail("[tls]", &e),
    }
    if !config.tls.client_crl.is_empty() {
        match crate::tls::load_crls(&config.tls.client_crl) {
            Ok(crls) => println!("ok: [tls] {} client CRLs load", crls.len()),
            Err(e) => problems.fail("[tls] client_crl", &e),
        }
    }
}

/// `[auth.jwt]`, users and roles.
fn identities(config: &Config, problems: &mut Problems) {
    if let Some(jwt) = &config.jwt {
        match crate::auth::jwt::JwtVerifier::load(jwt) {
            Ok(_) => println!(
                "ok: [auth.jwt] keys load (issuer {:?}, audience {:?})",
                jwt.issuer, jwt.audience
            ),
            Err(e) => problems.fail("[auth.jwt]", &e),
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
}

/// `[[destination]]` (their TLS settings load like the reload loads them) and `[admin]` (the bearer
/// token file and the client CA load as `run` and a reload load them).
fn destinations_and_admin(config: &Config, problems: &mut Problems) {
    if !config.destinations.is_empty() {
        match crate::moves::DestinationConnectors::new(config) {
            Ok(_) => println!(
                "ok: [[destination]] {} load",
                config
                    .destinations
                    .iter()
                    .map(|d| d.ae_title.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => problems.fail("[[destination]]", &e),
        }
    }
    if config.admin.is_some() {
        match crate::admin::AdminAccess::load(config) {
            Ok(_) => println!("ok: [admin] access settings load"),
            Err(e) => problems.fail("[admin]", &e),
        }
        for warning in crate::admin::warnings(config) {
            println!("warning: {warning}");
        }
    }
}

/// `[audit]`: the file (or the folder it will be created in) and the syslog CA, as `run` opens them.
fn audit(config: &Config, problems: &mut Problems) {
    let Some(audit) = &config.audit else {
        return;
    };
    if let Some(file) = &audit.file {
        match audit_file_writable(file) {
            Ok(how) => println!("ok: [audit] file {}: {how}", file.display()),
            Err(e) => problems.fail(&format!("[audit] file {}", file.display()), &e),
        }
    }
    if let Some(SyslogTarget::Tls { ca, .. }) = &audit.syslog {
        match crate::tls::client_config(ca, None, None) {
            Ok(_) => println!("ok: [audit] syslog_ca {} loads", ca.display()),
            Err(e) => problems.fail("[audit] syslog_ca", &e),
        }
    }
}

/// Listeners: every address this file names must be free, or be held by the pacsgate about to be reloaded.
fn listeners(config: &Config, rt: &tokio::runtime::Runtime, problems: &mut Problems) {
    for kind in Kind::ALL {
        let Some(address) = kind.address(config) else {
            continue;
        };
        match rt.block_on(tokio::net::TcpListener::bind(address)) {
            Ok(_) => println!("ok: {} {address} can be bound", kind.key()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let holder = listening_process(address);
                match holder.as_ref().map(|h| (h, h.which())) {
                    Some((h, Which::This)) => println!(
                        "ok: {} {address} is held by the running pacsgate (pid {}): a reload keeps it",
                        kind.key(),
                        h.pid
                    ),
                    Some((h, Which::Replaced)) => println!(
                        "ok: {} {address} is held by the running pacsgate (pid {}, the build an upgrade replaced at this path): a reload keeps it",
                        kind.key(),
                        h.pid
                    ),
                    Some((holder, Which::Other)) => {
                        problems.0 += 1;
                        println!(
                            "error: {}: cannot listen on {address}: {e} (by pid {}, {:?}{})",
                            kind.key(),
                            holder.pid,
                            holder.name,
                            holder
                                .program
                                .as_ref()
                                .map(|p| format!(", program {}", p.display()))
                                .unwrap_or_default()
                        );
                    }
                    None => {
                        problems.0 += 1;
                        println!(
                            "error: {}: cannot listen on {address}: {e} (if that is this gateway running, a reload keeps it)",
                            kind.key()
                        );
                    }
                }
            }
            Err(e) => {
                problems.0 += 1;
                println!("error: {}: cannot listen on {address}: {e}", kind.key());
            }
        }
    }
}

/// Reachability of every peer: reported; it does not make the file unusable (exit status 2, not 1).
/// Returns how many did not answer.
fn reachability(config: &Config, rt: &tokio::runtime::Runtime) -> usize {
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
            Some(SyslogTarget::Tls { address, .. }) => {
                reach("[audit] syslog collector".to_string(), address)
            }
            Some(SyslogTarget::Udp(address)) => println!(
                "ok: [audit] syslog udp://{address} (datagrams: whether the collector listens cannot be seen)"
            ),
            None => {}
        }
    }
    unreachable
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

/// A process holding a listening socket, as /proc shows it.
struct Holder {
    pid: u32,
    /// Its command name (`comm`): any program can take any name.
    name: String,
    /// Its executable's path (`exe`), for the message: a path says little (a bind mount in another
    /// mount namespace can put any file at any path), the file does.
    program: Option<PathBuf>,
}

/// What a [`Holder`] is to this check.
enum Which {
    /// This very program: the same executable file (device and inode) as check's own.
    This,
    /// The file an upgrade replaced: deleted, at check's own path, in check's mount namespace.
    Replaced,
    /// Anything else, including a program that calls itself pacsgate, or a file at a path named so.
    Other,
}

impl Holder {
    fn which(&self) -> Which {
        use std::os::unix::fs::MetadataExt;
        let proc = PathBuf::from(format!("/proc/{}", self.pid));
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        let theirs = proc.join("exe");
        if same(&theirs, Path::new("/proc/self/exe")) {
            return Which::This;
        }
        let deleted = std::fs::metadata(&theirs).is_ok_and(|m| m.nlink() == 0);
        let at_our_path = self
            .program
            .as_deref()
            .and_then(Path::to_str)
            .and_then(|p| p.strip_suffix(" (deleted)"))
            .zip(std::env::current_exe().ok())
            .is_some_and(|(theirs, ours)| Path::new(theirs) == ours);
        let our_namespace = same(&proc.join("ns/mnt"), Path::new("/proc/self/ns/mnt"));
        if deleted && at_our_path && our_namespace {
            Which::Replaced
        } else {
            Which::Other
        }
    }
}

/// The process whose listening socket keeps `address` from being bound, from /proc; `None` when it cannot be seen (another user's
/// process without privileges, or no /proc).
fn listening_process(address: std::net::SocketAddr) -> Option<Holder> {
    let inodes = crate::procnet::listening_inodes_at(address);
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
        if crate::procnet::holds_socket(pid, &inodes) {
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            let program = std::fs::read_link(entry.path().join("exe")).ok();
            return Some(Holder { pid, name, program });
        }
    }
    None
}

/// An error and its causes joined with ": ", leaving out a cause whose text the message already
/// carries (`{source}` in a message, then the same source as the next cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
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
