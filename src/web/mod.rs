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
//! - `mod.rs`: accept loop, connection lifecycle, the request's phases, the one place a refusal is
//!   turned into an answer, a log line, a metric and an audit event.
//! - [`login`]: credentials, lockouts, the per-address failure budget, the Basic cache.
//! - [`path`], [`route`], [`query`]: reading the request.
//! - [`answer`]: reading the archive's QIDO-RS and STOW-RS answers.

pub mod answer;
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
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::auth::Principal;
use crate::config::{Http, Operation};
use crate::gateway::{Gateway, PendingSlot, State};
use crate::metrics::metrics;
use crate::policy::Grants;
use crate::policy::query_guard::GuardError;
use login::{NotAuthenticated, WebLogin};
use path::{Path, PathError};
use query::{Qido, QueryError, WadoUri};
use route::{Retrieval, Route, RouteError, classify};

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
            Refusal::Rate { .. } => StatusCode::TOO_MANY_REQUESTS,
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
            _ => r,
        }
    }

    /// The audit event of a request the archive answered (or failed to): `fields` say what it was.
    fn record(&self, status: StatusCode, mut fields: Map<String, Value>) {
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

/// Headers that would make the archive run another method than the one the gateway judged
/// (Orthanc honours `X-HTTP-Method-Override` on POST).
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers (RFC 9110 7.6.1), the ones the request's `Connection` header names, and
/// headers about the client only the gateway may set: never forwarded as they came.
fn strip(headers: &mut HeaderMap, from_client: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    if from_client {
        for name in [
            "authorization",
            "cookie",
            "expect",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-proto",
            "x-forwarded-server",
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
        ] {
            headers.remove(name);
        }
    }
}

/// The Host header, when it is one `host[:port]` (the archive builds RetrieveURLs from it).
fn checked_host(headers: &HeaderMap) -> Result<Option<HeaderValue>, Refusal> {
    let mut all = headers.get_all(header::HOST).iter();
    let Some(host) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(Refusal::Host);
    }
    let text = host.to_str().map_err(|_| Refusal::Host)?;
    let authority: hyper::http::uri::Authority = text.parse().map_err(|_| Refusal::Host)?;
    let name = authority.host();
    let name_ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
        None => name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
    };
    // What follows the host is nothing or `:` and a port (the parser does not check the digits).
    let port_ok = match text.get(name.len()..) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()),
        None => false,
    };
    if text.contains('@') || name.is_empty() || !name_ok || !port_ok {
        return Err(Refusal::Host);
    }
    Ok(Some(host.clone()))
}

