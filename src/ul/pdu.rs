//! Bounded PDU framing over async streams (PS3.8 section 9): 6-byte header, a length checked before allocating;
//! one PDU at a time ([`read_pdu`]) or from a read-ahead buffer that says whether the next one is there ([`PduReader`]).

use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

pub const PDU_HEADER_LENGTH: usize = 6;

pub const A_ASSOCIATE_RQ: u8 = 0x01;
pub const A_ASSOCIATE_AC: u8 = 0x02;
pub const A_ASSOCIATE_RJ: u8 = 0x03;
pub const P_DATA_TF: u8 = 0x04;
pub const A_RELEASE_RQ: u8 = 0x05;
pub const A_RELEASE_RP: u8 = 0x06;
pub const A_ABORT: u8 = 0x07;

/// Control PDUs other than the association request and answer are tiny; anything larger is hostile.
const CONTROL_PDU_LIMIT: u32 = 64;

/// What went wrong while reading a PDU.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection closed")]
    Closed,
    #[error("PDU type {pdu_type:#04x} declares {length} bytes, over the limit of {limit}")]
    TooLarge {
        pdu_type: u8,
        length: u32,
        limit: u32,
    },
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The largest body a PDU of this type may have, given the limit for P-DATA-TF and association PDUs.
fn limit_for(pdu_type: u8, data_limit: u32) -> Result<u32, PduError> {
    match pdu_type {
        A_ASSOCIATE_RQ | A_ASSOCIATE_AC | A_ASSOCIATE_RJ | P_DATA_TF => Ok(data_limit),
        A_RELEASE_RQ | A_RELEASE_RP | A_ABORT => Ok(CONTROL_PDU_LIMIT),
        other => Err(PduError::UnknownType(other)),
    }
}

/// Refuse a PDU whose declared body length is over its type's limit (before anything is read or
/// allocated for it).
fn check_length(pdu_type: u8, length: u32, data_limit: u32) -> Result<(), PduError> {
    let allowed = limit_for(pdu_type, data_limit)?;
    if length > allowed {
        return Err(PduError::TooLarge {
            pdu_type,
            length,
            limit: allowed,
        });
    }
    Ok(())
}

/// Read one whole PDU, header and body, into `buf` (cleared first) and return its type.
/// A body longer than `limit` is refused before anything is allocated for it.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: u32,
) -> Result<u8, PduError> {
    let mut header = [0u8; PDU_HEADER_LENGTH];
    // A clean close between PDUs is not an error of the peer's framing.
    let n = reader.read(&mut header).await?;
    if n == 0 {
        return Err(PduError::Closed);
    }
    reader.read_exact(&mut header[n..]).await?;
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    check_length(pdu_type, length, limit)?;
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(PDU_HEADER_LENGTH + length as usize, 0);
    reader.read_exact(&mut buf[PDU_HEADER_LENGTH..]).await?;
    Ok(pdu_type)
}

/// How much a [`PduReader`] asks its stream for at once.
const READ_CHUNK: usize = 64 * 1024;

/// Read buffers lent to connections while data flows and given back when they wait: an idle
/// association holds none, and a busy one does not pay for a fresh (zeroed, page-faulted) buffer
/// each time it catches up with its peer. At most [`POOL_KEEP`] buffers of at most
/// [`POOL_MAX_LEN`] bytes are kept.
pub mod buffers {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    pub const POOL_KEEP: usize = 32;
    pub const POOL_MAX_LEN: usize = 320 * 1024;

    /// A buffer of at least `len` initialized bytes.
    pub fn lend(len: usize) -> Vec<u8> {
        let reused = {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter()
                .rposition(|b| b.len() >= len)
                .map(|i| pool.swap_remove(i))
        };
        reused.unwrap_or_else(|| vec![0; len])
    }

    /// Give a buffer back (an empty one, or one over the size kept, is dropped).
    pub fn give_back(buf: Vec<u8>) {
        if buf.is_empty() || buf.len() > POOL_MAX_LEN {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    }
}

/// PDUs read from a stream through a buffer, so that the relay can tell whether the next whole PDU
/// is already there (then it gathers its writes) or must be waited for (then it sends first). The
/// same bounds as [`read_pdu`]: a declared length over the limit is refused before anything is
/// allocated for it. The buffer is given back whenever the stream has nothing to read.
pub struct PduReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bumped whenever buffered bytes move or the buffer is given back: a range from
    /// [`PduReader::next`] is valid while this stays the same (see [`PduReader::generation`]).
    generation: u64,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(inner: R) -> PduReader<R> {
        PduReader {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            generation: 0,
        }
    }

