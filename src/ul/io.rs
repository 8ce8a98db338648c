//! Upper-layer I/O shared by every side of pacsgate (gateway, return path, `pacsgate connect`, relay):
//! a write that is flushed, the best-effort last PDU before a close (PS3.8 state Sta13: the requestor
//! closes first), and the one bounded read of an A-ASSOCIATE-RQ (PS3.8 9.3.2, within ARTIM).

use std::time::Duration;

use dicom_ul::pdu::AssociationRQ;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::association;
use super::pdu::{self, PduError, read_pdu};

/// Write all of `bytes` and flush.
pub async fn write_flush<S: AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// After an A-ASSOCIATE-RJ or A-ABORT the requestor closes the connection (PS3.8 state Sta13);
/// closing first can reset the connection before the peer has read the answer.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Best effort: send a last PDU, wait (bounded) for the peer to close, then close.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        write_flush(stream, bytes).await?;
        let mut sink = [0u8; 512];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        stream.shutdown().await
    })
    .await;
}

/// Why no A-ASSOCIATE-RQ could be read. Each caller turns it into its own answer and log line;
/// [`RequestError::abort_reason`] is the A-ABORT reason PS3.8 9.3.8 gives for it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("closed before A-ASSOCIATE-RQ")]
    Closed,
    #[error("association request timed out (ARTIM)")]
    Timeout,
    /// Framing: too long, truncated, or an unreadable PDU.
    #[error("association request: {0}")]
    Framing(PduError),
    #[error("PDU type {0:#04x} before A-ASSOCIATE-RQ")]
    NotARequest(u8),
    /// The PDU was an A-ASSOCIATE-RQ whose items could not be parsed.
    #[error("{0}")]
    Unparsable(String),
}

impl RequestError {
    /// The A-ABORT reason/diag (PS3.8 9.3.8): 0 not specified, 1 unrecognized PDU, 2 unexpected PDU.
    pub fn abort_reason(&self) -> u8 {
        match self {
            RequestError::Closed | RequestError::Timeout => 0,
            RequestError::NotARequest(_) => 1,
            RequestError::Framing(_) | RequestError::Unparsable(_) => 2,
        }
    }
}

/// Read one PDU within `within` and at most `limit` bytes long; it must be an A-ASSOCIATE-RQ.
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
    limit: u32,
) -> Result<AssociationRQ, RequestError> {
    let mut buf = Vec::new();
    let pdu_type = match tokio::time::timeout(within, read_pdu(stream, &mut buf, limit)).await {
        Ok(Ok(t)) => t,
        Ok(Err(PduError::Closed)) => return Err(RequestError::Closed),
        Ok(Err(e)) => return Err(RequestError::Framing(e)),
        Err(_) => return Err(RequestError::Timeout),
    };
    if pdu_type != pdu::A_ASSOCIATE_RQ {
        return Err(RequestError::NotARequest(pdu_type));
    }
    association::parse_request(&buf).map_err(|e| RequestError::Unparsable(e.to_string()))
}
