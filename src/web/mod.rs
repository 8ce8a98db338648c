//! The web door: an HTTPS reverse proxy in front of the archive's DICOMweb API, with the same users,
//! roles, limits and audit as the DIMSE side. Bodies stream both ways; only QIDO-RS answers are read
//! (bounded) to enforce the result cap.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::auth::{AuthFailure, Principal};
use crate::config::{Http, Operation};
use crate::metrics::metrics;
use crate::policy::{Grants, query_guard};
use crate::server::{Gateway, State};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;
type Upstream = Client<HttpConnector, Incoming>;

/// Successful HTTP Basic logins are remembered this long, so a viewer's hundreds of requests do not
/// each cost an argon2 computation. Keyed by a salted SHA-256 of user and password, never the password.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(60);
const BASIC_CACHE_MAX: usize = 10_000;
/// The longest one HTTPS connection may live (a slow 500 MB retrieve fits).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);

/// What a request is, once its path and method are classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// QIDO-RS; the UIDs named in the path, as (keyword, value).
    Query { uids: Vec<(&'static str, String)> },
    /// WADO-RS or WADO-URI; `whole` for study- or series-level retrieves (rate limited).
    Retrieve { whole: bool },
    /// STOW-RS.
    Store,
    /// A path in `allow_paths`.
    Allowed,
    /// Anything else, with the reason.
    Denied(&'static str),
}

/// Classify a request path under the configured DICOMweb and WADO-URI paths.
pub fn classify(http: &Http, method: &Method, path: &str) -> Route {
    if let Some(rest) = path.strip_prefix(&http.dicomweb_path)
        && (rest.is_empty() || rest.starts_with('/'))
    {
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        if segs.iter().any(|s| *s == ".." || *s == ".") {
            return Route::Denied("path not allowed");
        }
        let uid = |i: usize| segs.get(i).map(|s| s.to_string()).unwrap_or_default();
        return match (method, segs.as_slice()) {
            (&Method::GET, ["studies" | "series" | "instances"]) => Route::Query { uids: vec![] },
            (&Method::GET, ["studies", _, "series" | "instances"]) => Route::Query {
                uids: vec![("StudyInstanceUID", uid(1))],
            },
            (&Method::GET, ["studies", _, "series", _, "instances"]) => Route::Query {
                uids: vec![("StudyInstanceUID", uid(1)), ("SeriesInstanceUID", uid(3))],
            },
            (&Method::GET, ["studies", _]) | (&Method::GET, ["studies", _, "series", _]) => {
                Route::Retrieve { whole: true }
            }
            (&Method::GET, ["studies", ..]) => Route::Retrieve { whole: false },
            (&Method::POST, ["studies"]) | (&Method::POST, ["studies", _]) => Route::Store,
            _ => Route::Denied("not a DICOMweb service the gateway passes"),
        };
    }
    if let Some(wado) = &http.wado_uri_path
        && path == wado
        && method == Method::GET
    {
        return Route::Retrieve { whole: false };
    }
    if http
        .allow_paths
        .iter()
        .any(|p| path == p || path.starts_with(&format!("{p}/")))
    {
        return Route::Allowed;
    }
    Route::Denied("path not allowed through the gateway")
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
    r
}

fn unauthorized(reason: &str) -> Response<Body> {
    let mut r = full(
        StatusCode::UNAUTHORIZED,
        format!("authentication required: {reason}\n"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            "Bearer realm=\"pacsgate\", Basic realm=\"pacsgate\", charset=\"UTF-8\"",
        ),
    );
    r
}

fn too_many(reason: &str, retry_after: u64) -> Response<Body> {
    let mut r = full(StatusCode::TOO_MANY_REQUESTS, format!("{reason}\n"));
    if let Ok(v) = HeaderValue::from_str(&retry_after.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and credentials: never forwarded.
fn strip(headers: &mut HeaderMap, credentials: bool) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    if credentials {
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::COOKIE);
    }
}

/// The shared state of the web door.
pub struct Door {
    gateway: Gateway,
    client: Upstream,
    basic_salt: [u8; 16],
    basic_cache: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

/// Serve HTTPS on `listener` until the task is dropped.
pub async fn serve(gateway: Gateway, listener: TcpListener) {
    let mut salt = [0u8; 16];
    {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        OsRng.fill_bytes(&mut salt);
    }
    let door = Arc::new(Door {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
        gateway,
        basic_salt: salt,
        basic_cache: Mutex::new(HashMap::new()),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(reason = %e, "web: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tasks = door.gateway.tasks.clone();
        let door = door.clone();
        tasks.spawn(async move { connection(door, stream, peer).await });
    }
}

async fn connection(door: Arc<Door>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let state = door.gateway.current();
    let t = state.config.timeouts;
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(t.tls_handshake, state.acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics().tls_handshake_failures.inc();
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = %e, "web connection");
            return;
        }
        Err(_) => {
            metrics().tls_handshake_failures.inc();
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = "TLS handshake timed out", "web connection");
            return;
        }
    };
    let names: Arc<Vec<String>> = Arc::new(
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| crate::auth::certificate::names(leaf))
            .unwrap_or_default(),
    );
    let service = hyper::service::service_fn(move |req| {
        let door = door.clone();
        let names = names.clone();
        async move { Ok::<_, Infallible>(door.handle(req, peer, &names).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(t.association_request)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service);
    // A quiet keep-alive connection is closed by `header_read_timeout`; this bounds a connection whose
    // peer stops reading a response (or trickles forever) without cutting long downloads short.
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
}

impl Door {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        names: &[String],
    ) -> Response<Body> {
        let state = self.gateway.current();
        let Some(http) = state.config.http.clone() else {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                "the web door is not configured\n",
            );
        };
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_string);
        let cors = origin.filter(|o| http.cors_origins.iter().any(|a| a == "*" || a == o));
        if method == Method::OPTIONS && cors.is_some() {
            let mut r = full(StatusCode::NO_CONTENT, "");
            add_cors(&mut r, cors.as_deref(), true);
            return r;
        }
        let mut response = match self
            .authorize_and_forward(&state, &http, req, peer, names, started)
            .await
        {
            Ok(r) | Err(r) => r,
        };
        add_cors(&mut response, cors.as_deref(), false);
        tracing::debug!(peer = %peer, method = %method, path = %path, status = response.status().as_u16(), "web request");
        response
    }

    async fn authenticate(
        &self,
        state: &State,
        req: &Request<Incoming>,
        peer: SocketAddr,
        names: &[String],
    ) -> Result<Principal, Response<Body>> {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let address = peer.ip();
        let limiter = &state.limiter;
        if let Err(locked) = limiter.check_locked(None, address) {
            return Err(too_many(
                &locked.to_string(),
                state.config.limits.lockout.as_secs(),
            ));
        }
        let result: Result<Principal, AuthFailure> = match auth {
            Some(a)
                if a.get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
                    && a.len() > 7 =>
            {
                state.authenticator.token(a[7..].trim())
            }
            Some(a)
                if a.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("basic ")) && a.len() > 6 =>
            {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(a[6..].trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':'))
                else {
                    return Err(unauthorized("malformed Basic credentials"));
                };
                if let Err(locked) = limiter.check_locked(Some(user), address) {
                    return Err(too_many(
                        &locked.to_string(),
                        state.config.limits.lockout.as_secs(),
                    ));
                }
                let key = self.basic_key(user, password);
                if let Some(p) = self.cached(&key) {
                    return Ok(p);
                }
                let result = state
                    .authenticator
                    .password(user, password.as_bytes().to_vec())
                    .await;
                if let Ok(p) = &result {
                    self.remember(key, p.clone());
                }
                result
            }
            Some(_) => {
                return Err(unauthorized(
                    "unsupported Authorization scheme (use Bearer or Basic)",
                ));
            }
            None if !names.is_empty() => state.authenticator.certificate(names),
            None => return Err(unauthorized("no credentials")),
        };
        match result {
            Ok(p) => {
                limiter.login_succeeded(&p.user, address);
                Ok(p)
            }
            Err(failure) => {
                let reason = failure.error.to_string();
                state.audit.record(
                    "login.failed",
                    json!({"peer": peer.to_string(), "user": failure.user, "method": failure.method.map(|m| m.name()),
                           "via": "http", "reason": reason}),
                );
                for lock in limiter.login_failed(failure.user.as_deref(), address) {
                    state.audit.record(
                        "lockout",
                        json!({"peer": peer.to_string(), "user": failure.user, "scope": format!("{lock:?}"),
                               "seconds": state.config.limits.lockout.as_secs(), "rule": "failed_logins", "via": "http"}),
                    );
                    tracing::warn!(peer = %peer, user = failure.user.as_deref().unwrap_or("-"), lock = ?lock, reason = "failed logins", "lockout");
                }
                metrics().refusal("not_authenticated");
                tracing::info!(peer = %peer, user = failure.user.as_deref().unwrap_or("-"), outcome = "rejected", reason = %reason, "web request");
                Err(unauthorized(&reason))
            }
        }
    }

    fn basic_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.basic_salt);
        h.update(user.as_bytes());
        h.update([0u8]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Principal> {
        let cache = self.basic_cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < BASIC_CACHE_TTL)
            .map(|(p, _)| p.clone())
    }

    fn remember(&self, key: [u8; 32], p: Principal) {
        let mut cache = self.basic_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= BASIC_CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < BASIC_CACHE_TTL);
            if cache.len() >= BASIC_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (p, Instant::now()));
    }

    async fn authorize_and_forward(
        &self,
        state: &State,
        http: &Http,
        req: Request<Incoming>,
        peer: SocketAddr,
        names: &[String],
        started: Instant,
    ) -> Result<Response<Body>, Response<Body>> {
        let principal = self.authenticate(state, &req, peer, names).await?;
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let route = classify(http, &method, &path);
        let grants = Grants::for_roles(&state.config, &principal.roles);
        let (op, name) = match &route {
            Route::Query { .. } => (Some(Operation::Find), "qido"),
            Route::Retrieve { .. } => (Some(Operation::Get), "wado"),
            Route::Store => (Some(Operation::Store), "stow"),
            Route::Allowed => (None, "http"),
            Route::Denied(_) => (None, "denied"),
        };
        // Over a rate limit: when the user's bucket for this kind of request has a cell again.
        let limits = &state.config.limits;
        let bucket = if matches!(route, Route::Query { .. }) {
            limits.queries
        } else {
            limits.retrievals
        };
        let retry = (60 / u64::from(bucket.per_minute.max(1))).max(1);
        let refuse = |status: StatusCode, rule: &'static str, reason: String| {
            metrics().refusal(rule);
            state.audit.record(
                "refused",
                json!({"peer": peer.to_string(), "user": principal.user, "via": "http", "method": method.as_str(),
                       "path": path, "op": name, "status": status.as_u16(), "rule": rule, "reason": reason}),
            );
            tracing::info!(peer = %peer, user = %principal.user, op = name, path = %path, status = status.as_u16(), rule, reason = %reason, "refused");
            let body = format!("{reason}\n");
            if status == StatusCode::TOO_MANY_REQUESTS {
                too_many(&reason, retry)
            } else {
                full(status, body)
            }
        };
        if let Route::Denied(reason) = route {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "path_not_allowed",
                reason.to_string(),
            ));
        }
        if let Some(op) = op
            && !grants.allows(op)
        {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not_authorized",
                format!("{} is not allowed for this user", op.name()),
            ));
        }
        let mut query_keys = None;
        let mut cap = None;
        let mut uri_query = req.uri().query().map(str::to_string);
        match &route {
            Route::Query { uids } => {
                if !state.limiter.rates.queries.allow(&principal.user) {
                    return Err(refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit",
                        "query rate limit reached".into(),
                    ));
                }
                let mut params: Vec<(String, String)> =
                    form_urlencoded::parse(uri_query.as_deref().unwrap_or("").as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect();
                // Query parameters and the UIDs in the path, by tag (the path wins).
                let keys: HashMap<dicom_core::Tag, String> = params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain(uids.iter().map(|(k, v)| (*k, v.as_str())))
                    .filter_map(|(k, v)| Some((tag_of(k)?, v.to_string())))
                    .collect();
                if !grants.unrestricted_queries
                    && let Err(reason) = query_guard::check_values(
                        |t| keys.get(&t).cloned().unwrap_or_default(),
                        grants.query_min_chars,
                    )
                {
                    return Err(refuse(StatusCode::FORBIDDEN, "query_guard", reason));
                }
                // The result cap: ask the archive for one more than the cap (so a cut can be told
                // apart from an exact fit), and cut what it sends beyond the cap. The other
                // parameters go on byte for byte.
                let asked = params
                    .iter()
                    .find(|(k, _)| k == "limit")
                    .and_then(|(_, v)| v.parse::<u32>().ok());
                let limit = asked.map_or(grants.max_query_results, |a| {
                    a.min(grants.max_query_results)
                });
                let mut kept: Vec<&str> = uri_query
                    .as_deref()
                    .unwrap_or("")
                    .split('&')
                    .filter(|p| !p.is_empty() && !p.starts_with("limit="))
                    .collect();
                let limit_param = format!("limit={}", limit.saturating_add(1));
                kept.push(&limit_param);
                uri_query = Some(kept.join("&"));
                cap = Some(limit as usize);
                params.retain(|(k, _)| k != "limit");
                query_keys = Some(params.into_iter().collect::<HashMap<_, _>>());
            }
            Route::Retrieve { whole: true }
                if !state.limiter.rates.retrievals.allow(&principal.user) =>
            {
                return Err(refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit",
                    "retrieval rate limit reached".into(),
                ));
            }
            _ => {}
        }

        // Forward: credentials stripped, body streamed.
        let (mut parts, body) = req.into_parts();
        let pq = match &uri_query {
            Some(q) if !q.is_empty() => format!("{path}?{q}"),
            _ => path.clone(),
        };
        let uri: hyper::Uri = match format!("{}{}", http.upstream, pq).parse() {
            Ok(u) => u,
            Err(_) => return Err(full(StatusCode::BAD_REQUEST, "malformed request path\n")),
        };
        strip(&mut parts.headers, true);
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        parts.uri = uri;
        let upstream_req = Request::from_parts(parts, body);
        // The archive's answer comes after the whole request body: a STOW-RS upload gets the idle
        // timeout to arrive (a large study over a slow link), everything else `upstream_response`.
        let t = state.config.timeouts;
        let within = if method == Method::POST {
            t.idle.max(t.upstream_response)
        } else {
            t.upstream_response
        };
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
                return Err(full(
                    StatusCode::BAD_GATEWAY,
                    "the archive is unreachable\n",
                ));
            }
            Err(_) => {
                return Err(full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the archive did not answer in time\n",
                ));
            }
        };
        strip(response.headers_mut(), false);
        let status = response.status();
        let mut matches = None;
        let mut truncated = false;
        let out: Response<Body> = if let (Some(cap), true) = (cap, status.is_success()) {
            // QIDO-RS answers are small: read (bounded), cut at the cap, re-serialise.
            let (mut rparts, rbody) = response.into_parts();
            let collected = Limited::new(rbody, http.max_query_response).collect().await;
            let bytes = match collected {
                Ok(c) => c.to_bytes(),
                Err(_) => {
                    return Err(full(
                        StatusCode::BAD_GATEWAY,
                        "the archive's query answer is too large\n",
                    ));
                }
            };
            let body = match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Array(mut items)) => {
                    if items.len() > cap {
                        items.truncate(cap);
                        truncated = true;
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            "299 pacsgate \"result cap of {cap} matches reached\""
                        )) {
                            rparts.headers.insert(header::WARNING, v);
                        }
                    }
                    matches = Some(items.len());
                    Bytes::from(Value::Array(items).to_string())
                }
                _ => bytes,
            };
            rparts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(rparts, Full::new(body).map_err(|e| match e {}).boxed())
        } else {
            response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
        };
        if truncated {
            tracing::info!(peer = %peer, user = %principal.user, op = "qido", relayed = cap.unwrap_or(0), reason = "max_query_results reached", "QIDO-RS truncated");
        }
        metrics().operation(name, Some(if status.is_success() { 0 } else { 0xC000 }));
        state.audit.record(
            name,
            json!({"peer": peer.to_string(), "user": principal.user, "method": method.as_str(), "via": "http",
                   "path": path, "status": status.as_u16(), "query": query_keys, "matches": matches,
                   "truncated": truncated, "duration_ms": started.elapsed().as_millis() as u64}),
        );
        Ok(out)
    }
}

