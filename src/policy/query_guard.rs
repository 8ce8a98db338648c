//! The anti-enumeration guard: a C-FIND must name someone or something, not ask for everyone; a
//! C-MOVE / C-GET must name what it retrieves. One rule for both doors (DIMSE and QIDO-RS).
//!
//! The rule for queries: at least one *identifying key* at or above the query level must be *specific*.
//! Identifying keys, by level: PatientID, PatientName (PATIENT); AccessionNumber, StudyID,
//! StudyInstanceUID (STUDY); SeriesInstanceUID (SERIES); SOPInstanceUID (IMAGE). A key is specific when
//! every one of its values (a multi-valued key `A\B` is matched value by value) is: a UID key's values
//! must be UIDs (digits and dots); any other key's values must each have at least `min_chars`
//! characters before their first wildcard (`*` or `?`), not counting spaces and the name separators
//! `^` and `=`. Empty keys, pure wildcards, dates, modalities and every other key never make a query
//! specific. A UID key whose value is not a UID (a wildcard, a letter) makes the identifier malformed,
//! whoever asks: archives differ in whether they apply wildcards to UIDs.
//!
//! The rule for retrievals: the unique key of the retrieve level is present and names UIDs (or, at
//! PATIENT level, patient IDs without wildcards), and no key of the identifier holds a wildcard.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The query / retrieve level (PS3.4 C.6), in hierarchy order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    /// The value of QueryRetrieveLevel (0008,0052), padding removed.
    pub fn parse(value: &str) -> Option<Level> {
        match value.trim_matches([' ', '\0']) {
            "PATIENT" => Some(Level::Patient),
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }

    /// The unique key of this level (PS3.4 C.6.1.1 / C.6.2.1).
    fn unique_key(self) -> (Tag, &'static str) {
        match self {
            Level::Patient => (tags::PATIENT_ID, "PatientID"),
            Level::Study => (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
            Level::Series => (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
            Level::Image => (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
        }
    }
}

/// Why the guard refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The request asks for too much (DIMSE 0xA700 / 0xA701, HTTP 403).
    #[error("{0}")]
    NotSpecific(String),
    /// The identifier cannot be judged (DIMSE 0xA900, HTTP 400).
    #[error("{0}")]
    Malformed(String),
}

/// The keys that can make a query specific, with their level.
pub const IDENTIFYING_KEYS: [(Tag, &str, Level); 7] = [
    (tags::PATIENT_ID, "PatientID", Level::Patient),
    (tags::PATIENT_NAME, "PatientName", Level::Patient),
    (tags::ACCESSION_NUMBER, "AccessionNumber", Level::Study),
    (tags::STUDY_ID, "StudyID", Level::Study),
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID", Level::Study),
    (
        tags::SERIES_INSTANCE_UID,
        "SeriesInstanceUID",
        Level::Series,
    ),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID", Level::Image),
];

/// The identifying keys whose values are UIDs.
pub const UID_KEYS: [Tag; 3] = [
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
];

/// The most values one multi-valued key may carry.
const MAX_VALUES: usize = 1000;

/// Characters of `value` before its first wildcard, separators and spaces not counted, nor `%` and
/// `_` (SQL's wildcards, which an archive on a database may pass on; Orthanc reads them as spaces in
/// an ID).
pub fn specific_chars(value: &str) -> usize {
    value
        .chars()
        .take_while(|c| *c != '*' && *c != '?')
        .filter(|c| !matches!(c, ' ' | '^' | '=' | '\0' | '%' | '_'))
        .count()
}

/// One UID (PS3.5 9.1): 1 to 64 characters, components of digits separated by single dots.
pub fn is_uid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

/// A UID, or a list of UIDs separated by backslashes (DICOM's value separator).
pub fn is_uid_list(value: &str) -> bool {
    let values = value.trim_matches([' ', '\0']);
    values.split('\\').count() <= MAX_VALUES && values.split('\\').all(is_uid)
}

fn values(value: &str) -> impl Iterator<Item = &str> {
    value.split('\\').map(|v| v.trim_matches([' ', '\0']))
}

fn has_wildcard(value: &str) -> bool {
    value.contains(['*', '?'])
}

/// UID keys that hold something other than UIDs make a request malformed (on either door).
pub fn check_uids(value_of: &impl Fn(Tag) -> String) -> Result<(), GuardError> {
    for (tag, name, _) in IDENTIFYING_KEYS {
        let value = value_of(tag);
        if UID_KEYS.contains(&tag)
            && !value.trim_matches([' ', '\0']).is_empty()
            && !is_uid_list(&value)
        {
            return Err(GuardError::Malformed(format!(
                "{name} is not a UID or a list of UIDs"
            )));
        }
    }
    Ok(())
}

/// `Ok(key)` naming the key that makes a query at `level` specific, or why it is not.
pub fn check_values(
    value_of: impl Fn(Tag) -> String,
    level: Level,
    min_chars: usize,
) -> Result<&'static str, GuardError> {
    check_uids(&value_of)?;
    let min_chars = min_chars.max(1);
    for (tag, name, key_level) in IDENTIFYING_KEYS {
        if key_level > level {
            continue; // a lower-level key does not narrow a higher-level query
        }
        let value = value_of(tag);
        if value.trim_matches([' ', '\0']).is_empty() {
            continue;
        }
        let specific = if UID_KEYS.contains(&tag) {
            true // checked above: UIDs only
        } else {
            values(&value).count() <= MAX_VALUES
                && values(&value).all(|v| specific_chars(v) >= min_chars)
        };
        if specific {
            return Ok(name);
        }
    }
    Err(GuardError::NotSpecific(format!(
        "query names no patient or study: no identifying key at or above the query level has \
         {min_chars} characters before a wildcard in each of its values"
    )))
}

/// `Ok(key)` naming the unique key a C-MOVE / C-GET at `level` retrieves by, or why it may not run.
pub fn check_retrieve(
    value_of: impl Fn(Tag) -> String,
    level: Level,
) -> Result<&'static str, GuardError> {
    check_uids(&value_of)?;
    for (tag, name, _) in IDENTIFYING_KEYS {
        if has_wildcard(&value_of(tag)) {
            return Err(GuardError::NotSpecific(format!(
                "a retrieve names no wildcard ({name})"
            )));
        }
    }
    let (tag, name) = level.unique_key();
    let value = value_of(tag);
    if value.trim_matches([' ', '\0']).is_empty() || values(&value).any(str::is_empty) {
        return Err(GuardError::NotSpecific(format!(
            "a retrieve at this level names its {name}"
        )));
    }
    Ok(name)
}

