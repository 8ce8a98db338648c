//! Query/Retrieve matching for the demo archive (PS3.4 C.2.2.2 and C.4): levels, keys, responses.
//!
//! Matching is relational-style: every key the archive knows at or above the query level is
//! matched (single value, `*`/`?` wildcards, `\`-separated UID lists, DA/TM ranges, empty =
//! universal); keys it does not know, or below the level, are returned empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dicom_core::header::Header;
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, DicomValue, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::dimse::{status, trim_value};
use super::negotiation::Model;
use super::store::Instance;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        Some(match s {
            "PATIENT" => Level::Patient,
            "STUDY" => Level::Study,
            "SERIES" => Level::Series,
            "IMAGE" => Level::Image,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }

    /// The unique key of an entity at this level.
    fn unique_key(self) -> Tag {
        match self {
            Level::Patient => tags::PATIENT_ID,
            Level::Study => tags::STUDY_INSTANCE_UID,
            Level::Series => tags::SERIES_INSTANCE_UID,
            Level::Image => tags::SOP_INSTANCE_UID,
        }
    }
}

/// A key the archive knows: where it lives and its VR.
pub(crate) struct Key {
    pub tag: Tag,
    pub vr: VR,
    pub level: Level,
}

const fn key(tag: Tag, vr: VR, level: Level) -> Key {
    Key { tag, vr, level }
}

/// Attributes indexed from every stored instance.
pub(crate) const STORED_KEYS: &[Key] = &[
    key(tags::PATIENT_NAME, VR::PN, Level::Patient),
    key(tags::PATIENT_ID, VR::LO, Level::Patient),
    key(tags::PATIENT_BIRTH_DATE, VR::DA, Level::Patient),
    key(tags::PATIENT_SEX, VR::CS, Level::Patient),
    key(tags::STUDY_INSTANCE_UID, VR::UI, Level::Study),
    key(tags::STUDY_DATE, VR::DA, Level::Study),
    key(tags::STUDY_TIME, VR::TM, Level::Study),
    key(tags::ACCESSION_NUMBER, VR::SH, Level::Study),
    key(tags::STUDY_ID, VR::SH, Level::Study),
    key(tags::STUDY_DESCRIPTION, VR::LO, Level::Study),
    key(tags::REFERRING_PHYSICIAN_NAME, VR::PN, Level::Study),
    key(tags::SERIES_INSTANCE_UID, VR::UI, Level::Series),
    key(tags::MODALITY, VR::CS, Level::Series),
    key(tags::SERIES_NUMBER, VR::IS, Level::Series),
    key(tags::SERIES_DESCRIPTION, VR::LO, Level::Series),
    key(tags::SOP_INSTANCE_UID, VR::UI, Level::Image),
    key(tags::SOP_CLASS_UID, VR::UI, Level::Image),
    key(tags::INSTANCE_NUMBER, VR::IS, Level::Image),
];

/// Attributes computed over an entity's instances (returned; only Modalities in Study is matched).
const COMPUTED_KEYS: &[Key] = &[
    key(tags::MODALITIES_IN_STUDY, VR::CS, Level::Study),
    key(
        tags::NUMBER_OF_PATIENT_RELATED_STUDIES,
        VR::IS,
        Level::Patient,
    ),
    key(
        tags::NUMBER_OF_PATIENT_RELATED_SERIES,
        VR::IS,
        Level::Patient,
    ),
    key(
        tags::NUMBER_OF_PATIENT_RELATED_INSTANCES,
        VR::IS,
        Level::Patient,
    ),
    key(tags::NUMBER_OF_STUDY_RELATED_SERIES, VR::IS, Level::Study),
    key(
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        VR::IS,
        Level::Study,
    ),
    key(
        tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        VR::IS,
        Level::Series,
    ),
];

fn known_key(tag: Tag) -> Option<&'static Key> {
    STORED_KEYS
        .iter()
        .chain(COMPUTED_KEYS)
        .find(|k| k.tag == tag)
}

/// A parsed C-FIND or C-GET identifier.
pub(crate) struct Query {
    level: Level,
    identifier: InMemDicomObject,
    /// (tag, VR, value) of every non-empty known key at or above the level.
    conditions: Vec<(Tag, VR, String)>,
}

