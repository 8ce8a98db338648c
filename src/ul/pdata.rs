//! P-DATA-TF PDUs and their presentation data value items (PS3.8 9.3.5, annex E): checking that the
//! items tile a PDU, reading them, and packing message fragments into PDUs no longer than the peer's
//! Maximum Length. `PdvSpans` is the one check of the tiling rule: the relay keeps one per direction
//! and hands the inspector the checked items (`PData`); `check_pdv_items` is the same rule for others.

use super::pdu::{P_DATA_TF, PDU_HEADER_LENGTH};

/// Bytes of a PDV item before its value: item length (4), presentation context ID (1), message
/// control header (1) (PS3.8 9.3.5.1).
pub const PDV_ITEM_HEADER_LENGTH: usize = 6;
/// Message control header bit 0: the fragment is command information, not data set (PS3.8 E.2).
pub const CONTROL_COMMAND: u8 = 0x01;
/// Message control header bit 1: the last fragment of its command set or data set (PS3.8 E.2).
pub const CONTROL_LAST: u8 = 0x02;

/// One presentation data value item of a P-DATA-TF PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdv<'a> {
    pub presentation_context_id: u8,
    pub is_command: bool,
    pub is_last: bool,
    pub data: &'a [u8],
}

/// Check that the PDV items of a P-DATA-TF PDU tile its body exactly (PS3.8 9.3.5.1): the rule of
/// [`PdvSpans::check`], for a caller that only wants the verdict (the fuzz targets); a reader of the
/// items calls [`PdvSpans::check`] and reads [`PData::items`] in the same pass.
pub fn check_pdv_items(pdu: &[u8]) -> Result<(), String> {
    PdvSpans::default().check(pdu).map(|_| ())
}

/// The PDV items of a whole P-DATA-TF PDU that passed [`check_pdv_items`]; malformed tails are skipped.
pub fn pdv_items(pdu: &[u8]) -> impl Iterator<Item = Pdv<'_>> {
    let mut rest = pdu.get(PDU_HEADER_LENGTH..).unwrap_or_default();
    std::iter::from_fn(move || {
        let len = rest.get(..4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let item = rest.get(4..4 + len)?;
        let (&pc, rest_of_item) = item.split_first()?;
        let (&header, data) = rest_of_item.split_first()?;
        rest = &rest[4 + len..];
        Some(Pdv {
            presentation_context_id: pc,
            is_command: header & CONTROL_COMMAND != 0,
            is_last: header & CONTROL_LAST != 0,
            data,
        })
    })
}

/// Pack PDV items into P-DATA-TF PDUs no longer than `max_pdu_length` (body), splitting large values.
pub struct PDataWriter {
    out: Vec<u8>,
    max_body: usize,
    current_start: Option<usize>,
}

impl PDataWriter {
    pub fn new(max_pdu_length: u32) -> PDataWriter {
        PDataWriter {
            out: Vec::new(),
            max_body: (max_pdu_length as usize).max(64),
            current_start: None,
        }
    }

    /// Append one message fragment; it is split over several PDVs when it does not fit.
    pub fn push(&mut self, pc: u8, is_command: bool, is_last: bool, mut data: &[u8]) {
        loop {
            let room = self.room();
            if room <= PDV_ITEM_HEADER_LENGTH {
                self.finish_pdu();
                continue;
            }
            let take = data.len().min(room - PDV_ITEM_HEADER_LENGTH);
            let last_piece = take == data.len();
            self.open_pdu();
            self.out
                .extend_from_slice(&((take + 2) as u32).to_be_bytes());
            self.out.push(pc);
            let command = if is_command { CONTROL_COMMAND } else { 0 };
            let last = if is_last && last_piece {
                CONTROL_LAST
            } else {
                0
            };
            self.out.push(command | last);
            self.out.extend_from_slice(&data[..take]);
            data = &data[take..];
            if last_piece {
                return;
            }
            self.finish_pdu();
        }
    }

    fn room(&self) -> usize {
        match self.current_start {
            Some(start) => self.max_body - (self.out.len() - start - PDU_HEADER_LENGTH),
            None => self.max_body,
        }
    }

    fn open_pdu(&mut self) {
        if self.current_start.is_none() {
            self.current_start = Some(self.out.len());
            self.out.extend_from_slice(&[P_DATA_TF, 0, 0, 0, 0, 0]);
        }
    }

