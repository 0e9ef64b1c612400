//! The model registry: signed releases, which one is current, and what every site
//! reported when it tried to install one.
//!
//! A completed job releases its final model: the coordinator writes the model card
//! ([`ModelCard`]), signs the manifest with the consortium's Ed25519 key, appends a
//! `model_release` entry to the audit log, and stores the release here (trees
//! `releases` and `promotions` of the coordinator's state database, [`crate::storage`]; the blob stays
//! in `HOME/blobs`). Nothing is current until an operator promotes a release; the
//! heartbeat tells every site which release is current, and sites install it after
//! verifying it (`docs/protocols/releases.md`). Promotions and rollbacks form a stack:
//! a promote pushes, a rollback pops back to the release that was current before.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use maeum_protocols::wire::Digest;
use maeum_protocols::wire::release::ReleaseMsg;
use maeum_tlog::release::{
    CARD_FORMAT, CardCrisisFlag, CardJob, CardModel, CardRound, CardSecAgg, CrisisMeasure, GateFailure, Manifest,
    ModelCard, Selector, evaluation,
};
use maeum_tlog::{Event, unhex};

use crate::home::{hex, now_ms};
use crate::server::Coord;
use crate::storage::{Db, Tree, Write};
use crate::store::{JobRecord, VersionRecord};

/// What a site last reported for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub installed: bool,
    pub reason: String,
    /// The promotion the site acted on.
    pub promotion: u64,
    pub at_ms: i64,
}

/// One release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub version: u32,
    pub job_id: String,
    pub round: u32,
    pub model: VersionRecord,
    /// The card's exact bytes (UTF-8 JSON): what `card_sha256` names.
    pub card: String,
    pub card_sha256: String,
    /// Ed25519 signature of the manifest by the signing key (the log's), hex.
    pub signature: String,
    /// Ed25519 signature of the manifest by the release key, hex; empty while it waits
    /// for `models sign` (the key is not on this host) or in a consortium without one.
    #[serde(default)]
    pub release_signature: String,
    /// The `model_release` entry's seq.
    pub audit_seq: u64,
    pub released_ms: i64,
    pub installs: BTreeMap<String, InstallRecord>,
}

impl ReleaseRecord {
    pub fn manifest(&self, consortium: &str) -> Manifest {
        Manifest {
            consortium: consortium.into(),
            version: self.version,
            model_sha256: self.model.digest.clone(),
            model_size: self.model.size,
            layout_digest: self.model.layout_digest.clone(),
            card_sha256: self.card_sha256.clone(),
        }
    }

    /// The release as sites receive it.
    pub fn message(&self, consortium: &str) -> Result<ReleaseMsg> {
        Ok(ReleaseMsg {
            manifest: self.manifest(consortium),
            signature: unhex(&self.signature).context("stored release signature")?,
            release_signature: unhex(&self.release_signature).context("stored release-key signature")?,
            card: self.card.clone().into_bytes(),
            audit_seq: self.audit_seq,
            handovers: Vec::new(),
            log_handovers: Vec::new(),
        })
    }
}

/// A promotion or rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromotionRecord {
    pub id: u64,
    pub version: u32,
    /// `promote` or `rollback`.
    pub action: String,
    pub operator: String,
    pub at_ms: i64,
    /// The release gates the operator overrode to promote (logged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gate_overrides: Vec<GateOverride>,
}

/// A release gate an operator overrode, with the reason given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateOverride {
    pub gate: String,
    /// The card's value (`None`: not measured).
    pub measured: Option<f64>,
    pub threshold: f64,
    pub reason: String,
    /// The `release_gate_overridden` entry.
    pub audit_seq: u64,
}

impl GateOverride {
    /// `measured` as logged: 4 decimals, or `none`.
    pub fn measured_text(&self) -> String {
        self.measured.map_or("none".into(), |m| format!("{m:.4}"))
    }
}

/// An operator's explicit override of the release gates (`--override-gate --reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub reason: String,
}

/// Why `promote` refused: the release fails the consortium's gates.
#[derive(Debug)]
pub struct GatesFailed {
    pub version: u32,
    pub failures: Vec<GateFailure>,
}

impl std::fmt::Display for GatesFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.failures.iter().map(ToString::to_string).collect();
        write!(
            f,
            "release v{} fails the consortium's release gates (release_gates in consortium.json): {}; to promote it \
             anyway, pass --override-gate --reason \"WHY\" (the override is logged in the audit log and shown with \
             the release)",
            self.version,
            list.join("; ")
        )
    }
}