impl Query {
    /// Check the level against the information model; a refusal is the status to answer with.
    pub fn parse(identifier: InMemDicomObject, model: Model) -> Result<Query, u16> {
        let level = identifier
            .get(tags::QUERY_RETRIEVE_LEVEL)
            .and_then(|e| e.to_str().ok())
            .and_then(|s| Level::parse(trim_value(&s)))
            .ok_or(status::DOES_NOT_MATCH_SOP_CLASS)?;
        if model == Model::StudyRoot && level == Level::Patient {
            return Err(status::DOES_NOT_MATCH_SOP_CLASS);
        }
        let conditions = identifier
            .iter()
            .filter_map(|e| {
                let key = known_key(e.tag())?;
                if key.level > level || e.vr() == VR::SQ {
                    return None;
                }
                let value = e.to_str().ok()?;
                let value = trim_value(&value);
                (!value.is_empty()).then(|| (key.tag, key.vr, value.to_string()))
            })
            .collect();
        Ok(Query {
            level,
            identifier,
            conditions,
        })
    }

    /// C-GET needs the unique key of its level (a list of UIDs is fine).
    pub fn has_unique_key(&self) -> bool {
        let unique = self.level.unique_key();
        self.conditions.iter().any(|(tag, _, _)| *tag == unique)
    }

    /// C-FIND: one response identifier per matching entity, in unique-key order.
    pub fn find(
        &self,
        instances: &[Arc<Instance>],
        retrieve_ae_title: &str,
    ) -> Vec<InMemDicomObject> {
        let mut entities: BTreeMap<&str, Entity> = BTreeMap::new();
        for instance in instances {
            let id = instance.attribute(self.level.unique_key());
            entities
                .entry(id)
                .or_insert_with(|| Entity::new(instance))
                .add(instance);
        }
        entities
            .values()
            .filter(|entity| {
                self.conditions
                    .iter()
                    .all(|(tag, vr, q)| entity.values(*tag).iter().any(|v| matches(*vr, q, v)))
            })
            .map(|entity| self.response(entity, retrieve_ae_title))
            .collect()
    }

    /// C-GET: the instances under every matching entity.
    pub fn select(&self, instances: &[Arc<Instance>]) -> Vec<Arc<Instance>> {
        instances
            .iter()
            .filter(|instance| {
                self.conditions.iter().all(|(tag, vr, q)| {
                    match STORED_KEYS.iter().any(|k| k.tag == *tag) {
                        true => split_values(instance.attribute(*tag)).any(|v| matches(*vr, q, v)),
                        false => true,
                    }
                })
            })
            .cloned()
            .collect()
    }

    fn response(&self, entity: &Entity, retrieve_ae_title: &str) -> InMemDicomObject {
        let mut out = InMemDicomObject::new_empty();
        let mut non_ascii = false;
        for element in self.identifier.iter() {
            let tag = element.tag();
            if tag == tags::QUERY_RETRIEVE_LEVEL || tag == tags::SPECIFIC_CHARACTER_SET {
                continue;
            }
            let response = match known_key(tag) {
                Some(key) if key.level <= self.level => {
                    let value = entity.values(tag).join("\\");
                    non_ascii |= !value.is_ascii();
                    DataElement::new(tag, key.vr, PrimitiveValue::from(value))
                }
                _ if tag == tags::RETRIEVE_AE_TITLE => {
                    DataElement::new(tag, VR::AE, PrimitiveValue::from(retrieve_ae_title))
                }
                _ if element.vr() == VR::SQ => DataElement::new(
                    tag,
                    VR::SQ,
                    DicomValue::from(DataSetSequence::new(Vec::new(), Length(0))),
                ),
                _ => DataElement::new(tag, element.vr(), PrimitiveValue::Empty),
            };
            out.put(response);
        }
        out.put(DataElement::new(
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            PrimitiveValue::from(self.level.as_str()),
        ));
        if non_ascii {
            out.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                PrimitiveValue::from("ISO_IR 192"),
            ));
        } else if let Some(cs) = self.identifier.get(tags::SPECIFIC_CHARACTER_SET) {
            out.put(cs.clone());
        }
        out
    }
}

/// The instances of one patient, study, series or image.
struct Entity<'a> {
    first: &'a Instance,
    studies: BTreeSet<&'a str>,
    series: BTreeSet<&'a str>,
    modalities: BTreeSet<&'a str>,
    instances: usize,
}

