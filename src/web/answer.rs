//! The archive's answers the gateway reads: QIDO-RS matches (counted and cut at the result cap) and
//! STOW-RS results (for the audit trail). Everything else streams through unread.
//!
//! The cap only holds for an answer the gateway can count. So QIDO-RS is always asked for as
//! `application/dicom+json` with `Accept-Encoding: identity`, a client that accepts nothing else gets
//! 406, and a 2xx answer that is not an uncompressed JSON array is refused (502), never relayed uncounted.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

use super::Body;
use super::route::is_uid;

/// Does an `Accept` value (a list of media ranges) admit `application/dicom+json`?
pub fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
        });
        !refused
            && matches!(
                media.as_str(),
                "application/dicom+json" | "application/json" | "application/*" | "*/*"
            )
    })
}

/// The client's `Accept` headers, when they rule out the one answer the gateway can count.
pub fn qido_not_acceptable(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .collect();
    let joined = values.join(", ");
    (!values.is_empty() && !joined.trim().is_empty() && !accepts_json(&joined)).then_some(joined)
}

/// Why an answer the gateway must read is refused (502).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the archive's answer is larger than max_query_response ({0} bytes)")]
    TooLarge(usize),
    #[error("the archive's answer is content-encoded ({0:?}) although identity was asked for")]
    Encoded(String),
    #[error("the archive's query answer is {0:?}, not application/dicom+json")]
    NotJson(String),
    #[error("the archive's query answer is not a JSON array")]
    NotAnArray,
    #[error("reading the archive's answer: {0}")]
    Read(String),
}

fn media_type(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).map(|v| {
        v.to_str()
            .unwrap_or("\u{fffd}")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    matches!(
        media_type(headers, header::CONTENT_TYPE).as_deref(),
        Some("application/dicom+json" | "application/json")
    )
}

fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed()
}

async fn read(body: Incoming, max: usize) -> Result<Bytes, AnswerError> {
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AnswerError::TooLarge(max)),
        Err(e) => Err(AnswerError::Read(e.to_string())),
    }
}

/// A QIDO-RS answer, counted.
pub struct Counted {
    pub response: Response<Body>,
    /// Matches relayed (None when the archive's status was not a success).
    pub matches: Option<usize>,
    pub truncated: bool,
}

/// Where the RetrieveURLs of a QIDO-RS answer must point: the gateway, as the client reached it.
pub struct Origin<'a> {
    /// `host[:port]` the client addressed (its checked Host header, else the listen address).
    pub authority: &'a str,
    /// The DICOMweb root (`/dicom-web`; `""` for `/`), the same on the gateway and the archive.
    pub root: &'a str,
}

impl Origin<'_> {
    /// `url` on the gateway: an `http(s)://` URL whose path lies under the DICOMweb root becomes
    /// `https://{authority}{path}`. The archive builds them from its own scheme (`http`, whatever
    /// `X-Forwarded-Proto` says) and from its own address when it is configured with one; a viewer
    /// following either would go around the gateway or fail. Other values are left as they are.
    pub fn rewrite(&self, url: &str) -> Option<String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))?;
        let path = &rest[rest.find('/')?..];
        let under_root = self.root.is_empty()
            || path
                .strip_prefix(self.root)
                .is_some_and(|r| r.is_empty() || r.starts_with('/'));
        under_root.then(|| format!("https://{}{path}", self.authority))
    }

    /// Every RetrieveURL (0008,1190) of every match.
    fn rewrite_matches(&self, items: &mut [Value]) {
        for item in items {
            let Some(values) = item
                .get_mut("00081190")
                .and_then(|a| a.get_mut("Value"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for v in values {
                if let Some(url) = v.as_str().and_then(|u| self.rewrite(u)) {
                    *v = Value::String(url);
                }
            }
        }
    }
}

/// Read a QIDO-RS answer (at most `max` bytes) and relay at most `cap` of its matches, their
/// RetrieveURLs pointing at `origin`. An answer that is not a success is relayed as it is (an error
/// text, no matches).
pub async fn qido(
    response: Response<Incoming>,
    max: usize,
    cap: usize,
    origin: &Origin<'_>,
) -> Result<Counted, AnswerError> {
    if !response.status().is_success() {
        return Ok(Counted {
            response: response.map(|b| b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed()),
            matches: None,
            truncated: false,
        });
    }
    let (mut parts, body) = response.into_parts();
    if let Some(coding) = media_type(&parts.headers, header::CONTENT_ENCODING)
        && coding != "identity"
    {
        return Err(AnswerError::Encoded(coding));
    }
    let bytes = read(body, max).await?;
    let mut items = if bytes.iter().all(u8::is_ascii_whitespace) {
        Vec::new() // 204, or an empty 200: no matches
    } else if !is_json(&parts.headers) {
        let ct = media_type(&parts.headers, header::CONTENT_TYPE).unwrap_or_default();
        return Err(AnswerError::NotJson(ct));
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => items,
            _ => return Err(AnswerError::NotAnArray),
        }
    };
    let truncated = items.len() > cap;
    if truncated {
        items.truncate(cap);
        if let Ok(v) = HeaderValue::from_str(&format!(
            "299 pacsgate \"result cap of {cap} matches reached\""
        )) {
            parts.headers.insert(header::WARNING, v);
        }
    }
    let matches = items.len();
    origin.rewrite_matches(&mut items);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    let body = if parts.status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/dicom+json"),
        );
        Bytes::from(Value::Array(items).to_string())
    };
    Ok(Counted {
        response: Response::from_parts(parts, full_body(body)),
        matches: Some(matches),
        truncated,
    })
}

