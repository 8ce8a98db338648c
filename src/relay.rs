//! The two-way relay of an established association: whole PDUs each way, P-DATA checked and offered
//! to an inspector, release and abort passed through, an idle timeout, and an A-ABORT when a leg fails.
//! `relay/gather.rs`: what a direction has yet to forward (a span of the read buffer, or a copy).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

use crate::ul::pdata::{PData, PdvSpans};
use crate::ul::pdu::{self, PduError, PduReader};

mod gather;
use gather::Gathered;

/// Which end of the association a PDU came from (PS3.8 names them association-requestor and
/// -acceptor). For the gateway the requestor is the client and the acceptor the archive; on a C-MOVE
/// return path the archive is the requestor and the destination the acceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Requestor,
    Acceptor,
}

impl Side {
    /// The name in log lines and abort reasons ("client", "archive"), kept for compatibility
    /// (docs/operations.md).
    pub fn name(self) -> &'static str {
        match self {
            Side::Requestor => "client",
            Side::Acceptor => "archive",
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

/// The seam where DIMSE policy looks at traffic. Called once per P-DATA-TF PDU, whole, with its PDV
/// items already checked by the relay (one pass, [`PdvSpans::check`]). An error is a protocol
/// violation: both sides get an A-ABORT.
pub trait Inspector: Send {
    fn inspect(&mut self, from: Side, pdata: PData<'_>) -> Result<Actions, String>;

    /// Check a whole P-DATA-TF PDU as the relay does (same errors), then [`Inspector::inspect`] it;
    /// for tests and fuzzing (the relay keeps one [`PdvSpans`] per direction instead).
    fn inspect_pdu(&mut self, from: Side, pdu: &[u8]) -> Result<Actions, String> {
        let mut spans = PdvSpans::default();
        let pdata = spans.check(pdu)?;
        self.inspect(from, pdata)
    }
}

/// Forwards everything (its PDUs' PDV items are still checked by the relay).
pub struct PassThrough;

impl Inspector for PassThrough {
    fn inspect(&mut self, _from: Side, _pdata: PData<'_>) -> Result<Actions, String> {
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
///
/// Not an `async fn`: the streams and the inspector are moved into their places (the split halves,
/// [`Shared`]) before the future is made, so that it does not also keep room for them as arguments.
/// An idle association holds this future for its whole life (bench (6)).
pub fn relay<C, A, I>(
    client: C,
    archive: A,
    limits: RelayLimits,
    inspector: I,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = (RelayEnd, RelayStats, I)>
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
    async move {
        let (mut from_client, mut from_archive) = (0u64, 0u64);
        let end = {
            let up = direction(
                Legs {
                    side: Side::Requestor,
                    to: &archive_wr,
                    back: &client_wr,
                },
                &mut client_rd,
                limits.from_client,
                &shared,
                &mut from_client,
            );
            let down = direction(
                Legs {
                    side: Side::Acceptor,
                    to: &client_wr,
                    back: &archive_wr,
                },
                &mut archive_rd,
                limits.from_archive,
                &shared,
                &mut from_archive,
            );
            tokio::select! {
                end = up => end,
                end = down => end,
                end = idle_timeout(&shared, limits.idle) => end,
                end = shutting_down(shutdown) => end,
            }
        };
        let stats = RelayStats {
            from_client,
            from_archive,
        };
        close(&end, client_wr.into_inner(), archive_wr.into_inner()).await;
        let inspector = shared
            .inspector
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        (end, stats, inspector)
    }
}

/// Ends when neither side has sent anything for `idle`.
async fn idle_timeout<I>(shared: &Shared<I>, idle: Duration) -> RelayEnd {
    loop {
        let quiet = shared.idle_for();
        if quiet >= idle {
            return RelayEnd::IdleTimeout;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// Ends when told to abort; a dropped sender means nobody will ever say so.
async fn shutting_down(mut shutdown: tokio::sync::watch::Receiver<bool>) -> RelayEnd {
    if shutdown.wait_for(|abort| *abort).await.is_err() {
        std::future::pending::<()>().await;
    }
    RelayEnd::Shutdown
}

/// Tell the side(s) still there that the association is over, then close both legs.
async fn close<C: AsyncWrite, A: AsyncWrite>(
    end: &RelayEnd,
    mut client: WriteHalf<C>,
    mut archive: WriteHalf<A>,
) {
    let abort = pdu::abort(0);
    let (abort_client, abort_archive) = match end {
        RelayEnd::Released | RelayEnd::Aborted(_) => (false, false),
        RelayEnd::Closed(Side::Requestor) => (false, true),
        RelayEnd::Closed(Side::Acceptor) => (true, false),
        // A peer that broke the protocol gets an A-ABORT too (PS3.8 AA-8), if it still listens.
        RelayEnd::Failed(..) => (true, true),
        RelayEnd::IdleTimeout | RelayEnd::Shutdown => (true, true),
    };
    let bound = Duration::from_secs(2);
    if abort_client {
        let _ = tokio::time::timeout(bound, client.write_all(&abort)).await;
    }
    if abort_archive {
        let _ = tokio::time::timeout(bound, archive.write_all(&abort)).await;
    }
    let _ = tokio::time::timeout(bound, client.shutdown()).await;
    let _ = tokio::time::timeout(bound, archive.shutdown()).await;
}

/// The writers of one direction: onward to the other side, and back to the side PDUs come from.
struct Legs<'l, W, B> {
    /// The side PDUs come from.
    side: Side,
    to: &'l tokio::sync::Mutex<WriteHalf<W>>,
    back: &'l tokio::sync::Mutex<WriteHalf<B>>,
}

impl<W: AsyncWrite, B: AsyncWrite> Legs<'_, W, B> {
    fn other(&self) -> Side {
        match self.side {
            Side::Requestor => Side::Acceptor,
            Side::Acceptor => Side::Requestor,
        }
    }

    /// Write onward; failing, the association ends with the other side's failure.
    async fn forward(&self, bytes: &[u8]) -> Result<(), RelayEnd> {
        write_flush(&mut *self.to.lock().await, bytes)
            .await
            .map_err(|e| RelayEnd::Failed(self.other(), e.to_string()))
    }

    /// Write back to the sender; failing, the association ends with its failure.
    async fn answer(&self, bytes: &[u8]) -> Result<(), RelayEnd> {
        write_flush(&mut *self.back.lock().await, bytes)
            .await
            .map_err(|e| RelayEnd::Failed(self.side, e.to_string()))
    }

    /// The sender failed or broke the protocol: what was gathered before goes on (as it would have
    /// unbatched), whether or not that write works.
    async fn fail(&self, gathered: &[u8], reason: String) -> RelayEnd {
        let _ = write_flush(&mut *self.to.lock().await, gathered).await;
        RelayEnd::Failed(self.side, reason)
    }
}

/// Relay PDUs read from one side to the other until the association ends in this direction.
async fn direction<R, W, B, I>(
    legs: Legs<'_, W, B>,
    reader: &mut ReadHalf<R>,
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
    match relay_pdus(&legs, reader, limit, shared, bytes).await {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

/// [`direction`]'s loop; its only way out is how the association ended, as the error.
async fn relay_pdus<R, W, B, I>(
    legs: &Legs<'_, W, B>,
    reader: &mut ReadHalf<R>,
    limit: u32,
    shared: &Shared<I>,
    bytes: &mut u64,
) -> Result<std::convert::Infallible, RelayEnd>
where
    R: AsyncRead,
    W: AsyncWrite,
    B: AsyncWrite,
    I: Inspector,
{
    let side = legs.side;
    let mut reader = PduReader::new(reader);
    // What is to be forwarded, gathered while the next whole PDU is already buffered: one write
    // (and one wake-up of the receiver) for several PDUs. Sent before waiting for more input, so
    // nothing is held back from a peer that waits for it. PDUs forwarded as they came are written
    // from the read buffer, not copied (see `gather`).
    let mut out = Gathered::default();
    // The PDV items of the P-DATA-TF PDU at hand, checked once and handed to the inspector.
    let mut spans = PdvSpans::default();
    loop {
        if !out.is_empty() && (!reader.has_whole_pdu() || out.len() >= COALESCE_LIMIT) {
            legs.forward(gathered(&out, &reader, side)?).await?;
            out.clear();
        }
        if !reader.has_whole_pdu() {
            // About to wait for input: what one large burst grew is given back.
            if out.capacity() > KEEP_BUFFER {
                out.shrink();
            }
            spans.trim();
        }
        let (pdu_type, at) = match reader.next(limit).await {
            Ok(next) => next,
            Err(PduError::Closed) => return Err(RelayEnd::Closed(side)),
            // A PDU past its limit or of an unknown type: what was checked before it still goes on
            // (it is buffered whole, so whether it came in the same segment does not matter).
            Err(e) => {
                let before = out.bytes(&reader).unwrap_or_default();
                return Err(legs.fail(before, e.to_string()).await);
            }
        };
        let buf = reader.get(at.clone());
        shared.touch();
        *bytes += buf.len() as u64;
        let actions = match actions_for(side, pdu_type, buf, &mut spans, shared) {
            Ok(actions) => actions,
            Err(reason) => {
                let before = out.bytes(&reader).unwrap_or_default();
                return Err(legs.fail(before, reason).await);
            }
        };
        match &actions.forward {
            Forward::Unchanged => out.pass(at, &reader),
            Forward::Rebuilt(pdus) => out.push(pdus, &reader),
            Forward::Nothing => {}
        }
        if !actions.back.is_empty() {
            // An answer to the sender (a refusal) follows what was forwarded before it.
            legs.forward(gathered(&out, &reader, side)?).await?;
            out.clear();
            legs.answer(&actions.back).await?;
        }
        if pdu_type == pdu::A_RELEASE_RP || pdu_type == pdu::A_ABORT {
            legs.forward(gathered(&out, &reader, side)?).await?;
            return Err(if pdu_type == pdu::A_RELEASE_RP {
                RelayEnd::Released
            } else {
                RelayEnd::Aborted(side)
            });
        }
    }
}

/// What `out` gathered; if its span of the read buffer moved (a bug: it must be written before the
/// reader reads again), the association ends rather than forward bytes nobody checked.
fn gathered<'a, R: AsyncRead + Unpin>(
    out: &'a Gathered,
    reader: &'a PduReader<R>,
    side: Side,
) -> Result<&'a [u8], RelayEnd> {
    out.bytes(reader)
        .map_err(|e| RelayEnd::Failed(side, e.to_string()))
}

/// What to do with one whole PDU from `side`: a P-DATA-TF's PDV items checked (one pass) and offered
/// to the inspector, release and abort passed on; an error ends the association.
fn actions_for<I: Inspector>(
    side: Side,
    pdu_type: u8,
    pdu: &[u8],
    spans: &mut PdvSpans,
    shared: &Shared<I>,
) -> Result<Actions, String> {
    match pdu_type {
        pdu::P_DATA_TF => {
            let pdata = spans.check(pdu)?;
            match shared.inspector.lock() {
                Ok(mut inspector) => inspector.inspect(side, pdata),
                Err(_) => Err("inspector poisoned".into()),
            }
        }
        pdu::A_RELEASE_RQ | pdu::A_RELEASE_RP | pdu::A_ABORT => Ok(Actions::PASS),
        other_type => Err(format!(
            "unexpected PDU type {other_type:#04x} during the association"
        )),
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

    /// A malformed PDV list ends the relay with the check's text, also under the pass-through.
    #[tokio::test]
    async fn a_malformed_pdv_list_fails_the_pass_through_relay_too() {
        let (task, mut client_peer, _archive_peer) = pass_through_relay();
        let overrun = [4u8, 0, 0, 0, 0, 6, 0, 0, 0, 9, 1, 3];
        client_peer.write_all(&overrun).await.expect("write");
        let (end, _, _) = task.await.expect("join");
        assert_eq!(
            end,
            RelayEnd::Failed(Side::Requestor, "PDV item length 9 overruns its PDU".into())
        );
    }

    type RelayTask = tokio::task::JoinHandle<(RelayEnd, RelayStats, PassThrough)>;

    /// A pass-through relay between two in-memory peers (16 KiB limits, 5 s idle): the task, the
    /// client's end and the archive's end.
    fn pass_through_relay() -> (RelayTask, tokio::io::DuplexStream, tokio::io::DuplexStream) {
        let (client, client_peer) = tokio::io::duplex(1 << 16);
        let (archive, archive_peer) = tokio::io::duplex(1 << 16);
        let limits = RelayLimits {
            from_client: 16384,
            from_archive: 16384,
            idle: Duration::from_secs(5),
        };
        let task = tokio::spawn(relay(client, archive, limits, PassThrough, never()));
        (task, client_peer, archive_peer)
    }

    fn never() -> tokio::sync::watch::Receiver<bool> {
        // A dropped sender: nobody will ever ask this relay to stop.
        tokio::sync::watch::channel(false).1
    }

    #[tokio::test]
    async fn release_is_relayed_and_ends_the_association() {
        let (task, mut client_peer, mut archive_peer) = pass_through_relay();
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
        let (task, mut client_peer, archive_peer) = pass_through_relay();
        drop(archive_peer);
        use tokio::io::AsyncReadExt;
        let mut got = [0u8; 10];
        client_peer.read_exact(&mut got).await.expect("abort");
        assert_eq!(got[0], pdu::A_ABORT);
        let (end, _, _) = task.await.expect("join");
        assert_eq!(end, RelayEnd::Closed(Side::Acceptor));
    }

    /// A checked P-DATA-TF then a PDU the reader refuses (unknown type, or a release past its limit):
    /// the P-DATA-TF reaches the archive whether the two came in one segment or two.
    #[tokio::test]
    async fn what_was_checked_goes_on_before_a_refused_pdu_however_it_was_segmented() {
        use tokio::io::AsyncReadExt;
        let pdata = [4u8, 0, 0, 0, 0, 8, 0, 0, 0, 4, 1, 3, 0xaa, 0xbb];
        let unknown = [9u8, 0, 0, 0, 0, 0];
        let mut big_release = vec![pdu::A_RELEASE_RQ, 0, 0, 0, 0, 100];
        big_release.extend(std::iter::repeat_n(0u8, 100));
        for bad in [&unknown[..], &big_release[..]] {
            for together in [false, true] {
                let (task, mut client_peer, mut archive_peer) = pass_through_relay();
                if together {
                    client_peer
                        .write_all(&[&pdata[..], bad].concat())
                        .await
                        .expect("write");
                } else {
                    client_peer.write_all(&pdata).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    client_peer.write_all(bad).await.expect("write");
                }
                let (end, _, _) = task.await.expect("join");
                assert!(
                    matches!(end, RelayEnd::Failed(Side::Requestor, _)),
                    "{end:?}"
                );
                let mut got = Vec::new();
                archive_peer.read_to_end(&mut got).await.expect("read");
                assert!(got.starts_with(&pdata), "together={together}: {got:?}");
                assert_eq!(got[pdata.len()], pdu::A_ABORT, "then the abort");
            }
        }
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
