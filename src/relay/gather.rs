//! What one relay direction has yet to forward, gathered while more whole PDUs are already buffered.
//!
//! PDUs forwarded unchanged lie one after another in the [`PduReader`]'s buffer: while nothing else
//! is gathered they are kept as one span of that buffer and written from it, not copied. Bytes the
//! inspector rebuilt, and anything after them, are copied into a buffer of their own. The span stays
//! valid because the relay writes what it gathered before the reader has to read (and so may move its
//! buffer): [`PduReader::next`] only moves data when the next PDU is not buffered whole. Should that
//! ever not hold, the reader's generation has changed and [`Gathered::bytes`] refuses to read the span.

use std::ops::Range;

use tokio::io::AsyncRead;

use crate::ul::pdu::PduReader;

/// Gathered bytes: a span of the reader's buffer, or (after anything rebuilt) a copy; never both.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    span: Range<usize>,
    /// The reader's generation when the span began.
    generation: u64,
    copied: Vec<u8>,
}

/// The span of the read buffer no longer holds the PDUs gathered (a bug in the relay: it must write
/// what it gathered before the reader reads again).
#[derive(Debug, thiserror::Error)]
#[error("gathered PDUs moved in the read buffer before they were written")]
pub(super) struct SpanMoved;

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
    pub(super) fn bytes<'a, R: AsyncRead + Unpin>(
        &'a self,
        reader: &'a PduReader<R>,
    ) -> Result<&'a [u8], SpanMoved> {
        if self.span.is_empty() {
            Ok(&self.copied)
        } else if reader.generation() != self.generation {
            Err(SpanMoved)
        } else {
            Ok(reader.get(self.span.clone()))
        }
    }

    /// Forward the PDU at `pdu` of the reader's buffer as it came.
    pub(super) fn pass<R: AsyncRead + Unpin>(&mut self, pdu: Range<usize>, reader: &PduReader<R>) {
        if self.copied.is_empty() && self.span.is_empty() {
            self.span = pdu;
            self.generation = reader.generation();
        } else if self.copied.is_empty()
            && self.span.end == pdu.start
            && self.generation == reader.generation()
        {
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

    /// Copy the span out (before bytes that are not in the reader's buffer are added). A span that
    /// moved is dropped whole rather than copied wrong; [`Gathered::bytes`] then reports it.
    fn spill<R: AsyncRead + Unpin>(&mut self, reader: &PduReader<R>) {
        if !self.span.is_empty() && reader.generation() == self.generation {
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
        assert_eq!(g.bytes(&reader).unwrap(), &wire[a.start..b.end]);
        g.push(b"rebuilt", &reader);
        let (_, c) = reader.next(1 << 20).await.unwrap();
        g.pass(c.clone(), &reader);
        let mut expected = wire[a.start..b.end].to_vec();
        expected.extend_from_slice(b"rebuilt");
        expected.extend_from_slice(&wire[c]);
        assert_eq!(g.bytes(&reader).unwrap(), &expected[..]);
        assert_eq!(g.len(), expected.len());
        g.clear();
        assert!(g.is_empty());
        let (_, d) = reader.next(1 << 20).await.unwrap();
        g.pass(d.clone(), &reader);
        assert_eq!(g.bytes(&reader).unwrap(), &wire[d]);
        // The reader reads again (here: to find the end of the stream) and gives its buffer back:
        // the span is refused, not read.
        assert!(matches!(
            reader.next(1 << 20).await,
            Err(crate::ul::pdu::PduError::Closed)
        ));
        assert!(g.bytes(&reader).is_err());
        g.push(b"more", &reader);
        assert!(g.bytes(&reader).is_err(), "still refused after a push");
        g.clear();
        assert_eq!(g.bytes(&reader).unwrap(), b"");
    }
}