fn level_of(identifier: &InMemDicomObject) -> Result<Level, GuardError> {
    let value = crate::dimse::attribute(identifier, tags::QUERY_RETRIEVE_LEVEL);
    Level::parse(&value)
        .ok_or_else(|| GuardError::Malformed("no valid QueryRetrieveLevel (0008,0052)".into()))
}

/// The query rule for a DIMSE C-FIND identifier (its level read from it).
pub fn check(identifier: &InMemDicomObject, min_chars: usize) -> Result<&'static str, GuardError> {
    let level = level_of(identifier)?;
    check_values(
        |tag| crate::dimse::attribute(identifier, tag),
        level,
        min_chars,
    )
}

/// The unique keys of a retrieve, with their level (PS3.4 C.4.2.1.4, C.4.3.1.3: a C-MOVE / C-GET
/// names the unique keys of its level and the levels above, and nothing else).
const UNIQUE_KEYS: [(Tag, Level); 4] = [
    (tags::PATIENT_ID, Level::Patient),
    (tags::STUDY_INSTANCE_UID, Level::Study),
    (tags::SERIES_INSTANCE_UID, Level::Series),
    (tags::SOP_INSTANCE_UID, Level::Image),
];

/// The identifier a retrieve is forwarded with: QueryRetrieveLevel, SpecificCharacterSet and the
/// unique keys of its level and the levels above, as they came; every other key is left out. Any
/// other key with a value is one the archive may retrieve by instead of the unique key the guard
/// judged and the audit names: Orthanc retrieves a STUDY by AccessionNumber whenever one is given
/// (`\`, two empty values, names every study whose accession number is empty), and by the level's
/// key alone. SCUs that copy a C-FIND match into their C-MOVE (pynetdicom scripts, `findscu -X`
/// files) keep working.
pub fn retrieve_identifier(identifier: &InMemDicomObject) -> Result<InMemDicomObject, GuardError> {
    let level = level_of(identifier)?;
    let kept = [tags::QUERY_RETRIEVE_LEVEL, tags::SPECIFIC_CHARACTER_SET]
        .into_iter()
        .chain(
            UNIQUE_KEYS
                .iter()
                .filter(|(_, key_level)| *key_level <= level)
                .map(|(tag, _)| *tag),
        );
    let elements: Vec<_> = kept
        .filter_map(|tag| identifier.get(tag).cloned())
        .collect();
    Ok(InMemDicomObject::from_element_iter(elements))
}

