//! Signed model releases at the site: install only what verifies, keep the previous
//! model in service otherwise, and let the admin re-check everything offline.
//!
//! ```text
//! HOME/releases/vN.json        an installed release: manifest, signature, card, and the
//!                              audit-log entry with its inclusion proof against a
//!                              checkpoint this site witnessed
//! HOME/releases/current.json   the release in service (version, promotion, since)
//! HOME/releases/events.jsonl   every install and refusal, with the reason
//! HOME/models/SHA256.safetensors  the blobs (shared with training downloads)
//! HOME/evaluations.jsonl       the metrics this site reported, per model
//! ```
//!
//! The coordinator's heartbeat names the current release. When it changes (a new
//! version or a new promotion), the daemon fetches the release and installs it only if
//! (docs/protocols/releases.md): the signature verifies under the consortium key from
//! enrolment; the card hashes to the signed card digest and describes the signed
//! model; the blob hashes to the signed model digest and loads with the signed layout;
//! and a `model_release` entry naming both digests is included in a checkpoint this
//! site witnessed (it witnesses a newer one first if needed). Any failure refuses the
//! release: the previous release stays in service, the refusal goes to
//! `events.jsonl`, the daemon's log and metrics, and is reported to the coordinator,
//! which logs it in the audit log. Network failures are retried, not refusals. While
//! this site keeps fork evidence against the coordinator (`crate::witness`) it installs
//! nothing, not even a rollback, and reports nothing; it acts on the current release
//! once an admin has cleared the evidence.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use maeum_models::model::ModelSpec;
use maeum_protocols::wire::release::ReleaseMsg;
use maeum_protocols::wire::{Digest, Hasher, pb};
use maeum_tlog::handover::Role;
use maeum_tlog::merkle::verify_inclusion;
use maeum_tlog::release::{Manifest, ModelCard, ReleaseError, Selector, check_card, is_release_entry};
use maeum_tlog::{Entry, hex, rfc3339, unhex, unhex32};

use crate::daemon::{Agent, Client, DigestMismatch, describe};
use crate::enrol::Home;

const DIR: &str = "releases";
const CURRENT: &str = "releases/current.json";
const EVENTS: &str = "releases/events.jsonl";
/// Metrics this site reported (one line per evaluation report).
pub const EVALUATIONS: &str = "evaluations.jsonl";

/// An installed release (HOME/releases/vN.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub manifest: Manifest,
    /// Ed25519 signature by the signing key, hex.
    pub signature: String,
    /// Ed25519 signature by the release key, hex (empty: none; installs from before it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_signature: String,
    /// The card's exact bytes (UTF-8 JSON).
    pub card: String,
    pub installed_ms: i64,
    /// The `model_release` entry (canonical bytes) and its proof.
    pub log_entry: String,
    pub log_seq: u64,
    /// The witnessed checkpoint the proof is against.
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    /// Inclusion proof hashes, hex.
    pub proof: Vec<String>,
}

/// HOME/releases/current.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub version: u32,
    pub promotion: u64,
    pub since_ms: i64,
}

/// A line of HOME/releases/events.jsonl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallEvent {
    pub time_ms: i64,
    pub version: u32,
    pub promotion: u64,
    pub model: String,
    pub installed: bool,
    pub reason: String,
}

/// A line of HOME/evaluations.jsonl: what this site reported for a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub time_ms: i64,
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub model: String,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

fn append(home: &Home, name: &str, line: &impl Serialize) -> Result<()> {
    // INVARIANT: plain data always serialises.
    let text = serde_json::to_string(line).expect("a record serialises");
    crate::witness::append_line(home, name, &text)
}

fn read_lines<T: for<'de> Deserialize<'de>>(home: &Home, name: &str) -> Result<Vec<T>> {
    let Ok(text) = std::fs::read_to_string(home.path(name)) else { return Ok(Vec::new()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{name} line {}", i + 1)))
        .collect()
}

/// Records an evaluation this site reported (for `models show` and to reproduce it).
pub fn note_evaluation(home: &Home, r: &Reported) -> Result<()> {
    append(home, EVALUATIONS, r)
}

/// What this site reported, oldest first.
pub fn reported(home: &Home) -> Result<Vec<Reported>> {
    read_lines(home, EVALUATIONS)
}

/// The refusals and installs so far.
pub fn events(home: &Home) -> Result<Vec<InstallEvent>> {
    read_lines(home, EVENTS)
}

/// The release in service, if any.
pub fn current(home: &Home) -> Result<Option<Current>> {
    let p = home.path(CURRENT);
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?))
}

