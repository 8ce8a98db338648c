//! The structural walk of an identifier before any parser reads it (PS3.5 7.1, 7.5): one reading
//! of its tags, lengths, VRs and nesting, or a refusal saying why.

use dicom_core::dictionary::DataDictionary;
use dicom_core::{Tag, VR};

/// The undefined length (PS3.5 7.1.1), and the item and delimitation tags (PS3.5 7.5).
pub const UNDEFINED: u32 = 0xFFFF_FFFF;
pub const ITEM: Tag = Tag(0xFFFE, 0xE000);
pub const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
pub const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
/// Sequences nested deeper than this are refused before any recursive parser sees them (real
/// identifiers nest two or three levels).
pub const MAX_NESTING: usize = 16;

/// The byte size of one value of a binary VR (1 for everything read as bytes or text).
fn value_size(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::AT | VR::FL | VR::OF | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

/// Explicit VRs with a 4-byte length (PS3.5 7.1.2).
pub(crate) fn has_long_length(vr: VR) -> bool {
    matches!(
        vr,
        VR::OB
            | VR::OW
            | VR::OF
            | VR::SQ
            | VR::UT
            | VR::UN
            | VR::UC
            | VR::UR
            | VR::OD
            | VR::OL
            | VR::OV
            | VR::SV
            | VR::UV
    )
}

/// What the structural walk is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The identifier itself, or one item of a sequence: elements in ascending tag order.
    Elements { last: Option<Tag>, item: bool },
    /// A sequence: items only.
    Sequence,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// Where a defined-length frame ends; undefined-length frames end at their delimiter.
    end: Option<usize>,
    /// The furthest this frame's content may reach (its own end, or its parent's).
    limit: usize,
}

/// Read an element header at `at`: (tag, VR, value length, header length).
fn element_header(b: &[u8], at: usize, explicit: bool) -> Result<(Tag, VR, u32, usize), String> {
    let h = b
        .get(at..at + 8)
        .ok_or_else(|| "truncated element header".to_string())?;
    let tag = Tag(
        u16::from_le_bytes([h[0], h[1]]),
        u16::from_le_bytes([h[2], h[3]]),
    );
    let le32 = |x: &[u8]| u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    if tag.0 == 0xFFFE {
        // Items and delimiters have no VR in either syntax.
        return Ok((tag, VR::UN, le32(&h[4..8]), 8));
    }
    let known = dicom_dictionary_std::StandardDataDictionary.by_tag(tag);
    if !explicit {
        let vr = if tag.1 == 0x0000 {
            VR::UL // every group length is UL, whatever the dictionary knows
        } else {
            known.map(|e| e.vr.relaxed()).unwrap_or(VR::UN)
        };
        return Ok((tag, vr, le32(&h[4..8]), 8));
    }
    let code = [h[4], h[5]];
    let vr = VR::from_binary(code)
        .ok_or_else(|| format!("element {tag} has no standard VR ({code:?})"))?;
    // A known attribute under another VR is read one way here and another way by a peer that
    // trusts its dictionary: refuse it.
    if let Some(expected) = known.and_then(|e| e.vr.exact())
        && tag.1 != 0x0000
        && expected != vr
    {
        return Err(format!(
            "element {tag} is sent as {vr:?}, but the standard says {expected:?}"
        ));
    }
    if has_long_length(vr) {
        let l = b
            .get(at + 8..at + 12)
            .ok_or_else(|| "truncated element header".to_string())?;
        Ok((tag, vr, le32(l), 12))
    } else {
        Ok((tag, vr, u32::from(u16::from_le_bytes([h[6], h[7]])), 8))
    }
}

