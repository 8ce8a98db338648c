//! The headers of a forwarded request and its answer: method overrides refused, hop-by-hop and
//! client-asserted headers stripped (RFC 9110 7.6.1), the Host header checked, the forwarding headers
//! set, and CORS on the way out.

use std::net::SocketAddr;

use hyper::Response;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::{Body, Plan, Refusal};
use crate::config::Http;

/// Headers that would make the archive run another method than the one the gateway judged
/// (Orthanc honours `X-HTTP-Method-Override` on POST).
pub(super) const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers (RFC 9110 7.6.1), the ones the request's `Connection` header names, and
/// headers about the client only the gateway may set: never forwarded as they came.
pub(super) fn strip(headers: &mut HeaderMap, from_client: bool) {
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
pub(super) fn checked_host(headers: &HeaderMap) -> Result<Option<HeaderValue>, Refusal> {
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

/// The headers of the request to the archive: the client's stripped, the checked Host kept, the
/// forwarding headers set, and what the plan needs to count the answer. Returns the gateway's origin
/// as the client addressed it, for the RetrieveURLs of a QIDO-RS answer: the Host header's name and
/// port; without a port there (dicomweb-client sends none), the port of `[http] listen`.
pub(super) fn forwarded(
    headers: &mut HeaderMap,
    host: Option<HeaderValue>,
    http: &Http,
    peer: SocketAddr,
    plan: &Plan,
) -> Option<String> {
    strip(headers, true);
    let origin_authority = host
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
        .map(|a| match a.port_u16() {
            Some(_) => a.as_str().to_string(),
            None if http.listen.port() == 443 => a.host().to_string(),
            None => format!("{}:{}", a.host(), http.listen.port()),
        });
    // Without the client's Host (HTTP/1.0 may omit it), the client would have the upstream's own
    // address put there, and the archive builds the URLs it answers (BulkDataURIs in metadata) from
    // it: the gateway's listen address instead (`localhost` when that is a wildcard).
    let host = host.or_else(|| {
        let authority = if http.listen.ip().is_unspecified() {
            format!("localhost:{}", http.listen.port())
        } else {
            http.listen.to_string()
        };
        HeaderValue::from_str(&authority).ok()
    });
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
    headers.insert(
        HeaderName::from_static("forwarded"),
        HeaderValue::from_static("proto=https"),
    );
    if let Plan::Qido { .. } = plan {
        // The only answer the gateway can count.
        headers.remove(header::ACCEPT);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/dicom+json"),
        );
    }
    // The answers the gateway reads (QIDO-RS counted, STOW-RS audited) come unencoded.
    if matches!(plan, Plan::Qido { .. } | Plan::Store { .. }) {
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    origin_authority
}

pub(super) fn add_cors(r: &mut Response<Body>, origin: Option<&str>, preflight: bool) {
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
}