/// Every installed release, by version.
pub fn installed(home: &Home) -> Result<Vec<Installed>> {
    let dir = home.path(DIR);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('v') && name.ends_with(".json") {
            let text = std::fs::read_to_string(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
            out.push(
                serde_json::from_str::<Installed>(&text).with_context(|| format!("parsing {}", e.path().display()))?,
            );
        }
    }
    out.sort_by_key(|r| r.manifest.version);
    Ok(out)
}

/// An installed release by `3`/`v3` or a model-digest prefix.
pub fn find(home: &Home, selector: &str) -> Result<Installed> {
    let all = installed(home)?;
    let prefix = match Selector::parse(selector).map_err(|e| anyhow!(e))? {
        Selector::Version(n) => {
            return all
                .into_iter()
                .find(|r| r.manifest.version == n)
                .with_context(|| format!("release v{n} is not installed here (see `maeum-site models list`)"));
        }
        Selector::DigestPrefix(p) => p,
    };
    let found: Vec<Installed> = all.into_iter().filter(|r| r.manifest.model_sha256.starts_with(&prefix)).collect();
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => bail!("no installed release matches {selector:?}"),
        n => bail!("{n} installed releases match {selector:?}; give more digits"),
    }
}

/// Where a model blob lives.
pub fn model_path(home: &Home, digest: &str) -> PathBuf {
    home.path("models").join(format!("{digest}.safetensors"))
}

/// SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<Digest> {
    Hasher::file(path).with_context(|| format!("reading {}", path.display()))
}

/// The keys a release's two signatures may be under.
struct Keys {
    /// The log keys this site trusts (the enrolment's and every rotation it followed:
    /// a release stays signed by the log key of its time).
    log: Vec<[u8; 32]>,
    /// The release keys (`None`: no release key pinned): the current one for a new
    /// release, any this site trusted for one installed before a rotation.
    release: Option<Vec<[u8; 32]>>,
}

impl Keys {
    /// Every key this site has trusted (for releases it installed).
    fn trusted(home: &Home) -> Result<Keys> {
        let log = crate::keys::pinned(home, Role::Log)?.context("enrolment.json names no signing key")?.all;
        Ok(Keys { log, release: crate::keys::pinned(home, Role::Release)?.map(|p| p.all) })
    }

    /// For a new release: walks the rotations served with it (kept once the log is
    /// shown to hold them, [`keep_rotations`]); then any log key this site trusts and
    /// the current release key.
    fn following(home: &Home, msg: &ReleaseMsg) -> Result<(Keys, Vec<crate::keys::Walk>)> {
        let log = crate::keys::walk(home, Role::Log, &msg.log_handovers)
            .context("refusing the log-key handovers")?
            .context("enrolment.json names no signing key")?;
        let release =
            crate::keys::walk(home, Role::Release, &msg.handovers).context("refusing the release-key handovers")?;
        let keys = Keys { log: log.all(), release: release.as_ref().map(|w| vec![w.current()]) };
        Ok((keys, std::iter::once(log).chain(release).collect()))
    }
}

/// Both signatures on a release: the signing key's, and the release key's when this
/// site's enrolment names one (a serving host without the release key cannot make it).
fn verify_signatures(m: &Manifest, (signature, release_signature): (&[u8], &[u8]), keys: &Keys) -> Result<()> {
    if !keys.log.iter().any(|k| m.verify(k, signature).is_ok()) {
        return Err(ReleaseError::Signature.into());
    }
    let Some(keys) = &keys.release else { return Ok(()) };
    if release_signature.is_empty() {
        bail!("the release is not signed with the consortium's release key, which this site's enrolment requires");
    }
    if keys.iter().any(|k| m.verify(k, release_signature).is_ok()) {
        return Ok(());
    }
    let shown = keys.last().map_or(String::new(), |k| hex(&k[..8]));
    bail!("the release-key signature does not verify under the consortium's release key {shown}…")
}