/// A PatientID a retrieve may name: one value (VM 1), with a letter or digit. Orthanc looks a
/// patient up by its ID normalized (upper case, `%` and `_` as spaces, other than ASCII dropped,
/// trimmed): `_`, `%` or `é` would name the patient whose ID is empty, and `abc\ABC` one patient twice.
fn check_retrieve_patient_id(identifier: &InMemDicomObject) -> Result<(), GuardError> {
    let value = crate::dimse::attribute(identifier, tags::PATIENT_ID);
    let value = value.trim_matches([' ', '\0']);
    if value.is_empty() {
        return Ok(());
    }
    if value.contains('\\') {
        return Err(GuardError::Malformed(
            "a retrieve names one PatientID (it holds one value)".into(),
        ));
    }
    if !value.bytes().any(|b| b.is_ascii_alphanumeric()) {
        return Err(GuardError::Malformed(
            "a retrieve's PatientID holds no letter or digit".into(),
        ));
    }
    Ok(())
}

/// The retrieve rule for a DIMSE C-MOVE / C-GET identifier: its unique keys as it is forwarded
/// ([`retrieve_identifier`]) list no value twice (the archive would send it twice), PatientID is one
/// value with a letter or digit, no top-level string value holds a wildcard, and the level's unique
/// key is named.
pub fn check_retrieval(identifier: &InMemDicomObject) -> Result<&'static str, GuardError> {
    let level = level_of(identifier)?;
    check_uids(&|tag| crate::dimse::attribute(identifier, tag))?;
    check_retrieve_patient_id(identifier)?;
    for (tag, _) in &UNIQUE_KEYS {
        let value = crate::dimse::attribute(identifier, *tag);
        let listed: Vec<&str> = values(&value).filter(|v| !v.is_empty()).collect();
        let distinct: std::collections::HashSet<&&str> = listed.iter().collect();
        if distinct.len() < listed.len() {
            return Err(GuardError::Malformed(format!(
                "a retrieve lists a value of {tag} twice"
            )));
        }
    }
    for e in identifier.iter() {
        if e.header().vr != dicom_core::VR::SQ && e.to_str().is_ok_and(|v| has_wildcard(&v)) {
            return Err(GuardError::NotSpecific(format!(
                "a retrieve names no wildcard ({})",
                e.header().tag
            )));
        }
    }
    check_retrieve(|tag| crate::dimse::attribute(identifier, tag), level)
}

/// Character sets in which every ASCII byte means its ASCII character, so that the wildcards and the
/// value separator the guard judges are the bytes the archive matches on (PS3.3 C.12.1.1.2).
const PLAIN_CHARACTER_SETS: [&str; 13] = [
    "ISO_IR 6",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 144",
    "ISO_IR 127",
    "ISO_IR 126",
    "ISO_IR 138",
    "ISO_IR 148",
    "ISO_IR 166",
    "ISO_IR 203",
    "ISO_IR 192",
];

