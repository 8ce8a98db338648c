//! Message reassembly from PDVs, one direction at a time: a command set from its fragments (PS3.8
//! E.2), then its data set forwarded, held for a decision, or swallowed (PS3.7 6.3.1).

use crate::dimse::{self, Command, command_field as cf, status};
use crate::relay::Side;
use crate::ul::pdata::{PDataWriter, Pdv};

use super::*;

#[derive(Debug, Default)]
pub(super) enum DataMode {
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
pub(super) struct Assembly {
    command: Option<(u8, Vec<u8>)>,
    data: DataMode,
}

/// A PDV's fate in the rebuilt PDU.
pub(super) enum Piece<'a> {
    Pass(Pdv<'a>),
    Emit {
        pc: u8,
        is_command: bool,
        bytes: Vec<u8>,
    },
}

impl Session {
    pub(super) fn step<'a>(
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

    pub(super) fn step_in<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pc: u8,
        asm: &mut Assembly,
        pieces: &mut Vec<Piece<'a>>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        if pdv.is_command {
            self.step_command(from, pdv, pc, asm, pieces, back)
        } else {
            self.step_data(pdv, asm, pieces, back)
        }
    }

    /// A command fragment: reassemble the command set, decide on it, and set up its data set's fate.
    fn step_command<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pc: u8,
        asm: &mut Assembly,
        pieces: &mut Vec<Piece<'a>>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        {
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
            Ok(())
        }
    }

    /// A data set fragment: forward, swallow, or hold it, as its command's decision said.
    fn step_data<'a>(
        &mut self,
        pdv: Pdv<'a>,
        asm: &mut Assembly,
        pieces: &mut Vec<Piece<'a>>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
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
}