/// The checks that need no network, on a release's parts: signatures, card, blob (the
/// file at `blob`), and that the model loads with the signed layout and the card's
/// labels. `Err` is a refusal reason.
fn check_parts(
    home: &Home,
    m: &Manifest,
    signatures: (&[u8], &[u8]),
    keys: &Keys,
    card: &[u8],
    blob: &Path,
) -> Result<ModelCard> {
    let enrolment = home.enrolment()?;
    if m.consortium != enrolment.consortium {
        bail!("the release is of consortium {:?}, this site is enrolled in {:?}", m.consortium, enrolment.consortium);
    }
    verify_signatures(m, signatures, keys)?;
    let card = check_card(m, card)?;
    m.check_blob(&hash_file(blob)?.0)?;
    let (spec, _, _) = ModelSpec::load(blob).with_context(|| format!("loading {}", blob.display()))?;
    if spec.layout().digest().to_string() != m.layout_digest {
        bail!("the model's parameter layout is not the signed layout {}", m.layout_digest);
    }
    model_matches_card(&spec, &card)?;
    Ok(card)
}

/// The model file's own spec says what its signed card says: labels, kind and (for an
/// encoder model) the encoder by name and digests. A card naming another encoder than
/// the one the model runs would mislead every reader of the card.
fn model_matches_card(spec: &ModelSpec, card: &ModelCard) -> Result<()> {
    if spec.labels().names() != card.model.labels.as_slice() {
        bail!("the model's labels differ from its card's");
    }
    if spec.kind() != card.model.kind {
        bail!("the model is of kind {}, its card says {}", spec.kind(), card.model.kind);
    }
    let from_card = card.model.encoder.as_ref().map(|e| (&e.name, &e.sha256, &e.tokenizer_sha256));
    let from_model = spec.encoder().map(|e| (&e.name, &e.sha256, &e.tokenizer_sha256));
    if from_card != from_model {
        bail!(
            "the model runs encoder {}, its card names {}",
            from_model.map_or("none".into(), |(n, w, t)| format!("{n} (weights {w}, tokenizer {t})")),
            from_card.map_or("none".into(), |(n, w, t)| format!("{n} (weights {w}, tokenizer {t})"))
        );
    }
    let from_model = maeum_protocols::wire::release::card_adapter(spec);
    if card.model.adapter != from_model {
        let show = |a: Option<&maeum_tlog::release::CardAdapter>| a.map_or("none".into(), ToString::to_string);
        bail!(
            "the model's adapters are {}, its card says {}",
            show(from_model.as_ref()),
            show(card.model.adapter.as_ref())
        );
    }
    Ok(())
}

/// Re-checks an installed release offline: the parts, and the log entry's inclusion
/// proof against a checkpoint this site witnessed (in HOME/audit/witnessed.jsonl).
pub fn verify_installed(home: &Home, r: &Installed) -> Result<ModelCard> {
    let sig = unhex(&r.signature).context("stored signature")?;
    let release_sig = unhex(&r.release_signature).context("stored release-key signature")?;
    let blob = model_path(home, &r.manifest.model_sha256);
    let card = check_parts(home, &r.manifest, (&sig, &release_sig), &Keys::trusted(home)?, r.card.as_bytes(), &blob)?;
    let entry = Entry::decode(r.log_entry.as_bytes()).context("stored log entry")?;
    if entry.seq != r.log_seq || !is_release_entry(&entry.event, &r.manifest) {
        bail!("the stored log entry is not this release's model_release entry");
    }
    let root = unhex32(&r.checkpoint_root).context("stored checkpoint root")?;
    let proof: Vec<[u8; 32]> = r.proof.iter().map(|h| unhex32(h)).collect::<Result<_, _>>()?;
    verify_inclusion(&entry.leaf_hash(), r.log_seq, r.checkpoint_size, &proof, &root)
        .map_err(|e| anyhow!("the log entry's inclusion proof does not verify: {e}"))?;
    if !crate::witness::witnessed_roots(home)?.contains(&(r.checkpoint_size, r.checkpoint_root.clone())) {
        bail!("the checkpoint of size {} is not one this site witnessed", r.checkpoint_size);
    }
    Ok(card)
}

/// Why an install did not happen.
enum Failure {
    /// A check failed: refuse the release (reported, logged, not retried for this
    /// promotion).
    Refused(String),
    /// The coordinator or the network failed: try again later.
    Transient(anyhow::Error),
    /// This site caught the coordinator showing it a forked audit log: it installs
    /// nothing from it, reports nothing, and looks again once the evidence is cleared.
    Halted(String),
}