impl std::error::Error for GatesFailed {}

/// The registry's trees in the state database.
#[derive(Debug)]
pub struct Registry {
    db: Db,
    /// Serialises read-modify-write (release creation, promotions, install reports).
    write: std::sync::Mutex<()>,
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("decoding stored {what}"))
}

impl Registry {
    pub fn open(db: &Db) -> Result<Registry> {
        Ok(Registry { db: db.clone(), write: std::sync::Mutex::new(()) })
    }

    pub(crate) fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every release, oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.db.values(Tree::Releases)?.iter().map(|v| decode("release", v)).collect()
    }

    pub fn get(&self, version: u32) -> Result<Option<ReleaseRecord>> {
        self.db
            .get(Tree::Releases, &version.to_be_bytes())
            .context("reading the registry")?
            .map(|v| decode("release", &v))
            .transpose()
    }

    /// Writes a release, durably.
    fn put(&self, r: &ReleaseRecord) -> Result<()> {
        // INVARIANT: plain data always serialises.
        let bytes = serde_json::to_vec(r).expect("a release serialises");
        self.db.commit(vec![Write::put(Tree::Releases, r.version.to_be_bytes(), bytes)]).context("writing the registry")
    }

    /// A release by `3`, `v3`, or a unique prefix (at least 8 hex digits) of its model
    /// digest.
    pub fn find(&self, selector: &str) -> Result<ReleaseRecord> {
        let prefix = match Selector::parse(selector).map_err(|e| anyhow!(e))? {
            Selector::Version(n) => {
                return self.get(n)?.with_context(|| format!("no release v{n} (see `models list`)"));
            }
            Selector::DigestPrefix(p) => p,
        };
        let found: Vec<ReleaseRecord> =
            self.releases()?.into_iter().filter(|r| r.model.digest.starts_with(&prefix)).collect();
        match found.len() {
            1 => Ok(found.into_iter().next().expect("one")),
            0 => bail!("no release has a model digest starting {prefix}"),
            n => bail!("{n} releases have a model digest starting {prefix}; give more digits"),
        }
    }

    pub fn promotions(&self) -> Result<Vec<PromotionRecord>> {
        self.db.values(Tree::Promotions)?.iter().map(|v| decode("promotion", v)).collect()
    }

    /// The stack of current releases (promote pushes, rollback pops); the last is
    /// current.
    fn stack(&self) -> Result<Vec<u32>> {
        let mut stack = Vec::new();
        for p in self.promotions()? {
            match p.action.as_str() {
                "rollback" => {
                    stack.pop();
                }
                _ => stack.push(p.version),
            }
        }
        Ok(stack)
    }

    /// The current release and the promotion that made it current.
    pub fn current(&self) -> Result<Option<(ReleaseRecord, u64)>> {
        let Some(version) = self.stack()?.last().copied() else { return Ok(None) };
        let id = self.db.last(Tree::Promotions).context("reading the registry")?.map_or(0, |(k, _)| key_u64(&k));
        Ok(self.get(version)?.map(|r| (r, id)))
    }

    fn push(
        &self,
        version: u32,
        action: &str,
        operator: &str,
        gate_overrides: Vec<GateOverride>,
    ) -> Result<PromotionRecord> {
        let id = self.db.last(Tree::Promotions).context("reading the registry")?.map_or(0, |(k, _)| key_u64(&k)) + 1;
        let p = PromotionRecord {
            id,
            version,
            action: action.into(),
            operator: operator.into(),
            at_ms: now_ms(),
            gate_overrides,
        };
        // INVARIANT: plain data always serialises.
        let bytes = serde_json::to_vec(&p).expect("a promotion serialises");
        self.db.commit(vec![Write::put(Tree::Promotions, id.to_be_bytes(), bytes)]).context("writing the registry")?;
        Ok(p)
    }

    /// Records what a site reported.
    pub fn record_install(&self, version: u32, site: &str, install: InstallRecord) -> Result<bool> {
        let _g = self.guard();
        let Some(mut r) = self.get(version)? else { return Ok(false) };
        let changed = r.installs.get(site) != Some(&install);
        r.installs.insert(site.into(), install);
        self.put(&r)?;
        Ok(changed)
    }
}

fn key_u64(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 8 {
        b.copy_from_slice(k);
    }
    u64::from_be_bytes(b)
}