    fn finish_pdu(&mut self) {
        if let Some(start) = self.current_start.take() {
            let len = (self.out.len() - start - PDU_HEADER_LENGTH) as u32;
            self.out[start + 2..start + 6].copy_from_slice(&len.to_be_bytes());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The finished PDUs.
    pub fn into_bytes(mut self) -> Vec<u8> {
        self.finish_pdu();
        self.out
    }
}

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
const KEEP_SPANS: usize = 64;

/// The PDV items of the P-DATA-TF PDUs one direction relays, checked in one pass per PDU into spans
/// kept from PDU to PDU: once grown to the usual count of items, checking a PDU allocates nothing.
#[derive(Debug, Default)]
pub struct PdvSpans {
    spans: Vec<PdvSpan>,
}

impl PdvSpans {
    /// Check that the PDV items of a whole P-DATA-TF PDU tile its body exactly (PS3.8 9.3.5.1), with
    /// and give the PDU with its items.
    pub fn check<'a>(&'a mut self, pdu: &'a [u8]) -> Result<PData<'a>, String> {
        self.trim();
        self.spans.clear();
        let body = pdu.get(PDU_HEADER_LENGTH..).unwrap_or_default();
        if body.is_empty() {
            return Err("P-DATA-TF without PDV items".into());
        }
        let mut at = PDU_HEADER_LENGTH;
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

    /// Give back a list that one PDU of many items grew (called before the relay waits for input, so
    /// an idle association holds at most [`KEEP_SPANS`] spans per direction).
    pub fn trim(&mut self) {
        if self.spans.capacity() > KEEP_SPANS {
            self.spans = Vec::new();
        }
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

    /// The tiling rule written out plainly, as an oracle for [`PdvSpans::check`].
    fn reference_check(pdu: &[u8]) -> Result<(), String> {
        let mut rest = &pdu[PDU_HEADER_LENGTH..];
        if rest.is_empty() {
            return Err("P-DATA-TF without PDV items".into());
        }
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err("truncated PDV item header".into());
            }
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 2 {
                return Err(format!("PDV item length {len} is too short"));
            }
            if len > rest.len() - 4 {
                return Err(format!("PDV item length {len} overruns its PDU"));
            }
            rest = &rest[4 + len..];
        }
        Ok(())
    }

    /// Every P-DATA-TF PDU of up to 12 body bytes (lengths 0..=6 and bytes from a small alphabet):
    /// the one-pass check agrees with a plain reference walk (same error text) and with `pdv_items`.
    #[test]
    fn pdv_spans_agree_with_a_reference_walk_and_pdv_items() {
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
                let mut pdu = vec![P_DATA_TF, 0];
                pdu.extend_from_slice(&(len as u32).to_be_bytes());
                pdu.extend_from_slice(&body);
                let expected = reference_check(&pdu);
                match (spans.check(&pdu), expected) {
                    (Ok(pdata), Ok(())) => {
                        checked += 1;
                        assert_eq!(pdata.pdu(), &pdu[..]);
                        let ours: Vec<Pdv> = pdata.items().collect();
                        let theirs: Vec<Pdv> = pdv_items(&pdu).collect();
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
            let mut pdu = vec![P_DATA_TF, 0];
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
        // The relay trims before it waits for input: an idle direction keeps no large list.
        spans.trim();
        assert_eq!(spans.spans.capacity(), 0, "trimmed while idle");
        assert_eq!(spans.check(&many).expect("ok").len(), KEEP_SPANS + 1);
        assert_eq!(spans.check(&small).expect("ok").len(), 3);
        assert!(
            spans.spans.capacity() <= KEEP_SPANS,
            "a large list is not kept"
        );
    }

    #[test]
    fn pdv_items_must_tile_the_pdu() {
        let good = [4, 0, 0, 0, 0, 8, 0, 0, 0, 2, 1, 3, 0, 0];
        assert!(check_pdv_items(&good[..12]).is_ok());
        let overrun = [4, 0, 0, 0, 0, 6, 0, 0, 0, 9, 1, 3];
        assert!(check_pdv_items(&overrun).is_err());
        let short = [4, 0, 0, 0, 0, 6, 0, 0, 0, 1, 1, 3];
        assert!(check_pdv_items(&short).is_err());
        assert!(check_pdv_items(&[4, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn pdata_writer_splits_and_pdv_items_reads_back() {
        let big = vec![7u8; 10_000];
        let mut w = PDataWriter::new(4096);
        w.push(3, true, true, &[1, 2, 3]);
        w.push(3, false, true, &big);
        let bytes = w.into_bytes();
        let mut pdus = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
            assert!(len <= 4096);
            check_pdv_items(&rest[..6 + len]).expect("well-formed");
            pdus.push(&rest[..6 + len]);
            rest = &rest[6 + len..];
        }
        let items: Vec<Pdv> = pdus.iter().flat_map(|p| pdv_items(p)).collect();
        assert!(items[0].is_command && items[0].is_last && items[0].data == [1, 2, 3]);
        let data: Vec<u8> = items[1..]
            .iter()
            .flat_map(|p| p.data.iter().copied())
            .collect();
        assert_eq!(data, big);
        assert!(items.last().is_some_and(|p| p.is_last));
        assert!(items[1..items.len() - 1].iter().all(|p| !p.is_last));
    }
}
