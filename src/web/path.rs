//! Request paths (RFC 3986 3.3), read once the way the archive will read them, then rebuilt.
//!
//! An archive's HTTP server percent-decodes the path and removes dot segments before it routes
//! (Orthanc's CivetWeb turns `/dicom-web/studies/%2e%2e%2f%2e%2e%2fpatients` into `/patients`, and a
//! `\` into a `/`). So the gateway decodes each segment exactly once and refuses every segment that
//! another reader could take apart differently: empty segments (`//`), dot segments (`.`, `..`,
//! encoded or not), and any character outside letters, digits and `-._~,` (that rules out an encoded
//! `/` or `\`, `;` parameters, a `%` left after decoding (double encoding), bytes of overlong UTF-8
//! such as `%c0%ae`, and all non-ASCII). The path sent upstream is rebuilt from the checked
//! segments, so it needs no encoding at all: every reader sees the same segments the gateway judged.

use hyper::Uri;

/// Why a request path is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be a path (origin-form), not {0}")]
    NotOriginForm(&'static str),
    #[error("empty path segment (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("dot segment (`.` or `..`, encoded or not)")]
    DotSegment,
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    #[error("{0} in a path segment")]
    Character(Byte),
    #[error("more than {MAX_SEGMENTS} path segments")]
    TooManySegments,
}

/// A byte refused in a path, shown so that a log line or an answer never carries it raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Byte(pub u8);

impl std::fmt::Display for Byte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            b'/' => f.write_str("encoded `/`"),
            b'\\' => f.write_str("`\\` (a path separator to some servers)"),
            b';' => f.write_str("`;` (path parameters)"),
            b'%' => f.write_str("`%` after decoding (double encoding)"),
            b if b.is_ascii_graphic() => write!(f, "character `{}`", b as char),
            b => write!(f, "byte 0x{b:02X}"),
        }
    }
}

/// Deeper than any DICOMweb resource (a bulk data path in a nested sequence included).
const MAX_SEGMENTS: usize = 32;

/// A checked path: its decoded segments, none empty, none a dot segment, each made of
/// `[A-Za-z0-9-._~,]` only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Path {
    segments: Vec<String>,
}

impl Path {
    /// The path of a request target. Absolute-form (`GET https://host/...`) and asterisk-form
    /// (`OPTIONS *`) are refused: the gateway forwards paths only, to an archive it chose itself.
    pub fn of(uri: &Uri) -> Result<Path, PathError> {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(PathError::NotOriginForm("absolute-form"));
        }
        Path::parse(uri.path())
    }

    /// Parse a raw (still encoded) path such as `/dicom-web/studies/1.2.3`.
    pub fn parse(raw: &str) -> Result<Path, PathError> {
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(PathError::NotOriginForm("asterisk-form or a relative path"));
        };
        if rest.is_empty() {
            return Ok(Path::default());
        }
        let mut segments = Vec::new();
        for raw_segment in rest.split('/') {
            if segments.len() == MAX_SEGMENTS {
                return Err(PathError::TooManySegments);
            }
            segments.push(segment(raw_segment)?);
        }
        Ok(Path { segments })
    }

    /// The segments after `prefix`, when this path starts with all of `prefix`'s segments.
    pub fn strip_prefix(&self, prefix: &Path) -> Option<Vec<&str>> {
        let rest = self.segments.strip_prefix(prefix.segments.as_slice())?;
        Some(rest.iter().map(String::as_str).collect())
    }

    /// The path to send upstream: the checked segments, which need no encoding.
    pub fn upstream(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            out.push_str(s);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// One segment, decoded once and checked.
fn segment(raw: &str) -> Result<String, PathError> {
    if raw.is_empty() {
        return Err(PathError::EmptySegment);
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            i += 3;
            u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?
        } else {
            i += 1;
            bytes[i - 1]
        };
        if !allowed(b) {
            return Err(PathError::Character(Byte(b)));
        }
        out.push(b as char);
    }
    if out.bytes().all(|b| b == b'.') {
        return Err(PathError::DotSegment);
    }
    Ok(out)
}