/// The model card of `job`'s model of `round`; the crisis flag's threshold is chosen
/// for `target_recall` from that round's summed crisis histograms.
pub fn card(
    consortium: &str,
    version: u32,
    parent: Option<u32>,
    job: &JobRecord,
    round: u32,
    target_recall: f64,
    spent: std::collections::BTreeMap<String, String>,
) -> Result<ModelCard> {
    let labels = &job.spec.labels;
    let rec = job
        .history
        .iter()
        .find(|r| r.round == round)
        .with_context(|| format!("job {} has no round {round}", job.id))?;
    let spec = job.spec.model_spec()?;
    let eval = |rows: &Option<Vec<Vec<u64>>>, by: usize| {
        rows.as_ref().map(|rows| evaluation(labels, rows, u32::try_from(by).unwrap_or(u32::MAX)))
    };
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let sa = &job.spec.secure_aggregation;
    Ok(ModelCard {
        format: CARD_FORMAT.into(),
        consortium: consortium.into(),
        version,
        parent_version: parent,
        model: CardModel {
            sha256: rec.model.digest.clone(),
            size: rec.model.size,
            layout_digest: rec.model.layout_digest.clone(),
            kind: job.spec.model.kind.as_str().into(),
            parameters: spec.layout().numel() as u64,
            labels: labels.clone(),
            encoder: spec.encoder().map(|e| maeum_tlog::release::CardEncoder {
                name: e.name.clone(),
                sha256: e.sha256.clone(),
                tokenizer_sha256: e.tokenizer_sha256.clone(),
                max_tokens: u32::try_from(e.max_tokens).unwrap_or(u32::MAX),
                dim: u32::try_from(e.dim).unwrap_or(u32::MAX),
            }),
            adapter: maeum_protocols::wire::release::card_adapter(&spec),
        },
        job: CardJob {
            id: job.id.clone(),
            name: job.spec.name.clone(),
            spec_sha256: job.spec_sha256.clone(),
            rounds: job.spec.rounds,
            config: serde_json::from_str(&job.spec.to_json()).context("the job's canonical JSON")?,
        },
        round,
        released_ms: now_ms(),
        secure_aggregation: CardSecAgg {
            enabled: sa.enabled(),
            threshold: u32::from(sa.threshold),
            neighbours: u32::from(sa.neighbours),
            clip: sa.clip,
            max_weight: sa.max_weight,
        },
        // The initial evaluation's sites are those of round 1's evaluate-first pass.
        initial_evaluation: eval(&job.initial_evaluation, job.history.first().map_or(0, |r| r.contributors.len())),
        rounds: job
            .history
            .iter()
            .filter(|r| r.round <= round)
            .map(|r| CardRound {
                round: r.round,
                contributors: n(r.contributors.len()),
                dropped: n(r.dropped.len()),
                total_weight: r.total_weight,
                secure_aggregation: r.secure_aggregation,
                secagg_threshold: u32::from(r.secagg_threshold),
                aggregate_sha256: r.aggregate_sha256.clone(),
                model_sha256: r.model.digest.clone(),
                evaluation: eval(&r.evaluation, r.evaluated_by.len()),
            })
            .collect(),
        evaluation: eval(&rec.evaluation, rec.evaluated_by.len()),
        crisis_flag: CardCrisisFlag::choose(
            labels,
            rec.crisis_histogram.as_ref().map(|h| CrisisMeasure {
                point: h.choose_threshold(target_recall).map(|p| (p.threshold, p.recall, p.precision)),
                examples: h.total(),
                crisis_examples: h.crisis.iter().sum(),
            }),
            target_recall,
        ),
        privacy: job.spec.privacy_plan()?.map(|p| maeum_tlog::release::CardPrivacy {
            mechanism: p.mode.mechanism().into(),
            clip: p.clip,
            noise_multiplier: p.noise_multiplier,
            sampling: "poisson".into(),
            sample_rate: p.sample_rate,
            steps_per_round: p.steps_per_round,
            rounds: round,
            delta: p.delta,
            epsilon: p.epsilon_after(round),
            epsilon_per_site: spent,
            noise_shares: p.distributed().map(|m| m.noise_shares),
        }),
    })
}

