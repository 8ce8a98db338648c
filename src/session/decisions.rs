//! What is allowed and what is refused: a request by the user's grants and limits, a response by
//! the requests outstanding (PS3.7 9.3 MessageIDBeingRespondedTo), and the C-FIND result cap.

use dicom_object::InMemDicomObject;

use crate::config::Operation;
use crate::dimse::{self, Command, command_field as cf, status};
use crate::policy::query_guard::{self, GuardError};
use crate::relay::Side;
use crate::ul::pdata::PDataWriter;

use super::*;

/// What to do with a complete command.
pub(super) enum Decision {
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

impl Session {
    pub(super) fn refuse(
        &self,
        status: u16,
        rule: &'static str,
        reason: impl Into<String>,
    ) -> Decision {
        Decision::Refuse {
            status,
            rule,
            reason: reason.into(),
        }
    }

    /// Decide on a complete command set.
    pub(super) fn decide(
        &mut self,
        from: Side,
        pc: u8,
        c: &Command,
        back: &mut PDataWriter,
    ) -> Decision {
        match from {
            Side::Acceptor => self.decide_archive(pc, c, back),
            // A C-STORE-RSP to a C-GET sub-operation: only to a request the archive is waiting on.
            Side::Requestor if c.is_response() => {
                if self.archive_requests.remove(&c.responded_to) {
                    Decision::Forward
                } else {
                    Decision::Violation(untracked_response("client", c))
                }
            }
            Side::Requestor => self.decide_request(pc, c),
        }
    }

    /// A request from the client, in order: its operation, its context, its message ID, the user's
    /// grants, then the limits of the operation.
    fn decide_request(&mut self, pc: u8, c: &Command) -> Decision {
        self.counts.requests += 1;
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
        // The command must speak the context it travels on: the archive judges by the context's
        // abstract syntax, the gateway by the command's SOP class (PS3.7 9.3).
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
        self.decide_limits(op, c)
    }

