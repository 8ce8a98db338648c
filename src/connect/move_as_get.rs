//! Move-as-get on a relayed association: an [`Inspector`] that takes C-MOVE requests naming a local
//! storage SCP out of the stream (and C-CANCELs for them), starts a [`retrieve`] task for each, and
//! a pump that lets those tasks write their C-MOVE responses to the local client between whole PDUs.
//! While a retrieval runs, the viewer's own association is silent: a C-ECHO on a presentation context
//! of connect's own (never shown to the viewer) keeps it from idling out. Everything else passes
//! to the gateway unchanged. What it holds for the client (identifiers, command fragments, failed-instance
//! lists) is counted against a [`Buffer`]: a cap per association and one for all associations together.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::dimse_extra::{self, SubOperations};
use super::gateway::Gateway;
use super::retrieve::{self, LocalStore, Retrieval, get_model};
use crate::dimse::{self, Command, command_field as cf};
use crate::relay::{Actions, Forward, Inspector, Side};
use crate::ul::association::Context;
use crate::ul::pdata::{PData, PDataWriter, Pdv};

/// The largest C-MOVE identifier held back.
const MAX_IDENTIFIER: usize = 1024 * 1024;
/// Retrievals one association may run at once.
const MAX_RETRIEVALS: usize = 4;
// C-MOVE statuses (crate::dimse::status): 0xA900 for a C-MOVE without identifier, 0xA701 for an
// identifier that cannot be held within the move-as-get buffer.
use crate::dimse::status::UNABLE_TO_PERFORM_SUB_OPERATIONS as UNABLE_TO_PERFORM;
use crate::dimse::status::{
    IDENTIFIER_DOES_NOT_MATCH, MOVE_DESTINATION_UNKNOWN, OUT_OF_RESOURCES_MATCHES,
    SOP_CLASS_NOT_SUPPORTED,
};

pub use super::buffer::{
    Account, Buffer, BufferLimits, DEFAULT_BUFFER, DEFAULT_BUFFER_TOTAL, Exceeded, MIN_BUFFER,
    Reservation,
};

/// Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// What move-as-get knows of the setup: the local storage SCPs, the bound on each step (connect,
/// handshake, answer, local store), the longest wait for the archive's next C-GET message, and
/// how often to keep a waiting viewer's association alive (None: never).
#[derive(Debug, Clone)]
pub struct Settings {
    pub stores: Vec<LocalStore>,
    pub timeout: Duration,
    pub archive_wait: Duration,
    pub keepalive: Option<Duration>,
    /// Shared by every association of this connect.
    pub buffer: Arc<Buffer>,
}

/// The association the interceptor watches.
pub struct Association {
    pub contexts: HashMap<u8, Context>,
    pub calling_ae: String,
    pub called_ae: String,
    /// Largest PDU body the local client accepts.
    pub to_client_max: u32,
    /// Largest PDU body the gateway accepts.
    pub to_gateway_max: u32,
    /// connect's own Verification context, accepted by the gateway, for keep-alive C-ECHOs.
    pub keepalive_context: Option<u8>,
    /// C-MOVE contexts the gateway did not accept and connect accepted for the client itself:
    /// nothing on them goes to the gateway.
    pub local_only: HashSet<u8>,
}

/// A C-MOVE-RQ taken out of the stream, waiting for the rest of its identifier.
struct Held {
    command: Command,
    store: LocalStore,
    identifier: Vec<u8>,
    reservation: Reservation,
}

enum Decision {
    Forward,
    Intercept(Box<Command>, LocalStore),
    Cancel(u16),
}

/// One piece of a rebuilt P-DATA-TF.
enum Piece<'a> {
    Original(Pdv<'a>),
    Command { pc: u8, bytes: Vec<u8> },
}