    /// Changes whenever ranges [`PduReader::next`] returned stop being valid (data moved to the front,
    /// buffer given back). A holder of several ranges checks it before reading them.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The type and total length of the buffered PDU's header, if the header is there.
    fn header(&self) -> Option<(u8, usize)> {
        let b = self.buffered();
        (b.len() >= PDU_HEADER_LENGTH).then(|| {
            let length = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
            (b[0], PDU_HEADER_LENGTH + length as usize)
        })
    }

    /// True when the next PDU is already buffered whole: reading it will not wait.
    pub fn has_whole_pdu(&self) -> bool {
        self.header()
            .is_some_and(|(_, total)| self.end - self.start >= total)
    }

    /// Read at least one more byte; Ok(0) at the end of the stream. Room for `want` bytes is made
    /// first. A read that would wait gives the buffer back if it holds nothing.
    async fn fill(&mut self, want: usize) -> std::io::Result<usize> {
        let room = want.max(READ_CHUNK);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.generation += 1;
        } else if self.start > 0 && self.buf.len() - self.end < room {
            self.generation += 1;
            // Move the partial PDU to the front: the buffer stays within one PDU plus one read.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        std::future::poll_fn(|cx| {
            if self.buf.is_empty() {
                self.buf = buffers::lend(room);
            } else if self.buf.len() - self.end < room {
                self.buf.resize(self.end + room, 0);
            }
            let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if self.start == self.end {
                        buffers::give_back(std::mem::take(&mut self.buf));
                        self.generation += 1;
                        self.start = 0;
                        self.end = 0;
                    }
                    Poll::Pending
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.end += n;
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// The bytes of a PDU [`PduReader::next`] returned, valid until the next call to it.
    pub fn get(&self, pdu: std::ops::Range<usize>) -> &[u8] {
        &self.buf[pdu]
    }

    /// The type of the next whole PDU and where it is (header included, see [`PduReader::get`]).
    pub async fn next(&mut self, limit: u32) -> Result<(u8, std::ops::Range<usize>), PduError> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        while self.header().is_none() {
            if self.fill(PDU_HEADER_LENGTH).await? == 0 {
                // A clean close between PDUs is not an error of the peer's framing.
                return Err(if self.start == self.end {
                    PduError::Closed
                } else {
                    PduError::Io(eof())
                });
            }
        }
        let Some((pdu_type, total)) = self.header() else {
            return Err(PduError::Io(eof()));
        };
        check_length(pdu_type, (total - PDU_HEADER_LENGTH) as u32, limit)?;
        while self.end - self.start < total {
            let missing = total - (self.end - self.start);
            if self.fill(missing).await? == 0 {
                return Err(PduError::Io(eof()));
            }
        }
        let at = self.start;
        self.start += total;
        Ok((pdu_type, at..at + total))
    }

    /// Bytes of buffer held now (for tests).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// A-ASSOCIATE-RJ with the given result, source and reason (PS3.8 9.3.4).
pub fn associate_rj(result: u8, source: u8, reason: u8) -> [u8; 10] {
    [A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason]
}

/// A-ABORT from the service provider (source 2) with the given reason (PS3.8 9.3.8).
pub fn abort(reason: u8) -> [u8; 10] {
    [A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason]
}

/// A-RELEASE-RP.
pub const RELEASE_RP: [u8; 10] = [A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0];

/// Why an association is rejected, with the codes PS3.8 9.3.4 defines for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 1/2/1: permanent, service-provider (ACSE), no reason given: failed or missing credentials.
    NotAuthenticated,
    /// 1/1/7: permanent, service-user, called AE title not recognized.
    CalledAeNotRecognized,
    /// 1/2/2: permanent, service-provider (ACSE), protocol version not supported.
    ProtocolVersion,
    /// 1/1/2: permanent, service-user, application context name not supported.
    ApplicationContext,
    /// 1/1/1: permanent, service-user, no reason given: e.g. a return-path association nobody asked for.
    NotExpected,
    /// 2/3/1: transient, service-provider (presentation), temporary congestion: the archive is unreachable.
    UpstreamUnavailable,
    /// 2/3/2: transient, service-provider (presentation), local limit exceeded.
    LocalLimitExceeded,
}

impl Rejection {
    pub fn codes(self) -> (u8, u8, u8) {
        match self {
            Rejection::NotAuthenticated => (1, 2, 1),
            Rejection::CalledAeNotRecognized => (1, 1, 7),
            Rejection::ProtocolVersion => (1, 2, 2),
            Rejection::ApplicationContext => (1, 1, 2),
            Rejection::NotExpected => (1, 1, 1),
            Rejection::UpstreamUnavailable => (2, 3, 1),
            Rejection::LocalLimitExceeded => (2, 3, 2),
        }
    }

