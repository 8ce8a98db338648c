//! The association to the viewer's own storage SCP during a move-as-get: opened on the first
//! C-STORE sub-operation, re-opened for a SOP class / transfer syntax pair not yet proposed
//! (PS3.4 B), and the count of what was stored there.

use std::collections::HashSet;
use std::time::Duration;

use tokio::net::TcpStream;

use super::dimse_extra;
use super::link::{self, Answer, Link, Proposal};
use super::retrieve::{LocalStore, Retrieval};
use super::retrieve::{MAX_RESPONSE_IDENTIFIER, PROCESSING_FAILURE};
use crate::dimse::{Command, command_field as cf};

/// The association to the local storage SCP, opened on the first sub-operation and re-opened when
/// a sub-operation brings a SOP class / transfer syntax pair it was not proposed.
pub(super) struct LocalStorage<'a> {
    store: &'a LocalStore,
    /// Our calling AE title: the AE the local client called (the archive, as the viewer knows it).
    calling_ae: &'a str,
    /// The local C-MOVE's message ID and its requestor, for Move Originator.
    originator_ae: &'a str,
    originator_id: u16,
    timeout: Duration,
    link: Option<Link<TcpStream>>,
    proposed: Vec<(String, String)>,
    refused: HashSet<(String, String)>,
    pub(super) stored: u32,
    pub(super) failed: u32,
}

impl<'a> LocalStorage<'a> {
    pub(super) fn new(r: &'a Retrieval) -> LocalStorage<'a> {
        LocalStorage {
            store: &r.store,
            calling_ae: &r.called_ae,
            originator_ae: &r.calling_ae,
            originator_id: r.request.message_id,
            timeout: r.timeout,
            link: None,
            proposed: Vec::new(),
            refused: HashSet::new(),
            stored: 0,
            failed: 0,
        }
    }

    pub(super) fn note_failure(&mut self, command: &Command, reason: &str) {
        self.failed += 1;
        tracing::warn!(target: crate::logfmt::targets::CONNECT_RETRIEVE, destination = %self.store,
            sop_instance_uid = %command.affected_sop_instance,
            reason,
            "move-as-get: an instance could not be stored locally"
        );
    }

    /// Send the C-STORE-RQ for `command`; returns the local context and message ID.
    pub(super) async fn begin(&mut self, command: &Command, ts: &str) -> Result<(u8, u16), String> {
        let lpc = self.context(&command.affected_sop_class, ts).await?;
        let Some(link) = self.link.as_mut() else {
            return Err("no association".into());
        };
        let id = link.message_id();
        let rq = dimse_extra::store_request(command, id, self.originator_ae, self.originator_id);
        if let Err(e) = link.send_message(lpc, &rq, None).await {
            self.drop_link().await;
            return Err(e.to_string());
        }
        Ok((lpc, id))
    }

    pub(super) async fn send_data(
        &mut self,
        lpc: u8,
        data: &[u8],
        is_last: bool,
    ) -> Result<(), String> {
        let Some(link) = self.link.as_mut() else {
            return Err("no association".into());
        };
        if let Err(e) = link.send_data(lpc, data, is_last).await {
            self.drop_link().await;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// The local C-STORE-RSP to message `id`.
    pub(super) async fn finish(&mut self, id: u16) -> Result<u16, String> {
        let Some(link) = self.link.as_mut() else {
            return Err("no association".into());
        };
        for _ in 0..64 {
            let (pc, rsp) = match link.read_command("waiting for the local C-STORE-RSP").await {
                Ok(m) => m,
                Err(e) => {
                    self.drop_link().await;
                    return Err(e.to_string());
                }
            };
            if rsp.has_data_set
                && let Err(e) = link
                    .read_data(pc, MAX_RESPONSE_IDENTIFIER, "skipping")
                    .await
            {
                self.drop_link().await;
                return Err(e.to_string());
            }
            if rsp.field == (cf::C_STORE_RQ | cf::RESPONSE) && rsp.responded_to == id {
                return Ok(rsp.status.unwrap_or(PROCESSING_FAILURE));
            }
        }
        Err("no C-STORE-RSP".into())
    }

    pub(super) async fn drop_link(&mut self) {
        if let Some(link) = self.link.take() {
            link.abort().await;
        }
    }

    /// The local presentation context for this SOP class and transfer syntax, (re)associating if needed.
    pub(super) async fn context(&mut self, class: &str, ts: &str) -> Result<u8, String> {
        if let Some(id) = self
            .link
            .as_ref()
            .and_then(|l| l.context_for(class, Some(ts)))
        {
            return Ok(id);
        }
        let pair = (class.to_string(), ts.to_string());
        let refused = || {
            format!(
                "{} does not accept SOP class {class} in transfer syntax {ts}",
                self.store
            )
        };
        if self.refused.contains(&pair) {
            return Err(refused());
        }
        if !self.proposed.contains(&pair) {
            if self.proposed.len() >= 128 {
                return Err("more than 128 SOP class / transfer syntax pairs".into());
            }
            self.proposed.push(pair.clone());
        } else if self.link.is_some() {
            self.refused.insert(pair);
            return Err(refused());
        }
        if let Some(old) = self.link.take() {
            old.release().await;
        }
        self.link = Some(self.open().await?);
        match self
            .link
            .as_ref()
            .and_then(|l| l.context_for(class, Some(ts)))
        {
            Some(id) => Ok(id),
            None => {
                self.refused.insert(pair);
                Err(refused())
            }
        }
    }

    pub(super) async fn open(&self) -> Result<Link<TcpStream>, String> {
        let proposals: Vec<Proposal> = self
            .proposed
            .iter()
            .map(|(class, ts)| Proposal {
                abstract_syntax: class.clone(),
                transfer_syntaxes: vec![ts.clone()],
            })
            .collect();
        let rq = link::request(self.calling_ae, &self.store.ae_title, &proposals, &[], None);
        let bytes = link::encode(&dicom_ul::pdu::Pdu::AssociationRQ(rq.clone()))
            .map_err(|e| e.to_string())?;
        let mut stream =
            match tokio::time::timeout(self.timeout, TcpStream::connect(&self.store.address)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("{} unreachable: {e}", self.store)),
                Err(_) => return Err(format!("{} connect timed out", self.store)),
            };
        let _ = stream.set_nodelay(true);
        match link::exchange(&mut stream, &bytes, self.timeout).await {
            Ok(Answer::Accepted(ac)) => Ok(Link::new(stream, &rq, &ac, self.timeout)),
            Ok(Answer::Rejected(rj)) => {
                let code = |i: usize| rj.get(i).copied().unwrap_or(0);
                let r = crate::tools::client::Rejection {
                    result: code(7),
                    source: code(8),
                    reason: code(9),
                };
                Err(format!("{} rejected the association: {r}", self.store))
            }
            Ok(Answer::Aborted(abort)) => Err(format!(
                "{}: {}",
                self.store,
                super::gateway::abort_words(&abort)
            )),
            Err(e) => Err(format!("{}: {e}", self.store)),
        }
    }

    pub(super) async fn close(&mut self) {
        if let Some(link) = self.link.take() {
            link.release().await;
        }
    }
}
