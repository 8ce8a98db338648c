//! One reading: for generated identifiers (well-formed and hostile: repeated and swapped tags, nesting,
//! mislabelled VRs, truncations, flipped bytes) and for the fuzzers' identifier corpus, what the gateway
//! decides on must be what DCMTK (the parser inside Orthanc and dcmqrscp) reads from the same bytes.
//! Every identifier the gateway accepts is read again by `dcmdump`: it must read it without warnings,
//! see the same values for every key the guard judges, and the guard must reach the same verdict on
//! DCMTK's reading as on the gateway's.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use pacsgate::dimse;
use pacsgate::policy::query_guard::{self, Level};

const IMPLICIT: &str = "1.2.840.10008.1.2";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";

/// The keys the gateway reads from an identifier.
const JUDGED: [Tag; 8] = [
    tags::QUERY_RETRIEVE_LEVEL,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_ID,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
];

/// xorshift64*: deterministic, so a failure names an input that can be made again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Clone)]
enum Node {
    Value(Tag, [u8; 2], Vec<u8>),
    Sequence(Tag, Vec<Vec<Node>>),
}

fn tag_of(n: &Node) -> Tag {
    match n {
        Node::Value(t, ..) | Node::Sequence(t, _) => *t,
    }
}

fn value(rng: &mut Rng) -> Node {
    let pool: [(Tag, &[u8; 2], &[&str]); 9] = [
        (
            tags::QUERY_RETRIEVE_LEVEL,
            b"CS",
            &["STUDY", "SERIES", "PATIENT", "IMAGE", "", "STUDY\\SERIES"],
        ),
        (
            tags::PATIENT_NAME,
            b"PN",
            &["*", "DOE^JOHN", "D*", "DO?^*", "", "AB\\*", "SMITH*"],
        ),
        (
            tags::PATIENT_ID,
            b"LO",
            &["12345", "*", "AB\\CD", "1*", "", "BYPASS1"],
        ),
        (tags::ACCESSION_NUMBER, b"SH", &["A123", "", "A*"]),
        (
            tags::STUDY_INSTANCE_UID,
            b"UI",
            &["1.2.3", "1.2.3\\1.2.4", "*", "1.2.*", "", "1..2"],
        ),
        (tags::SERIES_INSTANCE_UID, b"UI", &["1.2.3.4", "", "*"]),
        (tags::STUDY_DATE, b"DA", &["20240101", "20240101-", ""]),
        (tags::MODALITIES_IN_STUDY, b"CS", &["CT", "CT\\MR", ""]),
        (Tag(0x0009, 0x0010), b"LO", &["PRIVATE CREATOR"]),
    ];
    let (tag, vr, values) = rng.pick(&pool);
    Node::Value(*tag, **vr, rng.pick(values).as_bytes().to_vec())
}

fn items(rng: &mut Rng, depth: usize) -> Vec<Vec<Node>> {
    (0..rng.below(3))
        .map(|_| {
            let mut item = vec![Node::Value(
                tags::REFERENCED_SOP_INSTANCE_UID,
                *b"UI",
                b"1.2.3".to_vec(),
            )];
            if depth < 20 && rng.chance(40) {
                let deeper = depth + 1 + rng.below(4);
                item.push(Node::Sequence(
                    tags::REFERENCED_SERIES_SEQUENCE,
                    items(rng, deeper),
                ));
            }
            if rng.chance(15) {
                item.push(Node::Value(tags::PATIENT_NAME, *b"PN", b"*".to_vec()));
            }
            item.sort_by_key(tag_of);
            item
        })
        .collect()
}

fn identifier(rng: &mut Rng) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..1 + rng.below(6)).map(|_| value(rng)).collect();
    if rng.chance(30) {
        nodes.push(Node::Sequence(
            tags::REFERENCED_STUDY_SEQUENCE,
            items(rng, 1),
        ));
    }
    nodes.sort_by_key(tag_of);
    nodes.dedup_by_key(|n| tag_of(n));
    // Hostile mutations: a repeated key (another value), two keys swapped.
    if rng.chance(20) && !nodes.is_empty() {
        let i = rng.below(nodes.len());
        let copy = match &nodes[i] {
            Node::Value(t, vr, _) => Node::Value(*t, *vr, b"*".to_vec()),
            other => other.clone(),
        };
        nodes.insert(i + rng.below(2), copy);
    }
    if rng.chance(15) && nodes.len() > 1 {
        let i = rng.below(nodes.len() - 1);
        nodes.swap(i, i + 1);
    }
    nodes
}

