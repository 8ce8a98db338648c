//! The demo archive's service providers: C-ECHO, C-FIND, C-STORE and C-GET (PS3.4 A, B, C; PS3.7 9.1).

use std::borrow::Cow;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::DemoArchiveError;
use super::association::{Association, Event, Message};
use super::dimse::{self, CommandBuilder, command, status};
use super::negotiation::{Context, Model, Service};
use super::query::Query;
use super::store::{DemoArchive, Instance};

/// How an association ended normally.
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    Released,
    Aborted,
    Closed,
}

/// Requests served on one association, for its log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    pub echo: u32,
    pub find: u32,
    pub store: u32,
    pub get: u32,
}

/// What became of one C-STORE sub-operation of a C-GET.
enum SubOperation {
    /// The peer answered with this status (`None`: nothing could be sent).
    Done { status: Option<u16>, cancel: bool },
    /// The association ended while waiting for the C-STORE response.
    Ended(End),
}

/// What became of a C-GET's sub-operations so far.
#[derive(Default)]
struct GetTally<'i> {
    completed: usize,
    warning: usize,
    /// SOP Instance UIDs of the failed sub-operations.
    failed: Vec<&'i str>,
    cancelled: bool,
}

/// One association's DIMSE conversation with the archive.
pub(crate) struct Session<'a> {
    assoc: Association,
    archive: &'a DemoArchive,
    ae_title: &'a str,
    pub counts: Counts,
    next_message_id: u16,
}

impl<'a> Session<'a> {
    pub fn new(assoc: Association, archive: &'a DemoArchive, ae_title: &'a str) -> Self {
        Session {
            assoc,
            archive,
            ae_title,
            counts: Counts::default(),
            next_message_id: 1,
        }
    }

    /// Serve requests until the peer releases, aborts or disconnects.
    pub async fn run(&mut self) -> Result<End, DemoArchiveError> {
        loop {
            let message = match self.assoc.next_event().await? {
                Event::Message(message) => message,
                Event::ReleaseRequested => {
                    self.assoc.release().await?;
                    return Ok(End::Released);
                }
                Event::Aborted => return Ok(End::Aborted),
                Event::Closed => return Ok(End::Closed),
            };
            if let Some(end) = self.dispatch(message).await? {
                return Ok(end);
            }
        }
    }

    /// After `run`: abort an association that ended in error.
    pub async fn finish(self, result: &Result<End, DemoArchiveError>) {
        if result.is_err() {
            self.assoc.abort().await;
        }
    }

    async fn dispatch(&mut self, message: Message) -> Result<Option<End>, DemoArchiveError> {
        let context = self
            .assoc
            .context(message.context_id)
            .cloned()
            .ok_or_else(|| DemoArchiveError::Protocol("unknown presentation context".into()))?;
        let field = message
            .command
            .field()
            .ok_or_else(|| DemoArchiveError::Command("no Command Field".into()))?;
        tracing::debug!(field, context = context.id, "demo archive: request");
        match (field, context.service) {
            (command::C_ECHO, Service::Verification) => {
                self.counts.echo += 1;
                self.respond(&context, &message, status::SUCCESS, None)
                    .await?;
            }
            (command::C_FIND, Service::Find(model)) => {
                self.counts.find += 1;
                self.find(&context, model, &message).await?;
            }
            (command::C_STORE, Service::Storage) => {
                self.counts.store += 1;
                self.store(&context, message).await?;
            }
            (command::C_GET, Service::Get(model)) => {
                self.counts.get += 1;
                return self.get(&context, model, &message).await;
            }
            // Nothing is in progress between requests: a late C-CANCEL has nothing to cancel.
            (command::C_CANCEL, _) => {}
            (f, _) if f & command::RESPONSE_BIT != 0 => {
                tracing::warn!(field = f, "demo archive: unexpected response ignored");
            }
            (command::C_ECHO | command::C_FIND | command::C_STORE | command::C_GET, _) => {
                let comment = "operation not supported on this presentation context";
                self.respond(
                    &context,
                    &message,
                    status::SOP_CLASS_NOT_SUPPORTED,
                    Some(comment),
                )
                .await?;
            }
            _ => {
                let comment = "operation not supported by the demo archive";
                self.respond(
                    &context,
                    &message,
                    status::UNRECOGNIZED_OPERATION,
                    Some(comment),
                )
                .await?;
            }
        }
        Ok(None)
    }