impl<'a> Entity<'a> {
    fn new(first: &'a Instance) -> Entity<'a> {
        Entity {
            first,
            studies: BTreeSet::new(),
            series: BTreeSet::new(),
            modalities: BTreeSet::new(),
            instances: 0,
        }
    }

    fn add(&mut self, instance: &'a Instance) {
        self.studies
            .insert(instance.attribute(tags::STUDY_INSTANCE_UID));
        self.series
            .insert(instance.attribute(tags::SERIES_INSTANCE_UID));
        let modality = instance.attribute(tags::MODALITY);
        if !modality.is_empty() {
            self.modalities.insert(modality);
        }
        self.instances += 1;
    }

    /// The values of a key for this entity (empty when unknown).
    fn values(&self, tag: Tag) -> Vec<String> {
        let count = |n: usize| vec![n.to_string()];
        match tag {
            tags::MODALITIES_IN_STUDY => self.modalities.iter().map(|m| m.to_string()).collect(),
            tags::NUMBER_OF_PATIENT_RELATED_STUDIES => count(self.studies.len()),
            tags::NUMBER_OF_PATIENT_RELATED_SERIES | tags::NUMBER_OF_STUDY_RELATED_SERIES => {
                count(self.series.len())
            }
            tags::NUMBER_OF_PATIENT_RELATED_INSTANCES
            | tags::NUMBER_OF_STUDY_RELATED_INSTANCES
            | tags::NUMBER_OF_SERIES_RELATED_INSTANCES => count(self.instances),
            _ => split_values(self.first.attribute(tag))
                .map(str::to_string)
                .collect(),
        }
    }
}

fn split_values(value: &str) -> impl Iterator<Item = &str> {
    value.split('\\').map(trim_value)
}

/// Does a stored value match one query value of this VR (PS3.4 C.2.2.2)?
pub(crate) fn matches(vr: VR, query: &str, value: &str) -> bool {
    let query = trim_value(query);
    if query.is_empty() || query == "*" {
        return true;
    }
    match vr {
        VR::UI => query.split('\\').any(|q| trim_value(q) == value),
        VR::DA | VR::TM | VR::DT => match query.split_once('-') {
            Some((low, high)) => {
                !value.is_empty()
                    && (low.is_empty() || value >= trim_value(low))
                    && (high.is_empty() || value <= trim_value(high))
            }
            None => query == value,
        },
        // Person names: case-insensitive, as PS3.4 C.2.2.2.1 allows.
        VR::PN => wildcard(&query.to_lowercase(), &value.to_lowercase()),
        _ => wildcard(query, value),
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else literally.
fn wildcard(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_value_wildcard_and_ranges() {
        assert!(matches(VR::LO, "DEMO-0001", "DEMO-0001"));
        assert!(!matches(VR::LO, "DEMO-0001", "DEMO-00012"));
        assert!(matches(VR::LO, "DEMO-*", "DEMO-0001"));
        assert!(matches(VR::LO, "DEMO-000?", "DEMO-0004"));
        assert!(!matches(VR::LO, "DEMO-000?", "DEMO-00041"));
        assert!(matches(VR::LO, "*1", "DEMO-0001"));
        assert!(matches(VR::LO, "D*0*1", "DEMO-0001"));
        assert!(!matches(VR::LO, "X*", "DEMO-0001"));
        assert!(matches(VR::PN, "doe*", "DOE^JOHN"));
        assert!(matches(VR::LO, "", "anything"));
        assert!(matches(VR::LO, "*", ""));
        assert!(!matches(VR::LO, "A", ""));
        assert!(matches(VR::UI, "1.2\\1.3", "1.3"));
        assert!(!matches(VR::UI, "1.2*", "1.23"));
        assert!(matches(VR::DA, "20240101-20241231", "20240612"));
        assert!(!matches(VR::DA, "20240101-20241231", "20231120"));
        assert!(matches(VR::DA, "-20231231", "20231120"));
        assert!(matches(VR::DA, "20240101-", "20250201"));
        assert!(!matches(VR::DA, "20240101-", ""));
        assert!(matches(VR::DA, "20240105", "20240105"));
    }
}