/// The text of a guarded identifier must read the same to the gateway and to the archive: one
/// Specific Character Set (0008,0005) without code extensions (ISO 2022 escape sequences are applied by
/// DCMTK and ignored by dicom-rs: `ESC ( B *` is three characters to one and `*` to the other), none of
/// the multi-byte sets whose bytes can look like `*`, `?` or `\`, and no control character in any value.
pub fn check_text(identifier: &InMemDicomObject) -> Result<(), GuardError> {
    if let Some(e) = identifier.get(tags::SPECIFIC_CHARACTER_SET) {
        let sets: Vec<String> = e
            .to_multi_str()
            .map(|v| {
                v.iter()
                    .map(|s| s.trim_matches([' ', '\0']).to_string())
                    .collect()
            })
            .unwrap_or_default();
        let plain = match sets.as_slice() {
            [] => true,
            [one] => one.is_empty() || PLAIN_CHARACTER_SETS.contains(&one.as_str()),
            _ => false,
        };
        if !plain {
            return Err(GuardError::Malformed(format!(
                "Specific Character Set {sets:?} is not supported in queries through the gateway \
                 (one of ISO_IR 6, 100-166, 203 or 192, without ISO 2022 code extensions)"
            )));
        }
    }
    for e in identifier.iter() {
        if e.header().vr == dicom_core::VR::SQ {
            continue;
        }
        if let Ok(v) = e.to_str()
            && v.trim_end_matches(['\0', ' '])
                .chars()
                .any(char::is_control)
        {
            return Err(GuardError::Malformed(format!(
                "{} holds a control character",
                e.header().tag
            )));
        }
    }
    Ok(())
}