fn encode(nodes: &[Node], explicit: bool, rng: &mut Rng, out: &mut Vec<u8>) {
    for n in nodes {
        let tag = tag_of(n);
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        match n {
            Node::Value(_, vr, v) => {
                let mut v = v.clone();
                if v.len() % 2 == 1 {
                    v.push(if vr == b"UI" { 0 } else { b' ' });
                }
                let mut vr = *vr;
                if explicit && rng.chance(3) {
                    vr = *b"LO"; // mislabelled
                }
                if explicit {
                    out.extend_from_slice(&vr);
                    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
                } else {
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                }
                out.extend(v);
            }
            Node::Sequence(_, items) => {
                let mut body = Vec::new();
                let undefined = rng.chance(50);
                for item in items {
                    let mut content = Vec::new();
                    encode(item, explicit, rng, &mut content);
                    body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
                    if rng.chance(50) {
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
                if undefined {
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

/// dcmdump's reading of a data set file: (top-level values by tag, warnings and errors it printed).
fn dcmdump(path: &Path, ts: &str) -> (HashMap<Tag, String>, String) {
    let out = Command::new("/usr/bin/dcmdump")
        .args(["-f", if ts == IMPLICIT { "-ti" } else { "-te" }, "+L"])
        .arg(path)
        .output()
        .expect("run /usr/bin/dcmdump (Debian package dcmtk)");
    let mut values = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "(0010,0010) PN [DOE^JOHN]   #   8, 1 PatientName", top level only (no indent).
        let Some(rest) = line.strip_prefix('(') else {
            continue;
        };
        let (Ok(g), Ok(e)) = (
            u16::from_str_radix(rest.get(0..4).unwrap_or(""), 16),
            u16::from_str_radix(rest.get(5..9).unwrap_or(""), 16),
        ) else {
            continue;
        };
        let value = match (line.find('['), line.rfind(']')) {
            (Some(a), Some(b)) if b > a => line[a + 1..b].to_string(),
            _ => String::new(),
        };
        values.insert(
            Tag(g, e),
            value.trim_end_matches(['\0', ' ']).trim_start().to_string(),
        );
    }
    let mut complaints = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        complaints.push_str(&format!("exit {}", out.status));
    }
    (values, complaints)
}

fn verdict(value_of: impl Fn(Tag) -> String) -> String {
    let level = Level::parse(&value_of(tags::QUERY_RETRIEVE_LEVEL));
    match level {
        None => "no level".into(),
        Some(level) => format!("{:?}", query_guard::check_values(value_of, level, 2)),
    }
}

#[test]
fn what_the_gateway_accepts_dcmtk_reads_the_same_way() {
    let dir = common::tempdir("differential");
    let mut inputs: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let mut rng = Rng(0x0005_EED0_F0DD_BA11);
    for i in 0..600 {
        let explicit = rng.chance(50);
        let nodes = identifier(&mut rng);
        let mut bytes = Vec::new();
        encode(&nodes, explicit, &mut rng, &mut bytes);
        if rng.chance(5) && !bytes.is_empty() {
            let cut = rng.below(bytes.len());
            bytes.truncate(cut);
        }
        if rng.chance(8) && !bytes.is_empty() {
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
        }
        inputs.push((
            format!("gen-{i}"),
            bytes,
            if explicit { EXPLICIT } else { IMPLICIT },
        ));
    }
    // The fuzzers' corpus for identifiers: its first byte picks the transfer syntax.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dimse_identifier");
    let entries =
        std::fs::read_dir(&corpus).unwrap_or_else(|e| panic!("{}: {e}", corpus.display()));
    for entry in entries.flatten() {
        let bytes = std::fs::read(entry.path()).expect("corpus file");
        let Some((first, rest)) = bytes.split_first() else {
            continue;
        };
        let ts = if first & 1 == 0 { IMPLICIT } else { EXPLICIT };
        inputs.push((
            entry.file_name().to_string_lossy().into(),
            rest.to_vec(),
            ts,
        ));
    }

    let (mut accepted, mut refused, mut compared) = (0, 0, 0);
    let mut failures = Vec::new();
    for (name, bytes, ts) in &inputs {
        let Ok(object) = dimse::decode_identifier(bytes, ts) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write input");
        let (theirs, complaints) = dcmdump(&path, ts);
        if !complaints.trim().is_empty() {
            failures.push(format!(
                "{name} ({ts}): accepted, but dcmdump says: {complaints}"
            ));
            continue;
        }
        let ours = |tag| dimse::attribute(&object, tag);
        for tag in JUDGED {
            let (mine, dcmtk) = (ours(tag), theirs.get(&tag).cloned().unwrap_or_default());
            if !mine.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
                continue; // dcmdump escapes what it cannot print; compare printable values only
            }
            compared += 1;
            if mine != dcmtk {
                failures.push(format!(
                    "{name} ({ts}): {tag}: gateway {mine:?}, DCMTK {dcmtk:?}"
                ));
            }
        }
        let (a, b) = (
            verdict(ours),
            verdict(|t| theirs.get(&t).cloned().unwrap_or_default()),
        );
        if a != b {
            failures.push(format!(
                "{name} ({ts}): guard on the gateway's reading {a}, on DCMTK's {b}"
            ));
        }
    }
    eprintln!(
        "{} inputs: {accepted} accepted and read again by dcmdump ({compared} values compared), {refused} refused",
        inputs.len()
    );
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        accepted >= 100 && refused >= 50,
        "the generator no longer covers both sides"
    );
}