/// The largest ε each site logged charging for `job_id` in rounds up to `round`
/// (`privacy_charged` entries).
pub fn privacy_spent(
    audit: &crate::audit::AuditLog,
    job_id: &str,
    round: u32,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out: std::collections::BTreeMap<String, (f64, String)> = std::collections::BTreeMap::new();
    for seq in 0..audit.size() {
        if let maeum_tlog::Event::PrivacyCharged { job_id: j, round: r, site, epsilon, .. } = audit.entry(seq)?.event
            && j == job_id
            && r <= round
        {
            let e: f64 = epsilon.parse().unwrap_or(f64::INFINITY);
            if out.get(&site).is_none_or(|(best, _)| e > *best) {
                out.insert(site, (e, epsilon));
            }
        }
    }
    Ok(out.into_iter().map(|(s, (_, e))| (s, e)).collect())
}

/// Releases the model of `job`'s round `round` (idempotent per model: a model already
/// released returns that release). Signs it, logs it, stores it.
pub fn release(c: &Coord, job: &JobRecord, round: u32) -> Result<ReleaseRecord> {
    let reg = &c.registry;
    let _g = reg.guard();
    let rec = job
        .history
        .iter()
        .find(|r| r.round == round)
        .with_context(|| format!("job {} has no round {round}", job.id))?;
    if let Some(existing) = reg.releases()?.into_iter().find(|r| r.model.digest == rec.model.digest) {
        return Ok(existing);
    }
    let settings = c.home.consortium()?;
    let consortium = settings.name;
    let version = reg.releases()?.last().map_or(1, |r| r.version + 1);
    let parent = reg.current()?.map(|(r, _)| r.version);
    let spent = if job.spec.privacy.is_off() { Default::default() } else { privacy_spent(&c.audit, &job.id, round)? };
    let card = card(&consortium, version, parent, job, round, settings.crisis_flag.target_recall, spent)?;
    let bytes = card.encode();
    let card_sha256 = Digest::of(&bytes).hex();
    let mut release = ReleaseRecord {
        version,
        job_id: job.id.clone(),
        round,
        model: rec.model.clone(),
        card: String::from_utf8(bytes).context("the card is UTF-8 JSON")?,
        card_sha256: card_sha256.clone(),
        signature: String::new(),
        release_signature: String::new(),
        audit_seq: 0,
        released_ms: card.released_ms,
        installs: BTreeMap::new(),
    };
    let manifest = release.manifest(&consortium);
    release.signature = hex(&manifest.sign(&c.home.signing_key()?));
    match c.home.release_key()? {
        Some(key) => release.release_signature = hex(&manifest.sign(&key)),
        None => tracing::info!(
            version,
            "release v{version} waits for the release key's signature: `maeum-coordinator models sign {version} --key FILE` \
             where the key is"
        ),
    }
    // Logged first: a crash before the store logs the release twice, never not at all.
    release.audit_seq = c.record_seq(Event::ModelRelease {
        job_id: job.id.clone(),
        round,
        version_sha256: rec.model.digest.clone(),
        card_sha256,
    })?;
    reg.put(&release)?;
    Ok(release)
}

/// The consortium's gates `r` fails now (empty: it passes them).
pub fn gate_failures(c: &Coord, r: &ReleaseRecord) -> Result<Vec<GateFailure>> {
    let gates = c.home.consortium()?.release_gates;
    let card = ModelCard::decode(r.card.as_bytes()).with_context(|| format!("release v{}'s stored card", r.version))?;
    Ok(gates.check(&card))
}