/// The inspector of one local association with move-as-get on.
pub struct Interceptor {
    settings: Arc<Settings>,
    gateway: Arc<Gateway>,
    pub(super) association: Association,
    out: mpsc::Sender<Vec<u8>>,
    /// This association's share of the move-as-get buffer.
    account: Account,
    /// Command fragments still being assembled, by presentation context.
    partial: HashMap<u8, (Vec<u8>, Reservation)>,
    held: HashMap<u8, Held>,
    /// Requests answered locally on a local-only context whose data set is still arriving: the
    /// answer (PDUs) goes out once it is complete.
    refusing: HashMap<u8, Vec<u8>>,
    /// Retrievals in progress, by the local C-MOVE's message ID: send true to cancel.
    active: HashMap<u16, watch::Sender<bool>>,
    /// Retrieval tasks still running (each holds a [`Running`] guard).
    running: Arc<AtomicUsize>,
}

/// Counts a retrieval task as running until dropped.
pub struct Running(Arc<AtomicUsize>);

impl Running {
    fn new(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Interceptor {
    pub fn new(
        settings: Arc<Settings>,
        gateway: Arc<Gateway>,
        association: Association,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Interceptor {
        let account = settings.buffer.association();
        Interceptor {
            settings,
            gateway,
            association,
            out,
            account,
            partial: HashMap::new(),
            held: HashMap::new(),
            refusing: HashMap::new(),
            active: HashMap::new(),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The number of retrieval tasks running, shared with the keep-alive.
    pub fn running(&self) -> Arc<AtomicUsize> {
        self.running.clone()
    }

    fn decide(&self, pc: u8, bytes: &[u8]) -> Decision {
        let Ok(command) = dimse::decode_command(bytes) else {
            // Not ours to judge: the gateway answers malformed requests.
            return Decision::Forward;
        };
        match command.field {
            cf::C_MOVE_RQ => {
                let Some(store) = self
                    .settings
                    .stores
                    .iter()
                    .find(|s| s.ae_title == command.move_destination)
                else {
                    return Decision::Forward;
                };
                let model = self
                    .association
                    .contexts
                    .get(&pc)
                    .map(|c| c.abstract_syntax.as_str())
                    .unwrap_or_default();
                if get_model(model).is_none() {
                    tracing::warn!(
                        destination = %store,
                        model,
                        "move-as-get: no C-GET for this information model; the C-MOVE goes to the gateway"
                    );
                    return Decision::Forward;
                }
                Decision::Intercept(Box::new(command), store.clone())
            }
            cf::C_CANCEL_RQ if self.active.contains_key(&command.responded_to) => {
                Decision::Cancel(command.responded_to)
            }
            _ => Decision::Forward,
        }
    }

    /// Start the retrieval for a complete C-MOVE.
    fn start(&mut self, pc: u8, held: Held) {
        let (cancel, cancelled) = watch::channel(false);
        self.active.insert(held.command.message_id, cancel);
        let a = &self.association;
        let retrieval = Retrieval {
            gateway: self.gateway.clone(),
            store: held.store,
            request: held.command,
            identifier: held.identifier,
            identifier_ts: a
                .contexts
                .get(&pc)
                .map(|c| c.transfer_syntax.clone())
                .unwrap_or_default(),
            context: pc,
            calling_ae: a.calling_ae.clone(),
            called_ae: a.called_ae.clone(),
            to_client_max: a.to_client_max,
            timeout: self.settings.timeout,
            archive_wait: self.settings.archive_wait,
            held: held.reservation,
            account: self.account.clone(),
        };
        let running = Running::new(&self.running);
        let out = self.out.clone();
        tokio::spawn(async move {
            retrieve::run(retrieval, out, cancelled).await;
            drop(running);
        });
    }

    /// The answer to a request on a local-only context that is not a move-as-get: a C-MOVE to
    /// any other destination is refused 0xA801 (the archive offers no C-MOVE); responses and
    /// C-CANCELs of nothing in progress get no answer.
    fn local_answer(&self, pc: u8, command: &Command) -> Vec<u8> {
        let rsp = match command.field {
            cf::C_MOVE_RQ => dimse_extra::move_response(
                command,
                MOVE_DESTINATION_UNKNOWN,
                &SubOperations::default(),
                false,
                "only --local-store destinations: the archive offers no C-MOVE",
            ),
            cf::C_CANCEL_RQ => return Vec::new(),
            _ if command.is_response() => return Vec::new(),
            _ => dimse::refusal(command, SOP_CLASS_NOT_SUPPORTED, ""),
        };
        let mut w = PDataWriter::new(self.association.to_client_max);
        w.push(pc, true, true, &rsp);
        w.into_bytes()
    }

    /// A C-MOVE response refusing `command` with `status`, as P-DATA-TF PDUs for the client.
    fn move_refusal(&self, pc: u8, command: &Command, status: u16, comment: &str) -> Vec<u8> {
        let rsp =
            dimse_extra::move_response(command, status, &SubOperations::default(), false, comment);
        let mut w = PDataWriter::new(self.association.to_client_max);
        w.push(pc, true, true, &rsp);
        w.into_bytes()
    }

    fn client_pdata(&mut self, pdata: PData<'_>) -> Result<Actions, String> {
        self.active.retain(|_, cancel| !cancel.is_closed());
        let mut out = Rebuild::default();
        for pdv in pdata.items() {
            if pdv.is_command {
                self.command_pdv(pdv, &mut out)?;
            } else {
                self.data_pdv(pdv, &mut out);
            }
        }
        Ok(out.into_actions(self.association.to_gateway_max))
    }

    /// A data set PDV: an identifier held back, one being refused, or one passed on.
    fn data_pdv<'a>(&mut self, pdv: Pdv<'a>, out: &mut Rebuild<'a>) {
        let pc = pdv.presentation_context_id;
        if self.refusing.contains_key(&pc) {
            out.changed = true;
            if pdv.is_last
                && let Some(answer) = self.refusing.remove(&pc)
            {
                out.back.extend_from_slice(&answer);
            }
            return;
        }
        let Some(held) = self.held.get_mut(&pc) else {
            if self.association.local_only.contains(&pc) {
                // A data set of nothing in progress on a local-only context: dropped.
                out.changed = true;
            } else {
                out.pieces.push(Piece::Original(pdv));
            }
            return;
        };
        out.changed = true;
        let room = if held.identifier.len() + pdv.data.len() > MAX_IDENTIFIER {
            Err(format!("a C-MOVE identifier over {MAX_IDENTIFIER} bytes"))
        } else {
            held.reservation
                .grow(pdv.data.len())
                .map_err(|e| e.to_string())
        };
        if let Err(reason) = room {
            self.refuse_identifier(pc, pdv.is_last, &reason, out);
            return;
        }
        held.identifier.extend_from_slice(pdv.data);
        if pdv.is_last
            && let Some(held) = self.held.remove(&pc)
        {
            self.start(pc, held);
        }
    }

    /// Refused 0xA701 once the rest of the identifier has gone by (unread, unheld).
    fn refuse_identifier(&mut self, pc: u8, is_last: bool, reason: &str, out: &mut Rebuild<'_>) {
        let Some(held) = self.held.remove(&pc) else {
            return;
        };
        tracing::warn!(
            calling_ae = ?self.association.calling_ae,
            destination = %held.store,
            held_total = self.settings.buffer.held(),
            reason = ?reason,
            "move-as-get: C-MOVE refused 0xA701"
        );
        let answer = self.move_refusal(
            pc,
            &held.command,
            OUT_OF_RESOURCES_MATCHES,
            "move-as-get: identifier over the memory cap",
        );
        if is_last {
            out.back.extend_from_slice(&answer);
        } else {
            self.refusing.insert(pc, answer);
        }
    }

    /// A command PDV: a fragment kept until the command set is whole, then decided on.
    fn command_pdv<'a>(&mut self, pdv: Pdv<'a>, out: &mut Rebuild<'a>) -> Result<(), String> {
        let pc = pdv.presentation_context_id;
        if self.held.contains_key(&pc) || self.refusing.contains_key(&pc) {
            return Err("a command set before the previous data set was complete".into());
        }
        let partial = self.partial.remove(&pc);
        let size = partial.as_ref().map_or(0, |(b, _)| b.len()) + pdv.data.len();
        if size > dimse::MAX_COMMAND_LENGTH {
            return Err(format!("a command set over {size} bytes"));
        }
        if !pdv.is_last {
            let (mut buf, mut reservation) =
                partial.unwrap_or_else(|| (Vec::new(), self.account.reservation()));
            reservation
                .grow(pdv.data.len())
                .map_err(|e| format!("command fragments: {e}"))?;
            buf.extend_from_slice(pdv.data);
            self.partial.insert(pc, (buf, reservation));
            out.changed = true;
            return Ok(());
        }
        let bytes: Cow<'a, [u8]> = match partial.map(|(b, _)| b) {
            Some(mut buf) => {
                buf.extend_from_slice(pdv.data);
                out.changed = true;
                Cow::Owned(buf)
            }
            None => Cow::Borrowed(pdv.data),
        };
        self.command(pdv, bytes, out)
    }

    /// A whole command set from the client: forwarded, answered here, or a move-as-get begun.
    fn command<'a>(
        &mut self,
        pdv: Pdv<'a>,
        bytes: Cow<'a, [u8]>,
        out: &mut Rebuild<'a>,
    ) -> Result<(), String> {
        let pc = pdv.presentation_context_id;
        match self.decide(pc, &bytes) {
            Decision::Forward if self.association.local_only.contains(&pc) => {
                out.changed = true;
                let command = dimse::decode_command(&bytes).map_err(|e| e.to_string())?;
                let answer = self.local_answer(pc, &command);
                if command.has_data_set {
                    self.refusing.insert(pc, answer);
                } else {
                    out.back.extend_from_slice(&answer);
                }
            }
            Decision::Forward => match bytes {
                Cow::Borrowed(_) => out.pieces.push(Piece::Original(pdv)),
                Cow::Owned(bytes) => out.pieces.push(Piece::Command { pc, bytes }),
            },
            Decision::Intercept(command, _) if self.active.len() >= MAX_RETRIEVALS => {
                out.changed = true;
                let answer = self.move_refusal(
                    pc,
                    &command,
                    UNABLE_TO_PERFORM,
                    "too many move-as-get retrievals at once",
                );
                if command.has_data_set {
                    self.refusing.insert(pc, answer);
                } else {
                    out.back.extend_from_slice(&answer);
                }
            }
            Decision::Intercept(command, store) => {
                out.changed = true;
                if command.has_data_set {
                    let reservation = self.account.reservation();
                    self.held.insert(
                        pc,
                        Held {
                            command: *command,
                            store,
                            identifier: Vec::new(),
                            reservation,
                        },
                    );
                } else {
                    let answer = self.move_refusal(
                        pc,
                        &command,
                        IDENTIFIER_DOES_NOT_MATCH,
                        "C-MOVE without identifier",
                    );
                    out.back.extend_from_slice(&answer);
                }
            }
            Decision::Cancel(id) => {
                out.changed = true;
                if let Some(cancel) = self.active.get(&id) {
                    cancel.send_replace(true);
                }
            }
        }
        Ok(())
    }
}

/// What one P-DATA-TF from the client becomes, built PDV by PDV: the pieces for the gateway
/// (unless nothing `changed`) and the PDUs answered `back` to the client.
#[derive(Default)]
struct Rebuild<'a> {
    pieces: Vec<Piece<'a>>,
    changed: bool,
    back: Vec<u8>,
}