    /// A response without data set to `message`.
    async fn respond(
        &mut self,
        context: &Context,
        message: &Message,
        status: u16,
        comment: Option<&str>,
    ) -> Result<(), DemoArchiveError> {
        let field = message.command.field().unwrap_or(0);
        let mut builder = response(context, message, field)
            .status(status)
            .data_set(false);
        if let Some(uid) = message.command.string(tags::AFFECTED_SOP_INSTANCE_UID) {
            builder = builder.str(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, &uid);
        }
        if let Some(comment) = comment {
            builder = builder.error_comment(comment);
        }
        self.assoc
            .send_message(context.id, builder.encode()?, None)
            .await
    }

    /// Read the identifier of a C-FIND / C-GET request, or the status to refuse it with.
    fn query(context: &Context, model: Model, message: &Message) -> Result<Query, (u16, String)> {
        if message.data_too_large {
            return Err((status::OUT_OF_RESOURCES, "identifier too large".into()));
        }
        let data = message
            .data
            .as_deref()
            .ok_or((status::DOES_NOT_MATCH_SOP_CLASS, "no identifier".into()))?;
        let identifier = dimse::decode_identifier(data, &context.transfer_syntax)
            .map_err(|e| (status::UNABLE_TO_PROCESS, e.to_string()))?;
        Query::parse(identifier, model)
            .map_err(|s| (s, "missing or invalid Query/Retrieve Level".into()))
    }

    async fn find(
        &mut self,
        context: &Context,
        model: Model,
        message: &Message,
    ) -> Result<(), DemoArchiveError> {
        let query = match Self::query(context, model, message) {
            Ok(query) => query,
            Err((status, comment)) => {
                return self.respond(context, message, status, Some(&comment)).await;
            }
        };
        let matches = query.find(&self.archive.snapshot(), self.ae_title);
        for identifier in &matches {
            let data = match dimse::encode_data_set(identifier, &context.transfer_syntax) {
                Ok(data) => data,
                Err(e) => {
                    let comment = e.to_string();
                    return self
                        .respond(context, message, status::UNABLE_TO_PROCESS, Some(&comment))
                        .await;
                }
            };
            let pending = response(context, message, command::C_FIND)
                .status(status::PENDING)
                .data_set(true)
                .encode()?;
            self.assoc
                .send_message(context.id, pending, Some(&data))
                .await?;
        }
        tracing::debug!(matches = matches.len(), "demo archive: C-FIND done");
        self.respond(context, message, status::SUCCESS, None).await
    }

    async fn store(
        &mut self,
        context: &Context,
        mut message: Message,
    ) -> Result<(), DemoArchiveError> {
        let (status, comment) = self.store_status(context, &mut message);
        self.respond(context, &message, status, comment.as_deref())
            .await
    }

    fn store_status(&self, context: &Context, message: &mut Message) -> (u16, Option<String>) {
        if message.data_too_large {
            return (status::OUT_OF_RESOURCES, Some("data set too large".into()));
        }
        let Some(data) = message.data.take() else {
            return (status::UNABLE_TO_PROCESS, Some("no data set".into()));
        };
        let instance = match Instance::from_data_set(data, &context.transfer_syntax) {
            Ok(instance) => instance,
            Err(e) => {
                tracing::warn!(reason = %e, "demo archive: C-STORE refused 0xC000");
                return (status::UNABLE_TO_PROCESS, Some(e.to_string()));
            }
        };
        let affected_class = message.command.string(tags::AFFECTED_SOP_CLASS_UID);
        let affected_instance = message.command.string(tags::AFFECTED_SOP_INSTANCE_UID);
        if affected_class.as_deref() != Some(instance.sop_class_uid.as_str())
            || affected_instance.as_deref() != Some(instance.sop_instance_uid.as_str())
        {
            let comment = "SOP class / instance differ from the command set";
            return (status::DOES_NOT_MATCH_SOP_CLASS, Some(comment.into()));
        }
        match self.archive.insert(instance) {
            Ok(()) => (status::SUCCESS, None),
            Err(e) => (status::OUT_OF_RESOURCES, Some(e.to_string())),
        }
    }