/// Makes `selector` current (logged), if it passes the consortium's release gates
/// (`consortium.json`); a release that fails one is refused with [`GatesFailed`] unless
/// the operator overrides with a reason, which is logged (`release_gate_overridden`,
/// one entry per failed gate) and kept with the promotion.
pub fn promote(
    c: &Coord,
    selector: &str,
    operator: &str,
    gate_override: Option<&Override>,
) -> Result<(ReleaseRecord, PromotionRecord)> {
    let reg = &c.registry;
    let _g = reg.guard();
    let mut r = reg.find(selector)?;
    // A stored signature that does not verify (a tampered or forged record) counts as
    // none: the coordinator promotes only what the release key signed.
    let signed = release_key_signed(&c.home, &r)?.unwrap_or(true);
    if !signed {
        if crate::attack::current() == Some(crate::attack::Attack::ForgeRelease) {
            // The attack: what a host without the release key can make.
            let consortium = c.home.consortium()?.name;
            r.release_signature = hex(&r.manifest(&consortium).sign(&c.home.signing_key()?));
            reg.put(&r)?;
        } else {
            c.record(Event::OperatorCommand {
                operator: operator.into(),
                command: format!("models promote v{}", r.version),
                result: "refused: not signed with the release key".into(),
            })?;
            return Err(Unsigned { version: r.version }.into());
        }
    }
    let failures = gate_failures(c, &r)?;
    let mut overrides = Vec::new();
    if !failures.is_empty() {
        let Some(o) = gate_override else {
            let refused = GatesFailed { version: r.version, failures };
            c.record(Event::OperatorCommand {
                operator: operator.into(),
                command: format!("models promote v{}", r.version),
                result: format!(
                    "refused: fails {}",
                    refused.failures.iter().map(|f| f.gate.as_str()).collect::<Vec<_>>().join(", ")
                ),
            })?;
            return Err(refused.into());
        };
        for f in failures {
            let mut g = GateOverride {
                gate: f.gate.clone(),
                measured: f.measured,
                threshold: f.threshold,
                reason: o.reason.clone(),
                audit_seq: 0,
            };
            g.audit_seq = c.record_seq(Event::ReleaseGateOverridden {
                version_sha256: r.model.digest.clone(),
                gate: f.gate,
                measured: g.measured_text(),
                threshold: format!("{:.4}", f.threshold),
                operator: operator.into(),
                reason: o.reason.clone(),
            })?;
            overrides.push(g);
        }
    }
    c.record(Event::ReleasePromoted { version_sha256: r.model.digest.clone(), operator: operator.into() })?;
    c.record(Event::OperatorCommand {
        operator: operator.into(),
        command: format!("models promote v{}{}", r.version, if overrides.is_empty() { "" } else { " --override-gate" }),
        result: format!("v{} is current", r.version),
    })?;
    let p = reg.push(r.version, "promote", operator, overrides)?;
    c.audit.checkpoint()?;
    Ok((r, p))
}

/// Whether `r`'s stored release-key signature verifies under the consortium's current
/// release key (`None`: the consortium has none). A signature that does not verify (a
/// tampered or forged record, or one by a rotated-out key) counts as none.
pub fn release_key_signed(home: &crate::home::Home, r: &ReleaseRecord) -> Result<Option<bool>> {
    let Some((_, key)) = home.release_verify_key()? else { return Ok(None) };
    let sig = unhex(&r.release_signature).unwrap_or_default();
    Ok(Some(!sig.is_empty() && r.manifest(&home.consortium()?.name).verify(&key, &sig).is_ok()))
}

/// A promotion refused: the release waits for the release key's signature.
#[derive(Debug, thiserror::Error)]
#[error(
    "release v{version} is not signed with the consortium's release key, which is not on this host: run \
     `maeum-coordinator models sign {version} --key FILE` where the key is, then promote it"
)]
pub struct Unsigned {
    pub version: u32,
}

/// A release-key signature `sign_release` refused (the reason is for the operator).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SignatureRefused(pub String);

/// `models sign`: stores the release key's `signature` on release `selector` once it
/// verifies under the current release key (`crate::release_key`; logged as an operator
/// command). The key itself
/// never reaches the coordinator.
pub fn sign_release(c: &Coord, selector: &str, signature: &[u8], operator: &str) -> Result<ReleaseRecord> {
    let reg = &c.registry;
    let _g = reg.guard();
    let mut r = reg.find(selector)?;
    let (public, key) = c.home.release_verify_key()?.ok_or_else(|| {
        SignatureRefused(
            "this consortium has no release key (HOME/release.pub); its releases need no second signature".into(),
        )
    })?;
    let consortium = c.home.consortium()?.name;
    if let Err(e) = r.manifest(&consortium).verify(&key, signature) {
        return Err(SignatureRefused(format!(
            "the signature on release v{} does not verify under the consortium's release key {}… ({e}); sign with \
             the current release key (`maeum-coordinator release-key show`)",
            r.version,
            &public[..16.min(public.len())]
        ))
        .into());
    }
    r.release_signature = hex(signature);
    reg.put(&r)?;
    c.record(Event::OperatorCommand {
        operator: operator.into(),
        command: format!("models sign v{}", r.version),
        result: "signed with the release key".into(),
    })?;
    Ok(r)
}

