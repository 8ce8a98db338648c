//! JWT verification (`JwtVerifier::verify`, via `Authenticator::authenticate` with User Identity type 5).
//! First byte even: the rest is the token as the peer sent it. Odd: the rest is a JSON header and
//! claims (split at the first 0x00) signed with the configured key, so the fuzzer reaches the claim
//! checks and the roles path behind a valid signature.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dicom_ul::pdu::{UserIdentity, UserIdentityType};
use libfuzzer_sys::fuzz_target;
use pacsgate::auth::jwt::JwtVerifier;
use pacsgate::auth::{Method, Origin};
use pacsgate_fuzz::{AUDIENCE, ISSUER, JWT_PRIVATE_PEM, authenticator, config, poll_once};
use std::sync::OnceLock;

fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| JwtVerifier::load(config().jwt.as_ref().expect("jwt")).expect("verifier"))
}

fn sign(header: &[u8], claims: &[u8]) -> Option<String> {
    use jsonwebtoken::{EncodingKey, Header, encode};
    static KEY: OnceLock<EncodingKey> = OnceLock::new();
    let key =
        KEY.get_or_init(|| EncodingKey::from_ec_pem(JWT_PRIVATE_PEM.as_bytes()).expect("key"));
    let mut h: Header = serde_json::from_slice(header)
        .unwrap_or_else(|_| Header::new(jsonwebtoken::Algorithm::ES256));
    h.alg = jsonwebtoken::Algorithm::ES256;
    let claims: serde_json::Value = serde_json::from_slice(claims).ok()?;
    encode(&h, &claims, key).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let split = rest.iter().position(|&b| b == 0).unwrap_or(0);
        let (header, claims) = rest.split_at(split);
        match sign(header, claims.get(1..).unwrap_or_default()) {
            Some(t) => t.into_bytes(),
            None => return,
        }
    };
    if let Ok(text) = std::str::from_utf8(&token)
        && let Ok(claims) = verifier().verify(text)
    {
        // Only a token with our issuer and audience, signed by our key, verifies.
        assert!(mode & 1 == 1, "an unsigned input verified: {text}");
        assert!(!claims.subject.is_empty() && claims.subject.len() <= 256);
        let payload: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(text.split('.').nth(1).unwrap_or_default())
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(payload["iss"], ISSUER);
        assert!(payload["exp"].is_number());
        let aud = &payload["aud"];
        assert!(
            aud == AUDIENCE
                || aud
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == AUDIENCE))
        );
    }
    if token.len() > 65_000 {
        return;
    }
    let id = UserIdentity::new(false, UserIdentityType::Jwt, token, Vec::new());
    let origin = Origin {
        address: "127.0.0.1".parse().expect("address"),
        calling_ae: "VIEWER",
        over_tls: true,
    };
    let judged = poll_once(authenticator().authenticate(Some(&id), &[], origin))
        .expect("a token is judged without waiting");
    if let Ok(p) = judged {
        assert_eq!(p.method, Method::Jwt);
        assert!(!p.roles.is_empty(), "a token without a known role got in");
    }
});