impl Rebuild<'_> {
    fn into_actions(self, to_gateway_max: u32) -> Actions {
        let Rebuild {
            pieces,
            changed,
            back,
        } = self;
        if !changed {
            return Actions {
                forward: Forward::Unchanged,
                back,
            };
        }
        let mut writer = PDataWriter::new(to_gateway_max);
        for piece in &pieces {
            match piece {
                Piece::Original(p) => {
                    writer.push(p.presentation_context_id, p.is_command, p.is_last, p.data)
                }
                Piece::Command { pc, bytes } => writer.push(*pc, true, true, bytes),
            }
        }
        let forward = if writer.is_empty() {
            Forward::Nothing
        } else {
            Forward::Rebuilt(writer.into_bytes())
        };
        Actions { forward, back }
    }
}

impl Interceptor {
    /// From the gateway: everything but the answers on connect's own keep-alive context.
    fn gateway_pdata(&mut self, pdata: PData<'_>) -> Actions {
        let Some(own) = self.association.keepalive_context else {
            return Actions::PASS;
        };
        if pdata.items().all(|p| p.presentation_context_id != own) {
            return Actions::PASS;
        }
        let mut writer = PDataWriter::new(self.association.to_client_max);
        for p in pdata.items().filter(|p| p.presentation_context_id != own) {
            writer.push(p.presentation_context_id, p.is_command, p.is_last, p.data);
        }
        Actions {
            forward: if writer.is_empty() {
                Forward::Nothing
            } else {
                Forward::Rebuilt(writer.into_bytes())
            },
            back: Vec::new(),
        }
    }
}

