//! The demo archive's in-memory store and the synthetic patients it starts with.

use std::collections::BTreeMap;
use std::io::{BufReader, Cursor};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::file::ReadPreamble;
use dicom_object::{DicomCollectorOptions, InMemDicomObject};

use super::DemoArchiveError;
use super::dimse::{self, trim_value};
use super::query::STORED_KEYS;
use crate::dimse::{ITEM, ITEM_END, SEQUENCE_END, UNDEFINED};

/// Root of every UID the synthetic data uses (not a registered root: demo data only).
pub const DEMO_UID_ROOT: &str = "1.2.826.0.1.3680043.10.1234";
/// Total data set bytes the archive keeps; a C-STORE beyond it gets 0xA700.
pub(crate) const MAX_ARCHIVE_BYTES: usize = 512 * 1024 * 1024;

/// The embedded archive: instances keyed by SOP Instance UID.
///
/// Each instance keeps its data set exactly as received (no file meta group) in the transfer
/// syntax it was received in, plus the patient/study/series/instance attributes used for queries.
#[derive(Debug, Default)]
pub struct DemoArchive {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    instances: BTreeMap<String, Arc<Instance>>,
    total_bytes: usize,
}

/// One stored instance.
#[derive(Debug)]
pub(crate) struct Instance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Values of `STORED_KEYS` present in the data set, padding trimmed.
    attributes: Vec<(Tag, String)>,
    pub data_set: Vec<u8>,
}

/// Transfer syntaxes whose bytes the nesting walk cannot read: deflated, and big endian (retired).
const UNWALKABLE: [&str; 3] = [
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.95",
];

/// Before dicom-object's (recursive) reader sees a stored data set: walk it once, without recursion,
/// and refuse sequences nested deeper than the gateway's bound ([`crate::dimse::MAX_NESTING`]), so
/// that a deeply nested C-STORE gets a failure status instead of overflowing the stack. Only the
/// nesting is judged here (the store keeps what it receives); encapsulated pixel data is skipped.
pub(crate) fn check_nesting(b: &[u8], explicit: bool) -> Result<(), String> {
    // (kind, where a defined-length frame ends)
    let mut stack: Vec<(Nest, Option<usize>)> = vec![(Nest::Elements, Some(b.len()))];
    let mut at = 0usize;
    loop {
        while let Some(&(_, Some(end))) = stack.last() {
            if at < end {
                break;
            }
            stack.pop();
        }
        if at >= b.len() || stack.is_empty() {
            return Ok(());
        }
        let header = nesting_header(b, at, explicit)?;
        at = nesting_step(&mut stack, b.len(), at, header)?;
    }
}

/// What the nesting walk is inside of.
#[derive(Clone, Copy, PartialEq)]
enum Nest {
    Elements,
    Sequence,
    Fragments,
}

/// An element header as the nesting walk reads it: tag, VR, value length, header length.
type NestHeader = (Tag, VR, u32, usize);