/// What a STOW-RS answer says was stored (PS3.18 10.5.3, Table 10.5.3-1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    pub study: Option<String>,
    /// ReferencedSOPSequence: the SOP Instance UIDs stored.
    pub stored: Vec<String>,
    /// FailedSOPSequence: the SOP Instance UIDs refused.
    pub failed: Vec<String>,
}

fn first_string<'a>(item: &'a Value, tag: &str) -> Option<&'a str> {
    item.get(tag)?.get("Value")?.get(0)?.as_str()
}

/// Read a STOW-RS answer when it is a JSON answer of a known length up to `max` bytes; otherwise it
/// streams through and the audit event has no instance list.
pub async fn stow(
    response: Response<Incoming>,
    max: usize,
) -> Result<(Response<Body>, Option<Stored>), AnswerError> {
    let readable = is_json(response.headers())
        && media_type(response.headers(), header::CONTENT_ENCODING).is_none_or(|c| c == "identity")
        && response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n <= max);
    if !readable {
        return Ok((
            response.map(|b| b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed()),
            None,
        ));
    }
    let (parts, body) = response.into_parts();
    let bytes = read(body, max).await?;
    let stored = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .map(|v| stored_in(&v));
    Ok((Response::from_parts(parts, full_body(bytes)), stored))
}

fn stored_in(answer: &Value) -> Stored {
    let uids = |seq: &str| -> Vec<String> {
        answer
            .get(seq)
            .and_then(|s| s.get("Value"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| first_string(i, "00081155"))
                    .filter(|u| is_uid(u))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    // The study's RetrieveURL ends in /studies/{uid}.
    let study = first_string(answer, "00081190")
        .and_then(|url| url.rsplit_once("/studies/"))
        .map(|(_, uid)| uid)
        .filter(|u| is_uid(u))
        .map(str::to_string);
    Stored {
        study,
        stored: uids("00081199"),
        failed: uids("00081198"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_json_answer_is_acceptable_for_qido() {
        for ok in [
            "application/dicom+json",
            "application/json",
            "*/*",
            "application/*",
            "text/html, application/dicom+json;q=0.5",
            "Application/DICOM+JSON; charset=utf-8",
        ] {
            assert!(accepts_json(ok), "{ok}");
        }
        for refused in [
            "application/dicom+xml",
            "multipart/related; type=\"application/dicom+xml\"",
            "multipart/related; type=\"application/dicom+json\"",
            "application/dicom+json;q=0",
            "text/html",
            "",
        ] {
            assert!(!accepts_json(refused), "{refused}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(qido_not_acceptable(&h), None);
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/dicom+xml"),
        );
        assert!(qido_not_acceptable(&h).is_some());
        h.append(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(qido_not_acceptable(&h), None);
    }

    #[test]
    fn retrieve_urls_point_at_the_gateway() {
        let o = Origin {
            authority: "pacs-gw.example.org:8443",
            root: "/dicom-web",
        };
        for (from, to) in [
            (
                "http://pacs-gw.example.org:8443/dicom-web/studies/1.2.3",
                Some("https://pacs-gw.example.org:8443/dicom-web/studies/1.2.3"),
            ),
            (
                "http://10.0.0.20:8042/dicom-web/studies/1.2/series/1.3",
                Some("https://pacs-gw.example.org:8443/dicom-web/studies/1.2/series/1.3"),
            ),
            (
                "http://10.0.0.20:8042/dicom-web",
                Some("https://pacs-gw.example.org:8443/dicom-web"),
            ),
            ("http://10.0.0.20:8042/dicom-webx/studies/1", None),
            ("http://10.0.0.20:8042/app/explorer.html", None),
            ("urn:oid:1.2.3", None),
            ("http://host-without-path", None),
        ] {
            assert_eq!(o.rewrite(from).as_deref(), to, "{from}");
        }
        let root = Origin {
            authority: "[::1]:8443",
            root: "",
        };
        assert_eq!(
            root.rewrite("http://127.0.0.1:8042/studies/1").as_deref(),
            Some("https://[::1]:8443/studies/1")
        );
        let mut items = vec![serde_json::json!({
            "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
            "00081190": {"vr": "UR", "Value": ["http://pacs-gw.example.org:8443/dicom-web/studies/1.2.3"]}
        })];
        o.rewrite_matches(&mut items);
        assert_eq!(
            items[0]["00081190"]["Value"][0],
            "https://pacs-gw.example.org:8443/dicom-web/studies/1.2.3"
        );
    }

    #[test]
    fn a_stow_answer_names_what_was_stored() {
        let answer = serde_json::json!({
            "00081190": {"vr": "UR", "Value": ["http://archive/dicom-web/studies/1.2.3"]},
            "00081199": {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                 "00081155": {"vr": "UI", "Value": ["1.2.3.4"]}},
                {"00081155": {"vr": "UI", "Value": ["not a uid"]}}
            ]},
            "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.5"]}}]}
        });
        assert_eq!(
            stored_in(&answer),
            Stored {
                study: Some("1.2.3".into()),
                stored: vec!["1.2.3.4".into()],
                failed: vec!["1.2.3.5".into()],
            }
        );
    }
}