impl Inspector for Interceptor {
    fn inspect(&mut self, from: Side, pdata: PData<'_>) -> Result<Actions, String> {
        match from {
            Side::Requestor => self.client_pdata(pdata),
            Side::Acceptor => Ok(self.gateway_pdata(pdata)),
        }
    }
}

pub use super::injection::relay_with_injection;

/// A free odd presentation context ID for connect's own keep-alive context, from the top down.
pub fn free_context_id(used: impl Iterator<Item = u8>) -> Option<u8> {
    let used: std::collections::HashSet<u8> = used.collect();
    (1..=255u8).rev().step_by(2).find(|id| !used.contains(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::link::{EXPLICIT_LE, IMPLICIT_LE};
    use crate::tools::client::request_command;
    use dicom_core::header::Header;

    fn interceptor() -> (Interceptor, mpsc::Receiver<Vec<u8>>) {
        interceptor_with(HashSet::new())
    }

    fn interceptor_with(local_only: HashSet<u8>) -> (Interceptor, mpsc::Receiver<Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::devcerts::generate(dir.path(), &["localhost".into()], &[]).expect("dev certs");
        let ca = dir.path().join("ca.crt");
        let gateway = Gateway::new(
            "127.0.0.1:1".into(),
            "localhost",
            super::super::gateway::TlsFiles {
                ca: Some(&ca),
                client: None,
            },
            super::super::gateway::Credentials::Certificate,
            Duration::from_secs(1),
        )
        .expect("gateway");
        let mut contexts = HashMap::new();
        contexts.insert(
            1,
            Context {
                abstract_syntax: retrieve::STUDY_ROOT_MOVE.into(),
                transfer_syntax: EXPLICIT_LE.into(),
            },
        );
        contexts.insert(
            3,
            Context {
                abstract_syntax: "1.2.840.10008.1.1".into(),
                transfer_syntax: IMPLICIT_LE.into(),
            },
        );
        let (tx, rx) = mpsc::channel(8);
        let i = Interceptor::new(
            Arc::new(Settings {
                stores: vec!["VIEWER@127.0.0.1:1".parse().expect("store")],
                timeout: Duration::from_secs(1),
                archive_wait: Duration::from_secs(1),
                keepalive: None,
                buffer: Buffer::new(BufferLimits {
                    per_association: 100 * 1024,
                    total: 150 * 1024,
                }),
            }),
            Arc::new(gateway),
            Association {
                contexts,
                calling_ae: "MOVESCU".into(),
                called_ae: "ARCHIVE".into(),
                to_client_max: 16384,
                to_gateway_max: 16384,
                keepalive_context: Some(255),
                local_only,
            },
            tx,
        );
        (i, rx)
    }

    fn move_command(destination: &str, id: u16, with_data: bool) -> Vec<u8> {
        let bytes = request_command(cf::C_MOVE_RQ, retrieve::STUDY_ROOT_MOVE, id, with_data);
        let command = dimse::decode_command(&bytes).expect("decode");
        let mut object = command.object;
        object.put(dicom_core::DataElement::new(
            dicom_dictionary_std::tags::MOVE_DESTINATION,
            dicom_core::VR::AE,
            dicom_core::PrimitiveValue::from(destination),
        ));
        let e: Vec<_> = object
            .into_iter()
            .filter(|e| e.tag() != dicom_dictionary_std::tags::COMMAND_GROUP_LENGTH)
            .collect();
        let object = dicom_object::InMemDicomObject::command_from_element_iter(e);
        let mut out = Vec::new();
        object
            .write_dataset_with_ts(
                &mut out,
                &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
            )
            .expect("encode");
        out
    }

    fn pdata(items: &[(u8, bool, bool, &[u8])]) -> Vec<u8> {
        let mut w = PDataWriter::new(1 << 20);
        for (pc, c, l, d) in items {
            w.push(*pc, *c, *l, d);
        }
        w.into_bytes()
    }

    #[tokio::test]
    async fn other_traffic_passes_unchanged() {
        let (mut i, _rx) = interceptor();
        let echo = request_command(cf::C_ECHO_RQ, "1.2.840.10008.1.1", 1, false);
        let p = pdata(&[(3, true, true, &echo)]);
        assert_eq!(
            i.inspect_pdu(Side::Requestor, &p).expect("ok"),
            Actions::PASS
        );
        let other = move_command("ELSEWHERE", 2, true);
        let p = pdata(&[(1, true, true, &other), (1, false, true, b"\x08\x00")]);
        assert_eq!(
            i.inspect_pdu(Side::Requestor, &p).expect("ok"),
            Actions::PASS
        );
        assert_eq!(
            i.inspect_pdu(Side::Acceptor, &p).expect("ok"),
            Actions::PASS
        );
    }

    #[tokio::test]
    async fn a_move_to_a_local_store_is_held_back_and_a_split_command_is_coalesced() {
        let (mut i, _rx) = interceptor();
        let mv = move_command("VIEWER", 5, true);
        let (a, b) = mv.split_at(10);
        // The command arrives in two fragments: nothing is forwarded until it is complete.
        let first = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, true, false, a)]))
            .expect("ok");
        assert_eq!(first.forward, Forward::Nothing);
        let second = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, true, true, b)]))
            .expect("ok");
        assert_eq!(second.forward, Forward::Nothing);
        assert!(i.held.contains_key(&1));
        // A command on the same context before the identifier is complete breaks the protocol.
        let echo = request_command(cf::C_ECHO_RQ, "1.2.840.10008.1.1", 6, false);
        assert!(
            i.inspect_pdu(Side::Requestor, &pdata(&[(1, true, true, &echo)]))
                .is_err()
        );

        // A split command that is not intercepted goes on as one PDV.
        let (mut i, _rx) = interceptor();
        let echo = request_command(cf::C_ECHO_RQ, "1.2.840.10008.1.1", 7, false);
        let (a, b) = echo.split_at(12);
        let _ = i
            .inspect_pdu(Side::Requestor, &pdata(&[(3, true, false, a)]))
            .expect("ok");
        let out = i
            .inspect_pdu(Side::Requestor, &pdata(&[(3, true, true, b)]))
            .expect("ok");
        assert_eq!(
            out.forward,
            Forward::Rebuilt(pdata(&[(3, true, true, &echo)]))
        );
    }

    #[tokio::test]
    async fn identifiers_past_the_buffer_are_refused_a701_and_given_back() {
        // The test interceptor's buffer: 100 KiB per association, 150 KiB in all.
        let (mut i, _rx) = interceptor();
        let (mut j, _rx2) = interceptor();
        let chunk = vec![0u8; 60 * 1024];
        let status_of = |back: &[u8]| {
            let item = crate::ul::pdata::pdv_items(back)
                .next()
                .expect("a response");
            dimse::decode_command(item.data).expect("decode").status
        };
        // First association: one 60 KiB fragment held, the second passes 100 KiB: refused.
        let mv = move_command("VIEWER", 1, true);
        let out = i
            .inspect_pdu(
                Side::Requestor,
                &pdata(&[(1, true, true, &mv), (1, false, false, &chunk)]),
            )
            .expect("ok");
        assert!(out.back.is_empty());
        assert_eq!(i.settings.buffer.held(), 60 * 1024);
        let out = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, false, false, &chunk)]))
            .expect("ok");
        assert!(
            out.back.is_empty(),
            "the answer waits for the last fragment"
        );
        assert_eq!(i.settings.buffer.held(), 0, "nothing of it is held");
        let out = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, false, true, &chunk)]))
            .expect("ok");
        assert_eq!(status_of(&out.back), Some(OUT_OF_RESOURCES_MATCHES));

        // Two associations sharing one buffer: 2 x 90 KiB fit 100 KiB each, but not 150 KiB in all.
        let chunk = vec![0u8; 90 * 1024];
        let shared = i.settings.clone();
        j.settings = shared.clone();
        j.account = shared.buffer.association();
        i.account = shared.buffer.association();
        let mv = move_command("VIEWER", 2, true);
        i.inspect_pdu(
            Side::Requestor,
            &pdata(&[(1, true, true, &mv), (1, false, false, &chunk)]),
        )
        .expect("ok");
        let out = j
            .inspect_pdu(
                Side::Requestor,
                &pdata(&[(1, true, true, &mv), (1, false, true, &chunk)]),
            )
            .expect("ok");
        assert_eq!(status_of(&out.back), Some(OUT_OF_RESOURCES_MATCHES));
        assert_eq!(shared.buffer.held(), 90 * 1024);
        drop(i);
        assert_eq!(
            shared.buffer.held(),
            0,
            "an association's bytes are given back"
        );
    }

    #[tokio::test]
    async fn a_move_without_identifier_is_answered_locally() {
        let (mut i, _rx) = interceptor();
        let mv = move_command("VIEWER", 9, false);
        let out = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, true, true, &mv)]))
            .expect("ok");
        assert_eq!(out.forward, Forward::Nothing);
        let item = crate::ul::pdata::pdv_items(&out.back)
            .next()
            .expect("a response");
        let rsp = dimse::decode_command(item.data).expect("decode");
        assert_eq!(rsp.field, 0x8021);
        assert_eq!(rsp.status, Some(IDENTIFIER_DOES_NOT_MATCH));
        assert_eq!(rsp.responded_to, 9);
    }

    #[tokio::test]
    async fn a_local_only_context_never_reaches_the_gateway() {
        let (mut i, mut rx) = interceptor_with(HashSet::from([1]));
        // A C-MOVE elsewhere: refused 0xA801 once its identifier is complete.
        let mv = move_command("ELSEWHERE", 4, true);
        let out = i
            .inspect_pdu(Side::Requestor, &pdata(&[(1, true, true, &mv)]))
            .expect("ok");
        assert_eq!(out.forward, Forward::Nothing);
        assert!(out.back.is_empty());
        let out = i
            .inspect_pdu(
                Side::Requestor,
                &pdata(&[(1, false, true, b"\x08\x00\x52\x00")]),
            )
            .expect("ok");
        assert_eq!(out.forward, Forward::Nothing);
        let item = crate::ul::pdata::pdv_items(&out.back)
            .next()
            .expect("a response");
        let rsp = dimse::decode_command(item.data).expect("decode");
        assert_eq!(rsp.status, Some(MOVE_DESTINATION_UNKNOWN));
        assert_eq!(rsp.responded_to, 4);

        // A C-MOVE to the local store starts a retrieval (which fails here: no gateway).
        let mv = move_command("VIEWER", 5, true);
        let out = i
            .inspect_pdu(
                Side::Requestor,
                &pdata(&[(1, true, true, &mv), (1, false, true, b"")]),
            )
            .expect("ok");
        assert_eq!(out.forward, Forward::Nothing);
        let pdus = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time")
            .expect("a response");
        let item = crate::ul::pdata::pdv_items(&pdus)
            .next()
            .expect("a response");
        let rsp = dimse::decode_command(item.data).expect("decode");
        assert_eq!((rsp.field, rsp.responded_to), (0x8021, 5));
        assert_eq!(rsp.status, Some(0xA702));

        // What the gateway sends on connect's own keep-alive context never reaches the client.
        let echo_rsp = dimse::refusal(
            &dimse::decode_command(&request_command(cf::C_ECHO_RQ, VERIFICATION, 1, false))
                .expect("decode"),
            0,
            "",
        );
        let out = i
            .inspect_pdu(Side::Acceptor, &pdata(&[(255, true, true, &echo_rsp)]))
            .expect("ok");
        assert_eq!(out.forward, Forward::Nothing);
    }
}
