//! Query strings: decoded once, checked, and rebuilt for the archive (never forwarded as they came).
//!
//! Every pair is split at `&` and its first `=`, `+` is a space, and `%XX` is decoded once; a
//! malformed escape, a value that is not UTF-8 or holds a control character, or a key that is not
//! letters and digits is refused. A key the gateway reads may appear once: archives disagree on which
//! copy of a repeated key counts (Orthanc takes the last), so two `limit`s, or `PatientID` next to
//! `00100020`, are refused rather than guessed at.
//!
//! The rebuilt query keeps the characters that every archive reads the same way as they are
//! (letters, digits, `-._~*?^\,/:@!$()'`) and percent-encodes the rest. Orthanc does not decode query
//! values at all (`PatientID=P%31` is not `P1` to it), so an archive that decodes sees exactly what the
//! gateway judged, and one that does not sees `%XX` literally: never a wildcard the gateway did not see.

use std::collections::HashMap;

use dicom_core::Tag;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, TagRange};
use dicom_dictionary_std::StandardDataDictionary;

use super::route::{Level, is_uid};
use crate::policy::query_guard;

/// More pairs than any real client sends.
const MAX_PAIRS: usize = 256;

/// Why a query string is refused: 400, or 406 for an `accept` the gateway cannot count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("malformed percent-encoding in the query string")]
    BadEscape,
    #[error("the query string is not UTF-8 once decoded")]
    NotUtf8,
    #[error("query parameter {0:?} holds a control character")]
    Control(String),
    #[error("query parameter name {0:?} is not letters and digits")]
    BadKey(String),
    #[error("query parameter {0:?} given twice (archives disagree on which copy counts)")]
    Duplicate(String),
    #[error("query parameter {0:?} is not one the gateway passes for this service")]
    Unknown(String),
    #[error("query parameter {key:?}: {value:?} is not {expected}")]
    Value {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{key} is both in the path and in the query string")]
    AlsoInPath { key: &'static str },
    #[error("more than {MAX_PAIRS} query parameters")]
    TooMany,
    /// 406.
    #[error("accept={0:?}: QIDO-RS answers pass the gateway as application/dicom+json only")]
    NotAcceptable(String),
}

/// The decoded pairs of a query string, in order.
pub fn decode(raw: Option<&str>) -> Result<Vec<(String, String)>, QueryError> {
    let mut pairs = Vec::new();
    for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if pairs.len() == MAX_PAIRS {
            return Err(QueryError::TooMany);
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = unescape(k)?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(QueryError::BadKey(key));
        }
        let value = unescape(v)?;
        if value.chars().any(char::is_control) {
            return Err(QueryError::Control(key));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// `application/x-www-form-urlencoded` decoding, strict: `+` is a space, `%XX` a byte, and anything
/// else after a `%` is an error (not passed on literally, as lenient decoders do).
fn unescape(raw: &str) -> Result<String, QueryError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(QueryError::BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| QueryError::BadEscape)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(QueryError::BadEscape);
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| QueryError::BadEscape)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// The query string to forward: `key=value` pairs, values canonically encoded (see the module text).
pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~*?^\\,/:@!$()'".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// A query the gateway does not read (WADO-RS, STOW-RS, allowed paths): each key once, except
/// `includefield`, which PS3.18 lets repeat.
pub fn plain(pairs: &[(String, String)]) -> Result<String, QueryError> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in pairs {
        if k != "includefield" && !seen.insert(k.as_str()) {
            return Err(QueryError::Duplicate(k.clone()));
        }
    }
    Ok(encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
}

/// A QIDO-RS key: a keyword (`PatientName`, exactly as the dictionary spells it) or a tag (`00100010`).
pub fn tag_of(key: &str) -> Option<Tag> {
    if key.len() == 8 && key.bytes().all(|c| c.is_ascii_hexdigit()) {
        let group = u16::from_str_radix(&key[..4], 16).ok()?;
        let element = u16::from_str_radix(&key[4..], 16).ok()?;
        return Some(Tag(group, element));
    }
    StandardDataDictionary
        .by_name(key)
        .and_then(|e| match e.tag_range() {
            TagRange::Single(t) => Some(t),
            _ => None,
        })
}

fn is_uid_key(tag: Tag) -> bool {
    StandardDataDictionary
        .by_tag(tag)
        .and_then(|e| e.vr().exact())
        .is_some_and(|vr| vr == dicom_core::VR::UI)
}

/// The values of a QIDO-RS key: `,` separates them (PS3.18 8.3.4.1, and Orthanc), `\` too (DIMSE).
fn values(value: &str) -> impl Iterator<Item = &str> {
    value.split([',', '\\'])
}

/// A search parameter's number: 1 to 9 digits.
fn number(key: &str, value: &str) -> Result<u32, QueryError> {
    (!value.is_empty() && value.len() <= 9 && value.bytes().all(|b| b.is_ascii_digit()))
        .then(|| value.parse::<u32>().ok())
        .flatten()
        .ok_or_else(|| QueryError::Value {
            key: key.to_string(),
            value: value.to_string(),
            expected: "a number",
        })
}

/// A search parameter given at most once: an error when `given` already.
fn once(given: bool, key: &str) -> Result<(), QueryError> {
    if given {
        Err(QueryError::Duplicate(key.to_string()))
    } else {
        Ok(())
    }
}

/// A checked QIDO-RS search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qido {
    pub level: Level,
    /// Matching keys, path UIDs first: (tag, key as given, decoded value).
    pub keys: Vec<(Tag, String, String)>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
    pub fuzzymatching: Option<String>,
    pub includefield: Vec<String>,
}

impl Qido {
    /// Check the pairs of a QIDO-RS request whose path named `path_uids`.
    pub fn parse(
        level: Level,
        path_uids: &[(Tag, &'static str, String)],
        pairs: Vec<(String, String)>,
    ) -> Result<Qido, QueryError> {
        let mut q = Qido {
            level,
            keys: path_uids
                .iter()
                .map(|(t, k, v)| (*t, k.to_string(), v.clone()))
                .collect(),
            limit: None,
            offset: None,
            fuzzymatching: None,
            includefield: Vec::new(),
        };
        for (key, value) in pairs {
            q.add(path_uids, key, value)?;
        }
        Ok(q)
    }

    /// One pair of the query string: a parameter of the search, or a matching key.
    fn add(
        &mut self,
        path_uids: &[(Tag, &'static str, String)],
        key: String,
        value: String,
    ) -> Result<(), QueryError> {
        match key.as_str() {
            "limit" => {
                once(self.limit.is_some(), &key)?;
                self.limit = Some(number(&key, &value)?);
            }
            "offset" => {
                once(self.offset.is_some(), &key)?;
                self.offset = Some(number(&key, &value)?);
            }
            "fuzzymatching" => {
                once(self.fuzzymatching.is_some(), &key)?;
                if value != "true" && value != "false" {
                    return Err(QueryError::Value {
                        key,
                        value,
                        expected: "true or false",
                    });
                }
                self.fuzzymatching = Some(value);
            }
            "includefield" => {
                if !value.split(',').all(|f| f == "all" || tag_of(f).is_some()) {
                    return Err(QueryError::Value {
                        key,
                        value,
                        expected: "`all` or a list of keywords and tags",
                    });
                }
                self.includefield.push(value);
            }
            "accept" => {
                // PS3.18 8.3.3.1: a media type in the query; only the one the gateway counts.
                if !super::answer::accepts_json(&value) {
                    return Err(QueryError::NotAcceptable(value));
                }
            }
            _ => self.add_key(path_uids, key, value)?,
        }
        Ok(())
    }

    /// A matching key: a keyword or tag the dictionary knows, once, not also in the path, a UID
    /// key with UIDs only.
    fn add_key(
        &mut self,
        path_uids: &[(Tag, &'static str, String)],
        key: String,
        value: String,
    ) -> Result<(), QueryError> {
        let tag = tag_of(&key).ok_or_else(|| QueryError::Unknown(key.clone()))?;
        if let Some((_, k, _)) = path_uids.iter().find(|(t, _, _)| *t == tag) {
            return Err(QueryError::AlsoInPath { key: k });
        }
        if self.keys.iter().any(|(t, _, _)| *t == tag) {
            return Err(QueryError::Duplicate(key));
        }
        if is_uid_key(tag) && !value.is_empty() && !values(&value).all(is_uid) {
            return Err(QueryError::Value {
                key,
                value,
                expected: "a UID or a list of UIDs",
            });
        }
        self.keys.push((tag, key, value));
        Ok(())
    }

    /// The anti-enumeration guard (the DIMSE side's rule, at this search's level) over the decoded
    /// keys. QIDO-RS lists are `,`-separated (Orthanc matches `WEB1,*` as WEB1 or anything): the
    /// guard gets them as DICOM's `\`-separated values, so that it judges each of them.
    pub fn guard(&self, min_chars: usize) -> Result<&'static str, query_guard::GuardError> {
        let by_tag: HashMap<Tag, String> = self
            .keys
            .iter()
            .map(|(t, _, v)| (*t, values(v).collect::<Vec<_>>().join("\\")))
            .collect();
        query_guard::check_values(
            |t| by_tag.get(&t).cloned().unwrap_or_default(),
            self.level,
            min_chars,
        )
    }

    /// The query string for the archive, asking for at most `limit` matches.
    pub fn upstream(&self, limit: u32, path_uids: usize) -> String {
        let limit = limit.to_string();
        let offset = self.offset.map(|o| o.to_string());
        let pairs = self
            .keys
            .iter()
            .skip(path_uids)
            .map(|(_, k, v)| (k.as_str(), v.as_str()))
            .chain(
                self.includefield
                    .iter()
                    .map(|v| ("includefield", v.as_str())),
            )
            .chain(self.fuzzymatching.as_deref().map(|v| ("fuzzymatching", v)))
            .chain(offset.as_deref().map(|v| ("offset", v)))
            .chain(std::iter::once(("limit", limit.as_str())));
        encode(pairs)
    }

    /// The keys for the audit trail: keyword or tag as given, decoded value.
    pub fn audit_keys(&self, path_uids: usize) -> serde_json::Map<String, serde_json::Value> {
        self.keys
            .iter()
            .skip(path_uids)
            .map(|(_, k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect()
    }
}

/// The UIDs a WADO-URI request names (PS3.18 9.1.2.1), checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WadoUri {
    pub study: Option<String>,
    pub series: Option<String>,
    pub object: Option<String>,
}

/// The parameters of WADO-URI (PS3.18 9.1.2): the only ones passed, each once.
const WADO_URI_KEYS: [&str; 18] = [
    "requestType",
    "studyUID",
    "seriesUID",
    "objectUID",
    "contentType",
    "charset",
    "anonymize",
    "annotation",
    "rows",
    "columns",
    "region",
    "windowCenter",
    "windowWidth",
    "frameNumber",
    "imageQuality",
    "presentationUID",
    "presentationSeriesUID",
    "transferSyntax",
];

impl WadoUri {
    /// Check a WADO-URI query; returns the UIDs and the query string for the archive.
    pub fn parse(pairs: &[(String, String)]) -> Result<(WadoUri, String), QueryError> {
        let mut w = WadoUri::default();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in pairs {
            if !WADO_URI_KEYS.contains(&key.as_str()) {
                return Err(QueryError::Unknown(key.clone()));
            }
            if !seen.insert(key.as_str()) {
                return Err(QueryError::Duplicate(key.clone()));
            }
            let uid_key = matches!(
                key.as_str(),
                "studyUID"
                    | "seriesUID"
                    | "objectUID"
                    | "presentationUID"
                    | "presentationSeriesUID"
                    | "transferSyntax"
            );
            if uid_key && !is_uid(value) {
                return Err(QueryError::Value {
                    key: key.clone(),
                    value: value.clone(),
                    expected: "a UID",
                });
            }
            match key.as_str() {
                "studyUID" => w.study = Some(value.clone()),
                "seriesUID" => w.series = Some(value.clone()),
                "objectUID" => w.object = Some(value.clone()),
                _ => {}
            }
        }
        Ok((w, plain(pairs)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;

    fn pairs(raw: &str) -> Vec<(String, String)> {
        decode(Some(raw)).expect("decodes")
    }

    #[test]
    fn pairs_are_decoded_once_and_strictly() {
        assert_eq!(
            pairs("PatientName=DOE%5EJ*&%6Cimit=5&x=a+b&empty&&y="),
            [
                ("PatientName".to_string(), "DOE^J*".to_string()),
                ("limit".into(), "5".into()),
                ("x".into(), "a b".into()),
                ("empty".into(), "".into()),
                ("y".into(), "".into()),
            ]
        );
        assert_eq!(decode(Some("a=%zz")), Err(QueryError::BadEscape));
        assert_eq!(decode(Some("a=%2")), Err(QueryError::BadEscape));
        assert_eq!(decode(Some("a=%+1")), Err(QueryError::BadEscape));
        assert_eq!(decode(Some("a=%ff")), Err(QueryError::NotUtf8));
        assert_eq!(decode(Some("a=%c0%ae")), Err(QueryError::NotUtf8));
        assert_eq!(
            decode(Some("a=x%0Ay")),
            Err(QueryError::Control("a".into()))
        );
        assert_eq!(decode(Some("a.b=1")), Err(QueryError::BadKey("a.b".into())));
        assert_eq!(decode(Some("=1")), Err(QueryError::BadKey("".into())));
        assert_eq!(decode(None), Ok(vec![]));
        let many = "a=1&".repeat(MAX_PAIRS + 1);
        assert_eq!(decode(Some(&many)), Err(QueryError::TooMany));
    }

    #[test]
    fn the_forwarded_query_is_canonical() {
        assert_eq!(
            encode([
                ("PatientName", "DOE^J*"),
                ("x", "a b&c=d+e%f#g;h"),
                ("u", "1.2\\1.3,1.4"),
                ("n", "M\u{fc}LLER"),
            ]),
            "PatientName=DOE^J*&x=a%20b%26c%3Dd%2Be%25f%23g%3Bh&u=1.2\\1.3,1.4&n=M%C3%BCLLER"
        );
        // Decoding the canonical form gives the same pairs back.
        let original = pairs("x=a%20b%26c%3Dd%2Be%25f%23g%3Bh&n=M%C3%BCLLER");
        let again = encode(original.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(pairs(&again), original);
        let uri: hyper::Uri = format!("/dicom-web/studies?{again}")
            .parse()
            .expect("a valid URI");
        assert_eq!(uri.query(), Some(again.as_str()));
    }

    #[test]
    fn qido_keys_are_keywords_or_tags_each_once() {
        assert_eq!(tag_of("PatientName"), Some(tags::PATIENT_NAME));
        assert_eq!(tag_of("00100020"), Some(tags::PATIENT_ID));
        assert_eq!(tag_of("limit"), None);
        assert_eq!(tag_of("patientid"), None);
        let q = |raw: &str| Qido::parse(Level::Study, &[], pairs(raw));
        assert_eq!(
            q("PatientID=1&00100020=*"),
            Err(QueryError::Duplicate("00100020".into()))
        );
        assert_eq!(
            q("limit=1&limit=1000"),
            Err(QueryError::Duplicate("limit".into()))
        );
        assert_eq!(
            q("patientid=*"),
            Err(QueryError::Unknown("patientid".into()))
        );
        assert!(matches!(q("limit=-1"), Err(QueryError::Value { .. })));
        assert!(matches!(q("limit=1e3"), Err(QueryError::Value { .. })));
        assert!(matches!(
            q("StudyInstanceUID=1.2*"),
            Err(QueryError::Value { .. })
        ));
        assert!(matches!(q("SOPClassUID=*"), Err(QueryError::Value { .. })));
        assert!(q("StudyInstanceUID=1.2,1.3").is_ok());
        assert!(q("StudyInstanceUID=").is_ok());
        assert!(matches!(
            q("includefield=Nope"),
            Err(QueryError::Value { .. })
        ));
        assert!(matches!(
            q("accept=application/dicom%2Bxml"),
            Err(QueryError::NotAcceptable(_))
        ));
        let path = [(
            tags::STUDY_INSTANCE_UID,
            "StudyInstanceUID",
            "1.2".to_string(),
        )];
        assert_eq!(
            Qido::parse(Level::Series, &path, pairs("StudyInstanceUID=1.3")),
            Err(QueryError::AlsoInPath {
                key: "StudyInstanceUID"
            })
        );
        let ok = q("PatientID=A%5E1&includefield=00081030,PatientAge&includefield=all&offset=4&limit=900&fuzzymatching=false")
            .expect("a valid search");
        assert_eq!(ok.limit, Some(900));
        assert_eq!(
            ok.upstream(3, 0),
            "PatientID=A^1&includefield=00081030,PatientAge&includefield=all&fuzzymatching=false&offset=4&limit=3"
        );
    }

    #[test]
    fn the_guard_judges_every_value_of_a_list() {
        let q = |raw: &str| {
            Qido::parse(Level::Study, &[], pairs(raw))
                .expect("parses")
                .guard(2)
        };
        assert_eq!(q("PatientID=WEB1"), Ok("PatientID"));
        assert_eq!(q("PatientID=WEB1,WEB2"), Ok("PatientID"));
        assert!(q("PatientID=WEB1,*").is_err());
        assert!(q("PatientID=WEB1%5C*").is_err());
        assert!(q("PatientID=WEB1,").is_err());
        assert!(q("PatientID=%2A").is_err());
        assert!(q("PatientName=*&PatientID=").is_err());
        assert_eq!(q("PatientName=*&PatientID=AB"), Ok("PatientID"));
        let path = [(
            tags::STUDY_INSTANCE_UID,
            "StudyInstanceUID",
            "1.2".to_string(),
        )];
        let in_study = Qido::parse(Level::Series, &path, vec![]).expect("parses");
        assert_eq!(in_study.guard(2), Ok("StudyInstanceUID"));
    }

    #[test]
    fn wado_uri_uids_are_uids_and_keys_are_known() {
        let (w, forward) = WadoUri::parse(&pairs(
            "requestType=WADO&studyUID=1.2&seriesUID=1.3&objectUID=1.4&contentType=application%2Fdicom",
        ))
        .expect("valid");
        assert_eq!(
            (w.study.as_deref(), w.series.as_deref(), w.object.as_deref()),
            (Some("1.2"), Some("1.3"), Some("1.4"))
        );
        assert_eq!(
            forward,
            "requestType=WADO&studyUID=1.2&seriesUID=1.3&objectUID=1.4&contentType=application/dicom"
        );
        assert!(matches!(
            WadoUri::parse(&pairs("requestType=WADO&objectUID=1.4*")),
            Err(QueryError::Value { .. })
        ));
        assert_eq!(
            WadoUri::parse(&pairs("objectUID=1.4&objectUID=1.5")),
            Err(QueryError::Duplicate("objectUID".into()))
        );
        assert_eq!(
            WadoUri::parse(&pairs("objectuid=1.4")),
            Err(QueryError::Unknown("objectuid".into()))
        );
    }
}
