//! One association's DIMSE policy: reassemble messages from PDVs, decide on each request by the user's
//! grants and limits, answer refusals on the same association, and cap C-FIND results.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::audit::Audit;
use crate::moves::MoveRegistry;
use crate::policy::{Grants, Limiter};
use crate::relay::{Actions, Inspector, Side};
use crate::ul::pdata::{PData, PDataWriter};

/// The Modality Worklist Information Model - FIND SOP class (PS3.4 K.6.1.2).
const WORKLIST_FIND: &str = "1.2.840.10008.5.1.4.31";
/// An identifier larger than this is not a query.
const MAX_IDENTIFIER: usize = 64 * 1024;
/// The largest C-FIND match from the archive the gateway holds to rewrite.
const MAX_ANSWER: usize = 1024 * 1024;
/// Locally refused message IDs remembered, so a later C-CANCEL for them is not sent upstream.
const REMEMBER_REFUSED: usize = 64;
/// Requests from the archive (C-GET's C-STORE sub-operations) awaiting the client's response, at most.
const MAX_ARCHIVE_REQUESTS: usize = 1024;

pub use crate::ul::association::Context;

/// Who is on this association, for log lines.
#[derive(Debug, Clone)]
pub struct Party {
    pub peer: SocketAddr,
    pub user: String,
    pub calling_ae: String,
    pub called_ae: String,
}

/// What happened on the association, for its log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub requests: u32,
    pub refused: u32,
    pub truncated_queries: u32,
}

mod assembly;
mod decisions;
mod reporting;
#[cfg(test)]
mod tests;

use assembly::{Assembly, Pieces};
use decisions::Decision;
use reporting::{FindTrack, OpTrack, Retrieval, dimse_name, query_keys, untracked_response};
pub use reporting::{error_comment, fit_comment};

/// The inspector the relay calls for every P-DATA-TF PDU.
pub struct Session {
    party: Party,
    grants: Grants,
    limiter: Arc<Limiter>,
    moves: Arc<MoveRegistry>,
    audit: Arc<Audit>,
    /// The accepted presentation contexts, by ID.
    contexts: HashMap<u8, Context>,
    /// Largest PDU body the client accepts / the archive accepts.
    client_max: u32,
    archive_max: u32,
    from_client: Assembly,
    from_archive: Assembly,
    finds: HashMap<u16, FindTrack>,
    retrievals: HashMap<u16, Retrieval>,
    ops: HashMap<u16, OpTrack>,
    /// Message IDs of requests from the archive (C-GET's C-STORE sub-operations) forwarded to the
    /// client and not yet answered: the only responses the client may send.
    archive_requests: HashSet<u16>,
    refused: VecDeque<u16>,
    pub counts: Counts,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        party: Party,
        grants: Grants,
        limiter: Arc<Limiter>,
        moves: Arc<MoveRegistry>,
        audit: Arc<Audit>,
        contexts: HashMap<u8, Context>,
        client_max: u32,
        archive_max: u32,
    ) -> Session {
        Session {
            party,
            grants,
            limiter,
            moves,
            audit,
            contexts,
            client_max,
            archive_max,
            from_client: Assembly::default(),
            from_archive: Assembly::default(),
            finds: HashMap::new(),
            retrievals: HashMap::new(),
            ops: HashMap::new(),
            archive_requests: HashSet::new(),
            refused: VecDeque::new(),
            counts: Counts::default(),
        }
    }
}

impl Inspector for Session {
    fn inspect(&mut self, from: Side, pdata: PData<'_>) -> Result<Actions, String> {
        let (to_max, back_max) = match from {
            Side::Requestor => (self.archive_max, self.client_max),
            Side::Acceptor => (self.client_max, self.archive_max),
        };
        let mut pieces = Pieces::new(pdata);
        let mut back = PDataWriter::new(back_max);
        for (index, pdv) in pdata.items().enumerate() {
            pieces.at(index);
            self.step(from, pdv, &mut pieces, &mut back)?;
        }
        let forward = pieces.forward(to_max);
        Ok(Actions {
            forward,
            back: back.into_bytes(),
        })
    }
}
