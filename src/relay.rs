//! The two-way relay of an established association: whole PDUs each way, P-DATA checked and offered
//! to an inspector, release and abort passed through, an idle timeout, and an A-ABORT when a leg fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

use crate::ul::pdu::{self, PduError, PduReader};

/// Which side of the gateway a PDU came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Archive,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Archive => "archive",
        }
    }
}

/// Where a P-DATA-TF PDU goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// The PDU as it came (the fast path: no re-encoding).
    Unchanged,
    /// These PDUs instead (some PDVs held back, dropped or rewritten).
    Rebuilt(Vec<u8>),
    /// Nothing.
    Nothing,
}

/// What to do with one P-DATA-TF PDU.
#[derive(Debug, PartialEq, Eq)]
pub struct Actions {
    pub forward: Forward,
    /// PDUs for the side the PDU came from (a refusal to the client, a C-CANCEL to the archive).
    pub back: Vec<u8>,
}

impl Actions {
    pub const PASS: Actions = Actions {
        forward: Forward::Unchanged,
        back: Vec::new(),
    };
}

/// The seam where DIMSE policy looks at traffic. Called once per P-DATA-TF PDU, whole and with
/// well-formed PDV items. An error is a protocol violation: both sides get an A-ABORT.
pub trait Inspector: Send {
    fn inspect(&mut self, from: Side, pdata: &[u8]) -> Result<Actions, String>;
}

/// Forwards everything.
pub struct PassThrough;

impl Inspector for PassThrough {
    fn inspect(&mut self, _from: Side, _pdata: &[u8]) -> Result<Actions, String> {
        Ok(Actions::PASS)
    }
}

/// How the relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// A-RELEASE-RQ / -RP exchanged.
    Released,
    /// One side sent A-ABORT, which was passed on.
    Aborted(Side),
    /// One side closed its connection without release or abort; the other got an A-ABORT.
    Closed(Side),
    /// Reading from or writing to a side failed, or it broke the protocol; the other got an A-ABORT.
    Failed(Side, String),
    /// Neither side sent anything for the idle timeout; both got an A-ABORT.
    IdleTimeout,
    /// The gateway is shutting down and the grace period ran out; both got an A-ABORT.
    Shutdown,
}

impl RelayEnd {
    pub fn reason(&self) -> String {
        match self {
            RelayEnd::Released => "released".into(),
            RelayEnd::Aborted(s) => format!("aborted by {}", s.name()),
            RelayEnd::Closed(s) => format!("{} closed the connection without release", s.name()),
            RelayEnd::Failed(s, m) => format!("{}: {m}", s.name()),
            RelayEnd::IdleTimeout => "idle timeout".into(),
            RelayEnd::Shutdown => "gateway shutting down: grace period over".into(),
        }
    }
}

/// Bytes relayed each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub from_client: u64,
    pub from_archive: u64,
}

/// Limits of one relayed association.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest PDU body the client may send (what the archive accepts, clamped by the gateway).
    pub from_client: u32,
    /// Largest PDU body the archive may send (what the client accepts, clamped by the gateway).
    pub from_archive: u32,
    pub idle: Duration,
}

/// An output buffer no larger than this is kept between writes; a larger one is given back.
const KEEP_BUFFER: usize = 64 * 1024;
/// At most this much is gathered into one write.
const COALESCE_LIMIT: usize = 256 * 1024;

struct Shared<I> {
    inspector: Mutex<I>,
    started: Instant,
    last_activity_ms: AtomicU64,
}

impl<I> Shared<I> {
    fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)))
    }
}

/// How much [`ReadAhead`] reads from the socket at once.
pub const READ_AHEAD: usize = 64 * 1024;

