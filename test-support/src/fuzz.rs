//! Fuzz target bodies. Each takes arbitrary bytes and feeds them to decoders of
//! untrusted input; a panic, an overflow or an endless loop is a bug.

use std::path::Path;

use prost::Message;

use maeum_protocols::wire::{self, pb};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/NAME.rs` file and the
/// `fuzz/corpus/NAME/` folder) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("wire", wire),
    ("tlog", tlog),
    ("export", export),
    ("release", release),
    ("job", job),
    ("data", data),
    ("safetensors", safetensors),
];

/// The wire boundary: a protobuf message of the kind the first byte selects, decoded
/// with prost, then checked by its `TryFrom` (what the coordinator and sites do with
/// every message they receive).
pub fn wire(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 9 {
        0 => decode_then::<pb::Work, wire::Work>(rest),
        1 => decode_then::<pb::UploadHeader, wire::UploadHeader>(rest),
        2 => decode_then::<pb::ModelRef, wire::ModelRef>(rest),
        3 => decode_then::<pb::EvaluationReport, wire::EvaluationReport>(rest),
        4 => decode_then::<pb::Confusion, wire::ConfusionCounts>(rest),
        5 => decode_then::<pb::SecAggSession, wire::secagg::SessionInfo>(rest),
        6 => decode_then::<pb::SecAggAdvertise, maeum_secagg::AdvertiseKeys>(rest),
        7 => decode_then::<pb::SecAggRequest, wire::secagg::Request>(rest),
        _ => decode_then::<pb::SecAggReply, wire::secagg::Reply>(rest),
    }
}

/// Decodes a protobuf `M` and, if it decodes, checks it as the domain type `T`.
fn decode_then<M: Message + Default, T: TryFrom<M>>(bytes: &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        let _ = T::try_from(m);
    }
}

/// The audit log's own formats: an entry, a checkpoint note body, a checkpoint file and
/// an inclusion proof (what sites and `maeum-audit` read from the coordinator).
pub fn tlog(data: &[u8]) {
    let _ = maeum_tlog::entry::Entry::decode(data);
    let _ = maeum_tlog::export::CheckpointFile::decode(data);
    if let Ok(p) = maeum_tlog::export::InclusionProof::decode(data) {
        let _ = maeum_tlog::export::verify_inclusion_proof(&p, None);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = maeum_tlog::checkpoint::Checkpoint::parse_body(text);
    }
}

/// An audit-log export, decoded and verified (every AUD check) as `maeum-audit verify`
/// does.
pub fn export(data: &[u8]) {
    let _ = maeum_tlog::export::Export::decode(data);
    let _ = maeum_tlog::export::verify(data, None);
}

/// Release files and model cards (what a site installs, what an auditor checks), and
/// the release selectors people type.
pub fn release(data: &[u8]) {
    let _ = maeum_tlog::release::ReleaseFile::decode(data);
    if let Ok(card) = maeum_tlog::release::ModelCard::decode(data) {
        let _ = maeum_tlog::release::check_card_privacy(&card, &[]);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = maeum_tlog::release::Selector::parse(text);
    }
}

/// A job file (TOML, as the lead writes it and as sites receive it) and its stored JSON,
/// then the privacy plan every site derives from it.
pub fn job(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(spec) = maeum_protocols::job::JobSpec::from_toml("fuzz.toml", &text) {
        let _ = spec.privacy_plan();
        let _ = spec.evaluation_words();
    }
    let _ = maeum_protocols::job::JobSpec::from_json(&text);
}

/// The data readers: JSONL and CSV records, strict and skipping invalid lines.
pub fn data(data: &[u8]) {
    use maeum_models::data::{ReadOptions, read_csv, read_jsonl};
    let path = Path::new("fuzz.jsonl");
    for skip_invalid in [false, true] {
        let opts = ReadOptions { skip_invalid, ..ReadOptions::default() };
        let _ = read_jsonl(data, path, &opts);
        let _ = read_csv(data, path, &opts);
    }
}

/// A model file: safetensors with Maeum's spec in the header (a release's model, an
/// export a site is handed).
pub fn safetensors(data: &[u8]) {
    let _ = maeum_models::model::ModelSpec::from_bytes(data, Path::new("fuzz.safetensors"));
}

/// Runs `body` on every file in `dir` (a corpus folder); returns how many it ran.
pub fn replay(dir: &Path, body: Body) -> std::io::Result<usize> {
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        if e.file_type()?.is_file() {
            body(&std::fs::read(e.path())?);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target over its committed corpus (seeds, and any crash ever found).
    #[test]
    fn every_target_survives_its_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, body) in TARGETS {
            let n = replay(&root.join(name), *body).unwrap_or_else(|e| panic!("corpus of {name}: {e}"));
            assert!(n > 0, "no seeds for {name} in {}", root.join(name).display());
        }
    }

    /// The empty input and a few degenerate ones, for every target.
    #[test]
    fn every_target_survives_degenerate_input() {
        for (_, body) in TARGETS {
            for input in [&b""[..], b"\0", b"\xff\xff\xff\xff", b"{}", b"[]", &[0u8; 64], &[0xffu8; 64]] {
                body(input);
            }
        }
    }
}
