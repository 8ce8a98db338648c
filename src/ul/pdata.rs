//! P-DATA-TF PDUs and their presentation data value items (PS3.8 9.3.5, annex E): checking that the
//! items tile a PDU, reading them, and packing message fragments into PDUs no longer than the peer's
//! Maximum Length.

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

/// Check that the PDV items of a P-DATA-TF PDU tile its body exactly (PS3.8 9.3.5.1).
pub fn check_pdv_items(pdu: &[u8]) -> Result<(), String> {
    let mut rest = pdu.get(PDU_HEADER_LENGTH..).unwrap_or_default();
    if rest.is_empty() {
        return Err("P-DATA-TF without PDV items".into());
    }
    while !rest.is_empty() {
        let Some(len) = rest.get(..4) else {
            return Err("truncated PDV item header".into());
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
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

#[cfg(test)]
mod tests {
    use super::*;

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