    async fn get(
        &mut self,
        context: &Context,
        model: Model,
        message: &Message,
    ) -> Result<Option<End>, DemoArchiveError> {
        let query = match Self::query(context, model, message) {
            Ok(query) if query.has_unique_key() => query,
            Ok(_) => {
                let comment = "C-GET needs the unique key of its level";
                let status = status::DOES_NOT_MATCH_SOP_CLASS;
                self.respond(context, message, status, Some(comment))
                    .await?;
                return Ok(None);
            }
            Err((status, comment)) => {
                self.respond(context, message, status, Some(&comment))
                    .await?;
                return Ok(None);
            }
        };
        let instances = query.select(&self.archive.snapshot());
        let get_id = message.command.message_id();
        let mut tally = GetTally::default();
        for (done, instance) in instances.iter().enumerate() {
            match self.store_sub_operation(instance, get_id).await? {
                SubOperation::Ended(end) => return Ok(Some(end)),
                SubOperation::Done { status, cancel } => {
                    match status {
                        Some(status::SUCCESS) => tally.completed += 1,
                        Some(s) if status::is_warning(s) => tally.warning += 1,
                        _ => tally.failed.push(&instance.sop_instance_uid),
                    }
                    tally.cancelled |= cancel;
                }
            }
            let remaining = instances.len() - done - 1;
            if tally.cancelled || remaining == 0 {
                break;
            }
            let pending = response(context, message, command::C_GET)
                .status(status::PENDING)
                .data_set(false)
                .count(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, remaining)
                .count(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, tally.completed)
                .count(tags::NUMBER_OF_FAILED_SUBOPERATIONS, tally.failed.len())
                .count(tags::NUMBER_OF_WARNING_SUBOPERATIONS, tally.warning)
                .encode()?;
            self.assoc.send_message(context.id, pending, None).await?;
        }
        self.get_done(context, message, instances.len(), &tally)
            .await?;
        Ok(None)
    }

    /// The final C-GET response for what became of `total` sub-operations (PS3.4 C.4.3.1.3).
    async fn get_done(
        &mut self,
        context: &Context,
        message: &Message,
        total: usize,
        tally: &GetTally<'_>,
    ) -> Result<(), DemoArchiveError> {
        let GetTally {
            completed,
            warning,
            ref failed,
            cancelled,
        } = *tally;
        let final_status = if cancelled {
            status::CANCEL
        } else if failed.is_empty() && warning == 0 {
            status::SUCCESS
        } else if completed == 0 && warning == 0 {
            status::UNABLE_TO_PERFORM_SUB_OPERATIONS
        } else {
            status::SUB_OPERATIONS_WITH_FAILURES
        };
        let mut builder = response(context, message, command::C_GET)
            .status(final_status)
            .count(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, completed)
            .count(tags::NUMBER_OF_FAILED_SUBOPERATIONS, failed.len())
            .count(tags::NUMBER_OF_WARNING_SUBOPERATIONS, warning);
        if cancelled {
            let remaining = total - completed - warning - failed.len();
            builder = builder.count(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, remaining);
        }
        // PS3.4 C.4.3.1.3.1: a non-success final response lists the failed instances.
        let identifier = if failed.is_empty() || final_status == status::SUCCESS {
            None
        } else {
            let mut list = InMemDicomObject::new_empty();
            list.put(DataElement::new(
                tags::FAILED_SOP_INSTANCE_UID_LIST,
                VR::UI,
                PrimitiveValue::from(failed.join("\\")),
            ));
            Some(dimse::encode_data_set(&list, &context.transfer_syntax)?)
        };
        let command = builder.data_set(identifier.is_some()).encode()?;
        self.assoc
            .send_message(context.id, command, identifier.as_deref())
            .await?;
        tracing::debug!(
            completed,
            warning,
            failed = failed.len(),
            cancelled,
            "demo archive: C-GET done"
        );
        Ok(())
    }

