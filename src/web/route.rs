//! What a request is: its method and checked path matched against the DICOMweb resources the gateway
//! passes (PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6 QIDO-RS, 9 WADO-URI), with every UID in the path
//! checked for UID syntax. Anything not in the table is refused.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use hyper::Method;

use super::path::Path;
use crate::config::Http;
/// The UID rule (digits and dots, at most 64 characters, no empty component) and the query levels
/// are the DIMSE side's: one rule for both doors.
pub use crate::policy::query_guard::{Level, is_uid};

/// The QueryRetrieveLevel value a QIDO-RS resource corresponds to (for the audit trail).
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Patient => "PATIENT",
        Level::Study => "STUDY",
        Level::Series => "SERIES",
        Level::Image => "IMAGE",
    }
}

/// What a WADO-RS request retrieves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// The instances of a study, series or instance (whichever UIDs the path names).
    Instances,
    Metadata,
    Rendered,
    Thumbnail,
    PixelData,
    Frames,
    BulkData,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Instances => "instances",
            Resource::Metadata => "metadata",
            Resource::Rendered => "rendered",
            Resource::Thumbnail => "thumbnail",
            Resource::PixelData => "pixeldata",
            Resource::Frames => "frames",
            Resource::BulkData => "bulkdata",
        }
    }
}

/// The study, series and instance a retrieve names, and what of them it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retrieval {
    pub study: String,
    pub series: Option<String>,
    pub instance: Option<String>,
    pub resource: Resource,
    /// The frame list of a frames request (`1,2,3`).
    pub frames: Option<String>,
}

impl Retrieval {
    /// A whole study or series (rate limited like C-MOVE and C-GET; a viewer's per-instance and
    /// per-frame requests are not).
    pub fn whole(&self) -> bool {
        self.instance.is_none() && self.resource == Resource::Instances
    }
}

/// What a request is, once its method and path are classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// QIDO-RS at `level`; the UIDs named in the path, as (tag, keyword, value).
    Query {
        level: Level,
        uids: Vec<(Tag, &'static str, String)>,
    },
    /// WADO-RS.
    Retrieve(Retrieval),
    /// WADO-URI: the UIDs are in the query string.
    WadoUri,
    /// STOW-RS, to the study the path names if any.
    Store { study: Option<String> },
    /// A path in `allow_paths`.
    Allowed,
}

