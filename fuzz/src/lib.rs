//! Helpers shared by the fuzz targets in `fuzz_targets/`: a poll-once executor for the async parsers,
//! a policy `Session` like the one the gateway builds per association, an `Authenticator` with a fixed
//! JWT key, and invariants on the P-DATA-TF bytes the gateway writes.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use pacsgate::audit::Audit;
use pacsgate::auth::Authenticator;
use pacsgate::config::Config;
use pacsgate::moves::MoveRegistry;
use pacsgate::policy::{Grants, Limiter};
use pacsgate::session::{Party, Session};

/// The fixed ES256 key pair of the JWT targets (test-only, generated for the fuzzer; signs nothing real).
pub const JWT_PRIVATE_PEM: &str = include_str!("../keys/jwt-private.pem");
pub const JWT_PUBLIC_PEM: &str = include_str!("../keys/jwt-public.pem");
pub const ISSUER: &str = "https://idp.fuzz";
pub const AUDIENCE: &str = "pacsgate";

/// Poll a future once. The readers here read from byte slices, which never wait: `None` means the
/// future wanted to wait (e.g. for a blocking-pool task) and the input is skipped.
pub fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pacsgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch dir");
        std::fs::write(dir.join("jwt-public.pem"), JWT_PUBLIC_PEM).expect("write the JWT key");
        dir
    })
}

/// A configuration like a real deployment's: two roles, a password user, JWT with nested roles, a device.
pub fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let dir = scratch_dir();
        let text = format!(
            r#"
[gateway]
listen = "127.0.0.1:2762"
return_listen = "127.0.0.1:2763"
[tls]
certificate = "server.crt"
private_key = "server.key"
[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:104"
ae_title = "ORTHANC"
[limits]
max_query_results = 3
queries_per_minute = 0
retrievals_per_minute = 0
[auth.jwt]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
public_key = "jwt-public.pem"
roles_claim = "realm_access.roles"
leeway = 0
[[destination]]
ae_title = "VIEWER"
address = "127.0.0.1:11112"
[[role]]
name = "clinician"
allow = ["echo", "find", "get", "move", "store", "worklist"]
move_destinations = ["VIEWER"]
[[role]]
name = "reader"
allow = ["echo", "find"]
[[user]]
name = "alice"
roles = ["clinician"]
[[device]]
ae_title = "CT1"
addresses = ["127.0.0.1"]
roles = ["reader"]
"#
        );
        Config::parse(&text, &dir.join("pacsgate.toml")).expect("the fuzz configuration is valid")
    })
}

pub fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| Authenticator::new(config()).expect("authenticator"))
}

/// The DIMSE policy of one association, as `gateway::associate` builds it: presentation context 1
/// Explicit VR Little Endian, 3 Implicit VR Little Endian, 5 a compressed syntax; both peers 16 KiB PDUs.
pub fn session(user_role: &str) -> Session {
    let cfg = config();
    let party = Party {
        peer: "127.0.0.1:5000".parse().expect("address"),
        user: "alice".into(),
        calling_ae: "VIEWER".into(),
        called_ae: "ARCHIVE".into(),
    };
    let context = |abstract_syntax: &str, transfer_syntax: &str| pacsgate::session::Context {
        abstract_syntax: abstract_syntax.to_string(),
        transfer_syntax: transfer_syntax.to_string(),
    };
    let ts = HashMap::from([
        (1u8, context("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.1.2.1")),
        (3u8, context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2")),
        (5u8, context("1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.1.2.4.50")),
    ]);
    Session::new(
        party,
        Grants::for_roles(cfg, &[user_role.to_string()]),
        Arc::new(Limiter::new(cfg)),
        Arc::new(MoveRegistry::default()),
        Arc::new(Audit::disabled()),
        ts,
        PDU_LIMIT,
        PDU_LIMIT,
    )
}

/// The maximum PDU body both peers of [`session`] accept.
pub const PDU_LIMIT: u32 = 16384;

/// Wrap a P-DATA-TF body in its 6-byte header.
pub fn pdata(body: &[u8]) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(body.len() + 6);
    pdu.extend_from_slice(&[pacsgate::ul::pdu::P_DATA_TF, 0]);
    pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pdu.extend_from_slice(body);
    pdu
}

/// What the gateway writes to a peer must be whole P-DATA-TF PDUs, each no larger than the peer
/// accepts, with PDV items that tile each PDU. Panics otherwise (a finding).
pub fn assert_well_formed_pdata(bytes: &[u8], max_body: u32, what: &str) {
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 6, "{what}: a truncated PDU header");
        assert_eq!(rest[0], pacsgate::ul::pdu::P_DATA_TF, "{what}: not a P-DATA-TF");
        let len = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]);
        assert!(
            len <= max_body,
            "{what}: a {len}-byte PDU for a peer that accepts {max_body}"
        );
        let end = 6 + len as usize;
        assert!(
            rest.len() >= end,
            "{what}: a PDU longer than the bytes written"
        );
        if let Err(e) = pacsgate::ul::pdata::check_pdv_items(&rest[..end]) {
            panic!("{what}: the gateway wrote a malformed P-DATA-TF: {e}");
        }
        rest = &rest[end..];
    }
}