/// Makes the release that was current before the current one current again (logged).
pub fn rollback(c: &Coord, operator: &str) -> Result<(ReleaseRecord, PromotionRecord)> {
    let reg = &c.registry;
    let _g = reg.guard();
    let stack = reg.stack()?;
    let [.., before, now] = stack.as_slice() else {
        bail!("nothing to roll back to: {} release(s) promoted so far", stack.len());
    };
    let r = reg.get(*before)?.with_context(|| format!("release v{before} vanished"))?;
    c.record(Event::ReleasePromoted { version_sha256: r.model.digest.clone(), operator: operator.into() })?;
    c.record(Event::OperatorCommand {
        operator: operator.into(),
        command: "models rollback".into(),
        result: format!("v{now} withdrawn; v{} is current again", r.version),
    })?;
    let p = reg.push(r.version, "rollback", operator, Vec::new())?;
    c.audit.checkpoint()?;
    Ok((r, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u32, digest: &str) -> ReleaseRecord {
        ReleaseRecord {
            version,
            job_id: "j-1".into(),
            round: 1,
            model: VersionRecord { digest: digest.into(), size: 1, layout_digest: "00".repeat(32) },
            card: "{}".into(),
            card_sha256: "11".repeat(32),
            signature: "22".repeat(64),
            release_signature: String::new(),
            audit_seq: 3,
            released_ms: 0,
            installs: BTreeMap::new(),
        }
    }

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("state"), crate::storage::Engine::Sled).expect("db");
        let reg = Registry::open(&db).expect("registry");
        (dir, reg)
    }

    #[test]
    fn releases_are_found_by_number_or_digest_prefix() {
        let (_d, reg) = registry();
        reg.put(&record(1, &"ab".repeat(32))).expect("put");
        reg.put(&record(2, &format!("abcd{}", "00".repeat(30)))).expect("put");
        assert_eq!(reg.find("2").expect("by number").version, 2);
        assert_eq!(reg.find("v1").expect("by v-number").version, 1);
        assert_eq!(reg.find("ABABABAB").expect("by prefix").version, 1);
        let e = reg.find("v9").expect_err("missing");
        assert!(e.to_string().contains("no release v9"), "{e}");
        let e = reg.find("abcd").expect_err("too short");
        assert!(e.to_string().contains("8+ hex digits"), "{e}");
    }

    #[test]
    fn promotions_form_a_stack_that_rollback_pops() {
        let (_d, reg) = registry();
        for v in 1..=3 {
            reg.put(&record(v, &format!("{v:02}").repeat(32))).expect("put");
        }
        assert!(reg.current().expect("current").is_none(), "nothing is current before a promotion");
        reg.push(1, "promote", "lead", Vec::new()).expect("push");
        reg.push(2, "promote", "lead", Vec::new()).expect("push");
        reg.push(3, "promote", "lead", Vec::new()).expect("push");
        assert_eq!(reg.current().expect("current").map(|(r, p)| (r.version, p)), Some((3, 3)));
        // A rollback pops to what was current before; a second one pops again.
        reg.push(2, "rollback", "lead", Vec::new()).expect("push");
        assert_eq!(reg.stack().expect("stack"), vec![1, 2]);
        assert_eq!(reg.current().expect("current").map(|(r, p)| (r.version, p)), Some((2, 4)));
        reg.push(1, "rollback", "lead", Vec::new()).expect("push");
        assert_eq!(reg.stack().expect("stack"), vec![1]);
        assert_eq!(reg.promotions().expect("history").len(), 5);
        // Promotions stored before gate overrides existed still decode.
        let old: PromotionRecord =
            decode("promotion", br#"{"id":1,"version":1,"action":"promote","operator":"lead","at_ms":0}"#)
                .expect("old promotion");
        assert!(old.gate_overrides.is_empty());
    }

    #[test]
    fn install_reports_are_kept_per_site() {
        let (_d, reg) = registry();
        reg.put(&record(1, &"ab".repeat(32))).expect("put");
        let refused = InstallRecord { installed: false, reason: "bad signature".into(), promotion: 1, at_ms: 5 };
        assert!(reg.record_install(1, "site-a", refused.clone()).expect("record"));
        assert!(!reg.record_install(1, "site-a", refused).expect("same again"));
        let ok = InstallRecord { installed: true, reason: String::new(), promotion: 2, at_ms: 6 };
        assert!(reg.record_install(1, "site-a", ok.clone()).expect("record"));
        assert_eq!(reg.get(1).expect("get").expect("release").installs.get("site-a"), Some(&ok));
        assert!(!reg.record_install(7, "site-a", ok).expect("unknown release"));
    }
}
