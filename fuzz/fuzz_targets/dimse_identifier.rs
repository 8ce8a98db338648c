//! Identifiers (C-FIND / C-MOVE / C-GET data sets, `dimse::decode_identifier`) in the two transfer
//! syntaxes the gateway decodes; the first byte picks Implicit (even) or Explicit (odd) VR Little Endian.
//! A decoded identifier also goes through the anti-enumeration guard and the attribute reader.
#![no_main]

use dicom_dictionary_std::tags;
use libfuzzer_sys::fuzz_target;
use pacsgate::dimse::{attribute, decode_identifier};
use pacsgate::policy::query_guard;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let ts = if which & 1 == 0 {
        "1.2.840.10008.1.2"
    } else {
        "1.2.840.10008.1.2.1\0"
    };
    if let Ok(obj) = decode_identifier(bytes, ts) {
        let _ = query_guard::check(&obj, usize::from(which >> 1) % 8);
        let _ = attribute(&obj, tags::PATIENT_NAME);
        let _ = attribute(&obj, tags::STUDY_INSTANCE_UID);
    }
});
