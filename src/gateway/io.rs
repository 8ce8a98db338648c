//! The gateway's small wire helpers: a bounded TCP connect to the next hop (counted in metrics) and a
//! write within a deadline; the flushed write and the last PDU before a close are `ul::io`'s.

use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::metrics::{UpstreamLabels, metrics};
pub(crate) use crate::ul::io::{send, write_flush};

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