/// A socket read in large chunks for a reader that asks for little at a time: rustls reads at most
/// 4 KiB per call, so a 16 KiB TLS record cost four `recvfrom` calls. The chunk buffer is lent
/// ([`pdu::buffers`]) only while data flows: it is given back whenever the socket has nothing to read,
/// so an idle association holds none. Writes go straight through.
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
            filled: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            // A caller that asks for a whole chunk or more needs no read-ahead.
            if out.remaining() >= READ_AHEAD {
                pdu::buffers::give_back(std::mem::take(&mut this.buf));
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.len() < READ_AHEAD {
                this.buf = pdu::buffers::lend(READ_AHEAD);
            }
            let mut chunk = ReadBuf::new(&mut this.buf[..READ_AHEAD]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Pending => {
                    // Nothing to read: idle, or between bursts. Hold no buffer while waiting.
                    pdu::buffers::give_back(std::mem::take(&mut this.buf));
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    this.filled = chunk.filled().len();
                    this.pos = 0;
                    if this.filled == 0 {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                }
            }
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Relay an established association until it is released, aborted, fails or idles out.
/// Returns how it ended, the bytes each way, and the inspector (with what it counted).
pub async fn relay<C, A, I>(
    client: C,
    archive: A,
    limits: RelayLimits,
    inspector: I,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> (RelayEnd, RelayStats, I)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
    I: Inspector,
{
    let (mut client_rd, client_wr) = tokio::io::split(client);
    let (mut archive_rd, archive_wr) = tokio::io::split(archive);
    let client_wr = tokio::sync::Mutex::new(client_wr);
    let archive_wr = tokio::sync::Mutex::new(archive_wr);
    let shared = Shared {
        inspector: Mutex::new(inspector),
        started: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
    };
    let mut stats = RelayStats::default();
    let (mut from_client, mut from_archive) = (0u64, 0u64);

    let end = {
        let up = direction(
            Side::Client,
            &mut client_rd,
            &archive_wr,
            &client_wr,
            limits.from_client,
            &shared,
            &mut from_client,
        );
        let down = direction(
            Side::Archive,
            &mut archive_rd,
            &client_wr,
            &archive_wr,
            limits.from_archive,
            &shared,
            &mut from_archive,
        );
        let watchdog = async {
            loop {
                let idle = shared.idle_for();
                if idle >= limits.idle {
                    return RelayEnd::IdleTimeout;
                }
                tokio::time::sleep(limits.idle - idle).await;
            }
        };
        let stop = async {
            // Ends when told to abort; a dropped sender means nobody will ever say so.
            if shutdown.wait_for(|abort| *abort).await.is_err() {
                std::future::pending::<()>().await;
            }
            RelayEnd::Shutdown
        };
        tokio::select! {
            end = up => end,
            end = down => end,
            end = watchdog => end,
            end = stop => end,
        }
    };
    stats.from_client = from_client;
    stats.from_archive = from_archive;

    // Tell the side(s) still there that the association is over, then close both legs.
    let abort = pdu::abort(0);
    let (abort_client, abort_archive) = match &end {
        RelayEnd::Released | RelayEnd::Aborted(_) => (false, false),
        RelayEnd::Closed(Side::Client) => (false, true),
        RelayEnd::Closed(Side::Archive) => (true, false),
        // A peer that broke the protocol gets an A-ABORT too (PS3.8 AA-8), if it still listens.
        RelayEnd::Failed(..) => (true, true),
        RelayEnd::IdleTimeout | RelayEnd::Shutdown => (true, true),
    };
    let bound = Duration::from_secs(2);
    let mut cw = client_wr.into_inner();
    let mut aw = archive_wr.into_inner();
    if abort_client {
        let _ = tokio::time::timeout(bound, cw.write_all(&abort)).await;
    }
    if abort_archive {
        let _ = tokio::time::timeout(bound, aw.write_all(&abort)).await;
    }
    let _ = tokio::time::timeout(bound, cw.shutdown()).await;
    let _ = tokio::time::timeout(bound, aw.shutdown()).await;
    let inspector = shared
        .inspector
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    (end, stats, inspector)
}

/// Relay PDUs read from one side to the other until the association ends in this direction.
async fn direction<R, W, B, I>(
    side: Side,
    reader: &mut ReadHalf<R>,
    to: &tokio::sync::Mutex<WriteHalf<W>>,
    back: &tokio::sync::Mutex<WriteHalf<B>>,
    limit: u32,
    shared: &Shared<I>,
    bytes: &mut u64,
) -> RelayEnd
where
    R: AsyncRead,
    W: AsyncWrite,
    B: AsyncWrite,
    I: Inspector,
{
    let other = match side {
        Side::Client => Side::Archive,
        Side::Archive => Side::Client,
    };
    let mut reader = PduReader::new(reader);
    // What is to be forwarded, gathered while the next whole PDU is already buffered: one write
    // (and one wake-up of the receiver) for several PDUs. Sent before waiting for more input, so
    // nothing is held back from a peer that waits for it.
    let mut out: Vec<u8> = Vec::new();
    loop {
        if !out.is_empty() && (!reader.has_whole_pdu() || out.len() >= COALESCE_LIMIT) {
            if let Err(e) = write_flush(&mut *to.lock().await, &out).await {
                return RelayEnd::Failed(other, e.to_string());
            }
            out.clear();
        }
        if out.capacity() > KEEP_BUFFER && !reader.has_whole_pdu() {
            out = Vec::new();
        }
        let (pdu_type, buf) = match reader.next(limit).await {
            Ok((t, at)) => (t, reader.get(at)),
            Err(PduError::Closed) => return RelayEnd::Closed(side),
            Err(e) => return RelayEnd::Failed(side, e.to_string()),
        };
        shared.touch();
        *bytes += buf.len() as u64;
        let actions = match pdu_type {
            pdu::P_DATA_TF => {
                let checked = crate::ul::pdata::check_pdv_items(buf).and_then(|()| {
                    match shared.inspector.lock() {
                        Ok(mut inspector) => inspector.inspect(side, buf),
                        Err(_) => Err("inspector poisoned".into()),
                    }
                });
                match checked {
                    Ok(actions) => actions,
                    Err(e) => {
                        // What was checked before this PDU goes on, as it would have unbatched.
                        let _ = write_flush(&mut *to.lock().await, &out).await;
                        return RelayEnd::Failed(side, e);
                    }
                }
            }
            pdu::A_RELEASE_RQ | pdu::A_RELEASE_RP | pdu::A_ABORT => Actions::PASS,
            other_type => {
                let _ = write_flush(&mut *to.lock().await, &out).await;
                return RelayEnd::Failed(
                    side,
                    format!("unexpected PDU type {other_type:#04x} during the association"),
                );
            }
        };
        match &actions.forward {
            // Nothing gathered and nothing more buffered: straight from the read buffer, no copy.
            Forward::Unchanged if out.is_empty() && !reader.has_whole_pdu() => {
                if let Err(e) = write_flush(&mut *to.lock().await, buf).await {
                    return RelayEnd::Failed(other, e.to_string());
                }
            }
            Forward::Unchanged => out.extend_from_slice(buf),
            Forward::Rebuilt(pdus) => out.extend_from_slice(pdus),
            Forward::Nothing => {}
        }
        if !actions.back.is_empty() {
            // An answer to the sender (a refusal) follows what was forwarded before it.
            if let Err(e) = write_flush(&mut *to.lock().await, &out).await {
                return RelayEnd::Failed(other, e.to_string());
            }
            out.clear();
            if let Err(e) = write_flush(&mut *back.lock().await, &actions.back).await {
                return RelayEnd::Failed(side, e.to_string());
            }
        }
        match pdu_type {
            pdu::A_RELEASE_RP | pdu::A_ABORT => {
                if let Err(e) = write_flush(&mut *to.lock().await, &out).await {
                    return RelayEnd::Failed(other, e.to_string());
                }
                return if pdu_type == pdu::A_RELEASE_RP {
                    RelayEnd::Released
                } else {
                    RelayEnd::Aborted(side)
                };
            }
            _ => {}
        }
    }
}

use crate::ul::io::write_flush;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_ahead_reads_large_chunks_and_holds_no_buffer_while_idle() {
        use tokio::io::AsyncReadExt;
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let mut r = ReadAhead::new(rx);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.expect("write");
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < got.len() {
            // Small reads, as rustls makes them.
            let end = (at + 4096).min(got.len());
            let n = r.read(&mut got[at..end]).await.expect("read");
            assert!(n > 0);
            at += n;
        }
        assert_eq!(got, data);
        // Drained and nothing more to read: the chunk buffer is given back.
        let pending = tokio::time::timeout(Duration::from_millis(50), r.read(&mut [0u8; 16])).await;
        assert!(pending.is_err(), "nothing to read");
        assert_eq!(r.buf.capacity(), 0, "an idle reader holds no buffer");
        drop(tx);
        assert_eq!(r.read(&mut [0u8; 16]).await.expect("eof"), 0);
    }

    fn never() -> tokio::sync::watch::Receiver<bool> {
        // A dropped sender: nobody will ever ask this relay to stop.
        tokio::sync::watch::channel(false).1
    }

    #[tokio::test]
    async fn release_is_relayed_and_ends_the_association() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (archive, mut archive_peer) = tokio::io::duplex(1 << 16);
        let limits = RelayLimits {
            from_client: 16384,
            from_archive: 16384,
            idle: Duration::from_secs(5),
        };
        let task = tokio::spawn(relay(client, archive, limits, PassThrough, never()));
        use tokio::io::AsyncReadExt;
        let pdata = [4u8, 0, 0, 0, 0, 8, 0, 0, 0, 4, 1, 3, 0xaa, 0xbb];
        client_peer.write_all(&pdata).await.expect("write");
        let mut got = [0u8; 14];
        archive_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, pdata);
        client_peer
            .write_all(&[5, 0, 0, 0, 0, 4, 0, 0, 0, 0])
            .await
            .expect("rq");
        let mut rq = [0u8; 10];
        archive_peer.read_exact(&mut rq).await.expect("read rq");
        assert_eq!(rq[0], pdu::A_RELEASE_RQ);
        archive_peer.write_all(&pdu::RELEASE_RP).await.expect("rp");
        let mut rp = [0u8; 10];
        client_peer.read_exact(&mut rp).await.expect("read rp");
        assert_eq!(rp, pdu::RELEASE_RP);
        let (end, stats, _) = task.await.expect("join");
        assert_eq!(end, RelayEnd::Released);
        assert_eq!(stats.from_client, 24);
        assert_eq!(stats.from_archive, 10);
    }

    #[tokio::test]
    async fn a_vanished_archive_gets_the_client_an_abort() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (archive, archive_peer) = tokio::io::duplex(1 << 16);
        let limits = RelayLimits {
            from_client: 16384,
            from_archive: 16384,
            idle: Duration::from_secs(5),
        };
        let task = tokio::spawn(relay(client, archive, limits, PassThrough, never()));
        drop(archive_peer);
        use tokio::io::AsyncReadExt;
        let mut got = [0u8; 10];
        client_peer.read_exact(&mut got).await.expect("abort");
        assert_eq!(got[0], pdu::A_ABORT);
        let (end, _, _) = task.await.expect("join");
        assert_eq!(end, RelayEnd::Closed(Side::Archive));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_associations_are_aborted_on_both_sides() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (archive, mut archive_peer) = tokio::io::duplex(1 << 16);
        let limits = RelayLimits {
            from_client: 16384,
            from_archive: 16384,
            idle: Duration::from_secs(30),
        };
        let (end, _, _) = relay(client, archive, limits, PassThrough, never()).await;
        assert_eq!(end, RelayEnd::IdleTimeout);
        use tokio::io::AsyncReadExt;
        let mut got = [0u8; 10];
        client_peer
            .read_exact(&mut got)
            .await
            .expect("client abort");
        assert_eq!(got[0], pdu::A_ABORT);
        archive_peer
            .read_exact(&mut got)
            .await
            .expect("archive abort");
        assert_eq!(got[0], pdu::A_ABORT);
    }
}