/// Before dicom-parser sees an identifier, walk it once, without recursion, exactly as it will be read,
/// and refuse anything two readers could read differently or that a reader could not afford:
/// - tags in strictly ascending order in the data set and in every item (no repeats: DCMTK keeps the
///   first copy, dicom-object the last);
/// - sequences nested at most [`MAX_NESTING`] deep, whatever their lengths (defined or undefined);
/// - every defined length within its parent; undefined lengths only on sequences and items, each
///   closed by its own delimiter; items only inside sequences; no other tag in group FFFE;
/// - binary values a whole number of values long (dicom-parser reads the rest as another header);
/// - explicit VRs standard, and the dictionary's for known attributes; no command or meta groups.
///
/// Little endian only. What passes reads the same in every conforming parser, so the bytes the
/// gateway judged can be forwarded as they are.
pub fn check_structure(b: &[u8], explicit: bool) -> Result<(), String> {
    let mut stack = vec![Frame {
        kind: Kind::Elements {
            last: None,
            item: false,
        },
        end: Some(b.len()),
        limit: b.len(),
    }];
    let mut at = 0usize;
    loop {
        let Some(top) = stack.last().copied() else {
            return Ok(());
        };
        if top.end == Some(at) {
            stack.pop();
            if stack.is_empty() {
                return Ok(());
            }
            continue;
        }
        if at >= top.limit {
            return Err("a sequence or item is not closed before its end".into());
        }
        let (tag, vr, len, header) = element_header(b, at, explicit)?;
        if at + header > top.limit {
            return Err(format!("element {tag} header overruns its parent"));
        }
        let element = Element {
            tag,
            vr,
            len,
            at,
            header,
        };
        at = match top.kind {
            Kind::Sequence => sequence_step(&mut stack, top, element)?,
            Kind::Elements { last, item } => elements_step(&mut stack, top, last, item, element)?,
        };
    }
}

/// One element header met by [`check_structure`], at offset `at`.
#[derive(Debug, Clone, Copy)]
struct Element {
    tag: Tag,
    vr: VR,
    len: u32,
    at: usize,
    header: usize,
}

impl Element {
    /// Where a value of `len` bytes after this header ends; it must end within its parent.
    fn value_end(&self, len: u32, parent: Frame) -> Result<usize, String> {
        let end = self.at + self.header + len as usize;
        if end > parent.limit {
            Err(format!(
                "element {} length {len} overruns its parent",
                self.tag
            ))
        } else {
            Ok(end)
        }
    }

    /// The frame a sequence or item opens: to its own end, or to its parent's when undefined.
    fn opened(&self, kind: Kind, parent: Frame) -> Result<Frame, String> {
        let (end, limit) = if self.len == UNDEFINED {
            (None, parent.limit)
        } else {
            let end = self.value_end(self.len, parent)?;
            (Some(end), end)
        };
        Ok(Frame { kind, end, limit })
    }
}

/// Inside a sequence: an item opens, or the sequence delimiter closes an undefined-length sequence.
/// Returns where the walk goes on.
fn sequence_step(stack: &mut Vec<Frame>, top: Frame, e: Element) -> Result<usize, String> {
    match e.tag {
        ITEM => {
            let item = Kind::Elements {
                last: None,
                item: true,
            };
            stack.push(e.opened(item, top)?);
            Ok(e.at + e.header)
        }
        SEQUENCE_END if top.end.is_none() && e.len == 0 => {
            stack.pop();
            Ok(e.at + e.header)
        }
        _ => Err(format!(
            "element {} inside a sequence is not an item",
            e.tag
        )),
    }
}

/// Inside the data set or an item: the item delimiter, or an element in ascending order, which is
/// a sequence (opened, nesting bounded) or a value of a whole number of values. Returns where the
/// walk goes on.
fn elements_step(
    stack: &mut Vec<Frame>,
    top: Frame,
    last: Option<Tag>,
    item: bool,
    e: Element,
) -> Result<usize, String> {
    let Element { tag, vr, len, .. } = e;
    if tag == ITEM_END && item && top.end.is_none() && len == 0 {
        stack.pop();
        return Ok(e.at + e.header);
    }
    if tag.0 == 0xFFFE {
        return Err(format!("element {tag} is out of place"));
    }
    if tag.0 < 0x0008 {
        return Err(format!("element {tag} does not belong in a data set"));
    }
    if last.is_some_and(|l| tag <= l) {
        return Err(format!(
            "element {tag} is repeated or out of ascending order"
        ));
    }
    if let Some(Frame {
        kind: Kind::Elements { last, .. },
        ..
    }) = stack.last_mut()
    {
        *last = Some(tag);
    }
    if vr == VR::SQ {
        let depth = stack.iter().filter(|f| f.kind == Kind::Sequence).count();
        if depth >= MAX_NESTING {
            return Err(format!("sequences nested deeper than {MAX_NESTING} levels"));
        }
        stack.push(e.opened(Kind::Sequence, top)?);
        return Ok(e.at + e.header);
    }
    if len == UNDEFINED {
        return Err(format!("element {tag} ({vr:?}) has an undefined length"));
    }
    if !(len as usize).is_multiple_of(value_size(vr)) {
        return Err(format!(
            "element {tag} ({vr:?}) has length {len}, not a multiple of {}",
            value_size(vr)
        ));
    }
    e.value_end(len, top)
}