/// Why a request is not classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// 400: a path segment where a UID goes is not a UID.
    #[error("{what} {value:?} in the path is not a UID (digits and dots, at most 64 characters)")]
    NotAUid { what: &'static str, value: String },
    /// 403.
    #[error("{0}")]
    Denied(&'static str),
}

/// Classify a request under the configured DICOMweb, WADO-URI and allowed paths. Configured paths
/// that do not parse as checked paths match nothing (fail closed).
pub fn classify(http: &Http, method: &Method, path: &Path) -> Result<Route, RouteError> {
    // The configuration keeps paths without a trailing `/`: the root `/` is "".
    let configured = |p: &str| Path::parse(if p.is_empty() { "/" } else { p });
    if let Ok(root) = configured(&http.dicomweb_path)
        && let Some(rest) = path.strip_prefix(&root)
    {
        return dicomweb(method, &rest);
    }
    if let Some(wado) = http
        .wado_uri_path
        .as_deref()
        .and_then(|p| configured(p).ok())
        && *path == wado
    {
        return if method == Method::GET {
            Ok(Route::WadoUri)
        } else {
            Err(RouteError::Denied("WADO-URI is GET only"))
        };
    }
    let allowed = http
        .allow_paths
        .iter()
        .filter_map(|p| configured(p).ok())
        .any(|p| path.strip_prefix(&p).is_some());
    if allowed {
        // Read only: a prefix opened for, say, `/system` must not let a role DELETE or POST there.
        return if method == Method::GET {
            Ok(Route::Allowed)
        } else {
            Err(RouteError::Denied("allow_paths are GET only"))
        };
    }
    Err(RouteError::Denied("path not allowed through the gateway"))
}

fn uid(what: &'static str, value: &str) -> Result<String, RouteError> {
    if is_uid(value) {
        Ok(value.to_string())
    } else {
        Err(RouteError::NotAUid {
            what,
            value: value.to_string(),
        })
    }
}

/// The most frames one frames request may name.
pub const MAX_FRAMES: usize = 256;

/// A frame list (PS3.18 8.3.5.1: `1,2,3`): at most [`MAX_FRAMES`] frame numbers, each at least 1
/// and each once (in the caller's order: dicomweb-client sends them so). The archive sends a frame
/// once per number it is given: frame 1 seven thousand times was 3.6 GB from a 14 kB request.
fn frame_list(value: &str) -> bool {
    let mut seen = std::collections::HashSet::new();
    for n in value.split(',') {
        if seen.len() >= MAX_FRAMES
            || n.is_empty()
            || n.len() > 9
            || !n.bytes().all(|b| b.is_ascii_digit())
        {
            return false;
        }
        match n.parse::<u32>() {
            Ok(frame) if frame >= 1 && seen.insert(frame) => {}
            _ => return false,
        }
    }
    !seen.is_empty()
}

const STUDY: &str = "StudyInstanceUID";
const SERIES: &str = "SeriesInstanceUID";
const INSTANCE: &str = "SOPInstanceUID";

fn denied() -> Result<Route, RouteError> {
    Err(RouteError::Denied(
        "not a DICOMweb service the gateway passes",
    ))
}

/// The resources under the DICOMweb root: STOW-RS on POST; on GET, QIDO-RS, else WADO-RS.
fn dicomweb(method: &Method, segs: &[&str]) -> Result<Route, RouteError> {
    if method == Method::POST {
        return match segs {
            ["studies"] => Ok(Route::Store { study: None }),
            ["studies", s] => Ok(Route::Store {
                study: Some(uid(STUDY, s)?),
            }),
            _ => denied(),
        };
    }
    if method != Method::GET {
        return denied();
    }
    match qido(segs)? {
        Some(route) => Ok(route),
        None => wado(segs),
    }
}

/// QIDO-RS searches; `None`: not a search path.
fn qido(segs: &[&str]) -> Result<Option<Route>, RouteError> {
    let query = |level, uids: Vec<(Tag, &'static str, String)>| Some(Route::Query { level, uids });
    Ok(match segs {
        ["studies"] => query(Level::Study, vec![]),
        ["series"] => query(Level::Series, vec![]),
        ["instances"] => query(Level::Image, vec![]),
        ["studies", s, "series"] => query(
            Level::Series,
            vec![(tags::STUDY_INSTANCE_UID, STUDY, uid(STUDY, s)?)],
        ),
        ["studies", s, "instances"] => query(
            Level::Image,
            vec![(tags::STUDY_INSTANCE_UID, STUDY, uid(STUDY, s)?)],
        ),
        ["studies", s, "series", se, "instances"] => query(
            Level::Image,
            vec![
                (tags::STUDY_INSTANCE_UID, STUDY, uid(STUDY, s)?),
                (tags::SERIES_INSTANCE_UID, SERIES, uid(SERIES, se)?),
            ],
        ),
        _ => None,
    })
}

/// WADO-RS retrievals (and the bulk data URIs Orthanc makes); anything else is denied.
fn wado(segs: &[&str]) -> Result<Route, RouteError> {
    let retrieve = |study: &str,
                    series: Option<&str>,
                    instance: Option<&str>,
                    resource,
                    frames: Option<&str>| {
        Ok(Route::Retrieve(Retrieval {
            study: uid(STUDY, study)?,
            series: series.map(|s| uid(SERIES, s)).transpose()?,
            instance: instance.map(|i| uid(INSTANCE, i)).transpose()?,
            resource,
            frames: frames.map(str::to_string),
        }))
    };
    let sub = |name: &str| match name {
        "metadata" => Some(Resource::Metadata),
        "rendered" => Some(Resource::Rendered),
        "thumbnail" => Some(Resource::Thumbnail),
        "pixeldata" => Some(Resource::PixelData),
        _ => None,
    };
    match segs {
        ["studies", s] => retrieve(s, None, None, Resource::Instances, None),
        ["studies", s, r] => match sub(r) {
            Some(resource) => retrieve(s, None, None, resource, None),
            None => denied(),
        },
        ["studies", s, "series", se] => retrieve(s, Some(se), None, Resource::Instances, None),
        ["studies", s, "series", se, r] => match sub(r) {
            Some(resource) => retrieve(s, Some(se), None, resource, None),
            None => denied(),
        },
        ["studies", s, "series", se, "instances", i] => {
            retrieve(s, Some(se), Some(i), Resource::Instances, None)
        }
        ["studies", s, "series", se, "instances", i, r] => match sub(r) {
            Some(resource) => retrieve(s, Some(se), Some(i), resource, None),
            None => denied(),
        },
        ["studies", s, "series", se, "instances", i, "frames", f] if frame_list(f) => {
            retrieve(s, Some(se), Some(i), Resource::Frames, Some(f))
        }
        [
            "studies",
            s,
            "series",
            se,
            "instances",
            i,
            "frames",
            f,
            "rendered" | "thumbnail",
        ] if frame_list(f) => retrieve(s, Some(se), Some(i), Resource::Frames, Some(f)),
        // Bulk data URIs as Orthanc makes them: tags (8 hex digits) and item numbers.
        [
            "studies",
            s,
            "series",
            se,
            "instances",
            i,
            "bulk" | "bulkdata",
            rest @ ..,
        ] if !rest.is_empty()
            && rest
                .iter()
                .all(|t| t.len() <= 8 && t.bytes().all(|b| b.is_ascii_hexdigit())) =>
        {
            retrieve(s, Some(se), Some(i), Resource::BulkData, None)
        }
        _ => denied(),
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
            failed_logins_per_minute: 10,
            max_requests_per_user: 16,
        }
    }

    fn route(method: &Method, raw: &str) -> Result<Route, RouteError> {
        classify(&http(), method, &Path::parse(raw).expect("a checked path"))
    }

    #[test]
    fn uids_are_digits_and_dots() {
        for ok in ["1", "1.2", "1.2.840.10008.5.1.4.1.1.2", &"1".repeat(64)] {
            assert!(is_uid(ok), "{ok}");
        }
        for bad in [
            "",
            "*",
            "1.2*",
            "1.?",
            ".1",
            "1.",
            "1..2",
            "1.2\\1.3",
            "1,2",
            "a.b",
            " 1",
            &"1".repeat(65),
        ] {
            assert!(!is_uid(bad), "{bad}");
        }
    }

    #[test]
    fn paths_are_classified_and_everything_else_is_denied() {
        let get = Method::GET;
        assert_eq!(
            route(&get, "/dicom-web/studies"),
            Ok(Route::Query {
                level: Level::Study,
                uids: vec![]
            })
        );
        assert_eq!(
            route(&get, "/dicom-web/studies/1.2/series"),
            Ok(Route::Query {
                level: Level::Series,
                uids: vec![(tags::STUDY_INSTANCE_UID, "StudyInstanceUID", "1.2".into())]
            })
        );
        let Ok(Route::Retrieve(r)) = route(&get, "/dicom-web/studies/1.2") else {
            panic!("study retrieve")
        };
        assert!(r.whole());
        let Ok(Route::Retrieve(r)) = route(&get, "/dicom-web/studies/1.2/series/3/instances/4")
        else {
            panic!("instance retrieve")
        };
        assert_eq!(
            (r.series.as_deref(), r.instance.as_deref(), r.whole()),
            (Some("3"), Some("4"), false)
        );
        let Ok(Route::Retrieve(r)) = route(
            &get,
            "/dicom-web/studies/1.2/series/3/instances/4/frames/1,2",
        ) else {
            panic!("frames")
        };
        assert_eq!(
            (r.resource, r.frames.as_deref()),
            (Resource::Frames, Some("1,2"))
        );
        let Ok(Route::Retrieve(r)) = route(&get, "/dicom-web/studies/1.2/metadata") else {
            panic!("metadata")
        };
        assert!(!r.whole());
        assert!(matches!(
            route(
                &get,
                "/dicom-web/studies/1.2/series/3/instances/4/bulk/7fe00010"
            ),
            Ok(Route::Retrieve(_))
        ));
        assert_eq!(
            route(&Method::POST, "/dicom-web/studies"),
            Ok(Route::Store { study: None })
        );
        assert_eq!(route(&get, "/wado"), Ok(Route::WadoUri));
        assert_eq!(route(&get, "/system"), Ok(Route::Allowed));
        assert_eq!(route(&get, "/system/x"), Ok(Route::Allowed));
        for method in [Method::DELETE, Method::POST, Method::PUT] {
            assert!(matches!(
                route(&method, "/system"),
                Err(RouteError::Denied(_))
            ));
        }
        for denied in [
            "/app/explorer.html",
            "/instances",
            "/dicom-webx/studies",
            "/tools/find",
            "/systemx",
            "/dicom-web/servers",
            "/dicom-web/info",
            "/dicom-web/studies/1.2/anything",
            "/dicom-web/studies/1.2/series/3/instances/4/frames/x",
            "/dicom-web/studies/1.2/series/3/instances/4/frames/0",
            "/dicom-web/studies/1.2/series/3/instances/4/frames/1,1",
            "/dicom-web/studies/1.2/series/3/instances/4/frames/1,,2",
            "/dicom-web/studies/1.2/series/3/instances/4/bulk",
            "/wado/x",
        ] {
            assert!(
                matches!(route(&get, denied), Err(RouteError::Denied(_))),
                "{denied}"
            );
        }
        let most: Vec<String> = (1..=MAX_FRAMES).map(|n| n.to_string()).collect();
        let path =
            |frames: &str| format!("/dicom-web/studies/1.2/series/3/instances/4/frames/{frames}");
        assert!(route(&get, &path(&most.join(","))).is_ok());
        assert!(route(&get, &path("3,1,2")).is_ok(), "the caller's order");
        assert!(matches!(
            route(&get, &path("1,2,01")),
            Err(RouteError::Denied(_))
        ));
        let over = format!("{},{}", most.join(","), MAX_FRAMES + 1);
        assert!(matches!(
            route(&get, &path(&over)),
            Err(RouteError::Denied(_))
        ));
        assert!(matches!(
            route(&Method::DELETE, "/dicom-web/studies/1.2"),
            Err(RouteError::Denied(_))
        ));
        assert!(matches!(
            route(&Method::POST, "/wado"),
            Err(RouteError::Denied(_))
        ));
    }

    #[test]
    fn a_dicomweb_root_of_slash_is_the_whole_path() {
        let mut h = http();
        h.dicomweb_path = String::new(); // `dicomweb_path = "/"` as the configuration keeps it
        let p = Path::parse("/studies").expect("path");
        assert!(matches!(
            classify(&h, &Method::GET, &p),
            Ok(Route::Query { .. })
        ));
    }

    #[test]
    fn a_path_uid_that_is_not_a_uid_is_refused_on_every_route() {
        for raw in [
            "/dicom-web/studies/1..2/series",
            "/dicom-web/studies/1.2/series/.3/instances",
            "/dicom-web/studies/x",
            "/dicom-web/studies/1.2./metadata",
            "/dicom-web/studies/1.2/series/3/instances/4~",
            "/dicom-web/studies/1,2",
        ] {
            assert!(
                matches!(route(&Method::GET, raw), Err(RouteError::NotAUid { .. })),
                "{raw}"
            );
        }
        let long = format!("/dicom-web/studies/{}", "1".repeat(65));
        assert!(matches!(
            route(&Method::POST, &long),
            Err(RouteError::NotAUid { .. })
        ));
    }
}
