//! PDU framing (`pdu::read_pdu`) over a byte stream: the first two bytes pick the P-DATA / association
//! limit, the rest is read PDU after PDU as the gateway reads a peer. Checks that an accepted PDU is
//! exactly header + declared length, within its limit, and that `check_pdv_items` and `pdv_items` agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::ul::pdata::{check_pdv_items, pdv_items};
use pacsgate::ul::pdu::{self, PduError, read_pdu};
use pacsgate_fuzz::poll_once;

fuzz_target!(|data: &[u8]| {
    let Some((limit, mut stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    // 0..=1 MiB in 16-byte steps: the range of max_pdu_length and max_association_request_length.
    let limit = u32::from(u16::from_le_bytes(*limit)) * 16;
    let mut buf = Vec::new();
    for _ in 0..256 {
        let before = stream.len();
        let read = poll_once(read_pdu(&mut stream, &mut buf, limit)).expect("a slice never waits");
        match read {
            Ok(pdu_type) => {
                assert_eq!(buf[0], pdu_type);
                let declared = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                assert_eq!(buf.len(), pdu::PDU_HEADER_LENGTH + declared as usize);
                assert!(declared <= limit.max(64), "{declared} over {limit}");
                assert_eq!(before - stream.len(), buf.len(), "consumed exactly one PDU");
                if pdu_type == pdu::P_DATA_TF && check_pdv_items(&buf).is_ok() {
                    let tiled: usize = pdv_items(&buf).map(|p| 6 + p.data.len()).sum();
                    assert_eq!(
                        tiled,
                        buf.len() - 6,
                        "pdv_items skipped part of a checked PDU"
                    );
                }
            }
            Err(PduError::Closed) => {
                assert_eq!(before, 0, "Closed with bytes left");
                return;
            }
            Err(_) => return,
        }
    }
});
