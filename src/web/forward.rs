//! One authenticated request's phases, each a step: judge the request as the archive would read it,
//! check the user's roles and rates, plan the route (query string decoded once and rebuilt), forward
//! what was judged, and read the archive's answer where the gateway must count it.

use std::net::SocketAddr;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::headers::{METHOD_OVERRIDES, checked_host, forwarded, strip};
use super::path::Path;
use super::query::{self, Qido, WadoUri};
use super::route::{self, Route, classify};
use super::{Body, BoxError, Ctx, Door, Plan, Refusal, answer, full};
use crate::auth::Principal;
use crate::config::{Http, Operation};
use crate::gateway::State;
use crate::metrics::metrics;
use crate::policy::Grants;

/// A request as the archive would read it: path, Host, route and the operation it needs.
struct Judged {
    path: Path,
    host: Option<HeaderValue>,
    route: Route,
    /// The request's `op` in its log lines and audit events: `qido`, `wado`, `stow` or `http`.
    name: &'static str,
    op: Option<Operation>,
}

impl Door {
    /// The phases of an authenticated request; `Err` is an answer the archive never saw (or a failure).
    pub(super) async fn authorize_and_forward(
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
        let judged =
            judge(http, &ctx.method, &parts.uri, &parts.headers).map_err(|e| ctx.refuse(e))?;
        ctx.op = judged.name;

        // Phase: the user's roles and rates.
        let grants = Grants::for_roles(&state.config, &principal.roles);
        if let Some(op) = judged.op
            && !grants.allows(op)
        {
            return Err(ctx.refuse(Refusal::NotAuthorized(op.name())));
        }

        // Phase `request_slot`: a place among this user's requests in flight, now or after a
        // bounded wait, held until the answer is sent.
        let limit = http.max_requests_per_user;
        let wait = state.config.timeouts.upstream_response;
        let slot = self
            .in_flight
            .take(&principal.user, limit, wait)
            .await
            .ok_or_else(|| ctx.refuse(Refusal::InFlight(limit)))?;

        // Phase: the query string, decoded once and rebuilt.
        let pairs = query::decode(parts.uri.query()).map_err(|e| ctx.refuse(e.into()))?;
        let (plan, upstream_query) =
            plan(&ctx, &grants, judged.route, pairs, &parts.headers).map_err(|e| ctx.refuse(e))?;

        // Phase: forward what was judged: rebuilt path and query, credentials stripped, body streamed.
        let upstream_path = judged.path.upstream();
        let target = if upstream_query.is_empty() {
            format!("{}{upstream_path}", http.upstream)
        } else {
            format!("{}{upstream_path}?{upstream_query}", http.upstream)
        };
        let uri: hyper::Uri = match target.parse() {
            Ok(u) => u,
            Err(_) => return Err(full(StatusCode::BAD_REQUEST, "malformed request path\n")),
        };
        let origin_authority = forwarded(&mut parts.headers, judged.host, http, peer, &plan);
        parts.uri = uri;
        let mut fields = plan_fields(&plan, &upstream_path);
        let response = self
            .send(&ctx, http, Request::from_parts(parts, body), &mut fields)
            .await?;

        // Phase: the archive's answer, counted where the plan says.
        let answer = read_answer(&ctx, http, response, plan, fields, origin_authority).await?;
        Ok(answer.map(|body| super::inflight::WithSlot { body, _slot: slot }.boxed()))
    }

    /// The request to the archive, within its phase's timeout. The archive's answer comes after the
    /// whole request body: a STOW-RS upload gets the idle timeout to arrive (a large study over a
    /// slow link), everything else `upstream_response`.
    async fn send(
        &self,
        ctx: &Ctx<'_>,
        http: &Http,
        upstream_req: Request<Incoming>,
        fields: &mut Map<String, Value>,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let t = ctx.state.config.timeouts;
        let within = if ctx.method == hyper::Method::POST {
            t.idle.max(t.upstream_response)
        } else {
            t.upstream_response
        };
        let answer = tokio::time::timeout(within, self.client.request(upstream_req)).await;
        match answer {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                metrics()
                    .upstream_connect_failures
                    .get_or_create(&crate::metrics::UpstreamLabels {
                        upstream: http.upstream.clone(),
                    })
                    .inc();
                tracing::warn!(target: crate::logfmt::targets::WEB, upstream = %http.upstream, reason = %e, "web: archive unreachable");
                fields.insert("reason".into(), json!("the archive is unreachable"));
                ctx.record(StatusCode::BAD_GATEWAY, std::mem::take(fields));
                Err(full(
                    StatusCode::BAD_GATEWAY,
                    "the archive is unreachable\n",
                ))
            }
            Err(_) => {
                tracing::warn!(target: crate::logfmt::targets::WEB, upstream = %http.upstream, op = ctx.op, reason = "upstream_response timed out", "web: archive did not answer");
                fields.insert("reason".into(), json!("the archive did not answer in time"));
                ctx.record(StatusCode::GATEWAY_TIMEOUT, std::mem::take(fields));
                Err(full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the archive did not answer in time\n",
                ))
            }
        }
    }
}