    /// Send one instance as a C-STORE sub-operation on a storage context where the peer is SCP,
    /// and wait for its response (noting a C-CANCEL of the C-GET on the way).
    async fn store_sub_operation(
        &mut self,
        instance: &Instance,
        get_id: u16,
    ) -> Result<SubOperation, DemoArchiveError> {
        let Some((context_id, data)) = self.payload(instance) else {
            tracing::debug!(
                sop_class = instance.sop_class_uid,
                ts = instance.transfer_syntax_uid,
                "demo archive: no storage context for C-GET sub-operation"
            );
            return Ok(SubOperation::Done {
                status: None,
                cancel: false,
            });
        };
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let command =
            CommandBuilder::request(command::C_STORE, &instance.sop_class_uid, message_id)
                .str(
                    tags::AFFECTED_SOP_INSTANCE_UID,
                    VR::UI,
                    &instance.sop_instance_uid,
                )
                .data_set(true)
                .encode()?;
        self.assoc
            .send_message(context_id, command, Some(&data))
            .await?;

        let mut cancel = false;
        loop {
            let message = match self.assoc.next_event().await? {
                Event::Message(message) => message,
                Event::ReleaseRequested => {
                    self.assoc.release().await?;
                    return Ok(SubOperation::Ended(End::Released));
                }
                Event::Aborted => return Ok(SubOperation::Ended(End::Aborted)),
                Event::Closed => return Ok(SubOperation::Ended(End::Closed)),
            };
            let responded_to = message.command.u16(tags::MESSAGE_ID_BEING_RESPONDED_TO);
            match message.command.field() {
                Some(f)
                    if f == command::C_STORE | command::RESPONSE_BIT
                        && responded_to == Some(message_id) =>
                {
                    let status = message
                        .command
                        .u16(tags::STATUS)
                        .unwrap_or(status::UNABLE_TO_PROCESS);
                    return Ok(SubOperation::Done {
                        status: Some(status),
                        cancel,
                    });
                }
                Some(command::C_CANCEL) if responded_to == Some(get_id) => cancel = true,
                _ => {
                    return Err(DemoArchiveError::Protocol(
                        "unexpected message while waiting for a C-STORE response".into(),
                    ));
                }
            }
        }
    }

    /// The storage context to send `instance` on and its bytes in that context's transfer syntax:
    /// as stored when the peer accepted it, else transcoded between Implicit and Explicit VR LE.
    fn payload<'i>(&self, instance: &'i Instance) -> Option<(u8, Cow<'i, [u8]>)> {
        let stored_ts = instance.transfer_syntax_uid.as_str();
        let mut contexts = self.assoc.storage_contexts(&instance.sop_class_uid);
        if let Some(c) = contexts.clone().find(|c| c.transfer_syntax == stored_ts) {
            return Some((c.id, Cow::Borrowed(&instance.data_set)));
        }
        dimse::native_ts(stored_ts)?;
        let c = contexts.find(|c| dimse::native_ts(&c.transfer_syntax).is_some())?;
        match dimse::transcode(&instance.data_set, stored_ts, &c.transfer_syntax) {
            Ok(bytes) => Some((c.id, Cow::Owned(bytes))),
            Err(e) => {
                tracing::warn!(error = %e, "demo archive: transcoding failed");
                None
            }
        }
    }
}

/// The response command for `message`, echoing its affected SOP class (or the context's).
fn response(context: &Context, message: &Message, field: u16) -> CommandBuilder {
    let sop_class = message
        .command
        .string(tags::AFFECTED_SOP_CLASS_UID)
        .unwrap_or_else(|| context.abstract_syntax.clone());
    CommandBuilder::response(field, &sop_class, message.command.message_id())
}
