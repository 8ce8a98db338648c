//! `pacsgate find` queries: `-k Tag=Value` keys (like DCMTK's findscu) into a C-FIND identifier,
//! and the matches printed readably or as JSON.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::InMemDicomObject;

use super::ToolError;
use super::client::{PATIENT_ROOT_FIND, STUDY_ROOT_FIND};

/// One `-k` key: a tag and its value ("" asks for the attribute to be returned).
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub tag: Tag,
    pub vr: VR,
    pub value: String,
}

/// Parse `Keyword=Value`, `gggg,eeee=Value`, `(gggg,eeee)=Value`, or a tag alone (empty value).
pub fn parse_key(text: &str) -> Result<Key, ToolError> {
    let (name, value) = match text.split_once('=') {
        Some((n, v)) => (n.trim(), v.to_string()),
        None => (text.trim(), String::new()),
    };
    let unknown = || {
        ToolError::Usage(format!(
            "-k {text:?}: {name:?} is neither a DICOM keyword (e.g. PatientName) nor a tag in the standard dictionary (e.g. 0010,0010)"
        ))
    };
    let dict = StandardDataDictionary;
    let (tag, vr) = match name.parse::<Tag>() {
        Ok(tag) => (
            tag,
            dict.by_tag(tag)
                .map(|e| e.vr().relaxed())
                .ok_or_else(unknown)?,
        ),
        Err(_) => {
            let entry = dict.by_name(name).ok_or_else(unknown)?;
            (entry.tag(), entry.vr().relaxed())
        }
    };
    if vr == VR::SQ {
        return Err(ToolError::Usage(format!(
            "-k {text:?}: sequence attributes cannot be given as query keys here"
        )));
    }
    Ok(Key { tag, vr, value })
}

fn element(key: &Key) -> Result<DataElement<InMemDicomObject>, ToolError> {
    let bad = |e: &dyn std::fmt::Display| {
        ToolError::Usage(format!(
            "-k ({:04X},{:04X})={:?}: {e}",
            key.tag.0, key.tag.1, key.value
        ))
    };
    let v = key.value.trim();
    let value = if v.is_empty() {
        PrimitiveValue::Empty
    } else {
        match key.vr {
            VR::US => PrimitiveValue::from(v.parse::<u16>().map_err(|e| bad(&e))?),
            VR::SS => PrimitiveValue::from(v.parse::<i16>().map_err(|e| bad(&e))?),
            VR::UL => PrimitiveValue::from(v.parse::<u32>().map_err(|e| bad(&e))?),
            VR::SL => PrimitiveValue::from(v.parse::<i32>().map_err(|e| bad(&e))?),
            VR::FL => PrimitiveValue::from(v.parse::<f32>().map_err(|e| bad(&e))?),
            VR::FD => PrimitiveValue::from(v.parse::<f64>().map_err(|e| bad(&e))?),
            VR::AE
            | VR::AS
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::ST
            | VR::TM
            | VR::UC
            | VR::UI
            | VR::UR
            | VR::UT => PrimitiveValue::from(key.value.as_str()),
            other => return Err(bad(&format!("VR {other:?} cannot be a query key"))),
        }
    };
    Ok(DataElement::new(key.tag, key.vr, value))
}

/// A C-FIND request: information model, level and keys.
#[derive(Debug, Clone)]
pub struct Find {
    pub patient_root: bool,
    /// PATIENT, STUDY, SERIES or IMAGE.
    pub level: String,
    pub keys: Vec<Key>,
}

impl Find {
    /// `level` is case-insensitive; INSTANCE means IMAGE.
    pub fn new(patient_root: bool, level: &str, keys: &[String]) -> Result<Find, ToolError> {
        let level = match level.to_ascii_uppercase().as_str() {
            "PATIENT" => "PATIENT",
            "STUDY" => "STUDY",
            "SERIES" => "SERIES",
            "IMAGE" | "INSTANCE" => "IMAGE",
            other => {
                return Err(ToolError::Usage(format!(
                    "--level {other:?}: expected PATIENT, STUDY, SERIES or IMAGE"
                )));
            }
        };
        if level == "PATIENT" && !patient_root {
            return Err(ToolError::Usage(
                "--level PATIENT needs --patient-root: the Study Root model has no patient level"
                    .into(),
            ));
        }
        let keys = keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        // A value that does not fit its VR is a usage error now, not after connecting.
        for key in &keys {
            element(key)?;
        }
        Ok(Find {
            patient_root,
            level: level.to_string(),
            keys,
        })
    }