/// Refuses to go on while fork evidence is kept (`crate::witness::fork_evidence`).
fn not_halted(home: &Home) -> Result<(), Failure> {
    crate::witness::fork_evidence(home).map_or(Ok(()), |why| Err(Failure::Halted(why)))
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure::Refused(e.to_string())
}

/// Whether the heartbeat's current release needs action.
pub(crate) fn wanted(agent: &Agent, cur: &pb::ReleaseRef) -> bool {
    let handled = *agent.release_handled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    handled != Some((cur.version, cur.promotion))
}

/// Follows the coordinator's current release (spawned by the heartbeat loop; one at a
/// time).
pub(crate) async fn follow(agent: Arc<Agent>, mut client: Client, cur: pb::ReleaseRef) {
    let outcome = install(&agent, &mut client, &cur).await;
    let home = &agent.home;
    let report = |installed: bool, reason: String| pb::ReleaseReport {
        version: cur.version,
        model_digest: cur.model_digest.clone(),
        installed,
        reason,
        promotion: cur.promotion,
    };
    let (installed, reason) = match outcome {
        Ok(()) => (true, String::new()),
        Err(Failure::Refused(reason)) => (false, reason),
        Err(Failure::Halted(why)) => {
            warn!(version = cur.version, reason = %why, "not installing the release: this site has stopped working for the coordinator (forked audit log)");
            agent.installing.store(false, Ordering::SeqCst);
            return;
        }
        Err(Failure::Transient(e)) => {
            warn!(version = cur.version, error = %format!("{e:#}"), "could not fetch the current release; will retry");
            tokio::time::sleep(Duration::from_secs(5)).await;
            agent.installing.store(false, Ordering::SeqCst);
            return;
        }
    };
    let event = InstallEvent {
        time_ms: crate::now_ms(),
        version: cur.version,
        promotion: cur.promotion,
        model: cur.model_digest.clone(),
        installed,
        reason: reason.clone(),
    };
    if let Err(e) = append(home, EVENTS, &event) {
        warn!(error = %format!("{e:#}"), "writing releases/events.jsonl");
    }
    let serving = current(home).ok().flatten().map_or("no release".to_string(), |c| format!("v{}", c.version));
    if installed {
        agent.metrics.releases_installed.inc();
        agent.set(|s| s.release = format!("v{} ({})", cur.version, cur.model_digest));
        info!(version = cur.version, model = %cur.model_digest, "release verified (signature, card, model digest, audit log) and in service");
    } else {
        agent.metrics.verification_failures.inc("release");
        warn!(version = cur.version, reason = %reason, serving = %serving, "REFUSED the release; the previous model stays in service");
    }
    match client.report_release(report(installed, reason.chars().take(500).collect())).await {
        Ok(_) => {
            *agent.release_handled.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((cur.version, cur.promotion));
        }
        Err(e) => {
            warn!(error = %describe(&e), "reporting the release outcome failed; will retry");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
    agent.installing.store(false, Ordering::SeqCst);
}

async fn install(agent: &Arc<Agent>, client: &mut Client, cur: &pb::ReleaseRef) -> Result<(), Failure> {
    let home = &agent.home;
    not_halted(home)?;
    // Already installed (a rollback, or a promotion seen again): re-check it offline.
    if let Ok(local) = find(home, &cur.version.to_string())
        && local.manifest.model_sha256 == cur.model_digest
    {
        verify_installed(home, &local).map_err(|e| refused(format!("{e:#}")))?;
        return make_current(home, cur).map_err(Failure::Transient);
    }
    let msg = client
        .get_release(pb::GetReleaseRequest { version: cur.version })
        .await
        .map_err(|e| Failure::Transient(anyhow!("fetching release v{}: {}", cur.version, describe(&e))))?
        .into_inner();
    let msg = ReleaseMsg::from_pb(msg).map_err(|e| refused(format!("malformed release: {e}")))?;
    let m = &msg.manifest;
    if m.version != cur.version || m.model_sha256 != cur.model_digest {
        return Err(refused(format!(
            "the coordinator announced v{} (model {}) but sent v{} (model {})",
            cur.version, cur.model_digest, m.version, m.model_sha256
        )));
    }
    // Cheap checks before the download.
    let enrolment = home.enrolment().map_err(Failure::Transient)?;
    if m.consortium != enrolment.consortium {
        return Err(refused(format!(
            "the release is of consortium {:?}, not {:?}",
            m.consortium, enrolment.consortium
        )));
    }
    // The keys: follow the rotations served with the release, then check under the
    // release key they end at.
    let (keys, walks) = Keys::following(home, &msg).map_err(|e| refused(format!("{e:#}")))?;
    let signatures = (&msg.signature[..], &msg.release_signature[..]);
    verify_signatures(m, signatures, &keys).map_err(|e| refused(format!("{e:#}")))?;
    check_card(m, &msg.card).map_err(refused)?;
    // The blob: a copy already here is re-hashed, never trusted for its name.
    let path = model_path(home, &m.model_sha256);
    if path.exists() && hash_file(&path).map_err(Failure::Transient)?.hex() != m.model_sha256 {
        warn!(path = %path.display(), "a stored model does not match its name; fetching it again");
        let _ = std::fs::remove_file(&path);
    }
    let model = msg.model().map_err(|e| refused(format!("malformed release: {e}")))?;
    if let Err(e) = crate::daemon::download(agent, client, &model).await {
        return Err(match e.downcast_ref::<DigestMismatch>() {
            Some(d) => refused(ReleaseError::BlobDigest { got: d.got.clone(), signed: m.model_sha256.clone() }),
            None => Failure::Transient(e),
        });
    }
    check_parts(home, m, signatures, &keys, &msg.card, &path).map_err(|e| refused(format!("{e:#}")))?;
    // The log: a model_release entry naming both digests, proven against a checkpoint
    // this site witnessed (witness a newer one first if the release is newer).
    let (entry, proof, size, root) = prove_release(agent, client, m, msg.audit_seq).await?;
    // Proving witnesses the log, which is where a fork is caught.
    not_halted(home)?;
    keep_rotations(home, client, &walks, (size, &root), m.version).await?;
    let record = Installed {
        manifest: m.clone(),
        signature: hex(&msg.signature),
        release_signature: hex(&msg.release_signature),
        card: String::from_utf8(msg.card.clone()).map_err(|_| refused("the model card is not UTF-8"))?,
        installed_ms: crate::now_ms(),
        log_entry: String::from_utf8(entry.encode()).map_err(|_| refused("the log entry is not UTF-8"))?,
        log_seq: entry.seq,
        checkpoint_size: size,
        checkpoint_root: hex(&root),
        proof: proof.iter().map(|h| hex(h)).collect(),
    };
    let p = home.path(&format!("{DIR}/v{}.json", m.version));
    std::fs::create_dir_all(home.path(DIR)).map_err(|e| Failure::Transient(e.into()))?;
    // INVARIANT: plain data always serialises.
    maeum_models::write_atomic(&p, serde_json::to_string_pretty(&record).expect("serialises").as_bytes())
        .with_context(|| format!("writing {}", p.display()))
        .map_err(Failure::Transient)?;
    make_current(home, cur).map_err(Failure::Transient)
}

type Proven = (Entry, Vec<[u8; 32]>, u64, [u8; 32]);

async fn prove_release(
    agent: &Arc<Agent>,
    client: &mut Client,
    m: &Manifest,
    claimed_seq: u64,
) -> Result<Proven, Failure> {
    for attempt in 0..2 {
        if attempt == 1 || crate::witness::witnessed_size(&agent.home) <= claimed_seq {
            crate::daemon::witness_now(agent, client).await;
        }
        let Some(file) = crate::witness::witnessed(&agent.home).map_err(Failure::Transient)? else {
            continue;
        };
        let origin = format!("maeum/{}", m.consortium);
        let (signed, _) = file.checkpoint.to_signed(&origin).map_err(|e| Failure::Transient(e.into()))?;
        let (size, root) = (signed.checkpoint.size, signed.checkpoint.root);
        let proven =
            crate::witness::fetch_proven(client, size, &root, vec![m.model_sha256.clone()]).await.map_err(|e| {
                match e.downcast_ref::<crate::witness::Unreachable>() {
                    Some(_) => Failure::Transient(e),
                    None => refused(format!("{e:#}")),
                }
            })?;
        if let Some(p) = proven.into_iter().find(|p| is_release_entry(&p.entry.event, m)) {
            return Ok((p.entry, p.proof, size, root));
        }
        if attempt == 1 {
            return Err(refused(ReleaseError::NotLogged(format!(
                "no model_release entry names model {} with card {} in the log up to the checkpoint of size {size} \
                 this site witnessed",
                m.model_sha256, m.card_sha256
            ))));
        }
    }
    Err(Failure::Transient(anyhow!("this site has not witnessed a checkpoint of the audit log yet")))
}

/// Keeps the rotations the release's chains led through, once the checkpoint `at` this
/// site witnessed proves each one's entry. Until then the install waits (the
/// coordinator may not have signed a checkpoint over the rotation yet); a rotation
/// the log never records is never followed.
async fn keep_rotations(
    home: &Home,
    client: &mut Client,
    walks: &[crate::keys::Walk],
    (size, root): (u64, &maeum_tlog::merkle::Hash),
    version: u32,
) -> Result<(), Failure> {
    let pending: Vec<&crate::keys::Walk> = walks.iter().filter(|w| !w.is_empty()).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let logged = crate::witness::logged_rotations(client, size, root).await.map_err(Failure::Transient)?;
    for w in pending {
        w.check_logged(&logged).map_err(Failure::Transient)?;
        crate::keys::keep(home, w, &format!("release v{version}")).map_err(Failure::Transient)?;
    }
    Ok(())
}

fn make_current(home: &Home, cur: &pb::ReleaseRef) -> Result<()> {
    let c = Current { version: cur.version, promotion: cur.promotion, since_ms: crate::now_ms() };
    let p = home.path(CURRENT);
    // INVARIANT: plain data always serialises.
    maeum_models::write_atomic(&p, serde_json::to_string_pretty(&c).expect("serialises").as_bytes())
        .with_context(|| format!("writing {}", p.display()))
}

/// `maeum-site models list`.
pub fn list(dir: &Path, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let all = installed(&home)?;
    let cur = current(&home)?;
    let evs = events(&home)?;
    let refusals: Vec<&InstallEvent> = evs.iter().filter(|e| !e.installed).collect();
    let locals = local_models(&home);
    if json {
        let releases: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                let card = ModelCard::decode(r.card.as_bytes()).ok();
                serde_json::json!({
                    "version": r.manifest.version, "model": r.manifest.model_sha256,
                    "current": cur.as_ref().is_some_and(|c| c.version == r.manifest.version),
                    "installed": rfc3339(r.installed_ms), "log_seq": r.log_seq,
                    "job": card.as_ref().map(|c| c.job.id.clone()), "round": card.as_ref().map(|c| c.round),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"current": cur.map(|c| c.version), "releases": releases, "refusals": refusals, "local_models": locals})
        );
        return Ok(());
    }
    if all.is_empty() {
        println!("no release installed yet (the daemon installs the consortium's current release)");
    }
    for r in &all {
        let is_current = cur.as_ref().is_some_and(|c| c.version == r.manifest.version);
        let card = ModelCard::decode(r.card.as_bytes()).ok();
        println!(
            "{} v{:<4} {}  job {} round {}  installed {}  log entry #{}",
            if is_current { "*" } else { " " },
            r.manifest.version,
            &r.manifest.model_sha256[..16],
            card.as_ref().map_or("?".into(), |c| c.job.id.clone()),
            card.as_ref().map_or(0, |c| c.round),
            rfc3339(r.installed_ms),
            r.log_seq
        );
    }
    for e in &refusals {
        println!("  REFUSED v{} at {}: {}", e.version, rfc3339(e.time_ms), e.reason);
    }
    for l in &locals {
        println!("  local model {} (fine-tuned here, never uploaded)", l);
    }
    Ok(())
}

fn local_models(home: &Home) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(home.path("local-models")) else { return Vec::new() };
    let mut out: Vec<String> =
        rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".safetensors").map(str::to_owned)).collect();
    out.sort();
    out
}

