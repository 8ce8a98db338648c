//! The PDV items of a P-DATA-TF PDU checked in one pass into spans the relay keeps from PDU to PDU
//! (`PdvSpans`), and the PDU handed to the inspector with them (`PData`).

use crate::dimse::Pdv;
use crate::ul::pdu;

/// Where one PDV item's fields are in its P-DATA-TF PDU.
#[derive(Debug, Clone, Copy)]
struct PdvSpan {
    presentation_context_id: u8,
    /// The message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
    header: u8,
    /// The fragment: `pdu[start..end]`.
    start: usize,
    end: usize,
}

/// A list of PDV spans larger than this is given back after use rather than kept for the next PDU.
const KEEP_SPANS: usize = 1024;

/// The PDV items of the P-DATA-TF PDUs one direction relays, checked in one pass per PDU into spans
/// kept from PDU to PDU: once grown to the usual count of items, checking a PDU allocates nothing.
#[derive(Debug, Default)]
pub struct PdvSpans {
    spans: Vec<PdvSpan>,
}

impl PdvSpans {
    /// Check that the PDV items of a whole P-DATA-TF PDU tile its body exactly (PS3.8 9.3.5.1), with
    /// the errors of `dimse::check_pdv_items`, and give the PDU with its items.
    pub fn check<'a>(&'a mut self, pdu: &'a [u8]) -> Result<PData<'a>, String> {
        if self.spans.capacity() > KEEP_SPANS {
            self.spans = Vec::new();
        }
        self.spans.clear();
        let body = pdu.get(pdu::PDU_HEADER_LENGTH..).unwrap_or_default();
        if body.is_empty() {
            return Err("P-DATA-TF without PDV items".into());
        }
        let mut at = pdu::PDU_HEADER_LENGTH;
        let mut rest = body;
        while !rest.is_empty() {
            let Some(&[l0, l1, l2, l3]) = rest.first_chunk::<4>() else {
                return Err("truncated PDV item header".into());
            };
            let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
            if len < 2 {
                return Err(format!("PDV item length {len} is too short"));
            }
            let Some(&[presentation_context_id, header, ..]) = rest.get(4..4 + len) else {
                return Err(format!("PDV item length {len} overruns its PDU"));
            };
            self.spans.push(PdvSpan {
                presentation_context_id,
                header,
                start: at + 6,
                end: at + 4 + len,
            });
            at += 4 + len;
            rest = &rest[4 + len..];
        }
        Ok(PData {
            pdu,
            spans: &self.spans,
        })
    }
}

/// A whole P-DATA-TF PDU whose PDV items tile its body, and where they are.
#[derive(Debug, Clone, Copy)]
pub struct PData<'a> {
    pdu: &'a [u8],
    spans: &'a [PdvSpan],
}

impl<'a> PData<'a> {
    /// The PDU as it came, header included.
    pub fn pdu(self) -> &'a [u8] {
        self.pdu
    }

    /// How many PDV items it holds (at least one).
    pub fn len(self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(self) -> bool {
        self.spans.is_empty()
    }

    /// Its PDV items, in order.
    pub fn items(self) -> impl ExactSizeIterator<Item = Pdv<'a>> + Clone + 'a {
        let pdu = self.pdu;
        self.spans.iter().map(move |s| Pdv {
            presentation_context_id: s.presentation_context_id,
            is_command: s.header & 0x01 != 0,
            is_last: s.header & 0x02 != 0,
            data: pdu.get(s.start..s.end).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every P-DATA-TF PDU of up to 12 body bytes (lengths 0..=6 and bytes from a small alphabet):
    /// the one-pass check agrees with `dimse::check_pdv_items` (same error text) and `dimse::pdv_items`.
    #[test]
    fn pdv_spans_agree_with_the_dimse_check_and_items() {
        let alphabet = [0u8, 1, 2, 3, 6, 0xff];
        let mut spans = PdvSpans::default();
        let mut checked = 0;
        for len in 0..=12usize {
            let combos = alphabet.len().pow(len.min(6) as u32);
            for n in 0..combos {
                let mut body = Vec::with_capacity(len);
                let mut k = n;
                for i in 0..len {
                    // Item lengths where they are most likely, bytes elsewhere.
                    body.push(if i < 6 {
                        alphabet[k % alphabet.len()]
                    } else {
                        i as u8
                    });
                    k /= alphabet.len();
                }
                let mut pdu = vec![pdu::P_DATA_TF, 0];
                pdu.extend_from_slice(&(len as u32).to_be_bytes());
                pdu.extend_from_slice(&body);
                let expected = crate::dimse::check_pdv_items(&pdu);
                match (spans.check(&pdu), expected) {
                    (Ok(pdata), Ok(())) => {
                        checked += 1;
                        assert_eq!(pdata.pdu(), &pdu[..]);
                        let ours: Vec<Pdv> = pdata.items().collect();
                        let theirs: Vec<Pdv> = crate::dimse::pdv_items(&pdu).collect();
                        assert_eq!(ours.len(), pdata.len());
                        assert_eq!(ours, theirs, "{pdu:?}");
                    }
                    (Err(a), Err(b)) => assert_eq!(a, b, "{pdu:?}"),
                    (a, b) => panic!("{pdu:?}: {:?} vs {b:?}", a.map(|p| p.len())),
                }
            }
        }
        assert!(checked > 100, "well-formed cases covered: {checked}");
    }

    #[test]
    fn pdv_spans_keep_their_list_from_pdu_to_pdu_unless_it_grew_large() {
        let item = |data: &[u8], pdu: &mut Vec<u8>| {
            pdu.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
            pdu.extend_from_slice(&[1, 0x02]);
            pdu.extend_from_slice(data);
        };
        let whole = |items: usize| {
            let mut body = Vec::new();
            for i in 0..items {
                item(&[i as u8; 3], &mut body);
            }
            let mut pdu = vec![pdu::P_DATA_TF, 0];
            pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
            pdu.extend_from_slice(&body);
            pdu
        };
        let mut spans = PdvSpans::default();
        let small = whole(3);
        assert_eq!(spans.check(&small).expect("ok").len(), 3);
        let kept = spans.spans.as_ptr();
        let capacity = spans.spans.capacity();
        for _ in 0..100 {
            let pdata = spans.check(&small).expect("ok");
            assert_eq!(
                pdata.items().map(|p| p.data[0]).collect::<Vec<_>>(),
                [0, 1, 2]
            );
        }
        assert_eq!(spans.spans.as_ptr(), kept, "no new allocation per PDU");
        assert_eq!(spans.spans.capacity(), capacity);
        let many = whole(KEEP_SPANS + 1);
        assert_eq!(spans.check(&many).expect("ok").len(), KEEP_SPANS + 1);
        assert_eq!(spans.check(&small).expect("ok").len(), 3);
        assert!(
            spans.spans.capacity() <= KEEP_SPANS,
            "a large list is not kept"
        );
    }
}
