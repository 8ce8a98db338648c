//! Message reassembly from PDVs, one direction at a time: a command set from its fragments (PS3.8
//! E.2), then its data set forwarded, held for a decision, or swallowed (PS3.7 6.3.1).

use crate::dimse::{self, Command, command_field as cf, status};
use crate::relay::{Forward, Side};
use crate::ul::pdata::{PData, PDataWriter, Pdv};

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

/// The fates of one PDU's PDVs, in order. While every PDV so far passes as it came (the usual case)
/// only their count is kept, allocating nothing; the list is written out at the first that does not.
pub(super) struct Pieces<'a> {
    pdata: PData<'a>,
    /// The index of the PDV being stepped.
    current: usize,
    /// While there is no `list`: the PDVs from the first on passed as they came.
    passed: usize,
    list: Option<Vec<Piece<'a>>>,
}

impl<'a> Pieces<'a> {
    pub(super) fn new(pdata: PData<'a>) -> Pieces<'a> {
        Pieces {
            pdata,
            current: 0,
            passed: 0,
            list: None,
        }
    }

    /// The PDV at `index` is stepped next.
    pub(super) fn at(&mut self, index: usize) {
        self.current = index;
    }

    /// The next piece of the rebuilt PDU (a `Pass` is always of the PDV being stepped).
    pub(super) fn push(&mut self, piece: Piece<'a>) {
        if self.list.is_none() && self.passed == self.current && matches!(piece, Piece::Pass(_)) {
            self.passed += 1;
            return;
        }
        let (pdata, passed) = (self.pdata, self.passed);
        self.list
            .get_or_insert_with(|| pdata.items().take(passed).map(Piece::Pass).collect())
            .push(piece);
    }

    /// Where the PDU goes on: as it came when every PDV passed, else rebuilt for a peer accepting
    /// PDUs of `max` bytes, or nothing.
    pub(super) fn forward(self, max: u32) -> Forward {
        match self.list {
            None if self.passed == self.pdata.len() => Forward::Unchanged,
            None if self.passed == 0 => Forward::Nothing,
            None => rebuild(self.pdata.items().take(self.passed).map(Piece::Pass), max),
            Some(list) if list.is_empty() => Forward::Nothing,
            Some(list) => rebuild(list.into_iter(), max),
        }
    }
}

fn rebuild<'a>(pieces: impl Iterator<Item = Piece<'a>>, max: u32) -> Forward {
    let mut out = PDataWriter::new(max);
    for piece in pieces {
        match piece {
            Piece::Pass(p) => out.push(p.presentation_context_id, p.is_command, p.is_last, p.data),
            Piece::Emit {
                pc,
                is_command,
                bytes,
            } => out.push(pc, is_command, true, &bytes),
        }
    }
    Forward::Rebuilt(out.into_bytes())
}