/// What the gateway does with the archive's answer, by route.
enum Plan {
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
        let mut response = if let Some(why) = state.audit.refusing() {
            // `[audit] on_failure = "refuse"` and the audit file cannot be written.
            let status = StatusCode::SERVICE_UNAVAILABLE;
            metrics().refusal("audit_unavailable");
            state.audit.record(
                "refused",
                json!({"peer": conn.peer.to_string(), "via": "http", "method": method.as_str(),
                       "path": raw_path, "op": "denied", "status": status.as_u16(),
                       "rule": "audit_unavailable", "reason": why}),
            );
            tracing::warn!(peer = %conn.peer, op = "denied", path = ?raw_path, status = status.as_u16(),
                           rule = "audit_unavailable", reason = ?why, "refused");
            retry_after(
                full(
                    status,
                    "the audit trail cannot be written; try again later\n",
                ),
                30,
            )
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

    async fn authorize_and_forward(
        &self,
        state: &State,
        http: &Http,
        req: Request<Incoming>,
        principal: &Principal,
        peer: SocketAddr,
        started: Instant,
    ) -> Result<Response<Body>, Response<Body>> {
        let (mut parts, body) = req.into_parts();
        let mut ctx = Ctx {
            state,
            peer,
            principal,
            method: parts.method.clone(),
            raw_path: parts.uri.path().to_string(),
            op: "denied",
            started,
        };

        // Phase: the request as the archive would read it.
        let path = Path::of(&parts.uri).map_err(|e| ctx.refuse(e.into()))?;
        let host = checked_host(&parts.headers).map_err(|e| ctx.refuse(e))?;
        if let Some(name) = METHOD_OVERRIDES
            .into_iter()
            .find(|n| parts.headers.contains_key(*n))
        {
            return Err(ctx.refuse(Refusal::MethodOverride(name)));
        }
        let route = classify(http, &ctx.method, &path).map_err(|e| ctx.refuse(e.into()))?;
        let op = match &route {
            Route::Query { .. } => {
                ctx.op = "qido";
                Some(Operation::Find)
            }
            Route::Retrieve(_) | Route::WadoUri => {
                ctx.op = "wado";
                Some(Operation::Get)
            }
            Route::Store { .. } => {
                ctx.op = "stow";
                Some(Operation::Store)
            }
            Route::Allowed => {
                ctx.op = "http";
                None
            }
        };

        // Phase: the user's roles and rates.
        let grants = Grants::for_roles(&state.config, &principal.roles);
        if let Some(op) = op
            && !grants.allows(op)
        {
            return Err(ctx.refuse(Refusal::NotAuthorized(op.name())));
        }
        let limits = &state.config.limits;
        let retry = |bucket: crate::config::Rate| (60 / u64::from(bucket.per_minute.max(1))).max(1);

        // Phase: the query string, decoded once and rebuilt.
        let pairs = query::decode(parts.uri.query()).map_err(|e| ctx.refuse(e.into()))?;
        let (plan, upstream_query) = match route {
            Route::Query { level, uids } => {
                if let Some(accept) = answer::qido_not_acceptable(&parts.headers) {
                    return Err(ctx.refuse(Refusal::NotAcceptable(accept)));
                }
                let qido = Qido::parse(level, &uids, pairs).map_err(|e| ctx.refuse(e.into()))?;
                if !grants.unrestricted_qido()
                    && let Err(reason) = qido.guard(grants.query_min_chars)
                {
                    return Err(ctx.refuse(Refusal::Guard(reason)));
                }
                if !state.limiter.rates.queries.allow(&principal.user) {
                    return Err(ctx.refuse(Refusal::Rate {
                        what: "query",
                        retry: retry(limits.queries),
                    }));
                }
                // Ask the archive for one more than the cap, so a cut can be told apart from an exact fit.
                let cap = qido.limit.map_or(grants.max_query_results, |a| {
                    a.min(grants.max_query_results)
                });
                let q = qido.upstream(cap.saturating_add(1), uids.len());
                (
                    Plan::Qido {
                        qido,
                        path_uids: uids.len(),
                        cap: cap as usize,
                    },
                    q,
                )
            }
            Route::Retrieve(r) => {
                let q = query::plain(&pairs).map_err(|e| ctx.refuse(e.into()))?;
                if r.whole() && !state.limiter.rates.retrievals.allow(&principal.user) {
                    return Err(ctx.refuse(Refusal::Rate {
                        what: "retrieval",
                        retry: retry(limits.retrievals),
                    }));
                }
                (Plan::Retrieve(r), q)
            }
            Route::WadoUri => {
                let (w, q) = WadoUri::parse(&pairs).map_err(|e| ctx.refuse(e.into()))?;
                (Plan::WadoUri(w), q)
            }
            Route::Store { study } => {
                let q = query::plain(&pairs).map_err(|e| ctx.refuse(e.into()))?;
                (Plan::Store { study }, q)
            }
            Route::Allowed => {
                let q = query::plain(&pairs).map_err(|e| ctx.refuse(e.into()))?;
                (Plan::Allowed, q)
            }
        };

        // Phase: forward what was judged: rebuilt path and query, credentials stripped, body streamed.
        let upstream_path = path.upstream();
        let target = if upstream_query.is_empty() {
            format!("{}{upstream_path}", http.upstream)
        } else {
            format!("{}{upstream_path}?{upstream_query}", http.upstream)
        };
        let uri: hyper::Uri = match target.parse() {
            Ok(u) => u,
            Err(_) => return Err(full(StatusCode::BAD_REQUEST, "malformed request path\n")),
        };
        strip(&mut parts.headers, true);
        // The gateway's origin as the client addressed it, for the RetrieveURLs of a QIDO-RS answer:
        // the Host header's name and port; without a port there (dicomweb-client sends none), the
        // port of `[http] listen`.
        let origin_authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
            .map(|a| match a.port_u16() {
                Some(_) => a.as_str().to_string(),
                None if http.listen.port() == 443 => a.host().to_string(),
                None => format!("{}:{}", a.host(), http.listen.port()),
            });
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        parts.headers.insert(
            HeaderName::from_static("forwarded"),
            HeaderValue::from_static("proto=https"),
        );
        match &plan {
            Plan::Qido { .. } => {
                // The only answer the gateway can count.
                parts.headers.remove(header::ACCEPT);
                parts.headers.insert(
                    header::ACCEPT,
                    HeaderValue::from_static("application/dicom+json"),
                );
                parts.headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            Plan::Store { .. } => {
                parts.headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            _ => {}
        }
        parts.uri = uri;
        let upstream_req = Request::from_parts(parts, body);
        // The archive's answer comes after the whole request body: a STOW-RS upload gets the idle
        // timeout to arrive (a large study over a slow link), everything else `upstream_response`.
        let t = state.config.timeouts;
        let within = if ctx.method == Method::POST {
            t.idle.max(t.upstream_response)
        } else {
            t.upstream_response
        };
        let mut fields = plan_fields(&plan, &upstream_path);
        let answer = tokio::time::timeout(within, self.client.request(upstream_req)).await;
        let mut response = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                metrics()
                    .upstream_connect_failures
                    .get_or_create(&crate::metrics::UpstreamLabels {
                        upstream: http.upstream.clone(),
                    })
                    .inc();
                tracing::warn!(upstream = %http.upstream, reason = %e, "web: archive unreachable");
                fields.insert("reason".into(), json!("the archive is unreachable"));
                ctx.record(StatusCode::BAD_GATEWAY, fields);
                return Err(full(
                    StatusCode::BAD_GATEWAY,
                    "the archive is unreachable\n",
                ));
            }
            Err(_) => {
                tracing::warn!(upstream = %http.upstream, op = ctx.op, reason = "upstream_response timed out", "web: archive did not answer");
                fields.insert("reason".into(), json!("the archive did not answer in time"));
                ctx.record(StatusCode::GATEWAY_TIMEOUT, fields);
                return Err(full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the archive did not answer in time\n",
                ));
            }
        };
        strip(response.headers_mut(), false);
        let status = response.status();
        let unread =
            |r: Response<Incoming>| r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed());
        let bad_answer = |e: answer::AnswerError, mut fields: Map<String, Value>| {
            tracing::warn!(upstream = %http.upstream, op = ctx.op, reason = %e, "web: archive answer refused");
            fields.insert("reason".into(), json!(e.to_string()));
            ctx.record(StatusCode::BAD_GATEWAY, fields);
            full(StatusCode::BAD_GATEWAY, format!("{e}\n"))
        };
        let out = match plan {
            Plan::Qido { cap, .. } => {
                let authority = origin_authority
                    .clone()
                    .unwrap_or_else(|| http.listen.to_string());
                let origin = answer::Origin {
                    authority: &authority,
                    root: &http.dicomweb_path,
                };
                match answer::qido(response, http.max_query_response, cap, &origin).await {
                    Ok(counted) => {
                        if counted.truncated {
                            tracing::info!(peer = %peer, user = ?principal.user, op = "qido", relayed = cap, reason = "max_query_results reached", "QIDO-RS truncated");
                        }
                        fields.insert("matches".into(), json!(counted.matches));
                        fields.insert("truncated".into(), json!(counted.truncated));
                        counted.response
                    }
                    Err(e) => return Err(bad_answer(e, fields)),
                }
            }
            Plan::Store { .. } if status.is_success() => {
                match answer::stow(response, http.max_query_response).await {
                    Ok((r, stored)) => {
                        if let Some(s) = stored {
                            if !fields.contains_key("study_uid")
                                && let Some(study) = s.study
                            {
                                fields.insert("study_uid".into(), json!(study));
                            }
                            fields.insert("stored".into(), json!(s.stored));
                            fields.insert("failed".into(), json!(s.failed));
                        }
                        r
                    }
                    Err(e) => return Err(bad_answer(e, fields)),
                }
            }
            _ => unread(response),
        };
        metrics().operation(ctx.op, Some(if status.is_success() { 0 } else { 0xC000 }));
        ctx.record(status, fields);
        Ok(out)
    }
}

