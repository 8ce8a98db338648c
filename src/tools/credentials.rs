//! `pacsgate certs`, `token` and `hash-password`: development certificates, test tokens and password
//! hashes for a configuration, printed for the admin (main.rs only dispatches to them).

use std::io::Read;
use std::path::Path;

/// Why `certs`, `token` or `hash-password` failed; printed as `pacsgate: error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the password from standard input")]
    Stdin(#[source] std::io::Error),
    #[error("empty password on standard input")]
    EmptyPassword,
    #[error("{0}")]
    Hash(String),
    #[error(transparent)]
    Certs(#[from] crate::devcerts::CertsError),
    #[error("--ttl {ttl:?}: expected e.g. 3600, 90s, 15m, 8h, 2d")]
    Ttl {
        ttl: String,
        source: std::num::ParseIntError,
    },
    #[error("--ttl {ttl:?}: unknown unit {unit:?} (use s, m, h or d)")]
    TtlUnit { ttl: String, unit: String },
    #[error("system clock before 1970")]
    Clock(#[source] std::time::SystemTimeError),
    #[error(transparent)]
    Mint(#[from] crate::auth::jwt::MintError),
}

/// `pacsgate hash-password`: a password on standard input, its argon2id hash on standard output.
pub fn hash_password() -> Result<(), CredentialError> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(CredentialError::Stdin)?;
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(CredentialError::EmptyPassword);
    }
    let hash = crate::auth::password::hash_password(password).map_err(CredentialError::Hash)?;
    println!("{hash}");
    Ok(())
}

/// `pacsgate certs`: development certificates made (or the CA reused), and what was written.
pub fn certs(
    out: &Path,
    ca_dir: Option<&Path>,
    hosts: &[String],
    clients: &[String],
) -> Result<(), CredentialError> {
    let made = crate::devcerts::generate_with_ca(out, ca_dir.unwrap_or(out), hosts, clients)?;
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
        let default_hosts = crate::devcerts::DEFAULT_HOSTS.join(", ");
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
         (docs/operations.md). These are development certificates: see \
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
fn parse_ttl(ttl: &str) -> Result<u64, CredentialError> {
    let ttl = ttl.trim();
    let (digits, unit) = match ttl.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => ttl.split_at(i),
        None => (ttl, "s"),
    };
    let n: u64 = digits.parse().map_err(|source| CredentialError::Ttl {
        ttl: ttl.to_string(),
        source,
    })?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(CredentialError::TtlUnit {
                ttl: ttl.to_string(),
                unit: other.to_string(),
            });
        }
    };
    Ok(n.saturating_mul(factor))
}

/// `pacsgate token`: a JWT for testing, signed with the PEM key `key`.
pub fn token(
    key: &Path,
    sub: &str,
    roles: &[String],
    ttl: &str,
    iss: &str,
    aud: &str,
    roles_claim: &str,
) -> Result<(), CredentialError> {
    let ttl = parse_ttl(ttl)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(CredentialError::Clock)?
        .as_secs();
    let mut claims = serde_json::json!({
        "iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + ttl,
    });
    claims[roles_claim] = serde_json::json!(roles);
    println!("{}", crate::auth::jwt::mint(key, &claims)?);
    Ok(())
}
