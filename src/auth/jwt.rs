//! JSON Web Tokens (User Identity type 5): pinned algorithms, issuer, audience, expiry, a bounded
//! lifetime (`iat` required, `exp - iat` at most `max_lifetime`), key from PEM or JWKS.

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use crate::config::{Jwt, JwtKeySource};

pub use crate::config::{DEFAULT_MAX_LIFETIME_SECONDS, MAX_LEEWAY_SECONDS};

/// Why the JWT settings could not be loaded (at start or reload).
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error("cannot read JWT key file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("JWT key file {path}: {message}")]
    Key {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Why a presented token was not accepted. Never carries the token itself.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("JWT is not accepted: {0}")]
    Invalid(String),
    #[error("JWT has no usable subject")]
    NoSubject,
    #[error("JWT lifetime is not bounded: {0}")]
    Lifetime(String),
}

/// A verified token's subject and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub subject: String,
    pub roles: Vec<String>,
}

struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies tokens against the configured keys and claims.
pub struct JwtVerifier {
    keys: Vec<VerifyingKey>,
    issuer: String,
    audience: String,
    roles_claim: String,
    leeway: u64,
    max_lifetime: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

fn family_algorithms(family: jsonwebtoken::AlgorithmFamily) -> Vec<Algorithm> {
    family.algorithms().to_vec()
}

impl JwtVerifier {
    pub fn load(cfg: &Jwt) -> Result<JwtVerifier, JwtSetupError> {
        let pin = |found: Vec<Algorithm>| -> Vec<Algorithm> {
            match &cfg.algorithms {
                Some(allowed) => found.into_iter().filter(|a| allowed.contains(a)).collect(),
                None => found,
            }
        };
        let keys = match &cfg.key {
            JwtKeySource::PublicKey(path) => {
                let pem = read(path)?;
                let key = pem_key(&pem).ok_or_else(|| JwtSetupError::Key {
                    path: path.clone(),
                    message: "not an RSA, EC or Ed25519 public key in PEM form".into(),
                })?;
                let algorithms = pin(family_algorithms(key.family()));
                vec![VerifyingKey {
                    kid: None,
                    key,
                    algorithms,
                }]
            }
            JwtKeySource::Jwks(path) => {
                let text = read(path)?;
                let set: JwkSet =
                    serde_json::from_slice(&text).map_err(|e| JwtSetupError::Key {
                        path: path.clone(),
                        message: format!("not a JWKS document: {e}"),
                    })?;
                let mut keys = Vec::new();
                for jwk in &set.keys {
                    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                        continue; // shared secrets are never accepted
                    }
                    let Ok(key) = DecodingKey::from_jwk(jwk) else {
                        continue;
                    };
                    let found = match jwk
                        .common
                        .key_algorithm
                        .and_then(|a| a.to_string().parse().ok())
                    {
                        Some(alg) => vec![alg],
                        None => family_algorithms(key.family()),
                    };
                    keys.push(VerifyingKey {
                        kid: jwk.common.key_id.clone(),
                        key,
                        algorithms: pin(found),
                    });
                }
                if keys.is_empty() {
                    return Err(JwtSetupError::Key {
                        path: path.clone(),
                        message: "holds no usable public key".into(),
                    });
                }
                keys
            }
        };
        if keys.iter().all(|k| k.algorithms.is_empty()) {
            return Err(JwtSetupError::Key {
                path: match &cfg.key {
                    JwtKeySource::PublicKey(p) | JwtKeySource::Jwks(p) => p.clone(),
                },
                message: "no key fits the algorithms allowed in auth.jwt.algorithms".into(),
            });
        }
        Ok(JwtVerifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            roles_claim: cfg.roles_claim.clone(),
            // The configuration refuses more; a verifier built some other way is held to it too.
            leeway: cfg.leeway.min(MAX_LEEWAY_SECONDS),
            max_lifetime: cfg.max_lifetime,
        })
    }

    /// Verify a compact JWS: signature, `alg` among the key's pinned algorithms, `iss`, `aud`, `exp`, `nbf`,
    /// and the lifetime: `iat` present, not in the future, `exp - iat` at most `max_lifetime`.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let header = decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let candidates = self.keys.iter().filter(|k| match (&header.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        });
        let mut last = TokenError::Invalid("no key matches the token's kid".into());
        for k in candidates {
            if !k.algorithms.contains(&header.alg) {
                last = TokenError::Invalid(format!("algorithm {:?} is not allowed", header.alg));
                continue;
            }
            let mut v = Validation::new(header.alg);
            v.algorithms = k.algorithms.clone();
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&[&self.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.validate_nbf = true;
            v.leeway = self.leeway;
            match decode::<serde_json::Map<String, serde_json::Value>>(token, &k.key, &v) {
                Ok(data) => {
                    self.lifetime(&data.claims)?;
                    return self.claims(&data.claims);
                }
                Err(e) => last = TokenError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }

    /// `iat` is required (a number, not after now plus the leeway) and `exp - iat` may not exceed
    /// `max_lifetime`: a token minted for a hundred years is refused, and so is one that claims to be
    /// issued in the future to stretch its window.
    fn lifetime(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), TokenError> {
        let number = |name: &str| claims.get(name).and_then(serde_json::Value::as_f64);
        let Some(iat) = number("iat") else {
            return Err(TokenError::Lifetime("no iat (issued-at) claim".into()));
        };
        // `exp` is required and was checked by the library; read it again as a number.
        let exp = number("exp").unwrap_or(f64::INFINITY);
        let now = jsonwebtoken::get_current_timestamp() as f64;
        if iat > now + self.leeway as f64 {
            return Err(TokenError::Lifetime(format!(
                "iat is {:.0} s in the future",
                iat - now
            )));
        }
        let lifetime = exp - iat;
        if lifetime.is_nan() || lifetime > self.max_lifetime as f64 {
            return Err(TokenError::Lifetime(format!(
                "exp - iat is {lifetime:.0} s, more than auth.jwt.max_lifetime ({} s)",
                self.max_lifetime
            )));
        }
        Ok(())
    }

    fn claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TokenClaims, TokenError> {
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or(TokenError::NoSubject)?
            .to_string();
        // The roles claim may be a dotted path (e.g. "realm_access.roles"), a list or a space-separated string.
        let mut value = None;
        let mut current: Option<&serde_json::Map<String, serde_json::Value>> = Some(claims);
        for part in self.roles_claim.split('.') {
            value = current.and_then(|m| m.get(part));
            current = value.and_then(|v| v.as_object());
        }
        let roles = match value {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(s)) => {
                s.split_whitespace().map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        Ok(TokenClaims { subject, roles })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    std::fs::read(path).map_err(|source| JwtSetupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_key(pem: &[u8]) -> Option<DecodingKey> {
    DecodingKey::from_ec_pem(pem)
        .or_else(|_| DecodingKey::from_rsa_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .ok()
}

type KeyLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<jsonwebtoken::EncodingKey>;

/// Why a development token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "signing key {path} is not an EC (P-256/P-384), RSA or Ed25519 private key in PEM form"
    )]
    Key { path: std::path::PathBuf },
}

/// Sign `claims` with a PEM private key, picking the algorithm from the key type
/// (ES256 / ES384, RS256, EdDSA). For `pacsgate token` and the demo; identity providers mint real ones.
pub fn mint(key_path: &Path, claims: &serde_json::Value) -> Result<String, MintError> {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let pem = std::fs::read(key_path).map_err(|source| MintError::Read {
        path: key_path.to_path_buf(),
        source,
    })?;
    let attempts: [(Algorithm, KeyLoader); 4] = [
        (Algorithm::ES256, EncodingKey::from_ec_pem),
        (Algorithm::ES384, EncodingKey::from_ec_pem),
        (Algorithm::RS256, EncodingKey::from_rsa_pem),
        (Algorithm::EdDSA, EncodingKey::from_ed_pem),
    ];
    for (alg, load) in attempts {
        if let Ok(key) = load(&pem)
            && let Ok(token) = encode(&Header::new(alg), claims, &key)
        {
            return Ok(token);
        }
    }
    Err(MintError::Key {
        path: key_path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Jwt, JwtKeySource};

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, JwtVerifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (private, public) = crate::devcerts::jwt_keypair(dir.path()).expect("keys");
        let cfg = Jwt {
            issuer: "https://idp.test".into(),
            audience: "pacsgate".into(),
            key: JwtKeySource::PublicKey(public),
            algorithms: None,
            roles_claim: "realm_access.roles".into(),
            leeway: 0,
            max_lifetime: DEFAULT_MAX_LIFETIME_SECONDS,
        };
        let verifier = JwtVerifier::load(&cfg).expect("verifier");
        (dir, private, verifier)
    }

    fn claims(exp_offset: i64, aud: &str) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        serde_json::json!({
            "iss": "https://idp.test", "aud": aud, "sub": "carol",
            "exp": now + exp_offset, "nbf": now - 10, "iat": now - 10,
            "realm_access": {"roles": ["reader", "other"]}
        })
    }

    #[test]
    fn a_minted_token_verifies_with_nested_roles() {
        let (_dir, key, verifier) = setup();
        let token = mint(&key, &claims(600, "pacsgate")).expect("mint");
        let got = verifier.verify(&token).expect("verify");
        assert_eq!(got.subject, "carol");
        assert_eq!(got.roles, vec!["reader".to_string(), "other".to_string()]);
    }

    #[test]
    fn expired_foreign_audience_and_unsigned_tokens_fail() {
        let (_dir, key, verifier) = setup();
        assert!(
            verifier
                .verify(&mint(&key, &claims(-60, "pacsgate")).expect("mint"))
                .is_err()
        );
        assert!(
            verifier
                .verify(&mint(&key, &claims(600, "someone-else")).expect("mint"))
                .is_err()
        );
        let token = mint(&key, &claims(600, "pacsgate")).expect("mint");
        let mut parts = token.split('.');
        let (_, payload) = (parts.next(), parts.next().expect("payload"));
        let none = format!("{}.{payload}.", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0");
        assert!(verifier.verify(&none).is_err());
        assert!(verifier.verify("not a token").is_err());
    }

    #[test]
    fn a_verifier_holds_leeway_to_the_bound_however_it_was_built() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, public) = crate::devcerts::jwt_keypair(dir.path()).expect("keys");
        let cfg = Jwt {
            issuer: "https://idp.test".into(),
            audience: "pacsgate".into(),
            key: JwtKeySource::PublicKey(public),
            algorithms: None,
            roles_claim: "realm_access.roles".into(),
            leeway: 86_400,
            max_lifetime: DEFAULT_MAX_LIFETIME_SECONDS,
        };
        let verifier = JwtVerifier::load(&cfg).expect("verifier");
        let late =
            mint(&key, &claims(-(MAX_LEEWAY_SECONDS as i64) - 60, "pacsgate")).expect("mint");
        assert!(verifier.verify(&late).is_err(), "expired beyond the bound");
        let recent = mint(&key, &claims(-60, "pacsgate")).expect("mint");
        assert!(verifier.verify(&recent).is_ok(), "within the bound");
    }

    #[test]
    fn a_token_needs_iat_and_a_lifetime_within_max_lifetime() {
        let (_dir, key, verifier) = setup();
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let with = |iat: Option<i64>, exp: i64| {
            let mut c = claims(0, "pacsgate");
            c["exp"] = exp.into();
            match iat {
                Some(iat) => c["iat"] = iat.into(),
                None => {
                    c.as_object_mut().expect("object").remove("iat");
                }
            }
            verifier.verify(&mint(&key, &c).expect("mint"))
        };
        assert!(with(Some(now - 60), now + 3600).is_ok());
        assert!(with(Some(now), now + 24 * 3600).is_ok(), "exactly 24 h");
        for (what, iat, exp) in [
            ("no iat", None, now + 3600),
            ("100 years", Some(now - 60), now + 100 * 365 * 86_400),
            ("24 h + 1 s", Some(now), now + 24 * 3600 + 1),
            (
                "iat in the future",
                Some(now + 10 * 86_400),
                now + 10 * 86_400 + 60,
            ),
        ] {
            let err = with(iat, exp).expect_err(what);
            assert!(matches!(err, TokenError::Lifetime(_)), "{what}: {err}");
        }
    }
}