impl Session {
    pub(super) fn step<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pieces: &mut Pieces<'a>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        let pc = pdv.presentation_context_id;
        if !self.contexts.contains_key(&pc) {
            return Err(format!(
                "PDV on presentation context {pc}, which was not accepted"
            ));
        }
        let mut asm = std::mem::take(match from {
            Side::Requestor => &mut self.from_client,
            Side::Acceptor => &mut self.from_archive,
        });
        let result = self.step_in(from, pdv, pc, &mut asm, pieces, back);
        *match from {
            Side::Requestor => &mut self.from_client,
            Side::Acceptor => &mut self.from_archive,
        } = asm;
        result
    }

    pub(super) fn step_in<'a>(
        &mut self,
        from: Side,
        pdv: Pdv<'a>,
        pc: u8,
        asm: &mut Assembly,
        pieces: &mut Pieces<'a>,
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
        pieces: &mut Pieces<'a>,
        back: &mut PDataWriter,
    ) -> Result<(), String> {
        if !matches!(asm.data, DataMode::Idle) {
            return Err("a command began before the previous data set ended".into());
        }
        let Some(set) = asm.command_set(pc, pdv)? else {
            return Ok(());
        };
        let command = dimse::decode_command(set.bytes()).map_err(|e| e.to_string())?;
        asm.data = self.route_command(from, pc, command, set, pieces, back)?;
        Ok(())
    }

    /// Decide on a complete command set and act on it: forward, rewrite, refuse, hold or drop it.
    /// Returns what becomes of its data set.
    fn route_command<'a>(
        &mut self,
        from: Side,
        pc: u8,
        command: Command,
        set: CommandSet<'a>,
        pieces: &mut Pieces<'a>,
        back: &mut PDataWriter,
    ) -> Result<DataMode, String> {
        let has_data = command.has_data_set;
        // What follows the command: its data set's fate, or nothing.
        let then = |mode: DataMode| if has_data { mode } else { DataMode::Idle };
        Ok(match self.decide(from, pc, &command, back) {
            Decision::Forward => {
                let tracked = from == Side::Requestor
                    && !command.is_response()
                    && command.field != cf::C_CANCEL_RQ
                    && self.track(&command, None);
                pieces.push(set.into_piece(pc));
                then(DataMode::Forward {
                    message: tracked.then_some(command.message_id),
                })
            }
            Decision::Rewrite(bytes) => {
                pieces.push(Piece::Emit {
                    pc,
                    is_command: true,
                    bytes,
                });
                then(DataMode::Forward { message: None })
            }
            Decision::Refuse {
                status,
                rule,
                reason,
            } => {
                let answer = self.refusal(&command, status, rule, &reason);
                if has_data {
                    DataMode::Drop {
                        answer: Some((pc, answer)),
                    }
                } else {
                    back.push(pc, true, true, &answer);
                    DataMode::Idle
                }
            }
            Decision::Hold if has_data => DataMode::Hold {
                pc,
                command: Box::new(command),
                command_bytes: set.into_bytes(),
                data: Vec::new(),
            },
            Decision::Hold => {
                let answer = self.refusal(
                    &command,
                    status::IDENTIFIER_DOES_NOT_MATCH,
                    "bad_identifier",
                    "request has no identifier",
                );
                back.push(pc, true, true, &answer);
                DataMode::Idle
            }
            Decision::HoldAnswer if has_data => DataMode::Answer {
                pc,
                command_bytes: set.into_bytes(),
                data: Vec::new(),
            },
            Decision::HoldAnswer => {
                pieces.push(set.into_piece(pc));
                DataMode::Idle
            }
            Decision::Drop => then(DataMode::Drop { answer: None }),
            Decision::Violation(reason) => return Err(reason),
        })
    }

    /// A refusal of `command`, counted and reported: the response that says so.
    fn refusal(
        &mut self,
        command: &Command,
        status: u16,
        rule: &'static str,
        reason: &str,
    ) -> Vec<u8> {
        let answer = dimse::refusal(command, status, &error_comment(rule, reason));
        self.refused_now(command, status, rule, reason);
        answer
    }

    /// A data set fragment: forward, swallow, or hold it, as its command's decision said.
    fn step_data<'a>(
        &mut self,
        pdv: Pdv<'a>,
        asm: &mut Assembly,
        pieces: &mut Pieces<'a>,
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
                gather(data, pdv, MAX_ANSWER, "archive's C-FIND match too large")?;
                if pdv.is_last
                    && let DataMode::Answer {
                        pc,
                        command_bytes,
                        data,
                    } = std::mem::take(&mut asm.data)
                {
                    self.answer_complete(pc, command_bytes, data, pieces);
                }
            }
            DataMode::Hold { data, .. } => {
                gather(data, pdv, MAX_IDENTIFIER, "identifier too large")?;
                if pdv.is_last
                    && let DataMode::Hold {
                        pc,
                        command,
                        command_bytes,
                        data,
                    } = std::mem::take(&mut asm.data)
                {
                    self.identifier_complete(pc, &command, command_bytes, data, pieces, back);
                }
            }
        }
        Ok(())
    }

    /// A C-FIND match from the archive, complete: forwarded rewritten, or left out when unreadable.
    fn answer_complete(
        &mut self,
        pc: u8,
        command_bytes: Vec<u8>,
        data: Vec<u8>,
        pieces: &mut Pieces<'_>,
    ) {
        match self.rewrite_answer(pc, &data) {
            Ok(data) => emit_message(pieces, pc, command_bytes, data),
            // What the gateway cannot read it does not forward (one reading): the match is left
            // out, and said so.
            Err(e) => {
                tracing::warn!(target: crate::logfmt::targets::SESSION, peer = %self.party.peer,
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

    /// A held request whose identifier is complete: forwarded whole, or refused.
    fn identifier_complete(
        &mut self,
        pc: u8,
        command: &Command,
        command_bytes: Vec<u8>,
        data: Vec<u8>,
        pieces: &mut Pieces<'_>,
        back: &mut PDataWriter,
    ) {
        match self.decide_identifier(pc, command, data) {
            Ok(forwarded) => emit_message(pieces, pc, command_bytes, forwarded),
            Err(Decision::Refuse {
                status,
                rule,
                reason,
            }) => {
                let answer = self.refusal(command, status, rule, &reason);
                back.push(pc, true, true, &answer);
            }
            Err(
                Decision::Forward
                | Decision::Rewrite(_)
                | Decision::Hold
                | Decision::HoldAnswer
                | Decision::Drop
                | Decision::Violation(_),
            ) => {}
        }
    }
}

/// A complete command set: the one PDV it came in, or its fragments joined.
enum CommandSet<'a> {
    Single(Pdv<'a>),
    Joined(Vec<u8>),
}

impl<'a> CommandSet<'a> {
    fn bytes(&self) -> &[u8] {
        match self {
            CommandSet::Single(pdv) => pdv.data,
            CommandSet::Joined(bytes) => bytes,
        }
    }

    /// Forwarded: the PDV as it came, or the joined fragments in one.
    fn into_piece(self, pc: u8) -> Piece<'a> {
        match self {
            CommandSet::Single(pdv) => Piece::Pass(pdv),
            CommandSet::Joined(bytes) => Piece::Emit {
                pc,
                is_command: true,
                bytes,
            },
        }
    }

    /// Held with its data set.
    fn into_bytes(self) -> Vec<u8> {
        match self {
            CommandSet::Single(pdv) => pdv.data.to_vec(),
            CommandSet::Joined(bytes) => bytes,
        }
    }
}

impl Assembly {
    /// Add a command fragment on context `pc` (PS3.8 E.2); the command set once it is complete.
    fn command_set<'a>(&mut self, pc: u8, pdv: Pdv<'a>) -> Result<Option<CommandSet<'a>>, String> {
        if self.command.is_none() && pdv.is_last {
            return Ok(Some(CommandSet::Single(pdv)));
        }
        let (held_pc, held) = self.command.get_or_insert_with(|| (pc, Vec::new()));
        if *held_pc != pc {
            return Err("command fragments on different presentation contexts".into());
        }
        if held.len() + pdv.data.len() > dimse::MAX_COMMAND_LENGTH {
            return Err("command set too large".into());
        }
        held.extend_from_slice(pdv.data);
        if !pdv.is_last {
            return Ok(None);
        }
        Ok(Some(CommandSet::Joined(
            self.command.take().map(|(_, b)| b).unwrap_or_default(),
        )))
    }
}

/// Add a held data set fragment, at most `max` bytes in all.
fn gather(data: &mut Vec<u8>, pdv: Pdv<'_>, max: usize, too_large: &str) -> Result<(), String> {
    if data.len() + pdv.data.len() > max {
        return Err(too_large.into());
    }
    data.extend_from_slice(pdv.data);
    Ok(())
}

/// A held message forwarded whole: its command set, then its data set.
fn emit_message(pieces: &mut Pieces<'_>, pc: u8, command_bytes: Vec<u8>, data: Vec<u8>) {
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