/// Letters, digits, `-._~` (RFC 3986 unreserved) and `,` (frame lists): nothing any server decodes,
/// splits or normalises.
fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b',')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(raw: &str) -> Result<Vec<String>, PathError> {
        Path::parse(raw).map(|p| p.segments)
    }

    #[test]
    fn plain_paths_are_their_segments_and_encoded_letters_are_decoded_once() {
        assert_eq!(
            segs("/dicom-web/studies/1.2.3").expect("ok"),
            ["dicom-web", "studies", "1.2.3"]
        );
        assert_eq!(
            segs("/dicom-web/%73tudies").expect("ok"),
            ["dicom-web", "studies"]
        );
        assert_eq!(segs("/").expect("ok"), Vec::<String>::new());
        assert_eq!(
            Path::parse("/dicom-web/%73tudies/1.2")
                .expect("ok")
                .upstream(),
            "/dicom-web/studies/1.2"
        );
        assert_eq!(Path::parse("/").expect("ok").upstream(), "/");
    }

    #[test]
    fn every_way_to_smuggle_a_separator_or_a_dot_segment_is_refused() {
        use PathError::*;
        for (raw, want) in [
            (
                "/dicom-web/studies/%2e%2e%2f%2e%2e%2fpatients",
                Character(Byte(b'/')),
            ),
            ("/dicom-web/studies/%2E%2E/%2E%2E/system", DotSegment),
            ("/dicom-web/studies/../../patients", DotSegment),
            ("/dicom-web/./studies", DotSegment),
            ("/dicom-web/studies/.%2e", DotSegment),
            ("/dicom-web/studies/...", DotSegment),
            (
                "/dicom-web/studies/..%5c..%5cpatients",
                Character(Byte(b'\\')),
            ),
            (
                "/dicom-web/studies/..\\..\\patients",
                Character(Byte(b'\\')),
            ),
            ("/dicom-web/studies;x/../../patients", Character(Byte(b';'))),
            (
                "/dicom-web/studies/%252e%252e/patients",
                Character(Byte(b'%')),
            ),
            (
                "/dicom-web/studies/%c0%ae%c0%ae/patients",
                Character(Byte(0xC0)),
            ),
            ("/dicom-web/studies/%zz", BadEscape),
            ("/dicom-web/studies/%2", BadEscape),
            ("/dicom-web/studies/%", BadEscape),
            ("//patients", EmptySegment),
            ("/dicom-web//studies", EmptySegment),
            ("/dicom-web/studies/", EmptySegment),
            ("/dicom-web/studies/%00", Character(Byte(0))),
            ("/dicom-web/studies/%2A", Character(Byte(b'*'))),
            ("/dicom-web/st\u{e9}dies", Character(Byte(0xC3))),
            ("*", NotOriginForm("asterisk-form or a relative path")),
        ] {
            assert_eq!(segs(raw), Err(want), "{raw}");
        }
        let deep = "/a".repeat(MAX_SEGMENTS + 1);
        assert_eq!(segs(&deep), Err(TooManySegments));
    }

    #[test]
    fn absolute_form_targets_are_refused() {
        let uri: Uri = "https://localhost/dicom-web/studies".parse().expect("uri");
        assert_eq!(
            Path::of(&uri),
            Err(PathError::NotOriginForm("absolute-form"))
        );
        let uri: Uri = "/dicom-web/studies?PatientID=1".parse().expect("uri");
        assert_eq!(Path::of(&uri).expect("ok").upstream(), "/dicom-web/studies");
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let root = Path::parse("/dicom-web").expect("root");
        let p = Path::parse("/dicom-web/studies").expect("p");
        assert_eq!(p.strip_prefix(&root), Some(vec!["studies"]));
        let other = Path::parse("/dicom-webx/studies").expect("other");
        assert_eq!(other.strip_prefix(&root), None);
        assert_eq!(root.strip_prefix(&root), Some(vec![]));
    }
}
