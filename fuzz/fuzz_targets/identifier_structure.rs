//! Structure-aware identifiers: the fuzzer's bytes choose a tree of elements (the keys the guard
//! judges, sequences, items, stray delimiters), its order (repeats and swaps included), nesting depth
//! and length encodings (defined or undefined), and the transfer syntax. The oracle is the tree itself:
//! `decode_identifier` may accept only trees with one reading (tags strictly ascending at every level,
//! nesting within `MAX_NESTING`, no stray delimiter), and what it accepts must carry the tree's values.
#![no_main]

use dicom_dictionary_std::tags;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pacsgate::dimse::{MAX_NESTING, attribute, decode_identifier};
use pacsgate::policy::query_guard;

#[derive(Debug)]
enum Node {
    Value(u16, u16, &'static [u8; 2], Vec<u8>),
    Sequence(u16, u16, Vec<Vec<Node>>, bool, Vec<bool>),
    /// An item or delimiter where an element belongs.
    Stray(u16),
}

const KEYS: [(u16, u16, &[u8; 2]); 7] = [
    (0x0008, 0x0052, b"CS"),
    (0x0008, 0x0050, b"SH"),
    (0x0010, 0x0010, b"PN"),
    (0x0010, 0x0020, b"LO"),
    (0x0020, 0x000D, b"UI"),
    (0x0020, 0x000E, b"UI"),
    (0x0008, 0x1150, b"UI"),
];
const VALUES: [&str; 8] = ["STUDY", "*", "DOE^J*", "12345", "1.2.3", "1.2.*", "", "A\\*"];
const SEQUENCES: [(u16, u16); 2] = [(0x0008, 0x1110), (0x0008, 0x1115)];

fn nodes(u: &mut Unstructured, depth: usize) -> Result<Vec<Node>> {
    let n = u.int_in_range(0..=5)?;
    let mut out = Vec::new();
    for _ in 0..n {
        let kind = u.int_in_range(0..=9)?;
        out.push(if kind < 7 {
            let (g, e, vr) = KEYS[u.choose_index(KEYS.len())?];
            let v = VALUES[u.choose_index(VALUES.len())?];
            Node::Value(g, e, vr, v.as_bytes().to_vec())
        } else if kind < 9 && depth < 40 {
            let (g, e) = SEQUENCES[u.choose_index(SEQUENCES.len())?];
            let count = u.int_in_range(0..=2)?;
            let mut items = Vec::new();
            let mut undefined = Vec::new();
            for _ in 0..count {
                items.push(nodes(u, depth + 1)?);
                undefined.push(u.arbitrary()?);
            }
            Node::Sequence(g, e, items, u.arbitrary()?, undefined)
        } else {
            Node::Stray([0xE000, 0xE00D, 0xE0DD][u.choose_index(3)?])
        });
    }
    if u.arbitrary::<bool>()? {
        out.sort_by_key(tag);
    }
    Ok(out)
}

fn tag(n: &Node) -> (u16, u16) {
    match n {
        Node::Value(g, e, ..) | Node::Sequence(g, e, ..) => (*g, *e),
        Node::Stray(e) => (0xFFFE, *e),
    }
}

/// Does the tree have one reading?
fn canonical(nodes: &[Node], depth: usize) -> bool {
    nodes.windows(2).all(|w| tag(&w[0]) < tag(&w[1]))
        && nodes.iter().all(|n| match n {
            Node::Value(..) => true,
            Node::Stray(_) => false,
            Node::Sequence(_, _, items, ..) => {
                depth < MAX_NESTING && items.iter().all(|i| canonical(i, depth + 1))
            }
        })
}

fn encode(nodes: &[Node], explicit: bool, out: &mut Vec<u8>) {
    for n in nodes {
        let (g, e) = tag(n);
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        match n {
            Node::Value(_, _, vr, v) => {
                let mut v = v.clone();
                if v.len() % 2 == 1 {
                    v.push(if *vr == b"UI" { 0 } else { b' ' });
                }
                if explicit {
                    out.extend_from_slice(*vr);
                    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
                } else {
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                }
                out.extend(v);
            }
            Node::Stray(_) => out.extend_from_slice(&0u32.to_le_bytes()),
            Node::Sequence(_, _, items, undefined, item_undefined) => {
                let mut body = Vec::new();
                for (item, undef) in items.iter().zip(item_undefined) {
                    let mut content = Vec::new();
                    encode(item, explicit, &mut content);
                    body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
                    if *undef {
                        body.extend_from_slice(&u32::MAX.to_le_bytes());
                        body.extend(content);
                        body.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
                    } else {
                        body.extend_from_slice(&(content.len() as u32).to_le_bytes());
                        body.extend(content);
                    }
                }
                if explicit {
                    out.extend_from_slice(b"SQ\0\0");
                }
                if *undefined {
                    out.extend_from_slice(&u32::MAX.to_le_bytes());
                    out.extend(body);
                    out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
                } else {
                    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    out.extend(body);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(explicit) = u.arbitrary::<bool>() else {
        return;
    };
    let Ok(tree) = nodes(&mut u, 0) else {
        return;
    };
    let mut bytes = Vec::new();
    encode(&tree, explicit, &mut bytes);
    let ts = if explicit {
        "1.2.840.10008.1.2.1"
    } else {
        "1.2.840.10008.1.2"
    };
    let decoded = decode_identifier(&bytes, ts);
    let one_reading = canonical(&tree, 0);
    match decoded {
        Ok(obj) => {
            assert!(one_reading, "accepted a tree with more than one reading: {tree:?}");
            for n in &tree {
                if let Node::Value(g, e, _, v) = n {
                    let want = String::from_utf8_lossy(v);
                    let want = want.trim_end_matches(['\0', ' ']);
                    let got = attribute(&obj, dicom_core::Tag(*g, *e));
                    assert_eq!(got, want, "({g:04X},{e:04X}) read back differently");
                }
            }
            let _ = query_guard::check(&obj, 2);
            let _ = query_guard::check_retrieval(&obj);
            let _ = attribute(&obj, tags::PATIENT_NAME);
        }
        Err(_) => assert!(!one_reading, "refused a tree with one reading: {tree:?}"),
    }
});