/// The request as the archive would read it: a clean path, one Host, no method override, a route.
fn judge(
    http: &Http,
    method: &hyper::Method,
    uri: &hyper::Uri,
    headers: &HeaderMap,
) -> Result<Judged, Refusal> {
    let path = Path::of(uri)?;
    let host = checked_host(headers)?;
    if let Some(name) = METHOD_OVERRIDES
        .into_iter()
        .find(|n| headers.contains_key(*n))
    {
        return Err(Refusal::MethodOverride(name));
    }
    let route = classify(http, method, &path)?;
    let (name, op) = match &route {
        Route::Query { .. } => ("qido", Some(Operation::Find)),
        Route::Retrieve(_) | Route::WadoUri => ("wado", Some(Operation::Get)),
        Route::Store { .. } => ("stow", Some(Operation::Store)),
        Route::Allowed => ("http", None),
    };
    Ok(Judged {
        path,
        host,
        route,
        name,
        op,
    })
}

/// What to ask the archive by route, and the query string to ask it with: the QIDO-RS guard, the
/// query and retrieval rates, the result cap.
fn plan(
    ctx: &Ctx<'_>,
    grants: &Grants,
    route: Route,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<(Plan, String), Refusal> {
    let limits = &ctx.state.config.limits;
    let rates = &ctx.state.limiter.rates;
    let user = &ctx.principal.user;
    let retry = |bucket: crate::config::Rate| (60 / u64::from(bucket.per_minute.max(1))).max(1);
    Ok(match route {
        Route::Query { level, uids } => {
            if let Some(accept) = answer::qido_not_acceptable(headers) {
                return Err(Refusal::NotAcceptable(accept));
            }
            let qido = Qido::parse(level, &uids, pairs)?;
            if !grants.unrestricted_qido()
                && let Err(reason) = qido.guard(grants.query_min_chars)
            {
                return Err(Refusal::Guard(reason));
            }
            if !rates.queries.allow(user) {
                return Err(Refusal::Rate {
                    what: "query",
                    retry: retry(limits.queries),
                });
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
            let q = query::plain(&pairs)?;
            if r.whole() && !rates.retrievals.allow(user) {
                return Err(Refusal::Rate {
                    what: "retrieval",
                    retry: retry(limits.retrievals),
                });
            }
            (Plan::Retrieve(r), q)
        }
        Route::WadoUri => {
            let (w, q) = WadoUri::parse(&pairs)?;
            (Plan::WadoUri(w), q)
        }
        Route::Store { study } => {
            let q = query::plain(&pairs)?;
            (Plan::Store { study }, q)
        }
        Route::Allowed => {
            let q = query::plain(&pairs)?;
            (Plan::Allowed, q)
        }
    })
}

/// The archive's answer, its headers stripped: QIDO-RS counted and capped (RetrieveURLs pointed at
/// the gateway), a successful STOW-RS read for the audit, everything else streamed unread.
async fn read_answer(
    ctx: &Ctx<'_>,
    http: &Http,
    mut response: Response<Incoming>,
    plan: Plan,
    mut fields: Map<String, Value>,
    origin_authority: Option<String>,
) -> Result<Response<Body>, Response<Body>> {
    strip(response.headers_mut(), false);
    let status = response.status();
    let unread =
        |r: Response<Incoming>| r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed());
    let bad_answer = |e: answer::AnswerError, mut fields: Map<String, Value>| {
        tracing::warn!(target: crate::logfmt::targets::WEB, upstream = %http.upstream, op = ctx.op, reason = %e, "web: archive answer refused");
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
                        tracing::info!(target: crate::logfmt::targets::WEB, peer = %ctx.peer, user = ?ctx.principal.user, op = "qido", relayed = cap, reason = "max_query_results reached", "QIDO-RS truncated");
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
