//! The web door: an HTTPS reverse proxy in front of the archive's DICOMweb API (PS3.18), with the same
//! users, roles, limits and audit as the DIMSE side. Bodies stream both ways; only QIDO-RS answers
//! (bounded, to enforce the result cap) and small STOW-RS answers (for the audit trail) are read.
//!
//! The gateway judges a request the way the archive will read it, and forwards what it judged:
//! the path is decoded once, checked segment by segment and rebuilt ([`path`]); the route and every
//! UID in it are checked ([`route`]); the query string is decoded once, checked and rebuilt
//! ([`query`]); the headers that would make the archive read another request (method overrides,
//! `Forwarded`, a Host that is not a host) are refused or replaced. See docs/dicomweb.md.
//!
//! # Layout
//! - `mod.rs`: accept loop, connection lifecycle, a request's way in (audit gate, CORS preflight,
//!   sign-in), the one place a refusal is turned into an answer, a log line, a metric and an audit event.
//! - [`forward`]: an authenticated request's phases, one step each: judge, authorize, plan, send, read.
//! - [`headers`]: headers stripped, checked and set on the way to the archive; CORS on the way out.
//! - [`login`]: credentials, lockouts, the per-address failure budget, the Basic cache.
//! - [`path`], [`route`], [`query`]: reading the request.
//! - [`answer`]: reading the archive's QIDO-RS and STOW-RS answers.