/// A QIDO-RS key: a keyword (`PatientName`) or a tag (`00100010`).
fn tag_of(key: &str) -> Option<dicom_core::Tag> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    if key.len() == 8 && key.chars().all(|c| c.is_ascii_hexdigit()) {
        let group = u16::from_str_radix(&key[..4], 16).ok()?;
        let element = u16::from_str_radix(&key[4..], 16).ok()?;
        return Some(dicom_core::Tag(group, element));
    }
    dicom_dictionary_std::StandardDataDictionary
        .by_name(key)
        .and_then(|e| match e.tag_range() {
            dicom_core::dictionary::TagRange::Single(t) => Some(t),
            _ => None,
        })
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

    fn http() -> Http {
        Http {
            listen: "127.0.0.1:0".parse().expect("addr"),
            upstream: "http://127.0.0.1:8042".into(),
            dicomweb_path: "/dicom-web".into(),
            wado_uri_path: Some("/wado".into()),
            allow_paths: vec!["/system".into()],
            cors_origins: vec![],
            max_query_response: 1 << 20,
        }
    }

    #[test]
    fn paths_are_classified_and_everything_else_is_denied() {
        let h = http();
        let get = Method::GET;
        assert_eq!(
            classify(&h, &get, "/dicom-web/studies"),
            Route::Query { uids: vec![] }
        );
        assert_eq!(
            classify(&h, &get, "/dicom-web/studies/1.2/series"),
            Route::Query {
                uids: vec![("StudyInstanceUID", "1.2".into())]
            }
        );
        assert_eq!(
            classify(&h, &get, "/dicom-web/studies/1.2"),
            Route::Retrieve { whole: true }
        );
        assert_eq!(
            classify(&h, &get, "/dicom-web/studies/1.2/series/3/instances/4"),
            Route::Retrieve { whole: false }
        );
        assert_eq!(
            classify(&h, &get, "/dicom-web/studies/1.2/metadata"),
            Route::Retrieve { whole: false }
        );
        assert_eq!(
            classify(&h, &Method::POST, "/dicom-web/studies"),
            Route::Store
        );
        assert_eq!(
            classify(&h, &get, "/wado"),
            Route::Retrieve { whole: false }
        );
        assert_eq!(classify(&h, &get, "/system"), Route::Allowed);
        for denied in [
            "/app/explorer.html",
            "/instances",
            "/dicom-webx/studies",
            "/tools/find",
            "/dicom-web/../instances",
            "/systemx",
        ] {
            assert!(
                matches!(classify(&h, &get, denied), Route::Denied(_)),
                "{denied}"
            );
        }
        assert!(matches!(
            classify(&h, &Method::DELETE, "/dicom-web/studies/1.2"),
            Route::Denied(_)
        ));
    }

    #[test]
    fn qido_keys_are_keywords_or_tags() {
        assert_eq!(tag_of("PatientName"), Some(dicom_core::Tag(0x0010, 0x0010)));
        assert_eq!(tag_of("00100020"), Some(dicom_core::Tag(0x0010, 0x0020)));
        assert_eq!(tag_of("limit"), None);
    }
}
