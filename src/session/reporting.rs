//! Reporting of outcomes: the log lines, audit events and metrics of each request, refusal and
//! retrieval, and the Error Comment (0000,0902) of a refusal.

use crate::dimse::{self, Command, command_field as cf};
use crate::metrics::metrics;
use serde_json::json;

use super::*;

#[derive(Debug)]
pub(super) struct OpTrack {
    pub(super) op: &'static str,
    pub(super) started: std::time::Instant,
    pub(super) sop_class: String,
    pub(super) sop_instance: String,
    pub(super) bytes: u64,
    /// The C-FIND keys, as the audit trail shows them.
    pub(super) query: Option<serde_json::Value>,
}

/// A C-MOVE or C-GET in progress, for its log lines and the return path.
#[derive(Debug)]
pub(super) struct Retrieval {
    pub(super) op: &'static str,
    pub(super) destination: String,
    pub(super) registered: Option<u64>,
    pub(super) level: String,
    pub(super) patient: String,
    pub(super) study: String,
    pub(super) series: String,
    pub(super) instance: String,
    pub(super) started: std::time::Instant,
}

#[derive(Debug)]
pub(super) struct FindTrack {
    pub(super) matches: u32,
    pub(super) cap: u32,
    pub(super) capped: bool,
    pub(super) dropped: u32,
}

impl Session {
    /// The final C-MOVE / C-GET response: log what was moved, and close the return path.
    pub(super) fn retrieval_finished(&mut self, c: &Command) {
        let Some(r) = self.retrievals.get_mut(&c.responded_to) else {
            return;
        };
        if let Some(id) = r.registered.take() {
            self.moves.end(id);
        }
        let r = &*r;
        let count = |tag| dimse::count(c, tag);
        tracing::info!(target: crate::logfmt::targets::SESSION, peer = %self.party.peer,
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

    /// Start tracking a forwarded request; false when it is not one the gateway reports on.
    pub(super) fn track(&mut self, c: &Command, query: Option<serde_json::Value>) -> bool {
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
    pub(super) fn finish(&mut self, c: &Command) {
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

    pub(super) fn refused_now(
        &mut self,
        c: &Command,
        status: u16,
        rule: &'static str,
        reason: &str,
    ) {
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
        tracing::info!(target: crate::logfmt::targets::SESSION, peer = %self.party.peer,
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
pub(super) fn tracked_op(field: u16) -> Option<&'static str> {
    match field {
        cf::C_ECHO_RQ | cf::C_STORE_RQ | cf::C_FIND_RQ | cf::C_MOVE_RQ | cf::C_GET_RQ => {
            Some(op_name(field))
        }
        _ => None,
    }
}

/// An identifier's keys as `keyword: value` for the audit trail (sequences summarised).
pub(super) fn query_keys(identifier: &dicom_object::InMemDicomObject) -> serde_json::Value {
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
pub(super) fn untracked_response(from: &str, c: &Command) -> String {
    format!(
        "protocol violation: {} from the {from} for message ID {}, which is not an outstanding request (MessageIDBeingRespondedTo unknown or already finished)",
        dimse_name(c.field),
        c.responded_to
    )
}

/// A command's name as PS3.7 writes it (C-FIND-RSP...).
pub(super) fn dimse_name(field: u16) -> String {
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

pub(super) fn op_name(field: u16) -> &'static str {
    match field {
        cf::C_ECHO_RQ => "echo",
        cf::C_STORE_RQ => "store",
        cf::C_FIND_RQ => "find",
        cf::C_MOVE_RQ => "move",
        cf::C_GET_RQ => "get",
        _ => "other",
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