/// `maeum-site models show VERSION`.
pub fn show(dir: &Path, selector: Option<&str>, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let r = match selector {
        Some(s) => find(&home, s)?,
        None => {
            let c = current(&home)?.context("no release is in service here yet")?;
            find(&home, &c.version.to_string())?
        }
    };
    let card = ModelCard::decode(r.card.as_bytes())?;
    let mine: Vec<Reported> = reported(&home)?.into_iter().filter(|e| e.model == r.manifest.model_sha256).collect();
    let labels = card.model.labels.clone();
    let my_metrics = mine.last().map(|e| maeum_tlog::release::evaluation(&labels, &e.confusion, 1));
    if json {
        println!(
            "{}",
            serde_json::json!({"version": r.manifest.version, "manifest": r.manifest, "log_seq": r.log_seq,
                "checkpoint_size": r.checkpoint_size, "card": card, "reported_by_this_site": my_metrics})
        );
        return Ok(());
    }
    println!("release v{} of {}", r.manifest.version, r.manifest.consortium);
    println!("  model       {} ({} bytes)", r.manifest.model_sha256, r.manifest.model_size);
    println!("  from        job {} round {} of {}", card.job.id, card.round, card.job.rounds);
    println!("  kind        {} ({} parameters)", card.model.kind, card.model.parameters);
    if let Some(e) = &card.model.encoder {
        println!(
            "  encoder     {} (weights {}, tokenizer {}, {} tokens)",
            e.name, e.sha256, e.tokenizer_sha256, e.max_tokens
        );
    }
    if let Some(a) = &card.model.adapter {
        println!("  adapters    {a}");
    }
    println!("  released    {}", rfc3339(card.released_ms));
    println!(
        "  audit log   entry #{}, proven against the checkpoint of size {} this site witnessed",
        r.log_seq, r.checkpoint_size
    );
    if let Some(e) = &card.evaluation {
        println!(
            "  federated   accuracy {:.4}  macro-F1 {:.4}  ({} examples at {} sites)",
            e.accuracy, e.macro_f1, e.examples, e.evaluated_by
        );
    }
    match &my_metrics {
        Some(e) => println!(
            "  this site   accuracy {:.4}  macro-F1 {:.4}  ({} examples, as reported)",
            e.accuracy, e.macro_f1, e.examples
        ),
        None => println!("  this site   reported no evaluation of this model"),
    }
    if let Some(e) = card.evaluation.as_ref().or(my_metrics.as_ref()) {
        let parts: Vec<String> = e
            .recall
            .iter()
            .map(|c| {
                format!(
                    "{}{} {}",
                    c.label,
                    if c.crisis { " (crisis)" } else { "" },
                    c.recall.map_or("-".into(), |r| format!("{r:.2}"))
                )
            })
            .collect();
        println!("  recall      {}", parts.join(", "));
    }
    if let Some(f) = &card.crisis_flag {
        println!(
            "  crisis flag {} at or above {} (recall {}, precision {} on the sites' held-out posts)",
            f.classes.join(", "),
            f.threshold.map_or("the fallback threshold".into(), |t| format!("{t:.2}")),
            f.recall.map_or("-".into(), |r| format!("{r:.2}")),
            f.precision.map_or("-".into(), |p| format!("{p:.2}"))
        );
    }
    match &card.privacy {
        Some(p) => println!(
            "  privacy     {}: ε = {:.3} per record per site at δ = {:e} after {} rounds",
            p.mechanism, p.epsilon, p.delta, p.rounds
        ),
        None => println!("  privacy     no differential privacy (no per-record guarantee)"),
    }
    Ok(())
}

