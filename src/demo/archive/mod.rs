//! Embedded in-memory DICOM archive: the upstream of `pacsgate demo` and of in-process tests.
//!
//! Map of this module:
//! - `mod.rs`         public API, errors, accept loop, one task and one log line per association
//! - `association.rs` the A-ASSOCIATE exchange (RQ read, AC / RJ written) and DIMSE message assembly on `ul`
//! - `negotiation.rs` A-ASSOCIATE-RQ decided: rejections, presentation contexts, SCP roles
//! - `dimse.rs`       command fields, statuses, command set and data set encoding
//! - `services.rs`    C-ECHO, C-FIND, C-STORE and C-GET service providers
//! - `query.rs`       Q/R levels, keys and matching
//! - `store.rs`       `DemoArchive`: the instance store and its synthetic content
//!
//! It is a correct but small SCP: Verification; Patient Root and Study Root FIND and GET;
//! any storage SOP class, stored as received. It is not a product archive.

mod association;
mod dimse;
mod negotiation;
mod query;
mod services;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use association::{Association, Establish};
pub use store::{DEMO_UID_ROOT, DemoArchive};

/// Associations served at once; further connections wait in the listen backlog.
const MAX_ASSOCIATIONS: usize = 64;

/// Everything that can end an association abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DemoArchiveError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {phase}")]
    Timeout { phase: &'static str },
    #[error("PDU of {length} bytes exceeds the limit of {max}")]
    PduTooLarge { length: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    ReadPdu(String),
    #[error("could not encode PDU: {0}")]
    WritePdu(#[from] dicom_ul::pdu::WriteError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("malformed command set: {0}")]
    Command(String),
    #[error("data set: {0}")]
    DataSet(String),
    #[error("archive is full")]
    ArchiveFull,
}

/// Accept associations until this future is dropped or aborted (which also ends every
/// association task it started). An empty `ae_title` accepts any called AE title; otherwise a
/// different one is rejected (1 / 1 / 7).
pub async fn serve(
    listener: TcpListener,
    archive: Arc<DemoArchive>,
    ae_title: String,
) -> std::io::Result<()> {
    let ae_title: Arc<str> = ae_title.trim().into();
    let limit = Arc::new(Semaphore::new(MAX_ASSOCIATIONS));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return Ok(());
        };
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "demo archive: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let archive = archive.clone();
        let ae_title = ae_title.clone();
        tasks.spawn(async move {
            handle(socket, peer, &archive, &ae_title).await;
            drop(permit);
        });
    }
}

/// Serve one association and leave one log line saying how it ended.
async fn handle(socket: TcpStream, peer: SocketAddr, archive: &DemoArchive, ae_title: &str) {
    let _ = socket.set_nodelay(true);
    let assoc = match Association::establish(socket, ae_title).await {
        Ok(Establish::Accepted(assoc)) => assoc,
        Ok(Establish::Rejected {
            calling_ae,
            called_ae,
            reason,
        }) => {
            tracing::info!(peer = %peer, calling_ae, called_ae, outcome = reason.as_str(), "demo archive association");
            return;
        }
        Ok(Establish::Gone) => {
            tracing::info!(peer = %peer, outcome = "closed before association", "demo archive association");
            return;
        }
        Err(e) => {
            tracing::info!(peer = %peer, outcome = "failed before association", error = %e, "demo archive association");
            return;
        }
    };
    let calling_ae = assoc.calling_ae.clone();
    let called_ae = assoc.called_ae.clone();
    let mut session = services::Session::new(assoc, archive, ae_title);
    let result = session.run().await;
    let counts = session.counts;
    let outcome = match &result {
        Ok(services::End::Released) => "released",
        Ok(services::End::Aborted) => "aborted by peer",
        Ok(services::End::Closed) => "closed by peer without release",
        Err(_) => "aborted by archive",
    };
    let error = result.as_ref().err().map(ToString::to_string);
    session.finish(&result).await;
    tracing::info!(
        peer = %peer,
        calling_ae,
        called_ae,
        outcome,
        error,
        echo = counts.echo,
        find = counts.find,
        store = counts.store,
        get = counts.get,
        "demo archive association"
    );
}
