//! PDV reassembly and DIMSE policy: a `session::Session` (the gateway's `relay::Inspector`) fed a
//! sequence of P-DATA-TF PDUs from either side, as the relay feeds it after `check_pdv_items`.
//! Input: chunks of [side/role byte][2-byte length][PDU body]. Whatever the session forwards or
//! answers must be well-formed P-DATA-TF within the receiving peer's maximum PDU length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::relay::{Forward, Inspector, Side};
use pacsgate::ul::pdata::check_pdv_items;
use pacsgate_fuzz::{PDU_LIMIT, assert_well_formed_pdata, pdata, session};

fuzz_target!(|data: &[u8]| {
    let Some((&role, mut rest)) = data.split_first() else {
        return;
    };
    let mut s = session(if role & 1 == 0 { "clinician" } else { "reader" });
    for _ in 0..512 {
        let Some((&[flags, hi, lo], tail)) = rest.split_first_chunk::<3>() else {
            return;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo])).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        let from = if flags & 1 == 0 {
            Side::Requestor
        } else {
            Side::Acceptor
        };
        let pdu = pdata(body);
        // The relay drops the association on a malformed PDU before the inspector sees it.
        if check_pdv_items(&pdu).is_err() || body.len() > PDU_LIMIT as usize {
            return;
        }
        let actions = match s.inspect_pdu(from, &pdu) {
            Ok(a) => a,
            Err(_) => return, // a protocol violation: the relay aborts both sides
        };
        if let Forward::Rebuilt(bytes) = &actions.forward {
            assert_well_formed_pdata(bytes, PDU_LIMIT, "forwarded");
        }
        assert_well_formed_pdata(&actions.back, PDU_LIMIT, "answered back");
    }
});