/// Every UI value of an identifier's top level is a UID list (C-FIND, whoever asks).
pub fn check_identifier_uids(identifier: &InMemDicomObject) -> Result<(), GuardError> {
    check_uids(&|tag| crate::dimse::attribute(identifier, tag))?;
    for e in identifier.iter() {
        if e.header().vr == dicom_core::VR::UI {
            let v = e.to_str().map(|v| v.to_string()).unwrap_or_default();
            if !v.trim_matches([' ', '\0']).is_empty() && !is_uid_list(&v) {
                return Err(GuardError::Malformed(format!(
                    "{} is not a UID or a list of UIDs",
                    e.header().tag
                )));
            }
        }
    }
    Ok(())
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

    const STUDY: (Tag, VR, &str) = (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY");

    #[test]
    fn wildcards_and_empty_keys_are_not_specific() {
        for q in [
            query(&[STUDY, (tags::PATIENT_NAME, VR::PN, "*")]),
            query(&[STUDY, (tags::PATIENT_NAME, VR::PN, "S*")]),
            query(&[STUDY, (tags::PATIENT_ID, VR::LO, "")]),
            query(&[
                STUDY,
                (tags::PATIENT_NAME, VR::PN, "^*"),
                (tags::STUDY_DATE, VR::DA, "20240101"),
            ]),
            query(&[STUDY, (tags::MODALITIES_IN_STUDY, VR::CS, "CT")]),
        ] {
            assert!(matches!(check(&q, 2), Err(GuardError::NotSpecific(_))));
        }
    }

    #[test]
    fn a_named_patient_or_a_uid_is_specific() {
        assert_eq!(
            check(&query(&[STUDY, (tags::PATIENT_ID, VR::LO, "12345")]), 2),
            Ok("PatientID")
        );
        assert_eq!(
            check(&query(&[STUDY, (tags::PATIENT_NAME, VR::PN, "SM*")]), 2),
            Ok("PatientName")
        );
        assert!(check(&query(&[STUDY, (tags::PATIENT_NAME, VR::PN, "SM*")]), 3).is_err());
        assert_eq!(
            check(
                &query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")]),
                8
            ),
            Ok("StudyInstanceUID")
        );
        assert_eq!(
            check(
                &query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4")]),
                8
            ),
            Ok("StudyInstanceUID")
        );
        assert_eq!(specific_chars("DOE^J*"), 4);
    }

    #[test]
    fn every_value_of_a_multi_valued_key_must_be_specific() {
        for id in ["AB\\*", "AB\\", "12345\\?", "\\12345"] {
            assert!(
                check(&query(&[STUDY, (tags::PATIENT_ID, VR::LO, id)]), 2).is_err(),
                "{id}"
            );
        }
        assert_eq!(
            check(&query(&[STUDY, (tags::PATIENT_ID, VR::LO, "AB\\CD")]), 2),
            Ok("PatientID")
        );
    }

    #[test]
    fn uid_keys_must_hold_uids() {
        for uid in [
            "*", "1.2.*", "1.2.3?", "1..2", ".1", "1.2.", "abc", "1.2\\*",
        ] {
            assert!(
                matches!(
                    check(&query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, uid)]), 2),
                    Err(GuardError::Malformed(_))
                ),
                "{uid}"
            );
        }
        let long = "1.".repeat(32) + "1";
        assert!(!is_uid(&long) && is_uid(&long[2..]));
    }

    #[test]
    fn the_specific_key_must_be_at_or_above_the_query_level() {
        // A SeriesInstanceUID does not narrow a STUDY-level query: archives ignore lower-level keys.
        let q = query(&[STUDY, (tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3")]);
        assert!(matches!(check(&q, 2), Err(GuardError::NotSpecific(_))));
        let q = query(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
            (tags::ACCESSION_NUMBER, VR::SH, "A123"),
        ]);
        assert!(check(&q, 2).is_err());
        let q = query(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "IMAGE"),
            (tags::PATIENT_ID, VR::LO, "12345"),
        ]);
        assert_eq!(check(&q, 2), Ok("PatientID"));
        let q = query(&[(tags::PATIENT_ID, VR::LO, "12345")]);
        assert!(
            matches!(check(&q, 2), Err(GuardError::Malformed(_))),
            "no level"
        );
    }

    #[test]
    fn a_retrieve_names_its_unique_key_and_no_wildcard() {
        let ok = query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")]);
        assert_eq!(check_retrieval(&ok), Ok("StudyInstanceUID"));
        for q in [
            query(&[STUDY, (tags::PATIENT_ID, VR::LO, "12345")]),
            query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "")]),
            query(&[
                STUDY,
                (tags::PATIENT_NAME, VR::PN, "*"),
                (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
            ]),
            query(&[
                (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
                (tags::PATIENT_ID, VR::LO, "12*"),
            ]),
        ] {
            assert!(check_retrieval(&q).is_err());
        }
        assert!(matches!(
            check_retrieval(&query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "*")])),
            Err(GuardError::Malformed(_))
        ));
        let patient = query(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
            (tags::PATIENT_ID, VR::LO, "12345"),
        ]);
        assert_eq!(check_retrieval(&patient), Ok("PatientID"));
    }

    #[test]
    fn a_retrieve_is_forwarded_with_its_level_and_unique_keys_only() {
        let uid = (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3");
        // Keys the archive could retrieve by instead (Orthanc: AccessionNumber), and keys below
        // the level, are left out; the level's and those above stay.
        let q = query(&[
            (tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
            (tags::ACCESSION_NUMBER, VR::SH, "ACC1\\ACC2"),
            STUDY,
            (tags::PATIENT_ID, VR::LO, "12345"),
            (tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
            (Tag(0x0009, 0x1001), VR::LO, "private"),
            uid,
            (tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4"),
        ]);
        assert_eq!(check_retrieval(&q), Ok("StudyInstanceUID"));
        let kept = retrieve_identifier(&q).expect("rebuilt");
        let tags_kept: Vec<Tag> = kept.iter().map(|e| e.header().tag).collect();
        assert_eq!(
            tags_kept,
            vec![
                tags::SPECIFIC_CHARACTER_SET,
                tags::QUERY_RETRIEVE_LEVEL,
                tags::PATIENT_ID,
                tags::STUDY_INSTANCE_UID
            ]
        );
        // The same UID twice would be sent twice.
        let twice = query(&[
            STUDY,
            (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4\\1.2.3"),
        ]);
        assert!(matches!(
            check_retrieval(&twice),
            Err(GuardError::Malformed(_))
        ));
        let two = query(&[STUDY, (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4")]);
        assert_eq!(check_retrieval(&two), Ok("StudyInstanceUID"));
        // A PatientID Orthanc would normalize to nothing, or to one ID named twice.
        let patient = |id: &str| {
            query(&[
                (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
                (tags::PATIENT_ID, VR::LO, id),
            ])
        };
        for bad in ["_", "%", "__%", "\u{e9}", "abc\\ABC"] {
            assert!(
                matches!(
                    check_retrieval(&patient(bad)),
                    Err(GuardError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(check_retrieval(&patient("ABC_123")), Ok("PatientID"));
        // `%` and `_` do not make a query specific (SQL's wildcards).
        assert_eq!(specific_chars("______"), 0);
        assert_eq!(specific_chars("AB_C%D"), 4);
    }
}
