//! DIMSE command sets (`dimse::decode_command`, always Implicit VR Little Endian), and the responses
//! the gateway builds from a decoded request (`refusal`, `with_status`), which must decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::dimse::{decode_command, refusal, status, with_status};

fuzz_target!(|data: &[u8]| {
    let Ok(c) = decode_command(data) else {
        return;
    };
    let r = decode_command(&refusal(
        &c,
        status::REFUSED_NOT_AUTHORIZED,
        "pacsgate: fuzz",
    ))
    .expect("the gateway's refusal decodes");
    assert_eq!(r.responded_to, c.message_id);
    assert_eq!(r.status, Some(status::REFUSED_NOT_AUTHORIZED));
    assert!(!r.has_data_set);
    let w = decode_command(&with_status(&c, status::CANCEL, "pacsgate: cap"))
        .expect("a rewritten response decodes");
    assert_eq!(w.status, Some(status::CANCEL));
    assert_eq!(w.field, c.field);
});
