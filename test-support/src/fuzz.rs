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
    ("secagg", secagg),
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
/// Both model readers: from bytes, and streamed from a file. Whatever the streamed
/// reader accepts, the bytes reader accepts with the same spec, values and metadata.
pub fn safetensors(data: &[u8]) {
    let in_memory = maeum_models::model::ModelSpec::from_bytes(data, Path::new("fuzz.safetensors"));
    let path = std::env::temp_dir().join(format!("maeum-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(streamed) = maeum_models::model::ModelSpec::load(&path) {
        match in_memory {
            Ok(read) => assert!(read == streamed, "the two readers disagree"),
            Err(e) => panic!("the streamed reader accepted what the bytes reader refuses: {e}"),
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A stand-in identity for the SecAgg target: a "signature" is the party's index and
/// an FNV-1a hash of the message (the state machines, not ECDSA, are under test).
struct FuzzId(u16);

fn fuzz_sig(party: u16, message: &[u8]) -> Vec<u8> {
    let h = message.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let mut sig = party.to_be_bytes().to_vec();
    sig.extend_from_slice(&h.to_be_bytes());
    sig
}

impl maeum_secagg::Signer for FuzzId {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        fuzz_sig(self.0, message)
    }
}

impl maeum_secagg::Verifier for FuzzId {
    fn verify(&self, party: u16, message: &[u8], signature: &[u8]) -> bool {
        signature == fuzz_sig(party, message)
    }
}

/// The fuzz input as a stream of decisions (0 once it runs out).
struct Ops<'a>(std::slice::Iter<'a, u8>);

impl Ops<'_> {
    fn next(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }
}

/// What happens to one message (to the server, or a reply to a client).
enum Fate {
    Send,
    Drop,
    /// Its protobuf encoding with one byte flipped (at the position, by the value).
    Mutate(u8, u8),
}

fn fate(ops: &mut Ops) -> Fate {
    match ops.next() % 8 {
        6 => Fate::Drop,
        7 => Fate::Mutate(ops.next(), ops.next().max(1)),
        _ => Fate::Send,
    }
}

/// A message after its fate: its wire form with one byte flipped, decoded again (as the
/// wire boundary would), or itself; `None` if dropped or no longer decodable.
fn through_wire<T>(
    fate: &Fate,
    value: T,
    encode: impl Fn(&T) -> Vec<u8>,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    match *fate {
        Fate::Send => Some(value),
        Fate::Drop => None,
        Fate::Mutate(at, x) => {
            let mut bytes = encode(&value);
            let n = bytes.len();
            if n == 0 {
                return Some(value);
            }
            bytes[usize::from(at) % n] ^= x;
            decode(&bytes)
        }
    }
}

/// The SecAgg server (and its honest clients) over message sequences the input
/// chooses: each message to the server, and each reply to a client, is sent, dropped,
/// or sent with one byte of its wire form flipped; masked words may be corrupted; the
/// server may be snapshotted and resumed mid-unmask. With the first byte's bit 1 set,
/// the rest is an arbitrary server snapshot to resume from. Nothing may panic; a
/// snapshot of a live server always resumes; a finished session's sum has the
/// session's length.
pub fn secagg(data: &[u8]) {
    let _ = secagg_run(data);
}

/// [`secagg`], returning the unmasked sum when the session finished.
fn secagg_run(data: &[u8]) -> Option<Vec<u32>> {
    use maeum_protocols::wire::secagg::{Reply, Request, StageMessage, stored};
    use maeum_secagg::{Client, Participant, Server, Session, SessionParams};

    let mut ops = Ops(data.iter());
    let head = ops.next();
    let n = 5u16;
    let degree = if head & 1 == 1 { 2 } else { 0 };
    let group = if degree == 0 { usize::from(n) } else { usize::from(degree) + 1 };
    let len = 8usize;
    let session = Session {
        consortium: "fuzz".into(),
        job_id: "j".into(),
        round: 1,
        attempt: 1,
        participants: (1..=n)
            .map(|i| Participant { index: i, site_id: format!("s{i}"), identity_key: vec![i as u8; 32] })
            .collect(),
        params: SessionParams {
            threshold: SessionParams::default_threshold(group),
            degree,
            vector_len: len as u64,
            clip: 1.0,
            max_weight: 10,
        },
        binding: [0; 32],
    };
    if head & 2 == 2 {
        let _ = Server::resume(session, data.get(1..).unwrap_or_default(), vec![0; len]);
        return None;
    }
    let mut server = Server::new(session.clone()).ok()?;
    let mut clients: std::collections::BTreeMap<u16, Client> =
        (1..=n).filter_map(|i| Client::new(session.clone(), i, [i as u8; 32]).ok().map(|c| (i, c))).collect();
    let ids: Vec<FuzzId> = (0..=n).map(FuzzId).collect();
    let verifier = FuzzId(0);
    let req = |message: StageMessage| Request { job_id: "j".into(), round: 1, attempt: 1, message };
    let to_server = |fate: &Fate, message: StageMessage| {
        through_wire(fate, req(message), stored::request_to_bytes, |b| stored::request_from_bytes(b).ok())
            .map(|r| r.message)
    };
    let to_client = |fate: &Fate, reply: Reply| {
        through_wire(fate, reply, stored::reply_to_bytes, |b| stored::reply_from_bytes(b).ok())
    };
    let deliver = |server: &mut Server, message: StageMessage| {
        let _ = match message {
            StageMessage::Advertise(m) => server.receive_advertise(m, &verifier),
            StageMessage::GraphReveal(m) => server.receive_reveal(m),
            StageMessage::ShareKeys(m) => server.receive_shares(m),
            StageMessage::SurvivorSignature(m) => server.receive_survivor_signature(m, &verifier),
            StageMessage::Unmask(m) => server.receive_unmask(m),
            StageMessage::AwaitSurvivors { .. } => Ok(()),
        };
    };

    // Stage 1.
    for (&i, c) in clients.iter_mut() {
        let f = fate(&mut ops);
        if let Ok(m) = c.advertise(&ids[usize::from(i)])
            && let Some(m) = to_server(&f, StageMessage::Advertise(m))
        {
            deliver(&mut server, m);
        }
    }
    let roster = server.close_advertise().ok()?;
    let mut rosters = std::collections::BTreeMap::new();
    for &i in clients.keys() {
        if let Some(Reply::Roster(r)) = to_client(&fate(&mut ops), Reply::Roster(roster.clone())) {
            rosters.insert(i, r);
        }
    }
    // Stage 1b (SecAgg+).
    let mut reveals = None;
    if server.needs_graph_reveal() {
        for (i, c) in clients.iter_mut() {
            let f = fate(&mut ops);
            if let Some(r) = rosters.get(i)
                && let Ok(m) = c.reveal_graph(r, &verifier)
                && let Some(m) = to_server(&f, StageMessage::GraphReveal(m))
            {
                deliver(&mut server, m);
            }
        }
        let r = server.close_reveals().ok()?;
        reveals = Some(r);
    }
    // Stage 2.
    for (i, c) in clients.iter_mut() {
        let mine = reveals.clone().and_then(|r| match to_client(&fate(&mut ops), Reply::Reveals(r)) {
            Some(Reply::Reveals(r)) => Some(r),
            _ => None,
        });
        let f = fate(&mut ops);
        if let Some(r) = rosters.get(i)
            && let Ok(m) = c.share_keys(r, mine.as_ref(), &verifier)
            && let Some(m) = to_server(&f, StageMessage::ShareKeys(m))
        {
            deliver(&mut server, m);
        }
    }
    server.close_shares().ok()?;
    // Stage 3: masked inputs, chunked; a word may be corrupted.
    for (&i, c) in clients.iter_mut() {
        let Ok(shares) = server.shares_for(i) else { continue };
        let Some(Reply::Shares(shares)) = to_client(&fate(&mut ops), Reply::Shares(shares)) else { continue };
        let Ok(mut masker) = c.masked_input(&shares) else { continue };
        let mut words: Vec<u32> = (0..len as u32).map(|w| w * u32::from(i)).collect();
        if masker.mask(&mut words).is_err() || masker.finish().is_err() {
            continue;
        }
        let cut = usize::from(ops.next()) % (len + 1);
        if ops.next() % 8 == 7 {
            words[cut % len] ^= 1;
        }
        let _ = server.fold_masked(i, &words[..cut]);
        let _ = server.fold_masked(i, &words[cut..]);
        if ops.next() % 8 != 6 {
            let _ = server.finish_masked(i);
        }
    }
    let set = server.close_masked().ok()?;
    // Stage 4.
    for (&i, c) in clients.iter_mut() {
        let Some(Reply::Survivors(set)) = to_client(&fate(&mut ops), Reply::Survivors(set.clone())) else { continue };
        let f = fate(&mut ops);
        if let Ok(m) = c.consistency(&set, &ids[usize::from(i)])
            && let Some(m) = to_server(&f, StageMessage::SurvivorSignature(m))
        {
            deliver(&mut server, m);
        }
    }
    let proof = server.close_consistency().ok()?;
    // Stage 5, with a restart (snapshot and resume) where the input says.
    for c in clients.values_mut() {
        if ops.next() % 8 == 5 {
            let snapshot = server.snapshot().expect("a server in the unmask stage has a snapshot");
            let sum = server.masked_sum().to_vec();
            // INVARIANT: a live server's own snapshot always resumes.
            server = Server::resume(session.clone(), &snapshot, sum).expect("a server's own snapshot resumes");
        }
        let Some(Reply::Proof(proof)) = to_client(&fate(&mut ops), Reply::Proof(proof.clone())) else { continue };
        let f = fate(&mut ops);
        if let Ok(m) = c.unmask(&proof, &verifier)
            && let Some(m) = to_server(&f, StageMessage::Unmask(m))
        {
            deliver(&mut server, m);
        }
    }
    let outcome = server.finish().ok()?.outcome();
    assert_eq!(outcome.sum.len(), len, "a finished session's sum has the session's length");
    Some(outcome.sum)
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

    /// The SecAgg target's honest seeds run whole sessions (with and without the
    /// SecAgg+ graph, with restarts mid-unmask) to the exact sum, so the fuzzer starts
    /// from the full protocol.
    #[test]
    fn the_secagg_targets_honest_seeds_finish_with_the_exact_sum() {
        let want: Vec<u32> = (0..8).map(|w| w * (1 + 2 + 3 + 4 + 5)).collect();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/secagg");
        for seed in ["honest-secagg", "honest-secagg-plus", "resume-every-unmask"] {
            let data = std::fs::read(root.join(seed)).expect("seed");
            assert_eq!(secagg_run(&data), Some(want.clone()), "{seed}");
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
