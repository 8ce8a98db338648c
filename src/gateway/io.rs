//! The gateway's small wire helpers: a bounded TCP connect to the next hop, a write within a deadline,
//! and the best-effort last PDU before a close (PS3.8 state Sta13: the requestor closes first).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::{UpstreamLabels, metrics};

fn connect_failed(address: &str) {
    metrics()
        .upstream_connect_failures
        .get_or_create(&UpstreamLabels {
            upstream: address.to_string(),
        })
        .inc();
}

/// A TCP connection to `address` within `within`, with TCP_NODELAY.
pub(crate) async fn connect_tcp(
    address: &str,
    within: Duration,
    what: &str,
) -> Result<TcpStream, String> {
    match tokio::time::timeout(within, TcpStream::connect(address)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            connect_failed(address);
            Err(format!("{what} {address} unreachable: {e}"))
        }
        Err(_) => {
            connect_failed(address);
            Err(format!("{what} {address} connect timed out"))
        }
    }
}

/// Best effort: a bounded write and close, for answers to peers we are about to drop.
/// After an A-ASSOCIATE-RJ or A-ABORT the requestor closes the connection (PS3.8 state Sta13);
/// closing first can reset the connection before the peer has read the answer.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Best effort: send a last PDU, wait (bounded) for the peer to close, then close.
pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
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

/// Write a PDU to a peer that must take it within `within` (a peer that stops reading is not waited for).
pub(crate) async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    within: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(within, write_flush(stream, bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer did not take the A-ASSOCIATE-AC in time",
        )),
    }
}

pub(crate) async fn write_flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}