/// What the audit event of a request names, by route.
fn plan_fields(plan: &Plan, upstream_path: &str) -> Map<String, Value> {
    let mut f = Map::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            f.insert(k.into(), json!(v));
        }
    };
    match plan {
        Plan::Qido {
            qido, path_uids, ..
        } => {
            let uid = |tag| {
                qido.keys
                    .iter()
                    .take(*path_uids)
                    .find(|(t, _, _)| *t == tag)
                    .map(|(_, _, v)| v.as_str())
            };
            put(
                "study_uid",
                uid(dicom_dictionary_std::tags::STUDY_INSTANCE_UID),
            );
            put(
                "series_uid",
                uid(dicom_dictionary_std::tags::SERIES_INSTANCE_UID),
            );
            put("level", Some(route::level_name(qido.level)));
            f.insert("query".into(), Value::Object(qido.audit_keys(*path_uids)));
        }
        Plan::Retrieve(r) => {
            put("service", Some("wado-rs"));
            put("resource", Some(r.resource.name()));
            put("study_uid", Some(&r.study));
            put("series_uid", r.series.as_deref());
            put("sop_instance_uid", r.instance.as_deref());
            put("frames", r.frames.as_deref());
        }
        Plan::WadoUri(w) => {
            put("service", Some("wado-uri"));
            put("study_uid", w.study.as_deref());
            put("series_uid", w.series.as_deref());
            put("sop_instance_uid", w.object.as_deref());
        }
        Plan::Store { study } => {
            put("study_uid", study.as_deref());
        }
        Plan::Allowed => {}
    }
    f.insert("path".into(), json!(upstream_path));
    f
}

fn add_cors(r: &mut Response<Body>, origin: Option<&str>, preflight: bool) {
    let Some(origin) = origin else { return };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Warning, Content-Type, Content-Length, Retry-After"),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, Accept"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_forwarding_and_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("forwarded", "host=evil.example"),
            ("x-forwarded-host", "evil.example"),
            ("authorization", "Basic eDp5"),
            ("accept", "application/dicom+json"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip(&mut h, true);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn the_host_header_must_be_a_host() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_str(v).expect("value"));
            checked_host(&m).map(|h| h.is_some())
        };
        assert!(matches!(h("gateway.example:8443"), Ok(true)));
        assert!(matches!(h("[::1]:8443"), Ok(true)));
        for bad in [
            "a/b?c",
            "user@host",
            "",
            "host:port",
            "a b",
            "a;b",
            "a%2fb",
            "[::1",
            "a:99999",
        ] {
            assert!(h(bad).is_err(), "{bad}");
        }
        assert!(matches!(checked_host(&HeaderMap::new()), Ok(None)));
    }

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
