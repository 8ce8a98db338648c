//! The relay of a move-as-get association: [`relay::relay`] between the local client and the
//! gateway, with the retrievals' C-MOVE responses injected between whole PDUs (PS3.8 9.3.1) and
//! keep-alive C-ECHOs sent on connect's own presentation context while a retrieval runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::move_as_get::{Interceptor, VERIFICATION};
use crate::dimse::command_field as cf;
use crate::relay::{self, RelayEnd, RelayLimits, RelayStats};
use crate::ul::pdata::PDataWriter;
use crate::ul::pdu::read_pdu;

/// Buffer of the in-process pipe between the relay and the local client's socket.
const PIPE: usize = 256 * 1024;

/// [`relay::relay`] between the local client and the gateway, with the PDUs that arrive on
/// `inject` (the retrievals' C-MOVE responses) written to the local client between whole PDUs,
/// and, every `keepalive` interval while a retrieval runs, a C-ECHO-RQ to the gateway on the
/// association's keep-alive context (its response never reaches the client).
pub async fn relay_with_injection<L, G>(
    local: L,
    gateway: G,
    limits: RelayLimits,
    inspector: Interceptor,
    mut inject: mpsc::Receiver<Vec<u8>>,
    keepalive: Option<Duration>,
    shutdown: watch::Receiver<bool>,
) -> (RelayEnd, RelayStats)
where
    L: AsyncRead + AsyncWrite + Send + 'static,
    G: AsyncRead + AsyncWrite + Unpin,
{
    let (relay_side, pump_side) = tokio::io::duplex(PIPE);
    let (mut pump_rd, pump_wr) = tokio::io::split(pump_side);
    let (mut local_rd, local_wr) = tokio::io::split(local);
    let local_wr = Arc::new(tokio::sync::Mutex::new(local_wr));
    let pump_wr = Arc::new(tokio::sync::Mutex::new(pump_wr));

    // Local client -> relay, and connect's keep-alives -> relay: whole PDUs each.
    let to_relay = pump_wr.clone();
    let up_limit = limits.from_client;
    let up = tokio::spawn(async move {
        let mut buf = Vec::new();
        while read_pdu(&mut local_rd, &mut buf, up_limit).await.is_ok() {
            let mut w = to_relay.lock().await;
            if w.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = to_relay.lock().await.shutdown().await;
    });
    let echo = match (keepalive, inspector.association.keepalive_context) {
        (Some(every), Some(context)) => Some(spawn_keepalive(
            every,
            context,
            inspector.running(),
            inspector.association.to_gateway_max,
            pump_wr.clone(),
        )),
        _ => None,
    };
    // Relay -> local client: whole PDUs, so injected ones never land inside another.
    let writer = local_wr.clone();
    let limit = limits.from_archive;
    let down = tokio::spawn(async move {
        let mut buf = Vec::new();
        while read_pdu(&mut pump_rd, &mut buf, limit).await.is_ok() {
            let mut w = writer.lock().await;
            if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
        let _ = writer.lock().await.shutdown().await;
    });
    let writer = local_wr.clone();
    let injector = tokio::spawn(async move {
        while let Some(pdus) = inject.recv().await {
            let mut w = writer.lock().await;
            if w.write_all(&pdus).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
    });

    let (end, stats, inspector) =
        relay::relay(relay_side, gateway, limits, inspector, shutdown).await;
    // Dropping the inspector drops the cancel senders: retrievals still running stop.
    drop(inspector);
    if let Some(echo) = echo {
        echo.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), down).await;
    up.abort();
    injector.abort();
    (end, stats)
}

/// Every `every`, while a retrieval runs, a C-ECHO-RQ on `context` into the relay towards the gateway.
fn spawn_keepalive<W>(
    every: Duration,
    context: u8,
    running: Arc<AtomicUsize>,
    max: u32,
    to_relay: Arc<tokio::sync::Mutex<W>>,
) -> tokio::task::JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut id: u16 = 0;
        loop {
            tokio::time::sleep(every).await;
            if running.load(Ordering::SeqCst) == 0 {
                continue;
            }
            id = id.wrapping_add(1).max(1);
            let command =
                crate::tools::client::request_command(cf::C_ECHO_RQ, VERIFICATION, id, false);
            let mut writer = PDataWriter::new(max);
            writer.push(context, true, true, &command);
            if to_relay
                .lock()
                .await
                .write_all(&writer.into_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    })
}