fn le16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_le_bytes([x[0], x[1]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// Read the element header at `at` (items and delimiters have no VR in either syntax).
fn nesting_header(b: &[u8], at: usize, explicit: bool) -> Result<NestHeader, String> {
    use dicom_core::dictionary::DataDictionary;
    let (Some(group), Some(element)) = (le16(b, at), le16(b, at + 2)) else {
        return Err("truncated element header".into());
    };
    let tag = Tag(group, element);
    if group == 0xFFFE || !explicit {
        let len = le32(b, at + 4).ok_or("truncated element header")?;
        let vr = if group == 0xFFFE {
            VR::UN
        } else {
            dicom_dictionary_std::StandardDataDictionary
                .by_tag(tag)
                .map_or(VR::UN, |e| e.vr.relaxed())
        };
        return Ok((tag, vr, len, 8));
    }
    let code = b.get(at + 4..at + 6).ok_or("truncated element header")?;
    let vr = VR::from_binary([code[0], code[1]])
        .ok_or_else(|| format!("element {tag} has no standard VR"))?;
    if crate::dimse::has_long_length(vr) {
        Ok((
            tag,
            vr,
            le32(b, at + 8).ok_or("truncated element header")?,
            12,
        ))
    } else {
        Ok((tag, vr, u32::from(le16(b, at + 6).ok_or("truncated")?), 8))
    }
}

/// One element met at `at`: the frame it opens or closes, and where the walk goes on.
fn nesting_step(
    stack: &mut Vec<(Nest, Option<usize>)>,
    total: usize,
    at: usize,
    (tag, vr, len, header): NestHeader,
) -> Result<usize, String> {
    let max = crate::dimse::MAX_NESTING;
    let top = stack.last().map_or(Nest::Elements, |f| f.0);
    let defined_end = |len: u32| at + header + len as usize;
    Ok(match tag {
        ITEM if top == Nest::Fragments => defined_end(len.min(total as u32)),
        ITEM => {
            let end = (len != UNDEFINED).then(|| defined_end(len));
            stack.push((Nest::Elements, end));
            at + header
        }
        // A delimiter closes only the undefined-length frame it belongs to; one out of place
        // closes nothing (so the depth counted here is never below a reader's).
        ITEM_END => {
            if stack.len() > 1 && stack.last() == Some(&(Nest::Elements, None)) {
                stack.pop();
            }
            at + header
        }
        SEQUENCE_END => {
            if matches!(
                stack.last(),
                Some(&(Nest::Sequence | Nest::Fragments, None))
            ) {
                stack.pop();
            }
            at + header
        }
        _ if tag == tags::PIXEL_DATA && len == UNDEFINED => {
            stack.push((Nest::Fragments, None));
            at + header
        }
        // A sequence, or anything of undefined length (which readers take as one).
        _ if vr == VR::SQ || len == UNDEFINED => {
            let depth = stack.iter().filter(|f| f.0 == Nest::Sequence).count();
            if depth >= max {
                return Err(format!("sequences nested deeper than {max} levels"));
            }
            let end = (len != UNDEFINED).then(|| defined_end(len));
            stack.push((Nest::Sequence, end));
            at + header
        }
        _ => defined_end(len),
    })
}

impl Instance {
    /// Index a data set (read up to the pixel data) in the given transfer syntax.
    pub fn from_data_set(data_set: Vec<u8>, ts_uid: &str) -> Result<Instance, DemoArchiveError> {
        if UNWALKABLE.contains(&ts_uid) {
            return Err(DemoArchiveError::DataSet(format!(
                "the demo archive does not store data sets in {ts_uid} (deflated or big endian)"
            )));
        }
        check_nesting(&data_set, ts_uid != uids::IMPLICIT_VR_LITTLE_ENDIAN)
            .map_err(DemoArchiveError::DataSet)?;
        let mut collector = DicomCollectorOptions::new()
            .read_preamble(ReadPreamble::Never)
            .expected_ts(ts_uid.to_string())
            .from_reader(BufReader::new(Cursor::new(&data_set[..])));
        let mut obj = InMemDicomObject::new_empty();
        collector
            .read_dataset_up_to_pixeldata(&mut obj)
            .map_err(|e| DemoArchiveError::DataSet(e.to_string()))?;
        let attributes: Vec<(Tag, String)> = STORED_KEYS
            .iter()
            .filter_map(|key| {
                let value = obj.get(key.tag)?.to_str().ok()?;
                Some((key.tag, trim_value(&value).to_string()))
            })
            .collect();
        let find = |tag| {
            attributes
                .iter()
                .find(|(t, _)| *t == tag)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let sop_instance_uid = find(tags::SOP_INSTANCE_UID)
            .ok_or_else(|| DemoArchiveError::DataSet("no SOP Instance UID".into()))?;
        let sop_class_uid = find(tags::SOP_CLASS_UID)
            .ok_or_else(|| DemoArchiveError::DataSet("no SOP Class UID".into()))?;
        drop(collector);
        Ok(Instance {
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid: ts_uid.to_string(),
            attributes,
            data_set,
        })
    }

    /// A stored attribute value (multiple values joined by `\`), empty when absent.
    pub fn attribute(&self, tag: Tag) -> &str {
        self.attributes
            .iter()
            .find(|(t, _)| *t == tag)
            .map_or("", |(_, v)| v.as_str())
    }
}

impl DemoArchive {
    /// An archive with no instances.
    pub fn empty() -> DemoArchive {
        DemoArchive::default()
    }

    /// An archive with 4 patients, 6 studies, 8 series and 14 small CT/MR images
    /// (64x64 MONOCHROME2, 16 bits allocated), UIDs under `DEMO_UID_ROOT`, stored in
    /// Explicit VR Little Endian. The same call always builds the same bytes.
    pub fn with_synthetic_data() -> DemoArchive {
        let archive = DemoArchive::empty();
        for (data_set, ts) in synthetic::data_sets() {
            if let Err(e) = archive.store(data_set, ts) {
                tracing::error!(error = %e, "demo archive: synthetic instance not stored");
            }
        }
        archive
    }

    pub fn instance_count(&self) -> usize {
        self.lock().instances.len()
    }

    /// The data set of an instance as received: no file meta group, in the transfer syntax it
    /// was received in (see `instance_transfer_syntax`). Synthetic instances are Explicit VR LE.
    pub fn instance_bytes(&self, sop_instance_uid: &str) -> Option<Vec<u8>> {
        let uid = trim_value(sop_instance_uid);
        self.lock().instances.get(uid).map(|i| i.data_set.clone())
    }

    /// The transfer syntax UID an instance's bytes are encoded in.
    pub fn instance_transfer_syntax(&self, sop_instance_uid: &str) -> Option<String> {
        let uid = trim_value(sop_instance_uid);
        self.lock()
            .instances
            .get(uid)
            .map(|i| i.transfer_syntax_uid.clone())
    }

    /// Store a data set (no file meta group) encoded in `transfer_syntax_uid`, replacing any
    /// instance with the same SOP Instance UID. Returns that UID.
    pub fn store(
        &self,
        data_set: Vec<u8>,
        transfer_syntax_uid: &str,
    ) -> Result<String, DemoArchiveError> {
        let instance = Instance::from_data_set(data_set, transfer_syntax_uid)?;
        let uid = instance.sop_instance_uid.clone();
        self.insert(instance)?;
        Ok(uid)
    }

    pub(crate) fn insert(&self, instance: Instance) -> Result<(), DemoArchiveError> {
        let mut inner = self.lock();
        let replaced = inner
            .instances
            .get(&instance.sop_instance_uid)
            .map_or(0, |old| old.data_set.len());
        let total = inner.total_bytes - replaced + instance.data_set.len();
        if total > MAX_ARCHIVE_BYTES {
            return Err(DemoArchiveError::ArchiveFull);
        }
        inner.total_bytes = total;
        inner
            .instances
            .insert(instance.sop_instance_uid.clone(), Arc::new(instance));
        Ok(())
    }

    /// All instances, ordered by SOP Instance UID; the lock is not held afterwards.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Instance>> {
        self.lock().instances.values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The store is only mutated by whole-value inserts: a poisoned lock still holds a consistent map.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

mod synthetic {
    //! Deterministic demo patients, studies, series and images.
    use super::*;

    struct Patient {
        id: &'static str,
        name: &'static str,
        birth_date: &'static str,
        sex: &'static str,
        studies: &'static [Study],
    }

    struct Study {
        date: &'static str,
        time: &'static str,
        accession: &'static str,
        description: &'static str,
        /// (modality, series description, number of images)
        series: &'static [(&'static str, &'static str, u32)],
    }

    const PATIENTS: &[Patient] = &[
        Patient {
            id: "DEMO-0001",
            name: "DOE^JOHN",
            birth_date: "19700101",
            sex: "M",
            studies: &[
                Study {
                    date: "20240105",
                    time: "093000",
                    accession: "ACC0001",
                    description: "CT CHEST",
                    series: &[("CT", "AXIAL 5MM", 2), ("CT", "CORONAL", 1)],
                },
                Study {
                    date: "20240612",
                    time: "141500",
                    accession: "ACC0002",
                    description: "MR BRAIN",
                    series: &[("MR", "T1 AXIAL", 2)],
                },
            ],
        },
        Patient {
            id: "DEMO-0002",
            name: "SMITH^JANE",
            birth_date: "19851224",
            sex: "F",
            studies: &[Study {
                date: "20231120",
                time: "080000",
                accession: "ACC0003",
                description: "CT ABDOMEN",
                series: &[("CT", "PORTAL VENOUS", 3)],
            }],
        },
        Patient {
            id: "DEMO-0003",
            name: "NGUYEN^AN",
            birth_date: "19921003",
            sex: "O",
            studies: &[Study {
                date: "20250201",
                time: "101010",
                accession: "ACC0004",
                description: "MR KNEE",
                series: &[("MR", "PD SAGITTAL", 2), ("MR", "T2 CORONAL", 1)],
            }],
        },
        Patient {
            id: "DEMO-0004",
            name: "GARCIA^MARIA",
            birth_date: "19600515",
            sex: "F",
            studies: &[
                Study {
                    date: "20220707",
                    time: "120000",
                    accession: "ACC0005",
                    description: "CT HEAD",
                    series: &[("CT", "AXIAL", 1)],
                },
                Study {
                    date: "20240930",
                    time: "163000",
                    accession: "ACC0006",
                    description: "MR SPINE",
                    series: &[("MR", "T2 SAGITTAL", 2)],
                },
            ],
        },
    ];

    const SIZE: u16 = 64;

    /// Every synthetic instance as (Explicit VR LE data set, transfer syntax UID).
    pub(super) fn data_sets() -> Vec<(Vec<u8>, &'static str)> {
        let mut out = Vec::new();
        for (p, patient) in PATIENTS.iter().enumerate() {
            for (s, study) in patient.studies.iter().enumerate() {
                let study_uid = format!("{DEMO_UID_ROOT}.2.{}.{}", p + 1, s + 1);
                for (r, (modality, description, images)) in study.series.iter().enumerate() {
                    let series_uid = format!("{DEMO_UID_ROOT}.3.{}.{}.{}", p + 1, s + 1, r + 1);
                    for i in 1..=*images {
                        let uid = format!("{DEMO_UID_ROOT}.4.{}.{}.{}.{i}", p + 1, s + 1, r + 1);
                        let image = Image {
                            patient,
                            study,
                            study_uid: &study_uid,
                            study_id: s + 1,
                            series_uid: &series_uid,
                            series_number: r + 1,
                            modality,
                            series_description: description,
                            sop_instance_uid: &uid,
                            instance_number: i,
                        };
                        match dimse::encode_data_set(
                            &image.build(),
                            uids::EXPLICIT_VR_LITTLE_ENDIAN,
                        ) {
                            Ok(bytes) => out.push((bytes, uids::EXPLICIT_VR_LITTLE_ENDIAN)),
                            Err(e) => {
                                tracing::error!(error = %e, "demo archive: encode synthetic image")
                            }
                        }
                    }
                }
            }
        }
        out
    }

    struct Image<'a> {
        patient: &'a Patient,
        study: &'a Study,
        study_uid: &'a str,
        study_id: usize,
        series_uid: &'a str,
        series_number: usize,
        modality: &'a str,
        series_description: &'a str,
        sop_instance_uid: &'a str,
        instance_number: u32,
    }

    impl Image<'_> {
        fn build(&self) -> InMemDicomObject {
            let mut obj = InMemDicomObject::new_empty();
            self.put_identity(&mut obj);
            self.put_image(&mut obj);
            obj
        }

        /// SOP, patient, study and series attributes.
        fn put_identity(&self, obj: &mut InMemDicomObject) {
            let sop_class = if self.modality == "CT" {
                uids::CT_IMAGE_STORAGE
            } else {
                uids::MR_IMAGE_STORAGE
            };
            let mut put = |tag: Tag, vr: VR, value: PrimitiveValue| {
                obj.put(DataElement::new(tag, vr, value));
            };
            let text = |s: &str| PrimitiveValue::from(s);
            put(tags::SPECIFIC_CHARACTER_SET, VR::CS, text("ISO_IR 100"));
            put(tags::IMAGE_TYPE, VR::CS, text("ORIGINAL\\PRIMARY\\AXIAL"));
            put(tags::SOP_CLASS_UID, VR::UI, text(sop_class));
            put(tags::SOP_INSTANCE_UID, VR::UI, text(self.sop_instance_uid));
            put(tags::STUDY_DATE, VR::DA, text(self.study.date));
            put(tags::SERIES_DATE, VR::DA, text(self.study.date));
            put(tags::CONTENT_DATE, VR::DA, text(self.study.date));
            put(tags::STUDY_TIME, VR::TM, text(self.study.time));
            put(tags::CONTENT_TIME, VR::TM, text(self.study.time));
            put(tags::ACCESSION_NUMBER, VR::SH, text(self.study.accession));
            put(tags::MODALITY, VR::CS, text(self.modality));
            put(tags::MANUFACTURER, VR::LO, text("PACSGATE DEMO"));
            put(tags::REFERRING_PHYSICIAN_NAME, VR::PN, text("WELBY^MARCUS"));
            put(
                tags::STUDY_DESCRIPTION,
                VR::LO,
                text(self.study.description),
            );
            put(
                tags::SERIES_DESCRIPTION,
                VR::LO,
                text(self.series_description),
            );
            put(tags::PATIENT_NAME, VR::PN, text(self.patient.name));
            put(tags::PATIENT_ID, VR::LO, text(self.patient.id));
            put(
                tags::PATIENT_BIRTH_DATE,
                VR::DA,
                text(self.patient.birth_date),
            );
            put(tags::PATIENT_SEX, VR::CS, text(self.patient.sex));
            put(tags::STUDY_INSTANCE_UID, VR::UI, text(self.study_uid));
            put(tags::SERIES_INSTANCE_UID, VR::UI, text(self.series_uid));
            put(tags::STUDY_ID, VR::SH, text(&self.study_id.to_string()));
            put(
                tags::SERIES_NUMBER,
                VR::IS,
                text(&self.series_number.to_string()),
            );
            put(
                tags::INSTANCE_NUMBER,
                VR::IS,
                text(&self.instance_number.to_string()),
            );
        }

        /// Image pixel attributes, the CT rescale and the pixel data.
        fn put_image(&self, obj: &mut InMemDicomObject) {
            let mut put = |tag: Tag, vr: VR, value: PrimitiveValue| {
                obj.put(DataElement::new(tag, vr, value));
            };
            let text = |s: &str| PrimitiveValue::from(s);
            put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
            put(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                text("MONOCHROME2"),
            );
            put(tags::ROWS, VR::US, PrimitiveValue::from(SIZE));
            put(tags::COLUMNS, VR::US, PrimitiveValue::from(SIZE));
            put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
            put(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16));
            put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16));
            put(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0u16),
            );
            if self.modality == "CT" {
                put(tags::RESCALE_INTERCEPT, VR::DS, text("-1024"));
                put(tags::RESCALE_SLOPE, VR::DS, text("1"));
            }
            put(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(self.pixels()),
            );
        }

        /// A 12-bit diagonal gradient with a bright disc, shifted per instance.
        fn pixels(&self) -> Vec<u8> {
            let n = i32::from(SIZE);
            let shift = (self.instance_number as usize * 7 + self.series_number * 3) as i32;
            let mut bytes = Vec::with_capacity((n * n * 2) as usize);
            for y in 0..n {
                for x in 0..n {
                    let (dx, dy) = (x - n / 2 + shift % 8, y - n / 2);
                    let disc = if dx * dx + dy * dy < 144 { 2000 } else { 0 };
                    let value = ((x + y) * 16 + disc) as u16 & 0x0FFF;
                    bytes.extend_from_slice(&value.to_le_bytes());
                }
            }
            bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_nesting;

    fn header(group: u16, element: u16, vr: &[u8; 2], len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
        out
    }

    fn item(len: u32) -> Vec<u8> {
        let mut out = vec![0xFE, 0xFF, 0x00, 0xE0];
        out.extend_from_slice(&len.to_le_bytes());
        out
    }

    #[test]
    fn encapsulated_pixel_data_is_not_nesting_and_deep_sequences_are_refused() {
        // Explicit VR LE: encapsulated pixel data with 40 fragments (each an item) passes.
        let mut b = header(0x7FE0, 0x0010, b"OB", 0xFFFF_FFFF);
        for _ in 0..40 {
            b.extend(item(4));
            b.extend_from_slice(&[1, 2, 3, 4]);
        }
        b.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert_eq!(check_nesting(&b, true), Ok(()));

        // Sequences of defined length nested 16 deep pass, 17 deep do not.
        let nested = |depth: usize| {
            let mut inner: Vec<u8> = Vec::new();
            for _ in 0..depth {
                let mut item_bytes = item(inner.len() as u32);
                item_bytes.extend(&inner);
                let mut seq = header(0x0040, 0xA730, b"SQ", item_bytes.len() as u32);
                seq.extend(item_bytes);
                inner = seq;
            }
            inner
        };
        assert_eq!(check_nesting(&nested(16), true), Ok(()));
        assert!(check_nesting(&nested(17), true).is_err());
        // Undefined lengths in Implicit VR: the same bound.
        let mut b = Vec::new();
        for _ in 0..17 {
            b.extend_from_slice(&[0x40, 0x00, 0x30, 0xA7, 0xFF, 0xFF, 0xFF, 0xFF]);
            b.extend(item(0xFFFF_FFFF));
        }
        assert!(check_nesting(&b, false).is_err());
    }
}