/// `maeum-site models verify`: re-checks every installed release offline. Fails if
/// any check fails.
pub fn verify(dir: &Path, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let all = installed(&home)?;
    let results: Vec<(u32, Result<ModelCard>)> =
        all.iter().map(|r| (r.manifest.version, verify_installed(&home, r))).collect();
    let bad = results.iter().filter(|(_, r)| r.is_err()).count();
    if json {
        let v: Vec<serde_json::Value> = results
            .iter()
            .map(|(n, r)| serde_json::json!({"version": n, "ok": r.is_ok(), "error": r.as_ref().err().map(|e| format!("{e:#}"))}))
            .collect();
        println!("{}", serde_json::json!({"releases": v, "failed": bad}));
    } else {
        if all.is_empty() {
            println!("no release installed yet");
        }
        for (n, r) in &results {
            match r {
                Ok(_) => println!("v{n}  ok: signature, card digest, model digest and layout, log inclusion"),
                Err(e) => println!("v{n}  FAILED: {e:#}"),
            }
        }
    }
    if bad > 0 {
        bail!("{bad} installed release(s) failed verification");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_models::data::LabelSet;
    use maeum_tlog::release::{CardEncoder, CardJob, CardModel, CardSecAgg};

    fn card(kind: &str, encoder: Option<CardEncoder>) -> ModelCard {
        ModelCard {
            format: maeum_tlog::release::CARD_FORMAT.into(),
            consortium: "c".into(),
            version: 1,
            parent_version: None,
            model: CardModel {
                sha256: "ab".repeat(32),
                size: 1,
                layout_digest: "cd".repeat(32),
                kind: kind.into(),
                parameters: 1,
                labels: vec!["calm".into(), "crisis".into()],
                encoder,
                adapter: None,
            },
            job: CardJob {
                id: "j".into(),
                name: "j".into(),
                spec_sha256: "ef".repeat(32),
                rounds: 1,
                config: serde_json::json!({}),
            },
            round: 1,
            released_ms: 0,
            secure_aggregation: CardSecAgg { enabled: true, threshold: 0, neighbours: 0, clip: 1.0, max_weight: 1 },
            initial_evaluation: None,
            rounds: Vec::new(),
            evaluation: None,
            crisis_flag: None,
            privacy: None,
        }
    }

    #[test]
    fn a_card_must_name_the_encoder_the_model_runs() {
        let e = maeum_models::encoder::known("all-minilm-l6-v2").expect("known");
        let spec = ModelSpec::EncoderHead {
            encoder: e.clone(),
            hidden: 4,
            labels: LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels"),
        };
        let named = |sha256: &str| CardEncoder {
            name: e.name.clone(),
            sha256: sha256.into(),
            tokenizer_sha256: e.tokenizer_sha256.clone(),
            max_tokens: 128,
            dim: 384,
        };
        model_matches_card(&spec, &card("encoder-head", Some(named(&e.sha256)))).expect("matches");
        let err = model_matches_card(&spec, &card("encoder-head", Some(named(&"00".repeat(32))))).expect_err("other");
        assert!(err.to_string().starts_with("the model runs encoder all-minilm-l6-v2 (weights 53aa5117"), "{err}");
        let err = model_matches_card(&spec, &card("encoder-head", None)).expect_err("none");
        assert!(err.to_string().ends_with("its card names none"), "{err}");
        let err = model_matches_card(&spec, &card("text-classifier", None)).expect_err("kind");
        assert_eq!(err.to_string(), "the model is of kind encoder-head, its card says text-classifier");
    }

    #[test]
    fn a_card_must_name_the_adapters_the_model_runs() {
        let e = maeum_models::encoder::known("all-minilm-l6-v2").expect("known");
        let lora = maeum_models::lora::LoraConfig { layers: 1, rank: 4, alpha: 32.0, seed: 21 };
        let spec = ModelSpec::EncoderLora {
            encoder: e.clone(),
            lora,
            hidden: 4,
            labels: LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels"),
        };
        let encoder = CardEncoder {
            name: e.name.clone(),
            sha256: e.sha256.clone(),
            tokenizer_sha256: e.tokenizer_sha256.clone(),
            max_tokens: 128,
            dim: 384,
        };
        let with = |adapter: Option<maeum_tlog::release::CardAdapter>| {
            let mut c = card("encoder-lora", Some(encoder.clone()));
            c.model.adapter = adapter;
            c
        };
        let named = maeum_protocols::wire::release::card_adapter(&spec);
        model_matches_card(&spec, &with(named.clone())).expect("matches");
        // Another A (the seed) is another model: the card would mislead its readers.
        let other = named.map(|a| maeum_tlog::release::CardAdapter { seed: 22, ..a });
        let err = model_matches_card(&spec, &with(other)).expect_err("other seed");
        assert_eq!(
            err.to_string(),
            "the model's adapters are FFA-LoRA on the top 1 layers, rank 4, alpha 32, A seed 21, its card says \
             FFA-LoRA on the top 1 layers, rank 4, alpha 32, A seed 22"
        );
        let err = model_matches_card(&spec, &with(None)).expect_err("none");
        assert!(err.to_string().ends_with("its card says none"), "{err}");
    }
}
