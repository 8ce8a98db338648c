//! The anti-enumeration guard: a C-FIND must name someone or something, not ask for everyone.
//!
//! The rule: at least one *identifying key* of the identifier must be *specific*. Identifying keys are
//! PatientID, PatientName, AccessionNumber, StudyID, StudyInstanceUID,
//! SeriesInstanceUID and SOPInstanceUID. A value is specific when it has at least `min_chars`
//! characters before its first wildcard (`*` or `?`), not counting spaces and the name separators
//! `^` and `=`. A UID key with any value (a UID or a UID list) is specific. Empty keys, pure
//! wildcards, dates, modalities and every other key never make a query specific.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The keys that can make a query specific.
pub const IDENTIFYING_KEYS: [(Tag, &str); 7] = [
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_NAME, "PatientName"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
    (tags::STUDY_ID, "StudyID"),
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
    (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
];

const UID_KEYS: [Tag; 3] = [
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
];

/// Characters of `value` before its first wildcard, separators and spaces not counted.
pub fn specific_chars(value: &str) -> usize {
    value
        .chars()
        .take_while(|c| *c != '*' && *c != '?')
        .filter(|c| !matches!(c, ' ' | '^' | '=' | '\0'))
        .count()
}

/// `Ok(key)` naming the key that makes the query specific, or `Err` saying why it is not.
pub fn check(identifier: &InMemDicomObject, min_chars: usize) -> Result<&'static str, String> {
    check_values(|tag| crate::dimse::attribute(identifier, tag), min_chars)
}

/// The same rule over any source of key values (a DIMSE identifier, QIDO-RS query parameters).
pub fn check_values(
    value_of: impl Fn(Tag) -> String,
    min_chars: usize,
) -> Result<&'static str, String> {
    for (tag, name) in IDENTIFYING_KEYS {
        let value = value_of(tag);
        if value.is_empty() {
            continue;
        }
        if UID_KEYS.contains(&tag) {
            if specific_chars(&value) > 0 {
                return Ok(name);
            }
            continue;
        }
        if specific_chars(&value) >= min_chars.max(1) {
            return Ok(name);
        }
    }
    Err(format!(
        "query names no patient or study: no identifying key has {} characters before a wildcard",
        min_chars.max(1)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    fn query(keys: &[(Tag, VR, &str)]) -> InMemDicomObject {
        InMemDicomObject::from_element_iter(
            keys.iter()
                .map(|(t, vr, v)| DataElement::new(*t, *vr, PrimitiveValue::from(*v))),
        )
    }

    #[test]
    fn wildcards_and_empty_keys_are_not_specific() {
        let level = (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY");
        for q in [
            query(&[level, (tags::PATIENT_NAME, VR::PN, "*")]),
            query(&[level, (tags::PATIENT_NAME, VR::PN, "S*")]),
            query(&[level, (tags::PATIENT_ID, VR::LO, "")]),
            query(&[
                level,
                (tags::PATIENT_NAME, VR::PN, "^*"),
                (tags::STUDY_DATE, VR::DA, "20240101"),
            ]),
            query(&[level, (tags::MODALITIES_IN_STUDY, VR::CS, "CT")]),
        ] {
            assert!(check(&q, 2).is_err());
        }
    }

    #[test]
    fn a_named_patient_or_a_uid_is_specific() {
        let level = (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY");
        assert_eq!(
            check(&query(&[level, (tags::PATIENT_ID, VR::LO, "12345")]), 2),
            Ok("PatientID")
        );
        assert_eq!(
            check(&query(&[level, (tags::PATIENT_NAME, VR::PN, "SM*")]), 2),
            Ok("PatientName")
        );
        assert!(check(&query(&[level, (tags::PATIENT_NAME, VR::PN, "SM*")]), 3).is_err());
        assert_eq!(
            check(
                &query(&[level, (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")]),
                8
            ),
            Ok("StudyInstanceUID")
        );
        assert_eq!(specific_chars("DOE^J*"), 4);
    }
}
