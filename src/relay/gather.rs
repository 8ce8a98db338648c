//! What one relay direction has yet to forward, gathered while more whole PDUs are already buffered.
//!
//! PDUs forwarded unchanged lie one after another in the [`PduReader`]'s buffer: while nothing else
//! is gathered they are kept as one span of that buffer and written from it, not copied. Bytes the
//! inspector rebuilt, and anything after them, are copied into a buffer of their own. The span stays
//! valid because the relay writes what it gathered before the reader has to read (and so may move its
//! buffer): [`PduReader::next`] only moves data when the next PDU is not buffered whole.

use std::ops::Range;

use tokio::io::AsyncRead;

use crate::ul::pdu::PduReader;

/// Gathered bytes: a span of the reader's buffer, or (after anything rebuilt) a copy; never both.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    span: Range<usize>,
    copied: Vec<u8>,
}

impl Gathered {
    pub(super) fn len(&self) -> usize {
        self.span.len() + self.copied.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of copy buffer held now.
    pub(super) fn capacity(&self) -> usize {
        self.copied.capacity()
    }

    /// Give the copy buffer back (after a large burst, while idle).
    pub(super) fn shrink(&mut self) {
        self.copied = Vec::new();
    }

    /// What is gathered, in order.
    pub(super) fn bytes<'a, R: AsyncRead + Unpin>(&'a self, reader: &'a PduReader<R>) -> &'a [u8] {
        if self.span.is_empty() {
            &self.copied
        } else {
            reader.get(self.span.clone())
        }
    }

    /// Forward the PDU at `pdu` of the reader's buffer as it came.
    pub(super) fn pass<R: AsyncRead + Unpin>(&mut self, pdu: Range<usize>, reader: &PduReader<R>) {
        if self.copied.is_empty() && self.span.is_empty() {
            self.span = pdu;
        } else if self.copied.is_empty() && self.span.end == pdu.start {
            self.span.end = pdu.end;
        } else {
            self.spill(reader);
            self.copied.extend_from_slice(reader.get(pdu));
        }
    }

    /// Forward bytes that are not in the reader's buffer (PDUs the inspector rebuilt).
    pub(super) fn push<R: AsyncRead + Unpin>(&mut self, bytes: &[u8], reader: &PduReader<R>) {
        self.spill(reader);
        self.copied.extend_from_slice(bytes);
    }

    /// Everything was written.
    pub(super) fn clear(&mut self) {
        self.span = 0..0;
        self.copied.clear();
    }

    fn spill<R: AsyncRead + Unpin>(&mut self, reader: &PduReader<R>) {
        if !self.span.is_empty() {
            self.copied.extend_from_slice(reader.get(self.span.clone()));
            self.span = 0..0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdu(n: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0x04, 0];
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend(std::iter::repeat_n(n, len));
        p
    }

    #[tokio::test]
    async fn unchanged_pdus_stay_a_span_and_rebuilt_ones_keep_their_order() {
        let wire: Vec<u8> = [pdu(1, 10), pdu(2, 20), pdu(3, 5), pdu(4, 7)].concat();
        let mut reader = PduReader::new(&wire[..]);
        let mut g = Gathered::default();
        let (_, a) = reader.next(1 << 20).await.unwrap();
        let (_, b) = reader.next(1 << 20).await.unwrap();
        g.pass(a.clone(), &reader);
        g.pass(b.clone(), &reader);
        assert_eq!(
            g.capacity(),
            0,
            "two unchanged PDUs in a row are not copied"
        );
        assert_eq!(g.bytes(&reader), &wire[a.start..b.end]);
        g.push(b"rebuilt", &reader);
        let (_, c) = reader.next(1 << 20).await.unwrap();
        g.pass(c.clone(), &reader);
        let mut expected = wire[a.start..b.end].to_vec();
        expected.extend_from_slice(b"rebuilt");
        expected.extend_from_slice(&wire[c]);
        assert_eq!(g.bytes(&reader), &expected[..]);
        assert_eq!(g.len(), expected.len());
        g.clear();
        assert!(g.is_empty());
        let (_, d) = reader.next(1 << 20).await.unwrap();
        g.pass(d.clone(), &reader);
        assert_eq!(g.bytes(&reader), &wire[d]);
    }
}