    /// A short fixed name (metrics label, audit rule).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::NotAuthenticated => "not_authenticated",
            Rejection::CalledAeNotRecognized => "called_ae_unknown",
            Rejection::ProtocolVersion => "protocol_version",
            Rejection::ApplicationContext => "application_context",
            Rejection::NotExpected => "not_expected",
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::LocalLimitExceeded => "local_limit",
        }
    }

    pub fn pdu(self) -> [u8; 10] {
        let (result, source, reason) = self.codes();
        associate_rj(result, source, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_whole_pdu_is_read() {
        let bytes = [A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0xff];
        let mut buf = Vec::new();
        let mut r = &bytes[..];
        assert_eq!(
            read_pdu(&mut r, &mut buf, 1024).await.expect("pdu"),
            A_RELEASE_RQ
        );
        assert_eq!(buf.len(), 10);
        assert_eq!(r, &[0xff]);
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_before_allocating() {
        let bytes = [P_DATA_TF, 0, 0xff, 0xff, 0xff, 0xff];
        let mut buf = Vec::new();
        let err = read_pdu(&mut &bytes[..], &mut buf, 65536)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                PduError::TooLarge {
                    length: 0xffff_ffff,
                    ..
                }
            ),
            "{err}"
        );
        assert!(buf.capacity() < 1024);
    }

    #[tokio::test]
    async fn truncation_and_unknown_types_are_errors() {
        let mut buf = Vec::new();
        let truncated = [P_DATA_TF, 0, 0, 0, 0, 10, 1, 2];
        assert!(matches!(
            read_pdu(&mut &truncated[..], &mut buf, 1024).await,
            Err(PduError::Io(_))
        ));
        let unknown = [0x09, 0, 0, 0, 0, 0];
        assert!(matches!(
            read_pdu(&mut &unknown[..], &mut buf, 1024).await,
            Err(PduError::UnknownType(9))
        ));
        assert!(matches!(
            read_pdu(&mut &[][..], &mut buf, 1024).await,
            Err(PduError::Closed)
        ));
    }

    #[tokio::test]
    async fn the_reader_frames_like_read_pdu_and_says_when_the_next_is_whole() {
        let release = [A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&release);
        bytes.extend_from_slice(&[P_DATA_TF, 0, 0, 0, 0, 3, 7, 8, 9]);
        bytes.extend_from_slice(&[P_DATA_TF, 0, 0, 0, 0, 10, 1]); // truncated
        let mut r = PduReader::new(&bytes[..]);
        assert!(!r.has_whole_pdu(), "nothing read yet");
        let (t, pdu) = r.next(1024).await.expect("first");
        assert_eq!((t, r.get(pdu)), (A_RELEASE_RQ, &release[..]));
        assert!(r.has_whole_pdu(), "the second came in the same read");
        let (t, pdu) = r.next(1024).await.expect("second");
        assert_eq!((t, r.get(pdu).len()), (P_DATA_TF, 9));
        assert!(!r.has_whole_pdu());
        assert!(matches!(r.next(1024).await, Err(PduError::Io(_))));
        let mut r = PduReader::new(&[][..]);
        assert!(matches!(r.next(1024).await, Err(PduError::Closed)));
        let huge = [P_DATA_TF, 0, 0xff, 0xff, 0xff, 0xff];
        let mut r = PduReader::new(&huge[..]);
        assert!(matches!(
            r.next(65536).await,
            Err(PduError::TooLarge { .. })
        ));
        assert!(
            r.capacity() < 1 << 20,
            "nothing allocated for the declared length"
        );
        let unknown = [0x09, 0, 0, 0, 0, 0];
        let mut r = PduReader::new(&unknown[..]);
        assert!(matches!(r.next(1024).await, Err(PduError::UnknownType(9))));
    }

    #[tokio::test]
    async fn the_reader_holds_no_buffer_while_waiting_between_pdus() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = PduReader::new(rx);
        let big: Vec<u8> = [P_DATA_TF, 0, 0, 1, 0, 0]
            .into_iter()
            .chain(std::iter::repeat_n(5u8, 65536))
            .collect();
        tx.write_all(&big).await.expect("write");
        let (_, pdu) = r.next(1 << 20).await.expect("a PDU larger than one read");
        assert_eq!(r.get(pdu), &big[..]);
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.next(1 << 20)).await;
        assert!(waiting.is_err(), "nothing to read");
        assert_eq!(r.capacity(), 0, "no buffer held while waiting");
    }

    #[test]
    fn rejection_codes_follow_the_notes() {
        assert_eq!(
            Rejection::NotAuthenticated.pdu(),
            [3, 0, 0, 0, 0, 4, 0, 1, 2, 1]
        );
        assert_eq!(Rejection::CalledAeNotRecognized.codes(), (1, 1, 7));
        assert_eq!(Rejection::LocalLimitExceeded.codes(), (2, 3, 2));
    }
}