    /// An allowed request against its operation's limits: the move destinations, the rate limits.
    /// Queries and retrievals are held for their identifier.
    fn decide_limits(&self, op: Operation, c: &Command) -> Decision {
        let user = &self.party.user;
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
            Operation::Move if !self.grants.move_destinations.contains(&c.move_destination) => self
                .refuse(
                    status::MOVE_DESTINATION_UNKNOWN,
                    "move_destination",
                    format!(
                        "move destination {:?} is not allowed for this user",
                        c.move_destination
                    ),
                ),
            Operation::Move | Operation::Get => {
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

    /// Decide on a held request once its identifier is complete: the identifier to forward (a
    /// C-FIND's as it came, a retrieve's rebuilt from the keys judged), or the refusal.
    pub(super) fn decide_identifier(
        &mut self,
        pc: u8,
        c: &Command,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, Decision> {
        let identifier = self.check_identifier(pc, c, &data)?;
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
            // Forwarded, and audited, as judged: the level and its unique keys, nothing else.
            let bytes =
                dimse::encode_identifier(&identifier, self.transfer_syntax(pc)).map_err(|e| {
                    self.refuse(
                        status::IDENTIFIER_DOES_NOT_MATCH,
                        "bad_identifier",
                        e.to_string(),
                    )
                })?;
            self.begin_retrieval(c, &identifier);
            return Ok(bytes);
        }
        Ok(data)
    }

    /// The transfer syntax accepted for context `pc` (`""` for none: decoding it fails).
    fn transfer_syntax(&self, pc: u8) -> &str {
        self.contexts
            .get(&pc)
            .map(|ctx| ctx.transfer_syntax.as_str())
            .unwrap_or("")
    }

    /// A held request's identifier: decoded in its context's transfer syntax, its UIDs and text
    /// checked, and specific enough for the query guard; else the refusal.
    fn check_identifier(
        &self,
        pc: u8,
        c: &Command,
        data: &[u8],
    ) -> Result<InMemDicomObject, Decision> {
        let decoded = dimse::decode_identifier(data, self.transfer_syntax(pc)).map_err(|e| {
            self.refuse(
                status::IDENTIFIER_DOES_NOT_MATCH,
                "bad_identifier",
                e.to_string(),
            )
        })?;
        // A retrieve is judged as it will be forwarded: its level and unique keys only (a key left
        // out cannot refuse it, nor pass it).
        let identifier = if c.field == cf::C_FIND_RQ {
            decoded
        } else {
            query_guard::retrieve_identifier(&decoded).map_err(|e| {
                self.refuse(
                    status::IDENTIFIER_DOES_NOT_MATCH,
                    "bad_identifier",
                    e.to_string(),
                )
            })?
        };
        if let Err(e) = query_guard::check_identifier_uids(&identifier) {
            return Err(self.refuse(
                status::IDENTIFIER_DOES_NOT_MATCH,
                "bad_identifier",
                e.to_string(),
            ));
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
            Ok(key) => {
                tracing::debug!(target: crate::logfmt::targets::SESSION, user = ?self.party.user, key, "identifier allowed by key")
            }
            Err(GuardError::NotSpecific(reason)) => {
                let status = if c.field == cf::C_FIND_RQ {
                    status::OUT_OF_RESOURCES
                } else {
                    status::OUT_OF_RESOURCES_MATCHES
                };
                return Err(self.refuse(status, "query_guard", reason));
            }
            Err(GuardError::Malformed(reason)) => {
                return Err(self.refuse(
                    status::IDENTIFIER_DOES_NOT_MATCH,
                    "bad_identifier",
                    reason,
                ));
            }
        }
        Ok(identifier)
    }

    /// A C-MOVE or C-GET allowed: tracked, registered (a C-MOVE, for its return path), logged.
    fn begin_retrieval(&mut self, c: &Command, identifier: &InMemDicomObject) {
        use dicom_dictionary_std::tags;
        let op = if c.field == cf::C_MOVE_RQ {
            "move"
        } else {
            "get"
        };
        let study = dimse::attribute(identifier, tags::STUDY_INSTANCE_UID);
        let series = dimse::attribute(identifier, tags::SERIES_INSTANCE_UID);
        let level = dimse::attribute(identifier, tags::QUERY_RETRIEVE_LEVEL);
        self.track(c, None);
        let registered = (op == "move").then(|| {
            self.moves.begin(
                &c.move_destination,
                &self.party.user,
                &self.party.calling_ae,
                c.message_id,
            )
        });
        tracing::info!(target: crate::logfmt::targets::SESSION, peer = %self.party.peer,
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
                patient: dimse::attribute(identifier, tags::PATIENT_ID),
                instance: dimse::attribute(identifier, tags::SOP_INSTANCE_UID),
                level,
                study,
                series,
                started: std::time::Instant::now(),
            },
        );
    }

    /// Messages from the archive: a response must answer a request of the client still outstanding
    /// (PS3.7 9.3: MessageIDBeingRespondedTo), else the association is aborted; a request (C-GET's
    /// C-STORE sub-operation) is remembered for the client's response. Then count C-FIND matches and
    /// enforce the result cap.
    pub(super) fn decide_archive(
        &mut self,
        pc: u8,
        c: &Command,
        back: &mut PDataWriter,
    ) -> Decision {
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
    pub(super) fn rewrite_answer(&self, pc: u8, data: &[u8]) -> Result<Vec<u8>, String> {
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
    pub(super) fn outstanding(&self, message_id: u16) -> bool {
        self.ops.contains_key(&message_id)
            || self.finds.contains_key(&message_id)
            || self.retrievals.contains_key(&message_id)
    }

    pub(super) fn decide_response(
        &mut self,
        pc: u8,
        c: &Command,
        back: &mut PDataWriter,
    ) -> Decision {
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
            tracing::info!(target: crate::logfmt::targets::SESSION, peer = %self.party.peer,
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
}
