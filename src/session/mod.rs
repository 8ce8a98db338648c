//! One association's DIMSE policy: reassemble messages from PDVs, decide on each request by the user's
//! grants and limits, answer refusals on the same association, and cap C-FIND results.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::audit::Audit;
use crate::config::Operation;
use crate::dimse::{self, Command, PDataWriter, Pdv, command_field as cf, status};
use crate::metrics::metrics;
use crate::moves::MoveRegistry;
use crate::policy::query_guard::{self, GuardError};
use crate::policy::{Grants, Limiter};
use crate::relay::{Actions, Forward, Inspector, Side};
use serde_json::json;

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

/// One accepted presentation context: what may be said on it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

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

#[derive(Debug, Default)]
enum DataMode {
    /// No message in progress, or one without a data set.
    #[default]
    Idle,
    /// The data set of an allowed message: pass it on (and count its bytes for request `message`).
    Forward { message: Option<u16> },
    /// The data set of a refused or dropped message: swallow it, then send `answer` if any.
    Drop { answer: Option<(u8, Vec<u8>)> },
    /// An identifier the decision needs: hold command and data until the data set is complete.
    Hold {
        pc: u8,
        command: Box<Command>,
        command_bytes: Vec<u8>,
        data: Vec<u8>,
    },
    /// A C-FIND pending response's identifier from the archive: held with its command until
    /// complete, then read once, rewritten (RetrieveAETitle) and forwarded as re-encoded.
    Answer {
        pc: u8,
        command_bytes: Vec<u8>,
        data: Vec<u8>,
    },
}

/// Message reassembly for one direction.
#[derive(Debug, Default)]
struct Assembly {
    command: Option<(u8, Vec<u8>)>,
    data: DataMode,
}

/// A PDV's fate in the rebuilt PDU.
enum Piece<'a> {
    Pass(Pdv<'a>),
    Emit {
        pc: u8,
        is_command: bool,
        bytes: Vec<u8>,
    },
}

/// What to do with a complete command.
enum Decision {
    Forward,
    /// Forward this command set instead (e.g. a truncated C-FIND's final response).
    Rewrite(Vec<u8>),
    Refuse {
        status: u16,
        rule: &'static str,
        reason: String,
    },
    Hold,
    /// A C-FIND match from the archive: hold it whole, rewrite, forward the re-encoded identifier.
    HoldAnswer,
    Drop,
    /// A protocol violation (e.g. a response to no outstanding request): the association is aborted.
    Violation(String),
}

/// A request forwarded to the archive, until its final response: for metrics and the audit trail.
#[derive(Debug)]
struct OpTrack {
    op: &'static str,
    started: std::time::Instant,
    sop_class: String,
    sop_instance: String,
    bytes: u64,
    /// The C-FIND keys, as the audit trail shows them.
    query: Option<serde_json::Value>,
}

/// A C-MOVE or C-GET in progress, for its log lines and the return path.
#[derive(Debug)]
struct Retrieval {
    op: &'static str,
    destination: String,
    registered: Option<u64>,
    level: String,
    patient: String,
    study: String,
    series: String,
    instance: String,
    started: std::time::Instant,
}