    /// The abstract syntax of the information model.
    pub fn model(&self) -> &'static str {
        if self.patient_root {
            PATIENT_ROOT_FIND
        } else {
            STUDY_ROOT_FIND
        }
    }

    /// The identifier: Query/Retrieve Level (unless a key sets it) and the keys.
    pub fn identifier(&self) -> Result<InMemDicomObject, ToolError> {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            PrimitiveValue::from(self.level.as_str()),
        ));
        for key in &self.keys {
            obj.put(element(key)?);
        }
        Ok(obj)
    }
}

/// The keyword of a tag, or `(gggg,eeee)`.
fn name_of(tag: Tag) -> String {
    StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.alias().to_string())
        .unwrap_or_else(|| format!("({:04X},{:04X})", tag.0, tag.1))
}

/// The value as text: strings and numbers as DICOM writes them (multiple values joined by `\`),
/// binary values as a byte count, sequences as an item count.
fn value_text(e: &DataElement<InMemDicomObject>) -> String {
    match e.value() {
        Value::Sequence(s) => format!("<{} item(s)>", s.items().len()),
        Value::PixelSequence(_) => "<pixel data>".to_string(),
        Value::Primitive(p) => match p {
            PrimitiveValue::U8(b) => format!("<{} bytes>", b.len()),
            PrimitiveValue::Empty => String::new(),
            other => other.to_str().trim_end_matches(['\0', ' ']).to_string(),
        },
    }
}

/// One match as an indented block: keyword, tag, VR, value.
pub fn readable(n: usize, obj: &InMemDicomObject) -> String {
    let mut out = format!("match {n}\n");
    for e in obj.iter() {
        let tag = e.header().tag;
        out.push_str(&format!(
            "  {:<32} ({:04X},{:04X}) {:?}  {}\n",
            name_of(tag),
            tag.0,
            tag.1,
            e.header().vr,
            value_text(e)
        ));
    }
    out
}

/// All matches and the final status as one JSON object:
/// `{"matches": [{"PatientName": "..."}], "count": N, "status": 0, "status_text": "Success"}`.
pub fn json(matches: &[InMemDicomObject], status: u16) -> String {
    let list: Vec<serde_json::Value> = matches
        .iter()
        .map(|m| {
            let map: serde_json::Map<String, serde_json::Value> = m
                .iter()
                .map(|e| (name_of(e.header().tag), value_text(e).into()))
                .collect();
            serde_json::Value::Object(map)
        })
        .collect();
    serde_json::json!({
        "matches": list,
        "count": matches.len(),
        "status": status,
        "status_hex": format!("{status:#06x}"),
        "status_text": super::client::status_words(status),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_like_findscu() {
        let k = parse_key("PatientName=DOE^*").expect("keyword");
        assert_eq!(
            (k.tag, k.vr, k.value.as_str()),
            (tags::PATIENT_NAME, VR::PN, "DOE^*")
        );
        let k = parse_key("0010,0020=ABC").expect("tag");
        assert_eq!(k.tag, tags::PATIENT_ID);
        let k = parse_key("(0020,000D)").expect("tag alone");
        assert_eq!((k.tag, k.value.as_str()), (tags::STUDY_INSTANCE_UID, ""));
        assert!(parse_key("PatientNmae=X").is_err());
        assert!(parse_key("ReferencedStudySequence=").is_err());
    }

    #[test]
    fn the_identifier_has_the_level_and_keys_can_override_it() {
        let f = Find::new(false, "study", &["PatientName=*".into()]).expect("find");
        let obj = f.identifier().expect("identifier");
        assert_eq!(
            obj.get(tags::QUERY_RETRIEVE_LEVEL)
                .and_then(|e| e.to_str().ok())
                .as_deref(),
            Some("STUDY")
        );
        let f = Find::new(true, "STUDY", &["QueryRetrieveLevel=PATIENT".into()]).expect("find");
        let obj = f.identifier().expect("identifier");
        assert_eq!(
            obj.get(tags::QUERY_RETRIEVE_LEVEL)
                .and_then(|e| e.to_str().ok())
                .as_deref(),
            Some("PATIENT")
        );
        assert_eq!(f.model(), PATIENT_ROOT_FIND);
        assert!(Find::new(false, "WARD", &[]).is_err());
        assert!(Find::new(false, "STUDY", &["Rows=abc".into()]).is_err());
    }

    #[test]
    fn matches_print_by_keyword() {
        let f = Find::new(
            false,
            "STUDY",
            &["PatientName=SMITH^JANE".into(), "PatientID".into()],
        )
        .expect("find");
        let obj = f.identifier().expect("identifier");
        let text = readable(1, &obj);
        assert!(
            text.contains("PatientName") && text.contains("SMITH^JANE"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&[obj], 0)).expect("json");
        assert_eq!(v["matches"][0]["PatientName"], "SMITH^JANE");
        assert_eq!(v["matches"][0]["PatientID"], "");
        assert_eq!(v["count"], 1);
    }
}