pub mod answer;
mod forward;
mod headers;
mod inflight;
mod login;
mod path;
mod query;
mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::auth::Principal;
use crate::gateway::{Gateway, PendingSlot, State};
use crate::metrics::metrics;
use crate::policy::query_guard::GuardError;
use headers::add_cors;
use login::{NotAuthenticated, WebLogin};
use path::PathError;
use query::{Qido, QueryError, WadoUri};
use route::{Retrieval, RouteError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;
type Upstream = Client<HttpConnector, Incoming>;

/// The longest one HTTPS connection may live (a slow 500 MB retrieve fits).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);

/// The shared state of the web door.
pub struct Door {
    gateway: Gateway,
    client: Upstream,
    login: WebLogin,
    in_flight: inflight::InFlight,
}

/// One client connection, as its requests see it.
struct Conn {
    peer: SocketAddr,
    /// Names of the verified client certificate, if any.
    names: Vec<String>,
    /// The pending-connection slot, held until a request on this connection authenticates.
    pending: Mutex<Option<PendingSlot>>,
}

impl Conn {
    fn authenticated(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn is_pending(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Serve HTTPS on `listener` until the task is dropped.
pub async fn serve(gateway: Gateway, listener: TcpListener) {
    let door = Arc::new(Door {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
        gateway,
        login: WebLogin::new(),
        in_flight: inflight::InFlight::default(),
    });
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(reason = %e, "web: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        // Connections that have not authenticated yet share the DICOM side's budget: overall and per
        // address, with the same bounded wait for a slot (gateway::PendingConnections), in their own task.
        let tasks = door.gateway.tasks.clone();
        let door = door.clone();
        tasks.spawn(async move { connection(door, stream, peer).await });
    }
}

/// One connection: TLS within `tls_handshake`, then HTTP/1.1. Every request head must arrive within
/// `association_request` (that also closes a quiet keep-alive connection); an answer to a request
/// that did not authenticate closes the connection.
async fn connection(door: Arc<Door>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let state = door.gateway.current();
    let t = state.config.timeouts;
    let bounds = crate::gateway::Bounds::from_limits(&state.config.limits);
    let pending = match door
        .gateway
        .pending()
        .admit(peer.ip(), bounds, t.tls_handshake)
        .await
    {
        Ok(p) => p,
        Err(cap) => {
            metrics().refusal(cap.rule());
            tracing::debug!(peer = %peer, outcome = "dropped", reason = %cap, "web connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(t.tls_handshake, state.web_acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics().tls_handshake_failures.inc();
            let reason = crate::tls::handshake_failure(&e);
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = ?reason, "web connection");
            return;
        }
        Err(_) => {
            metrics().tls_handshake_failures.inc();
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = "TLS handshake timed out", "web connection");
            return;
        }
    };
    let names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| crate::auth::certificate::names_for(leaf, state.config.tls.client_identity))
        .unwrap_or_default();
    let conn = Arc::new(Conn {
        peer,
        names,
        pending: Mutex::new(Some(pending)),
    });
    let service = hyper::service::service_fn(move |req| {
        let door = door.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(door.handle(req, &conn).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(t.association_request)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service);
    // This bounds a connection whose peer stops reading a response (or trickles forever) without
    // cutting long downloads short.
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
}

fn full(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text.into()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The text may quote (escaped) what the client sent: never let a browser take it for HTML.
    r.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn retry_after(mut r: Response<Body>, seconds: u64) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// The answer to a request that did not authenticate.
fn not_authenticated(refused: NotAuthenticated) -> Response<Body> {
    match refused {
        // The reason was logged where it was found; the client gets the one uniform body.
        NotAuthenticated::Unauthorized(_reason) => {
            let mut r = full(StatusCode::UNAUTHORIZED, login::UNAUTHORIZED_BODY);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"pacsgate\", Basic realm=\"pacsgate\", charset=\"UTF-8\"",
                ),
            );
            r
        }
        NotAuthenticated::Limited {
            reason,
            retry_after: s,
        } => retry_after(
            full(StatusCode::TOO_MANY_REQUESTS, format!("{reason}\n")),
            s,
        ),
        NotAuthenticated::Busy { retry_after: s } => retry_after(
            full(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is busy checking passwords; try again\n",
            ),
            s,
        ),
    }
}

/// Why an authenticated request is refused before it reaches the archive.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("request path refused: {0}")]
    Path(#[from] PathError),
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("query string refused: {0}")]
    Query(#[from] QueryError),
    #[error("the Host header is not one host[:port]")]
    Host,
    #[error("{0} headers are not passed (the archive would run another method)")]
    MethodOverride(&'static str),
    #[error("{0} is not allowed for this user")]
    NotAuthorized(&'static str),
    #[error("{0}")]
    Guard(GuardError),
    #[error("{what} rate limit reached")]
    Rate { what: &'static str, retry: u64 },
    #[error("Accept {0:?}: QIDO-RS answers pass the gateway as application/dicom+json only")]
    NotAcceptable(String),
    #[error(
        "{0} requests of this user were in flight and none finished in time (phase request_slot, http.max_requests_per_user)"
    )]
    InFlight(usize),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Path(_)
            | Refusal::Route(RouteError::NotAUid { .. })
            | Refusal::Host
            | Refusal::MethodOverride(_) => StatusCode::BAD_REQUEST,
            Refusal::Query(QueryError::NotAcceptable(_)) | Refusal::NotAcceptable(_) => {
                StatusCode::NOT_ACCEPTABLE
            }
            Refusal::Query(_) => StatusCode::BAD_REQUEST,
            Refusal::Guard(GuardError::Malformed(_)) => StatusCode::BAD_REQUEST,
            Refusal::Route(RouteError::Denied(_))
            | Refusal::NotAuthorized(_)
            | Refusal::Guard(GuardError::NotSpecific(_)) => StatusCode::FORBIDDEN,
            Refusal::Rate { .. } | Refusal::InFlight(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short, fixed name (metrics label, audit `rule`).
    fn rule(&self) -> &'static str {
        match self {
            Refusal::Path(_) => "bad_path",
            Refusal::Route(RouteError::NotAUid { .. }) => "bad_uid",
            Refusal::Route(RouteError::Denied(_)) => "path_not_allowed",
            Refusal::Query(QueryError::NotAcceptable(_)) | Refusal::NotAcceptable(_) => {
                "not_acceptable"
            }
            Refusal::Query(_) => "bad_query",
            Refusal::Host => "bad_host",
            Refusal::MethodOverride(_) => "method_override",
            Refusal::NotAuthorized(_) => "not_authorized",
            Refusal::Guard(GuardError::NotSpecific(_)) => "query_guard",
            Refusal::Guard(GuardError::Malformed(_)) => "bad_identifier",
            Refusal::Rate { .. } => "rate_limit",
            Refusal::InFlight(_) => "requests_in_flight",
        }
    }
}

/// One authenticated request, for its log lines and audit events.
struct Ctx<'a> {
    state: &'a State,
    peer: SocketAddr,
    principal: &'a Principal,
    method: Method,
    /// The path as it came (still encoded), for the record.
    raw_path: String,
    /// `qido`, `wado`, `stow`, `http`, or `denied` before the route is known.
    op: &'static str,
    started: Instant,
}

impl Ctx<'_> {
    /// The one place a refusal becomes an answer, a log line, a metric and an audit event.
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        let status = refusal.status();
        let rule = refusal.rule();
        let reason = refusal.to_string();
        metrics().refusal(rule);
        self.state.audit.record(
            "refused",
            json!({"peer": self.peer.to_string(), "user": self.principal.user, "via": "http",
                   "method": self.method.as_str(), "path": self.raw_path, "op": self.op,
                   "status": status.as_u16(), "rule": rule, "reason": reason}),
        );
        tracing::info!(peer = %self.peer, user = ?self.principal.user, op = self.op, path = ?self.raw_path,
                       status = status.as_u16(), rule, reason = ?reason, "refused");
        let r = full(status, format!("{reason}\n"));
        match refusal {
            Refusal::Rate { retry, .. } => retry_after(r, retry),
            Refusal::InFlight(_) => retry_after(r, 1),
            _ => r,
        }
    }

    /// The audit event and the log line of a request the archive answered (or failed to): `fields`
    /// say what it was.
    fn record(&self, status: StatusCode, mut fields: Map<String, Value>) {
        tracing::info!(target: crate::logfmt::targets::WEB, peer = %self.peer, user = ?self.principal.user,
            op = self.op, method = %self.method, path = ?self.raw_path, status = status.as_u16(),
            duration_ms = self.started.elapsed().as_millis() as u64, "web request");
        let base = json!({"peer": self.peer.to_string(), "user": self.principal.user,
                          "method": self.method.as_str(), "via": "http", "status": status.as_u16(),
                          "duration_ms": self.started.elapsed().as_millis() as u64});
        if let Value::Object(base) = base {
            for (k, v) in base {
                fields.entry(k).or_insert(v);
            }
        }
        self.state.audit.record(self.op, Value::Object(fields));
    }
}

/// What the gateway does with the archive's answer, by route.
pub(super) enum Plan {
    Qido {
        qido: Qido,
        path_uids: usize,
        cap: usize,
    },
    Retrieve(Retrieval),
    WadoUri(WadoUri),
    Store {
        study: Option<String>,
    },
    Allowed,
}

/// `[audit] on_failure = "refuse"` and the audit file cannot be written: 503, logged and counted.
fn audit_unavailable(
    state: &State,
    peer: SocketAddr,
    method: &Method,
    raw_path: &str,
    why: &str,
) -> Response<Body> {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    metrics().refusal("audit_unavailable");
    state.audit.record(
        "refused",
        json!({"peer": peer.to_string(), "via": "http", "method": method.as_str(),
               "path": raw_path, "op": "denied", "status": status.as_u16(),
               "rule": "audit_unavailable", "reason": why}),
    );
    tracing::warn!(peer = %peer, op = "denied", path = ?raw_path, status = status.as_u16(),
                   rule = "audit_unavailable", reason = ?why, "refused");
    retry_after(
        full(
            status,
            "the audit trail cannot be written; try again later\n",
        ),
        30,
    )
}

impl Door {
    async fn handle(&self, req: Request<Incoming>, conn: &Conn) -> Response<Body> {
        let state = self.gateway.current();
        let Some(http) = state.config.http.clone() else {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                "the web door is not configured\n",
            );
        };
        let started = Instant::now();
        let method = req.method().clone();
        let raw_path = req.uri().path().to_string();
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_string);
        let cors = origin.filter(|o| http.cors_origins.iter().any(|a| a == "*" || a == o));
        let mut response = if req.version() == hyper::Version::HTTP_11
            && !req.headers().contains_key(header::HOST)
        {
            // RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request without Host.
            tracing::info!(peer = %conn.peer, outcome = "rejected", reason = "no Host header", "web request");
            full(
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request needs a Host header\n",
            )
        } else if let Some(why) = state.audit.refusing() {
            audit_unavailable(&state, conn.peer, &method, &raw_path, &why)
        } else if method == Method::OPTIONS && cors.is_some() {
            full(StatusCode::NO_CONTENT, "")
        } else {
            match self
                .login
                .authenticate(
                    &state,
                    || self.gateway.current(),
                    req.headers(),
                    conn.peer,
                    &conn.names,
                )
                .await
            {
                Ok(principal) => {
                    conn.authenticated();
                    match self
                        .authorize_and_forward(&state, &http, req, &principal, conn.peer, started)
                        .await
                    {
                        Ok(r) | Err(r) => r,
                    }
                }
                Err(refused) => not_authenticated(refused),
            }
        };
        // A connection that has not authenticated a request gets no keep-alive: it cannot be held
        // open with requests that fail.
        if conn.is_pending() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        add_cors(&mut response, cors.as_deref(), method == Method::OPTIONS);
        tracing::debug!(peer = %conn.peer, method = %method, path = ?raw_path, status = response.status().as_u16(), "web request");
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_their_status() {
        assert_eq!(
            Refusal::Path(PathError::DotSegment).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            Refusal::Query(QueryError::NotAcceptable("x".into())).status(),
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            Refusal::Route(RouteError::Denied("x")).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Refusal::Route(RouteError::NotAUid {
                what: "StudyInstanceUID",
                value: "*".into()
            })
            .status(),
            StatusCode::BAD_REQUEST
        );
    }
}