#[derive(Debug)]
struct FindTrack {
    matches: u32,
    cap: u32,
    capped: bool,
    dropped: u32,
}

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

    fn step<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pieces: &mut Vec<Piece<'a>>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        let pc = pdv.presentation_context_id;
        if !self.contexts.contains_key(&pc) {
            return Err(format!(
                "PDV on presentation context {pc}, which was not accepted"
            ));
        }
        let mut asm = std::mem::take(match from {
            Side::Client => &mut self.from_client,
            Side::Archive => &mut self.from_archive,
        });
        let result = self.step_in(from, pdv, pc, &mut asm, pieces, back);
        *match from {
            Side::Client => &mut self.from_client,
            Side::Archive => &mut self.from_archive,
        } = asm;
        result
    }

    fn step_in<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pc: u8,
        asm: &mut Assembly,
        pieces: &mut Vec<Piece<'a>>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        if pdv.is_command {
            if !matches!(asm.data, DataMode::Idle) {
                return Err("a command began before the previous data set ended".into());
            }
            let single = asm.command.is_none() && pdv.is_last;
            let bytes: Vec<u8> = if single {
                Vec::new()
            } else {
                let (held_pc, held) = asm.command.get_or_insert_with(|| (pc, Vec::new()));
                if *held_pc != pc {
                    return Err("command fragments on different presentation contexts".into());
                }
                if held.len() + pdv.data.len() > dimse::MAX_COMMAND_LENGTH {
                    return Err("command set too large".into());
                }
                held.extend_from_slice(pdv.data);
                if !pdv.is_last {
                    return Ok(());
                }
                asm.command.take().map(|(_, b)| b).unwrap_or_default()
            };
            let raw: &[u8] = if single { pdv.data } else { &bytes };
            let command = dimse::decode_command(raw).map_err(|e| e.to_string())?;
            let has_data = command.has_data_set;
            match self.decide(from, pc, &command, back) {
                Decision::Forward => {
                    let tracked = from == Side::Client
                        && !command.is_response()
                        && command.field != cf::C_CANCEL_RQ
                        && self.track(&command, None);
                    pieces.push(if single {
                        Piece::Pass(pdv)
                    } else {
                        Piece::Emit {
                            pc,
                            is_command: true,
                            bytes,
                        }
                    });
                    asm.data = if has_data {
                        DataMode::Forward {
                            message: tracked.then_some(command.message_id),
                        }
                    } else {
                        DataMode::Idle
                    };
                }
                Decision::Rewrite(bytes) => {
                    pieces.push(Piece::Emit {
                        pc,
                        is_command: true,
                        bytes,
                    });
                    asm.data = if has_data {
                        DataMode::Forward { message: None }
                    } else {
                        DataMode::Idle
                    };
                }
                Decision::Refuse {
                    status,
                    rule,
                    reason,
                } => {
                    let answer = dimse::refusal(&command, status, &error_comment(rule, &reason));
                    self.refused_now(&command, status, rule, &reason);
                    if has_data {
                        asm.data = DataMode::Drop {
                            answer: Some((pc, answer)),
                        };
                    } else {
                        back.push(pc, true, true, &answer);
                    }
                }
                Decision::Hold if has_data => {
                    asm.data = DataMode::Hold {
                        pc,
                        command: Box::new(command),
                        command_bytes: raw.to_vec(),
                        data: Vec::new(),
                    };
                }
                Decision::Hold => {
                    let reason = "request has no identifier".to_string();
                    let answer = dimse::refusal(
                        &command,
                        status::IDENTIFIER_DOES_NOT_MATCH,
                        &error_comment("bad_identifier", &reason),
                    );
                    self.refused_now(
                        &command,
                        status::IDENTIFIER_DOES_NOT_MATCH,
                        "bad_identifier",
                        &reason,
                    );
                    back.push(pc, true, true, &answer);
                }
                Decision::HoldAnswer if has_data => {
                    asm.data = DataMode::Answer {
                        pc,
                        command_bytes: raw.to_vec(),
                        data: Vec::new(),
                    };
                }
                Decision::HoldAnswer => pieces.push(if single {
                    Piece::Pass(pdv)
                } else {
                    Piece::Emit {
                        pc,
                        is_command: true,
                        bytes,
                    }
                }),
                Decision::Drop => {
                    asm.data = if has_data {
                        DataMode::Drop { answer: None }
                    } else {
                        DataMode::Idle
                    };
                }
                Decision::Violation(reason) => return Err(reason),
            }
            return Ok(());
        }
        match &mut asm.data {
            DataMode::Idle => return Err("data set fragment without a command".into()),
            DataMode::Forward { message } => {
                if let Some(t) = message.and_then(|m| self.ops.get_mut(&m)) {
                    t.bytes += pdv.data.len() as u64;
                }
                pieces.push(Piece::Pass(pdv));
                if pdv.is_last {
                    asm.data = DataMode::Idle;
                }
            }
            DataMode::Drop { answer } => {
                if pdv.is_last {
                    if let Some((pc, a)) = answer.take() {
                        back.push(pc, true, true, &a);
                    }
                    asm.data = DataMode::Idle;
                }
            }
            DataMode::Answer { data, .. } => {
                if data.len() + pdv.data.len() > MAX_ANSWER {
                    return Err("archive's C-FIND match too large".into());
                }
                data.extend_from_slice(pdv.data);
                if pdv.is_last
                    && let DataMode::Answer {
                        pc,
                        command_bytes,
                        data,
                    } = std::mem::take(&mut asm.data)
                {
                    match self.rewrite_answer(pc, &data) {
                        Ok(data) => {
                            pieces.push(Piece::Emit {
                                pc,
                                is_command: true,
                                bytes: command_bytes,
                            });
                            pieces.push(Piece::Emit {
                                pc,
                                is_command: false,
                                bytes: data,
                            });
                        }
                        // What the gateway cannot read it does not forward (one reading): the match
                        // is left out, and said so.
                        Err(e) => {
                            tracing::warn!(
                                peer = %self.party.peer,
                                user = ?self.party.user,
                                calling_ae = ?self.party.calling_ae,
                                called_ae = ?self.party.called_ae,
                                op = "find",
                                reason = ?e,
                                "C-FIND match from the archive left out: it cannot be read"
                            );
                        }
                    }
                }
            }
            DataMode::Hold { data, .. } => {
                if data.len() + pdv.data.len() > MAX_IDENTIFIER {
                    return Err("identifier too large".into());
                }
                data.extend_from_slice(pdv.data);
                if pdv.is_last
                    && let DataMode::Hold {
                        pc,
                        command,
                        command_bytes,
                        data,
                    } = std::mem::take(&mut asm.data)
                {
                    match self.decide_identifier(pc, &command, &data) {
                        Decision::Forward => {
                            pieces.push(Piece::Emit {
                                pc,
                                is_command: true,
                                bytes: command_bytes,
                            });
                            pieces.push(Piece::Emit {
                                pc,
                                is_command: false,
                                bytes: data,
                            });
                        }
                        Decision::Refuse {
                            status,
                            rule,
                            reason,
                        } => {
                            let answer =
                                dimse::refusal(&command, status, &error_comment(rule, &reason));
                            self.refused_now(&command, status, rule, &reason);
                            back.push(pc, true, true, &answer);
                        }
                        Decision::Rewrite(_)
                        | Decision::Hold
                        | Decision::HoldAnswer
                        | Decision::Drop
                        | Decision::Violation(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn refuse(&self, status: u16, rule: &'static str, reason: impl Into<String>) -> Decision {
        Decision::Refuse {
            status,
            rule,
            reason: reason.into(),
        }
    }

    /// Decide on a complete command set.
    fn decide(&mut self, from: Side, pc: u8, c: &Command, back: &mut PDataWriter) -> Decision {
        match from {
            Side::Archive => self.decide_archive(pc, c, back),
            // A C-STORE-RSP to a C-GET sub-operation: only to a request the archive is waiting on.
            Side::Client if c.is_response() => {
                if self.archive_requests.remove(&c.responded_to) {
                    Decision::Forward
                } else {
                    Decision::Violation(untracked_response("client", c))
                }
            }
            Side::Client => {
                self.counts.requests += 1;
                let user = &self.party.user;
                let op = match c.field {
                    cf::C_ECHO_RQ => Operation::Echo,
                    cf::C_STORE_RQ => Operation::Store,
                    cf::C_FIND_RQ if c.affected_sop_class == WORKLIST_FIND => Operation::Worklist,
                    cf::C_FIND_RQ => Operation::Find,
                    cf::C_MOVE_RQ => Operation::Move,
                    cf::C_GET_RQ => Operation::Get,
                    cf::C_CANCEL_RQ => {
                        self.counts.requests -= 1;
                        return if self.refused.contains(&c.responded_to)
                            && !self.outstanding(c.responded_to)
                        {
                            Decision::Drop
                        } else {
                            Decision::Forward
                        };
                    }
                    other => {
                        return self.refuse(
                            status::REFUSED_NOT_AUTHORIZED,
                            "unsupported_operation",
                            format!("operation {other:#06x} is not supported through the gateway"),
                        );
                    }
                };
                // The command must speak the context it travels on: the archive judges by the
                // context's abstract syntax, the gateway by the command's SOP class (PS3.7 9.3).
                let negotiated = self
                    .contexts
                    .get(&pc)
                    .map(|ctx| ctx.abstract_syntax.as_str())
                    .unwrap_or_default();
                if c.affected_sop_class != negotiated {
                    return self.refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "context_mismatch",
                        format!(
                            "SOP class {:?} is not the abstract syntax of presentation context {pc}",
                            c.affected_sop_class
                        ),
                    );
                }
                if self.outstanding(c.message_id) {
                    return self.refuse(
                        status::DUPLICATE_INVOCATION,
                        "duplicate_message_id",
                        format!("message ID {} is still in progress", c.message_id),
                    );
                }
                if !self.grants.allows(op) {
                    return self.refuse(
                        status::REFUSED_NOT_AUTHORIZED,
                        "not_authorized",
                        format!("{} is not allowed for this user", op.name()),
                    );
                }
                match op {
                    Operation::Find | Operation::Worklist => {
                        if !self.limiter.rates.queries.allow(user) {
                            return self.refuse(
                                status::OUT_OF_RESOURCES,
                                "rate_limit",
                                "query rate limit reached",
                            );
                        }
                        Decision::Hold
                    }
                    Operation::Move => {
                        if !self.grants.move_destinations.contains(&c.move_destination) {
                            return self.refuse(
                                status::MOVE_DESTINATION_UNKNOWN,
                                "move_destination",
                                format!(
                                    "move destination {:?} is not allowed for this user",
                                    c.move_destination
                                ),
                            );
                        }
                        if !self.limiter.rates.retrievals.allow(user) {
                            return self.refuse(
                                status::OUT_OF_RESOURCES_MATCHES,
                                "rate_limit",
                                "retrieval rate limit reached",
                            );
                        }
                        Decision::Hold
                    }
                    Operation::Get => {
                        if !self.limiter.rates.retrievals.allow(user) {
                            return self.refuse(
                                status::OUT_OF_RESOURCES_MATCHES,
                                "rate_limit",
                                "retrieval rate limit reached",
                            );
                        }
                        Decision::Hold
                    }
                    Operation::Echo | Operation::Store => Decision::Forward,
                }
            }
        }
    }

    /// Decide on a held request once its identifier is complete.
    fn decide_identifier(&mut self, pc: u8, c: &Command, data: &[u8]) -> Decision {
        let ts = self
            .contexts
            .get(&pc)
            .map(|ctx| ctx.transfer_syntax.as_str())
            .unwrap_or("");
        let identifier = match dimse::decode_identifier(data, ts) {
            Ok(i) => i,
            Err(e) => {
                return self.refuse(
                    status::IDENTIFIER_DOES_NOT_MATCH,
                    "bad_identifier",
                    e.to_string(),
                );
            }
        };
        if let Err(e) = query_guard::check_identifier_uids(&identifier) {
            return self.refuse(
                status::IDENTIFIER_DOES_NOT_MATCH,
                "bad_identifier",
                e.to_string(),
            );
        }
        let verdict = match c.field {
            cf::C_FIND_RQ
                if c.affected_sop_class == WORKLIST_FIND
                    || self.grants.unrestricted_find(&c.affected_sop_class) =>
            {
                Ok("")
            }
            cf::C_FIND_RQ => query_guard::check_text(&identifier)
                .and_then(|()| query_guard::check(&identifier, self.grants.query_min_chars)),
            _ => query_guard::check_text(&identifier)
                .and_then(|()| query_guard::check_retrieval(&identifier)),
        };
        match verdict {
            Ok(key) => tracing::debug!(user = ?self.party.user, key, "identifier allowed by key"),
            Err(GuardError::NotSpecific(reason)) => {
                let status = if c.field == cf::C_FIND_RQ {
                    status::OUT_OF_RESOURCES
                } else {
                    status::OUT_OF_RESOURCES_MATCHES
                };
                return self.refuse(status, "query_guard", reason);
            }
            Err(GuardError::Malformed(reason)) => {
                return self.refuse(status::IDENTIFIER_DOES_NOT_MATCH, "bad_identifier", reason);
            }
        }
        if c.field == cf::C_FIND_RQ {
            self.track(c, Some(query_keys(&identifier)));
            self.finds.insert(
                c.message_id,
                FindTrack {
                    matches: 0,
                    cap: self.grants.max_query_results,
                    capped: false,
                    dropped: 0,
                },
            );
        }
        if c.field == cf::C_MOVE_RQ || c.field == cf::C_GET_RQ {
            let op = if c.field == cf::C_MOVE_RQ {
                "move"
            } else {
                "get"
            };
            let study =
                dimse::attribute(&identifier, dicom_dictionary_std::tags::STUDY_INSTANCE_UID);
            let series =
                dimse::attribute(&identifier, dicom_dictionary_std::tags::SERIES_INSTANCE_UID);
            let level = dimse::attribute(
                &identifier,
                dicom_dictionary_std::tags::QUERY_RETRIEVE_LEVEL,
            );
            self.track(c, None);
            let registered = (op == "move").then(|| {
                self.moves.begin(
                    &c.move_destination,
                    &self.party.user,
                    &self.party.calling_ae,
                    c.message_id,
                )
            });
            tracing::info!(
                peer = %self.party.peer,
                user = ?self.party.user,
                calling_ae = ?self.party.calling_ae,
                called_ae = ?self.party.called_ae,
                op,
                destination = ?c.move_destination,
                level = ?level,
                study_uid = ?study,
                series_uid = ?series,
                "retrieval requested"
            );
            self.retrievals.insert(
                c.message_id,
                Retrieval {
                    op,
                    destination: c.move_destination.clone(),
                    registered,
                    patient: dimse::attribute(&identifier, dicom_dictionary_std::tags::PATIENT_ID),
                    instance: dimse::attribute(
                        &identifier,
                        dicom_dictionary_std::tags::SOP_INSTANCE_UID,
                    ),
                    level,
                    study,
                    series,
                    started: std::time::Instant::now(),
                },
            );
        }
        Decision::Forward
    }

    /// The final C-MOVE / C-GET response: log what was moved, and close the return path.
    fn retrieval_finished(&mut self, c: &Command) {
        let Some(r) = self.retrievals.get_mut(&c.responded_to) else {
            return;
        };
        if let Some(id) = r.registered.take() {
            self.moves.end(id);
        }
        let r = &*r;
        let count = |tag| dimse::count(c, tag);
        tracing::info!(
            peer = %self.party.peer,
            user = ?self.party.user,
            calling_ae = ?self.party.calling_ae,
            called_ae = ?self.party.called_ae,
            op = r.op,
            destination = ?r.destination,
            study_uid = ?r.study,
            series_uid = ?r.series,
            status = format_args!("{:#06x}", c.status.unwrap_or(0)),
            completed = count(dicom_dictionary_std::tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
            failed = count(dicom_dictionary_std::tags::NUMBER_OF_FAILED_SUBOPERATIONS),
            warning = count(dicom_dictionary_std::tags::NUMBER_OF_WARNING_SUBOPERATIONS),
            duration_ms = r.started.elapsed().as_millis() as u64,
            "retrieval finished"
        );
    }

    /// Messages from the archive: a response must answer a request of the client still outstanding
    /// (PS3.7 9.3: MessageIDBeingRespondedTo), else the association is aborted; a request (C-GET's
    /// C-STORE sub-operation) is remembered for the client's response. Then count C-FIND matches and
    /// enforce the result cap.
    fn decide_archive(&mut self, pc: u8, c: &Command, back: &mut PDataWriter) -> Decision {
        if !c.is_response() {
            if c.field != cf::C_CANCEL_RQ {
                if self.archive_requests.len() >= MAX_ARCHIVE_REQUESTS {
                    return Decision::Violation(format!(
                        "protocol violation: more than {MAX_ARCHIVE_REQUESTS} requests from the archive awaiting the client's response"
                    ));
                }
                if !self.archive_requests.insert(c.message_id) {
                    return Decision::Violation(format!(
                        "protocol violation: {} from the archive reuses message ID {}, still awaiting the client's response",
                        dimse_name(c.field),
                        c.message_id
                    ));
                }
            }
            return Decision::Forward;
        }
        if !self.outstanding(c.responded_to) {
            return Decision::Violation(untracked_response("archive", c));
        }
        let decision = self.decide_response(pc, c, back);
        if c.is_response() && !c.status.is_some_and(status::is_pending) {
            self.finish(c);
        }
        decision
    }

    /// A C-FIND match from the archive, read once: a RetrieveAETitle (0008,0054), whatever the archive
    /// put there (its own AE title, or nothing), becomes the AE title the client called (a viewer
    /// retrieves through the gateway, not around it), and the re-encoded identifier is what is forwarded.
    fn rewrite_answer(&self, pc: u8, data: &[u8]) -> Result<Vec<u8>, String> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let ts = self
            .contexts
            .get(&pc)
            .map(|ctx| ctx.transfer_syntax.as_str())
            .unwrap_or("");
        let mut identifier = dimse::decode_identifier(data, ts).map_err(|e| e.to_string())?;
        if identifier
            .element_opt(dicom_dictionary_std::tags::RETRIEVE_AE_TITLE)
            .ok()
            .flatten()
            .is_some()
        {
            identifier.put(DataElement::new(
                dicom_dictionary_std::tags::RETRIEVE_AE_TITLE,
                VR::AE,
                PrimitiveValue::from(self.party.called_ae.trim()),
            ));
        }
        dimse::encode_identifier(&identifier, ts).map_err(|e| e.to_string())
    }

    /// Is a request with this message ID forwarded and not yet finished?
    fn outstanding(&self, message_id: u16) -> bool {
        self.ops.contains_key(&message_id)
            || self.finds.contains_key(&message_id)
            || self.retrievals.contains_key(&message_id)
    }

    /// Start tracking a forwarded request; false when it is not one the gateway reports on.
    fn track(&mut self, c: &Command, query: Option<serde_json::Value>) -> bool {
        let Some(op) = tracked_op(c.field) else {
            return false;
        };
        self.ops.insert(
            c.message_id,
            OpTrack {
                op,
                started: std::time::Instant::now(),
                sop_class: c.affected_sop_class.clone(),
                sop_instance: c.affected_sop_instance.clone(),
                bytes: 0,
                query,
            },
        );
        true
    }

    /// A final response from the archive: metrics and the audit event for its request.
    fn finish(&mut self, c: &Command) {
        let retrieval = self.retrievals.remove(&c.responded_to);
        let Some(t) = self.ops.remove(&c.responded_to) else {
            return;
        };
        let find = self.finds.remove(&c.responded_to);
        metrics().operation(t.op, c.status);
        if t.op == "find" {
            metrics()
                .find_seconds
                .observe(t.started.elapsed().as_secs_f64());
        }
        let mut event = json!({
            "peer": self.party.peer.to_string(),
            "user": self.party.user,
            "calling_ae": self.party.calling_ae,
            "called_ae": self.party.called_ae,
            "op": t.op,
            "message_id": c.responded_to,
            "status": format!("{:#06x}", c.status.unwrap_or(0)),
            "duration_ms": t.started.elapsed().as_millis() as u64,
        });
        let fields = match t.op {
            "find" => json!({
                "sop_class_uid": t.sop_class,
                "query": t.query,
                "matches": find.as_ref().map(|f| f.matches.min(f.cap)),
                "truncated": find.as_ref().is_some_and(|f| f.capped && f.dropped > 0),
            }),
            "store" => json!({
                "sop_class_uid": t.sop_class,
                "sop_instance_uid": t.sop_instance,
                "bytes": t.bytes,
            }),
            "move" | "get" => json!({
                "level": retrieval.as_ref().map(|r| r.level.clone()),
                "patient_id": retrieval.as_ref().map(|r| r.patient.clone()).filter(|p| !p.is_empty()),
                "study_uid": retrieval.as_ref().map(|r| r.study.clone()),
                "series_uid": retrieval.as_ref().map(|r| r.series.clone()).filter(|s| !s.is_empty()),
                "sop_instance_uid": retrieval.as_ref().map(|r| r.instance.clone()).filter(|s| !s.is_empty()),
                "destination": retrieval.as_ref().map(|r| r.destination.clone()).filter(|d| !d.is_empty()),
                "completed": dimse::count(c, dicom_dictionary_std::tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
                "failed": dimse::count(c, dicom_dictionary_std::tags::NUMBER_OF_FAILED_SUBOPERATIONS),
                "warning": dimse::count(c, dicom_dictionary_std::tags::NUMBER_OF_WARNING_SUBOPERATIONS),
            }),
            _ => json!({}),
        };
        if let (Some(e), serde_json::Value::Object(f)) = (event.as_object_mut(), fields) {
            e.extend(f);
        }
        self.audit.record(t.op, event);
    }

    fn decide_response(&mut self, pc: u8, c: &Command, back: &mut PDataWriter) -> Decision {
        if (c.field == (cf::C_MOVE_RQ | cf::RESPONSE) || c.field == (cf::C_GET_RQ | cf::RESPONSE))
            && !c.status.is_some_and(status::is_pending)
        {
            self.retrieval_finished(c);
            return Decision::Forward;
        }
        if c.field != (cf::C_FIND_RQ | cf::RESPONSE) {
            return Decision::Forward;
        }
        let id = c.responded_to;
        let Some(track) = self.finds.get_mut(&id) else {
            return Decision::Forward;
        };
        let st = c.status.unwrap_or(status::SUCCESS);
        if status::is_pending(st) {
            track.matches += 1;
            if track.capped {
                track.dropped += 1;
                return Decision::Drop;
            }
            if track.matches >= track.cap {
                track.capped = true;
                back.push(pc, true, true, &dimse::c_cancel(id));
            }
            return if c.has_data_set {
                Decision::HoldAnswer
            } else {
                Decision::Forward
            };
        }
        // The final response (the track itself is dropped in `finish`).
        let Some(track) = self.finds.get(&id) else {
            return Decision::Forward;
        };
        if track.capped && (track.dropped > 0 || st == status::CANCEL) {
            self.counts.truncated_queries += 1;
            tracing::info!(
                peer = %self.party.peer,
                user = ?self.party.user,
                calling_ae = ?self.party.calling_ae,
                called_ae = ?self.party.called_ae,
                op = "find",
                relayed = track.cap,
                dropped = track.dropped,
                reason = "max_query_results reached",
                "C-FIND truncated"
            );
            let comment = format!("pacsgate: result cap of {} matches reached", track.cap);
            return Decision::Rewrite(dimse::with_status(c, status::CANCEL, &comment));
        }
        Decision::Forward
    }

    fn refused_now(&mut self, c: &Command, status: u16, rule: &'static str, reason: &str) {
        self.counts.refused += 1;
        metrics().refusal(rule);
        metrics().operation(op_name(c.field), Some(status));
        self.audit.record(
            "refused",
            json!({
                "peer": self.party.peer.to_string(),
                "user": self.party.user,
                "calling_ae": self.party.calling_ae,
                "called_ae": self.party.called_ae,
                "op": op_name(c.field),
                "message_id": c.message_id,
                "status": format!("{status:#06x}"),
                "rule": rule,
                "reason": reason,
                "sop_instance_uid": (!c.affected_sop_instance.is_empty()).then_some(&c.affected_sop_instance),
                "move_destination": (!c.move_destination.is_empty()).then_some(&c.move_destination),
            }),
        );
        if self.refused.len() >= REMEMBER_REFUSED {
            self.refused.pop_front();
        }
        self.refused.push_back(c.message_id);
        tracing::info!(
            peer = %self.party.peer,
            user = ?self.party.user,
            calling_ae = ?self.party.calling_ae,
            called_ae = ?self.party.called_ae,
            op = op_name(c.field),
            status = format_args!("{status:#06x}"),
            rule,
            reason,
            "refused"
        );
    }
}

impl Drop for Session {
    /// Moves still open when the association ends no longer admit return-path associations, and each
    /// retrieval the archive never finished is still an audit event (who asked for what, to where).
    fn drop(&mut self) {
        for (message_id, r) in self.retrievals.drain() {
            if let Some(id) = r.registered {
                self.moves.end(id);
            }
            self.audit.record(
                r.op,
                json!({
                    "peer": self.party.peer.to_string(),
                    "user": self.party.user,
                    "calling_ae": self.party.calling_ae,
                    "called_ae": self.party.called_ae,
                    "op": r.op,
                    "message_id": message_id,
                    "outcome": "incomplete",
                    "reason": "the association ended before the final response",
                    "level": r.level,
                    "patient_id": (!r.patient.is_empty()).then_some(&r.patient),
                    "study_uid": r.study,
                    "series_uid": (!r.series.is_empty()).then_some(&r.series),
                    "sop_instance_uid": (!r.instance.is_empty()).then_some(&r.instance),
                    "destination": (!r.destination.is_empty()).then_some(&r.destination),
                    "duration_ms": r.started.elapsed().as_millis() as u64,
                }),
            );
        }
    }
}

/// The requests the gateway reports on (metrics, audit), by command field.
fn tracked_op(field: u16) -> Option<&'static str> {
    match field {
        cf::C_ECHO_RQ | cf::C_STORE_RQ | cf::C_FIND_RQ | cf::C_MOVE_RQ | cf::C_GET_RQ => {
            Some(op_name(field))
        }
        _ => None,
    }
}

/// An identifier's keys as `keyword: value` for the audit trail (sequences summarised).
fn query_keys(identifier: &dicom_object::InMemDicomObject) -> serde_json::Value {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    let mut map = serde_json::Map::new();
    for e in identifier.iter() {
        let tag = e.header().tag;
        let name = dicom_dictionary_std::StandardDataDictionary
            .by_tag(tag)
            .map(|d| d.alias().to_string())
            .unwrap_or_else(|| format!("({:04X},{:04X})", tag.0, tag.1));
        let value = match e.value() {
            dicom_core::value::Value::Sequence(seq) => format!("[{} items]", seq.items().len()),
            _ => e
                .to_str()
                .map(|v| v.trim_end_matches(['\0', ' ']).to_string())
                .unwrap_or_default(),
        };
        map.insert(name, serde_json::Value::String(value));
    }
    serde_json::Value::Object(map)
}

/// The reason a response to no outstanding request aborts the association (its log line says it).
fn untracked_response(from: &str, c: &Command) -> String {
    format!(
        "protocol violation: {} from the {from} for message ID {}, which is not an outstanding request (MessageIDBeingRespondedTo unknown or already finished)",
        dimse_name(c.field),
        c.responded_to
    )
}

/// A command's name as PS3.7 writes it (C-FIND-RSP...).
fn dimse_name(field: u16) -> String {
    let base = match field & !cf::RESPONSE {
        cf::C_ECHO_RQ => "C-ECHO",
        cf::C_STORE_RQ => "C-STORE",
        cf::C_FIND_RQ => "C-FIND",
        cf::C_MOVE_RQ => "C-MOVE",
        cf::C_GET_RQ => "C-GET",
        cf::C_CANCEL_RQ => "C-CANCEL",
        _ => return format!("command {field:#06x}"),
    };
    let kind = if field & cf::RESPONSE != 0 {
        "RSP"
    } else {
        "RQ"
    };
    format!("{base}-{kind}")
}

fn op_name(field: u16) -> &'static str {
    match field {
        cf::C_ECHO_RQ => "echo",
        cf::C_STORE_RQ => "store",
        cf::C_FIND_RQ => "find",
        cf::C_MOVE_RQ => "move",
        cf::C_GET_RQ => "get",
        _ => "other",
    }
}

impl Inspector for Session {
    fn inspect(&mut self, from: Side, pdata: &[u8]) -> Result<Actions, String> {
        let (to_max, back_max) = match from {
            Side::Client => (self.archive_max, self.client_max),
            Side::Archive => (self.client_max, self.archive_max),
        };
        let mut pieces = Vec::new();
        let mut back = PDataWriter::new(back_max);
        let mut items = 0usize;
        for pdv in dimse::pdv_items(pdata) {
            items += 1;
            self.step(from, pdv, &mut pieces, &mut back)?;
        }
        let unchanged = pieces.len() == items && pieces.iter().all(|p| matches!(p, Piece::Pass(_)));
        let forward = if unchanged {
            Forward::Unchanged
        } else if pieces.is_empty() {
            Forward::Nothing
        } else {
            let mut out = PDataWriter::new(to_max);
            for piece in &pieces {
                match piece {
                    Piece::Pass(p) => {
                        out.push(p.presentation_context_id, p.is_command, p.is_last, p.data)
                    }
                    Piece::Emit {
                        pc,
                        is_command,
                        bytes,
                    } => out.push(*pc, *is_command, true, bytes),
                }
            }
            Forward::Rebuilt(out.into_bytes())
        };
        Ok(Actions {
            forward,
            back: back.into_bytes(),
        })
    }
}

/// The Error Comment (0000,0902) of a refusal: an LO, at most 64 characters, so each rule has a
/// sentence written to fit; the full reason goes to the log line and the audit event. A rule without
/// one gets the reason cut at a word boundary.
pub fn error_comment(rule: &str, reason: &str) -> String {
    let fixed = match rule {
        "query_guard" => "pacsgate: query too broad; give an identifying key (PatientID)",
        "bad_identifier" => "pacsgate: identifier malformed or not allowed",
        "not_authorized" => "pacsgate: operation not allowed for this user",
        "move_destination" => "pacsgate: move destination not allowed for this user",
        "rate_limit" => "pacsgate: rate limit reached; retry later",
        "duplicate_message_id" => "pacsgate: message ID still in progress",
        "context_mismatch" => "pacsgate: SOP class does not match the presentation context",
        "unsupported_operation" => "pacsgate: operation not supported through the gateway",
        _ => return fit_comment(&format!("pacsgate: {reason}")),
    };
    fixed.to_string()
}

/// `text` in at most 64 characters (an LO), cut at a word boundary with "..." when it is longer.
pub fn fit_comment(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        return text.to_string();
    }
    let head: String = text.chars().take(MAX - 3).collect();
    let cut = head
        .rfind(' ')
        .filter(|&i| i > MAX / 2)
        .unwrap_or(head.len());
    format!("{}...", head[..cut].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

    const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:2762"
[tls]
certificate = "c"
private_key = "k"
[[upstream]]
called_ae = "A"
address = "127.0.0.1:104"
ae_title = "A"
[limits]
max_query_results = 2
[[role]]
name = "r"
allow = ["echo", "find"]
"#;

    fn session() -> Session {
        let cfg = Config::parse(CONFIG, std::path::Path::new("/x.toml")).expect("config");
        let party = Party {
            peer: "127.0.0.1:5000".parse().expect("addr"),
            user: "u".into(),
            calling_ae: "C".into(),
            called_ae: "A".into(),
        };
        let ctx = |abstract_syntax: &str, transfer_syntax: &str| Context {
            abstract_syntax: abstract_syntax.into(),
            transfer_syntax: transfer_syntax.into(),
        };
        let ts = HashMap::from([
            (1u8, ctx(FIND, "1.2.840.10008.1.2.1")),
            (3u8, ctx(CT, "1.2.840.10008.1.2")),
            (5u8, ctx("1.2.840.10008.1.1", "1.2.840.10008.1.2")),
        ]);
        Session::new(
            party,
            Grants::for_roles(&cfg, &["r".to_string()]),
            Arc::new(Limiter::new(&cfg)),
            Arc::new(MoveRegistry::default()),
            Arc::new(Audit::disabled()),
            ts,
            16384,
            16384,
        )
    }

    fn command(elements: Vec<(dicom_core::Tag, u16)>, sop_class: &str) -> Vec<u8> {
        let mut e: Vec<DataElement<InMemDicomObject>> = vec![DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        )];
        e.extend(
            elements
                .into_iter()
                .map(|(t, v)| DataElement::new(t, VR::US, PrimitiveValue::from(v))),
        );
        let obj = InMemDicomObject::command_from_element_iter(e);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(
            &mut out,
            &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .expect("encode");
        out
    }

    fn pdu(pc: u8, is_command: bool, is_last: bool, data: &[u8]) -> Vec<u8> {
        let mut w = PDataWriter::new(1 << 20);
        w.push(pc, is_command, is_last, data);
        w.into_bytes()
    }

    fn identifier(keys: &[(dicom_core::Tag, VR, &str)]) -> Vec<u8> {
        let obj = InMemDicomObject::from_element_iter(
            keys.iter()
                .map(|(t, vr, v)| DataElement::new(*t, *vr, PrimitiveValue::from(*v))),
        );
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .expect("encode");
        out
    }

    fn statuses(back: &[u8]) -> Vec<u16> {
        let mut out = Vec::new();
        let mut rest = back;
        while rest.len() >= 6 {
            let len = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
            for pdv in dimse::pdv_items(&rest[..6 + len]) {
                if pdv.is_command {
                    out.push(
                        dimse::decode_command(pdv.data)
                            .expect("cmd")
                            .status
                            .unwrap_or(0),
                    );
                }
            }
            rest = &rest[6 + len..];
        }
        out
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

    #[test]
    fn an_allowed_echo_takes_the_fast_path() {
        let mut s = session();
        let echo = command(
            vec![
                (tags::COMMAND_FIELD, 0x0030),
                (tags::MESSAGE_ID, 1),
                (tags::COMMAND_DATA_SET_TYPE, 0x0101),
            ],
            "1.2.840.10008.1.1",
        );
        let a = s
            .inspect(Side::Client, &pdu(5, true, true, &echo))
            .expect("inspect");
        assert_eq!(a, Actions::PASS);
    }

    #[test]
    fn a_refused_store_swallows_its_data_and_answers_after_the_last_fragment() {
        let mut s = session();
        let store = command(
            vec![
                (tags::COMMAND_FIELD, 0x0001),
                (tags::MESSAGE_ID, 9),
                (tags::COMMAND_DATA_SET_TYPE, 0),
            ],
            CT,
        );
        let a = s
            .inspect(Side::Client, &pdu(3, true, true, &store))
            .expect("command");
        assert_eq!((a.forward, a.back.len()), (Forward::Nothing, 0));
        let a = s
            .inspect(Side::Client, &pdu(3, false, false, &[0u8; 1000]))
            .expect("data 1");
        assert_eq!((a.forward, a.back.len()), (Forward::Nothing, 0));
        let a = s
            .inspect(Side::Client, &pdu(3, false, true, &[0u8; 10]))
            .expect("data 2");
        assert_eq!(a.forward, Forward::Nothing);
        assert_eq!(statuses(&a.back), vec![0x0124]);
        assert_eq!(s.counts.refused, 1);
        // The association stays usable: the next echo passes.
        let echo = command(
            vec![
                (tags::COMMAND_FIELD, 0x0030),
                (tags::MESSAGE_ID, 10),
                (tags::COMMAND_DATA_SET_TYPE, 0x0101),
            ],
            "1.2.840.10008.1.1",
        );
        assert_eq!(
            s.inspect(Side::Client, &pdu(5, true, true, &echo))
                .expect("echo"),
            Actions::PASS
        );
    }

    #[test]
    fn a_find_is_held_until_its_identifier_is_complete() {
        let mut s = session();
        let find = command(
            vec![
                (tags::COMMAND_FIELD, 0x0020),
                (tags::MESSAGE_ID, 3),
                (tags::COMMAND_DATA_SET_TYPE, 0),
            ],
            FIND,
        );
        let id = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::PATIENT_ID, VR::LO, "12345"),
        ]);
        let a = s
            .inspect(Side::Client, &pdu(1, true, true, &find))
            .expect("command");
        assert_eq!(a.forward, Forward::Nothing, "held");
        let (first, second) = id.split_at(10);
        assert_eq!(
            s.inspect(Side::Client, &pdu(1, false, false, first))
                .expect("1")
                .forward,
            Forward::Nothing
        );
        let a = s
            .inspect(Side::Client, &pdu(1, false, true, second))
            .expect("2");
        let Forward::Rebuilt(bytes) = a.forward else {
            panic!("expected the held request")
        };
        let items: Vec<Pdv> = dimse::pdv_items(&bytes).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_command && items[0].data == &find[..]);
        assert!(!items[1].is_command && items[1].is_last && items[1].data == &id[..]);
    }

    #[test]
    fn a_wildcard_find_is_refused_a700_and_the_cap_cancels_at_the_archive() {
        let mut s = session();
        let find = |id: u16| {
            command(
                vec![
                    (tags::COMMAND_FIELD, 0x0020),
                    (tags::MESSAGE_ID, id),
                    (tags::COMMAND_DATA_SET_TYPE, 0),
                ],
                FIND,
            )
        };
        let wild = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::PATIENT_NAME, VR::PN, "*"),
        ]);
        s.inspect(Side::Client, &pdu(1, true, true, &find(4)))
            .expect("cmd");
        let a = s
            .inspect(Side::Client, &pdu(1, false, true, &wild))
            .expect("id");
        assert_eq!(
            (a.forward, statuses(&a.back)),
            (Forward::Nothing, vec![0xA700])
        );

        let named = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::PATIENT_NAME, VR::PN, "DOE*"),
        ]);
        s.inspect(Side::Client, &pdu(1, true, true, &find(5)))
            .expect("cmd");
        assert!(matches!(
            s.inspect(Side::Client, &pdu(1, false, true, &named))
                .expect("id")
                .forward,
            Forward::Rebuilt(_)
        ));
        let rsp = |status: u16, data: bool| {
            command(
                vec![
                    (tags::COMMAND_FIELD, 0x8020),
                    (tags::MESSAGE_ID_BEING_RESPONDED_TO, 5),
                    (tags::COMMAND_DATA_SET_TYPE, if data { 0 } else { 0x0101 }),
                    (tags::STATUS, status),
                ],
                FIND,
            )
        };
        let mut relayed = 0;
        let mut cancels = 0;
        for _ in 0..4 {
            let a = s
                .inspect(Side::Archive, &pdu(1, true, true, &rsp(0xFF00, true)))
                .expect("pending");
            let b = s
                .inspect(Side::Archive, &pdu(1, false, true, &named))
                .expect("match");
            // A match is held whole (command and identifier), then forwarded re-encoded.
            if a.forward == Forward::Nothing && matches!(b.forward, Forward::Rebuilt(_)) {
                relayed += 1;
            }
            cancels += usize::from(!a.back.is_empty());
        }
        assert_eq!((relayed, cancels), (2, 1));
        let a = s
            .inspect(Side::Archive, &pdu(1, true, true, &rsp(0x0000, false)))
            .expect("final");
        let Forward::Rebuilt(bytes) = a.forward else {
            panic!("final response rewritten")
        };
        assert_eq!(statuses(&bytes), vec![0xFE00]);
        assert_eq!(s.counts.truncated_queries, 1);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut s = session();
        assert!(
            s.inspect(Side::Client, &pdu(1, false, true, &[1, 2, 3]))
                .is_err(),
            "data without command"
        );
        assert!(
            s.inspect(Side::Client, &pdu(1, true, true, &[0xff; 9]))
                .is_err(),
            "garbage command"
        );
    }

    #[test]
    fn a_c_find_match_is_forwarded_re_encoded_with_the_called_ae_as_retrieve_ae_title() {
        let mut s = session();
        let rq = command(
            vec![
                (tags::COMMAND_FIELD, 0x0020),
                (tags::MESSAGE_ID, 5),
                (tags::PRIORITY, 0),
                (tags::COMMAND_DATA_SET_TYPE, 0),
            ],
            FIND,
        );
        let named = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::PATIENT_ID, VR::LO, "P1"),
        ]);
        s.inspect(Side::Client, &pdu(1, true, true, &rq))
            .expect("cmd");
        s.inspect(Side::Client, &pdu(1, false, true, &named))
            .expect("id");
        let rsp = command(
            vec![
                (tags::COMMAND_FIELD, 0x8020),
                (tags::MESSAGE_ID_BEING_RESPONDED_TO, 5),
                (tags::COMMAND_DATA_SET_TYPE, 0),
                (tags::STATUS, 0xFF00),
            ],
            FIND,
        );
        let answer = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::RETRIEVE_AE_TITLE, VR::AE, "ORTHANC"),
            (tags::PATIENT_ID, VR::LO, "P1"),
        ]);
        let a = s
            .inspect(Side::Archive, &pdu(1, true, true, &rsp))
            .expect("pending");
        assert_eq!(
            a.forward,
            Forward::Nothing,
            "held until the identifier is whole"
        );
        let b = s
            .inspect(Side::Archive, &pdu(1, false, true, &answer))
            .expect("match");
        let Forward::Rebuilt(bytes) = b.forward else {
            panic!("the match is forwarded re-encoded")
        };
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        // (0008,0054) AE, length 2, "A " (the called AE, padded): explicit VR little endian.
        assert!(has(b"\x08\x00\x54\x00AE\x02\x00A "), "{bytes:?}");
        assert!(!has(b"ORTHANC"));
        assert!(has(b"P1"));
    }

    #[test]
    fn error_comments_fit_an_lo_and_end_on_a_word() {
        for rule in [
            "query_guard",
            "bad_identifier",
            "not_authorized",
            "move_destination",
            "rate_limit",
            "duplicate_message_id",
            "context_mismatch",
            "unsupported_operation",
        ] {
            let c = error_comment(rule, "");
            assert!(
                c.len() <= 64 && c.starts_with("pacsgate: "),
                "{rule}: {c:?}"
            );
        }
        let long =
            "no identifying key has at least 2 characters before its first wildcard: add PatientID";
        let c = fit_comment(&format!("pacsgate: {long}"));
        assert!(
            c.chars().count() <= 64 && c.ends_with("...") && !c.contains("ha..."),
            "{c:?}"
        );
        assert_eq!(fit_comment("short"), "short");
    }
}
