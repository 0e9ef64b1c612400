//! `maeum-coordinator models …`: the operator's view of the model registry (list,
//! show, promote, rollback) and `models export`, which writes a release for people and
//! other tools:
//!
//! ```text
//! OUT/model-vN.safetensors   the model (its SHA-256 is the release's model digest)
//! OUT/card-vN.json           the model card, byte for byte as signed
//! OUT/card-vN.md             the same card for people
//! OUT/release-vN.json        manifest, signature, signing key, audit-log entry seq
//! OUT/curve-vN.svg           accuracy and macro-F1 per round
//! OUT/report-vN.html         the card for people in a browser: charts, confusion heat
//!                            map, crisis flag, standing (self-contained, no network)
//! OUT/model-vN.torch.safetensors   with `--layout torch`: the same weights in PyTorch's
//!                            layout (linear weights (out, in); docs/models.md)
//! ```
//!
//! Export verifies the signature (HOME/signing.pub), the card digest and the model
//! digest before it writes anything, so what lands in OUT is what the consortium
//! signed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use maeum_models::model::ModelSpec;
use maeum_protocols::wire::Digest;
use maeum_protocols::wire::pb;
use maeum_protocols::wire::release::ReleaseMsg;
use maeum_tlog::release::{CardEvaluation, ModelCard, ReleaseFile, check_card, crisis_recall};
use maeum_tlog::{rfc3339, unhex32};

use crate::client::connect;
use crate::home::{Home, write_file};
use maeum_protocols::wire::pb::control_client::ControlClient;
use tonic::transport::Channel;

/// A release as the CLI shows it.
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    pub version: u32,
    pub current: bool,
    pub model_sha256: String,
    pub model_size: u64,
    pub card_sha256: String,
    pub job_id: String,
    pub round: u32,
    pub released: String,
    pub audit_seq: u64,
    pub accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    /// The lowest recall among the crisis classes (federated evaluation).
    pub crisis_recall: Option<f64>,
    pub installs: Vec<InstallView>,
    /// The consortium's release gates this release fails now (empty: it passes).
    pub gate_failures: Vec<String>,
    /// Gates a lead overrode to promote it, with the reasons.
    pub gate_overrides: Vec<OverrideView>,
    /// Whether it carries the release key's signature (`models sign`; sites pinned to
    /// the key install nothing without it).
    pub release_key_signed: bool,
    pub card: Option<ModelCard>,
}

/// A gate overridden at a promotion.
#[derive(Debug, Clone, Serialize)]
pub struct OverrideView {
    pub gate: String,
    pub measured: String,
    pub threshold: String,
    pub operator: String,
    pub reason: String,
    pub at: String,
    pub audit_seq: u64,
}

impl From<&pb::GateOverride> for OverrideView {
    fn from(g: &pb::GateOverride) -> Self {
        Self {
            gate: g.gate.clone(),
            measured: g.measured.clone(),
            threshold: g.threshold.clone(),
            operator: g.operator.clone(),
            reason: g.reason.clone(),
            at: rfc3339(g.at_ms),
            audit_seq: g.audit_seq,
        }
    }
}

impl std::fmt::Display for OverrideView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gate {} OVERRIDDEN by {} at {} (measured {}, threshold {}): {:?} (audit-log entry #{})",
            self.gate, self.operator, self.at, self.measured, self.threshold, self.reason, self.audit_seq
        )
    }
}

/// What a site reported.
#[derive(Debug, Serialize)]
pub struct InstallView {
    pub site: String,
    pub installed: bool,
    pub reason: String,
    pub at: String,
}

fn view(info: &pb::ReleaseInfo, with_card: bool) -> Result<ReleaseView> {
    let r = ReleaseMsg::from_pb(info.release.clone().context("the coordinator sent a release without its body")?)?;
    let card = ModelCard::decode(&r.card).ok();
    let eval = card.as_ref().and_then(|c| c.evaluation.as_ref());
    Ok(ReleaseView {
        version: r.manifest.version,
        current: info.current,
        model_sha256: r.manifest.model_sha256.clone(),
        model_size: r.manifest.model_size,
        card_sha256: r.manifest.card_sha256.clone(),
        job_id: info.job_id.clone(),
        round: info.round,
        released: rfc3339(info.released_ms),
        audit_seq: r.audit_seq,
        accuracy: eval.map(|e| e.accuracy),
        macro_f1: eval.map(|e| e.macro_f1),
        crisis_recall: eval.and_then(crisis_recall),
        gate_failures: info.gate_failures.clone(),
        gate_overrides: info.gate_overrides.iter().map(OverrideView::from).collect(),
        release_key_signed: info.release_key_signed,
        installs: info
            .installs
            .iter()
            .map(|i| InstallView {
                site: i.site_id.clone(),
                installed: i.installed,
                reason: i.reason.clone(),
                at: rfc3339(i.at_ms),
            })
            .collect(),
        card: if with_card { card } else { None },
    })
}

fn score(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// `models list`.
pub async fn list(home: &Path, json: bool) -> Result<()> {
    let list = connect(home).await?.list_releases(pb::ListReleasesRequest {}).await?.into_inner();
    let views: Vec<ReleaseView> = list.releases.iter().map(|r| view(r, false)).collect::<Result<_>>()?;
    if json {
        let promotions: Vec<serde_json::Value> = list
            .promotions
            .iter()
            .map(|p| {
                serde_json::json!({"id": p.id, "version": p.version, "action": p.action,
                    "operator": p.operator, "at": rfc3339(p.at_ms)})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"current": (list.current > 0).then_some(list.current), "releases": views, "promotions": promotions})
        );
        return Ok(());
    }
    if views.is_empty() {
        println!("no releases yet: a job releases its final model when it completes");
        return Ok(());
    }
    println!("{}", releases_table(&views));
    match list.current {
        0 => println!("no release is current yet: `maeum-coordinator models promote VERSION`"),
        n => println!("* current: v{n} (sites install it and keep it in service)"),
    }
    Ok(())
}

/// `models list` for people: `*` marks the current release.
fn releases_table(views: &[ReleaseView]) -> comfy_table::Table {
    let mut t = maeum_runtime::table::table(
        &["", "ver", "model", "job", "round", "accuracy", "macro-F1", "crisis recall", "gates", "installed"],
        &[4, 5, 6, 7],
    );
    for v in views {
        let ok = v.installs.iter().filter(|i| i.installed).count();
        let refused = v.installs.iter().filter(|i| !i.installed).count();
        t.add_row(vec![
            if v.current { "*" } else { "" }.to_string(),
            format!("v{}{}", v.version, if v.release_key_signed { "" } else { " (unsigned)" }),
            v.model_sha256[..12.min(v.model_sha256.len())].to_string(),
            v.job_id.clone(),
            v.round.to_string(),
            score(v.accuracy),
            score(v.macro_f1),
            score(v.crisis_recall),
            match (v.gate_failures.len(), v.gate_overrides.len()) {
                (0, _) => "pass".to_string(),
                (n, 0) => format!("FAIL {n}"),
                (n, _) => format!("FAIL {n}, overridden"),
            },
            format!("{ok} site(s){}", if refused > 0 { format!(", {refused} REFUSED") } else { String::new() }),
        ]);
    }
    t
}

/// `models show VERSION`.
pub async fn show(home: &Path, version: &str, json: bool) -> Result<()> {
    let info =
        connect(home).await?.get_release_info(pb::ReleaseSelector { version: version.into() }).await?.into_inner();
    let v = view(&info, true)?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("release v{}{}", v.version, if v.current { " (current)" } else { "" });
    println!("  model      {} ({} bytes)", v.model_sha256, v.model_size);
    println!("  card       {}", v.card_sha256);
    println!("  from       job {} round {}", v.job_id, v.round);
    println!("  released   {}   audit-log entry #{} (model_release)", v.released, v.audit_seq);
    match (v.release_key_signed, Home::new(home).release_public()?) {
        (true, _) => println!("  signed     by the log key and the release key"),
        (false, Some(_)) => println!(
            "  signed     by the log key only: it waits for the release key (`maeum-coordinator models sign {}`)",
            v.version
        ),
        (false, None) => println!("  signed     by the log key (this consortium has no release key)"),
    }
    if let Some(card) = &v.card {
        if let Some(p) = card.parent_version {
            println!("  parent     v{p}");
        }
        println!("  kind       {} ({} parameters)", card.model.kind, card.model.parameters);
        if let Some(e) = &card.model.encoder {
            println!(
                "  encoder    {} (weights {}, tokenizer {}, {} tokens)",
                e.name, e.sha256, e.tokenizer_sha256, e.max_tokens
            );
        }
        if let Some(a) = &card.model.adapter {
            println!("  adapters   {a}");
        }
        print_eval("evaluation", card.evaluation.as_ref());
        if let Some(f) = &card.crisis_flag {
            println!("  crisis     {}", crisis_flag_line(f));
        }
        if let Some(p) = &card.privacy {
            println!("  privacy    {}", privacy_line(p));
        }
    }
    if v.gate_failures.is_empty() {
        println!("  gates      passes the consortium's release gates");
    }
    for g in &v.gate_failures {
        println!("  gates      FAILS {g}");
    }
    for o in &v.gate_overrides {
        println!("  override   {o}");
    }
    if v.installs.is_empty() {
        println!("  sites      none has reported on this release yet");
    }
    for i in &v.installs {
        if i.installed {
            println!("  site {:<16} installed and verified ({})", i.site, i.at);
        } else {
            println!("  site {:<16} REFUSED ({}): {}", i.site, i.at, i.reason);
        }
    }
    Ok(())
}

fn print_eval(what: &str, e: Option<&CardEvaluation>) {
    let Some(e) = e else {
        println!("  {what} none recorded");
        return;
    };
    println!(
        "  {what} accuracy {:.4}  macro-F1 {:.4}  ({} held-out examples at {} sites)",
        e.accuracy, e.macro_f1, e.examples, e.evaluated_by
    );
    let parts: Vec<String> = e
        .recall
        .iter()
        .map(|c| format!("{}{} {}", c.label, if c.crisis { " (crisis)" } else { "" }, score(c.recall)))
        .collect();
    println!("  recall     {}", parts.join(", "));
}

/// The crisis flag of a card, in one line.
/// The card's differential-privacy claim in one line.
fn privacy_line(p: &maeum_tlog::release::CardPrivacy) -> String {
    let shares = p
        .noise_shares
        .map_or(String::new(), |m| format!("; the noise split among ≥ {m} honest sites under secure aggregation"));
    format!(
        "{}: ε = {:.3} per record per site at δ = {:e} after {} rounds (clip {}, noise multiplier {:.4}, {} sampling at \
         {}, {} steps a round{shares})",
        p.mechanism,
        p.epsilon,
        p.delta,
        p.rounds,
        p.clip,
        p.noise_multiplier,
        p.sampling,
        p.sample_rate,
        p.steps_per_round
    )
}

fn crisis_flag_line(f: &maeum_tlog::release::CardCrisisFlag) -> String {
    match f.threshold {
        Some(t) => format!(
            "flag at probability >= {t:.2} ({}): recall {} precision {} on {} held-out examples ({} crisis), target \
             recall {:.2}",
            f.classes.join(", "),
            score(f.recall),
            score(f.precision),
            f.examples,
            f.crisis_examples,
            f.target_recall
        ),
        None => format!(
            "no flag threshold could be chosen ({}: no held-out crisis examples were reported); sites use their \
             own or the fallback",
            f.classes.join(", ")
        ),
    }
}

/// `models promote VERSION [--override-gate --reason WHY]`.
pub async fn promote(home: &Path, version: &str, override_reason: Option<&str>, json: bool) -> Result<()> {
    let req = pb::PromoteRequest {
        version: version.into(),
        override_gate: override_reason.is_some(),
        reason: override_reason.unwrap_or_default().into(),
    };
    let info = connect(home).await?.promote_release(req).await?;
    let v = view(&info.into_inner(), false)?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("v{} is now the current release; sites verify and install it next", v.version);
        for o in v.gate_overrides.iter().filter(|o| o.reason == override_reason.unwrap_or_default().trim()) {
            println!("  {o}");
        }
    }
    Ok(())
}

/// `models sign VERSION --key FILE`: signs a release with the release key in FILE (run
/// where the key is; only the signature goes to the coordinator, which checks it under
/// the current release key). The manifest is built from what the coordinator serves sites,
/// and its card digest is checked against the card before anything is signed.
pub async fn sign(home: &Path, version: &str, key: &Path, json: bool) -> Result<()> {
    let pair = crate::release_key::read_key(key)?;
    let mut client = connect(home).await?;
    let (msg, card, signed) = sign_with(&mut client, version, &pair).await?;
    let v = view(&signed, false)?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let m = &msg.manifest;
        println!(
            "signed release v{} (job {} round {}, model {}…, card {}…) with the release key {}…; promote it with \
             `maeum-coordinator models promote {}`",
            m.version,
            card.job.id,
            card.round,
            &m.model_sha256[..16],
            &m.card_sha256[..16],
            &maeum_tlog::hex(ring::signature::KeyPair::public_key(&pair).as_ref())[..16],
            m.version
        );
    }
    Ok(())
}

/// Signs release `version` with `pair` (its card checked against the manifest first)
/// and sends only the signature (`Control.SignRelease`).
pub async fn sign_with(
    client: &mut ControlClient<Channel>,
    version: &str,
    pair: &ring::signature::Ed25519KeyPair,
) -> Result<(ReleaseMsg, ModelCard, pb::ReleaseInfo)> {
    let info = client.get_release_info(pb::ReleaseSelector { version: version.into() }).await?.into_inner();
    let msg = ReleaseMsg::from_pb(info.release.context("the coordinator sent no release")?)?;
    let card = check_card(&msg.manifest, &msg.card).context("the release's card does not match its manifest")?;
    let signature = msg.manifest.sign(pair);
    let req = pb::SignReleaseRequest { version: version.into(), release_signature: signature };
    let signed = client.sign_release(req).await?.into_inner();
    Ok((msg, card, signed))
}

/// `models rollback`.
pub async fn rollback(home: &Path, json: bool) -> Result<()> {
    let info = connect(home).await?.rollback_release(pb::RollbackRequest {}).await?;
    let v = view(&info.into_inner(), false)?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("rolled back: v{} is the current release again; sites return to it next", v.version);
    }
    Ok(())
}

/// What `models export` wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub version: u32,
    pub files: Vec<PathBuf>,
}

/// How `models export` lays out the weights besides the signed model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportLayout {
    /// Only the signed model file: burn's layout, linear weights (in, out).
    Burn,
    /// Also model-vN.torch.safetensors: linear weights (out, in) as torch.nn.Linear.
    Torch,
}

/// `models export VERSION --out DIR [--layout torch]`.
pub async fn export(home: &Path, version: &str, out: &Path, layout: ExportLayout, json: bool) -> Result<()> {
    let mut client = connect(home).await?;
    let info = client.get_release_info(pb::ReleaseSelector { version: version.into() }).await?.into_inner();
    let r = ReleaseMsg::from_pb(info.release.clone().context("the coordinator sent a release without its body")?)?;
    let mut stream = client.export_model(pb::ReleaseSelector { version: version.into() }).await?.into_inner();
    let mut blob = Vec::new();
    while let Some(piece) = stream.message().await? {
        blob.extend_from_slice(&piece.data);
    }
    // Signed by the log key of its day: the one in use or one it replaced.
    let current = unhex32(Home::new(home).read("signing.pub")?.trim()).context("HOME/signing.pub")?;
    let retired = Home::new(home).retired_log_keys()?;
    let key = std::iter::once(current)
        .chain(retired)
        .find(|k| r.manifest.verify(k, &r.signature).is_ok())
        .context("checking the release before export: its signature verifies under none of the log's keys")?;
    let release_key = match r.release_signature.is_empty() {
        true => None,
        false => Some(crate::release_key::signer(&Home::new(home), &r).context("checking the release before export")?),
    };
    let card = check_card(&r.manifest, &r.card).context("checking the release before export")?;
    r.manifest.check_blob(&Digest::of(&blob).0).context("checking the release before export")?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let n = r.manifest.version;
    let path = |name: String| out.join(name);
    let torch = match layout {
        ExportLayout::Burn => None,
        ExportLayout::Torch => {
            let name = PathBuf::from(format!("model-v{n}.safetensors"));
            let (spec, params, _) = ModelSpec::from_bytes(&blob, &name).context("reading the release's model")?;
            let extra = HashMap::from([
                ("maeum.release.version".to_string(), n.to_string()),
                ("maeum.release.model_sha256".to_string(), r.manifest.model_sha256.clone()),
            ]);
            Some(spec.to_torch_safetensors(&params, extra).context("converting the model to the torch layout")?)
        }
    };
    let mut files = vec![
        (path(format!("model-v{n}.safetensors")), blob),
        (path(format!("card-v{n}.json")), r.card.clone()),
        (path(format!("card-v{n}.md")), card_markdown(&card, &r, &view(&info, false)?.gate_overrides).into_bytes()),
        (
            path(format!("release-v{n}.json")),
            ReleaseFile::new(r.manifest.clone(), &r.signature, &key, r.audit_seq)
                .with_release_key(&r.release_signature, release_key.as_deref().unwrap_or(""))
                .encode(),
        ),
        (path(format!("curve-v{n}.svg")), curve_svg(&card).into_bytes()),
        (path(format!("report-v{n}.html")), report_html(&card, &r, &view(&info, false)?).into_bytes()),
    ];
    if let Some(bytes) = torch {
        files.push((path(format!("model-v{n}.torch.safetensors")), bytes));
    }
    for (p, bytes) in &files {
        write_file(p, bytes, false)?;
    }
    let report = Exported { version: n, files: files.into_iter().map(|(p, _)| p).collect() };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("release v{n} verified (signature, card digest, model digest) and exported:");
        for f in &report.files {
            println!("  {}", f.display());
        }
    }
    Ok(())
}

/// The card for people, as one self-contained HTML page (`maeum_report`).
fn report_html(card: &ModelCard, r: &ReleaseMsg, v: &ReleaseView) -> String {
    let standing = maeum_report::card::Standing {
        signature: Some(Ok(
            "checked by `models export` under HOME/signing.pub; the card and model digests match".into()
        )),
        logged: Some(Ok(format!(
            "entry #{} (as the coordinator states; `maeum-audit release` checks it against a log export)",
            r.audit_seq
        ))),
        current: v.current,
        history: Vec::new(),
        overrides: v
            .gate_overrides
            .iter()
            .map(|o| (o.gate.clone(), o.measured.clone(), o.threshold.clone(), o.operator.clone(), o.reason.clone()))
            .collect(),
        gate_failures: v.gate_failures.clone(),
        installs: v.installs.iter().map(|i| (i.site.clone(), i.installed, i.reason.clone())).collect(),
    };
    maeum_report::Page {
        title: &format!("Release v{} of {}", card.version, card.consortium),
        subtitle: &format!("Model card of job {} ({}), round {}", card.job.name, card.job.id, card.round),
        nav: &[],
        current: "",
        live: false,
        generated_ms: maeum_runtime::runtime::now_ms(),
        generator: concat!("maeum-coordinator ", env!("CARGO_PKG_VERSION")),
        body: maeum_report::card::render(card, &standing),
    }
    .render()
}

/// The card for people (Markdown).
/// `overrides` are the gates a lead overrode to promote it (not part of the signed card:
/// they happen after the release, and are logged in the audit log).
pub fn card_markdown(card: &ModelCard, r: &ReleaseMsg, overrides: &[OverrideView]) -> String {
    let mut md = String::new();
    let m = &card.model;
    let _ = writeln!(md, "# Model card: {} release v{}\n", card.consortium, card.version);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| Version | v{}{} |",
        card.version,
        card.parent_version.map_or(String::new(), |p| format!(" (supersedes v{p})"))
    );
    let _ = writeln!(md, "| Model | `{}` ({} bytes, safetensors) |", m.sha256, m.size);
    let _ =
        writeln!(md, "| Architecture | {} with {} parameters; layout `{}` |", m.kind, m.parameters, m.layout_digest);
    let _ = writeln!(md, "| Labels | {} |", m.labels.join(", "));
    let _ = writeln!(
        md,
        "| Origin | job `{}` ({}), round {} of {} |",
        card.job.id, card.job.name, card.round, card.job.rounds
    );
    let _ = writeln!(md, "| Job file SHA-256 | `{}` |", card.job.spec_sha256);
    let _ = writeln!(md, "| Released | {} |", rfc3339(card.released_ms));
    let _ = writeln!(md, "| Audit log | entry #{} (`model_release`, names the model and card digests) |", r.audit_seq);
    let _ = writeln!(md, "| Card SHA-256 | `{}` (signed with the consortium key) |", r.manifest.card_sha256);
    let sa = &card.secure_aggregation;
    let _ = writeln!(
        md,
        "| Secure aggregation | {} (threshold {}, neighbours {}, clip {}, max weight {}) |\n",
        if sa.enabled { "on" } else { "OFF (debugging job)" },
        if sa.threshold == 0 { "default rule".to_string() } else { sa.threshold.to_string() },
        if sa.neighbours == 0 { "all pairs".to_string() } else { sa.neighbours.to_string() },
        sa.clip,
        sa.max_weight
    );
    let _ = writeln!(md, "## Federated evaluation of this model\n");
    match &card.evaluation {
        Some(e) => {
            let _ = writeln!(
                md,
                "Held-out splits at {} sites, {} examples: accuracy **{:.4}**, macro-F1 **{:.4}**.\n",
                e.evaluated_by, e.examples, e.accuracy, e.macro_f1
            );
            let _ = writeln!(md, "| Class | Recall | |\n|---|---:|---|");
            for c in &e.recall {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    c.label,
                    score(c.recall),
                    if c.crisis { "crisis class" } else { "" }
                );
            }
        }
        None => {
            let _ = writeln!(md, "No federated evaluation was recorded for this model.");
        }
    }
    let _ = writeln!(md, "\n## Differential privacy\n");
    match &card.privacy {
        Some(p) => {
            let _ = writeln!(md, "{}.\n", privacy_line(p));
            let _ = writeln!(md, "| Site | ε charged to its ledger (as logged) |\n|---|---:|");
            for (site, e) in &p.epsilon_per_site {
                let _ = writeln!(md, "| {site} | {e} |");
            }
        }
        None => {
            let _ = writeln!(
                md,
                "None: this model was trained without differential privacy; it carries no per-record guarantee."
            );
        }
    }
    if let Some(f) = &card.crisis_flag {
        let _ = writeln!(md, "\n## Crisis flag\n");
        let _ = writeln!(
            md,
            "`maeum-site predict` flags an input for review when any crisis class ({}) has a probability at or \
             above the threshold, whatever the top label.\n",
            f.classes.join(", ")
        );
        match f.threshold {
            Some(t) => {
                let _ = writeln!(
                    md,
                    "| Threshold | Recall | Precision | Target recall | Held-out examples (crisis) |\n|---:|---:|---:|---:|---:|\n| {t:.2} | {} | {} | {:.2} | {} ({}) |",
                    score(f.recall),
                    score(f.precision),
                    f.target_recall,
                    f.examples,
                    f.crisis_examples
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "No threshold could be chosen: the sites reported no held-out crisis example. Sites use their own \
                     `[predict] crisis_threshold` or the fallback (see the site admin guide)."
                );
            }
        }
    }
    if !overrides.is_empty() {
        let _ = writeln!(md, "\n## Release gates overridden\n");
        let _ = writeln!(
            md,
            "This release failed the consortium's release gates and was promoted with an explicit override (logged \
             in the audit log):\n"
        );
        let _ = writeln!(
            md,
            "| Gate | Measured | Threshold | By | When | Reason | Audit entry |\n|---|---:|---:|---|---|---|---:|"
        );
        for o in overrides {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | #{} |",
                o.gate,
                o.measured,
                o.threshold,
                o.operator,
                o.at,
                o.reason.replace('|', "\\|"),
                o.audit_seq
            );
        }
    }
    let _ = writeln!(md, "\n## Rounds\n\n![accuracy and macro-F1 per round](curve-v{}.svg)\n", card.version);
    let _ = writeln!(
        md,
        "| Round | Sites | Dropped | Examples | Secure agg. (t) | Accuracy | Macro-F1 |\n|---:|---:|---:|---:|---|---:|---:|"
    );
    if let Some(e) = &card.initial_evaluation {
        let _ = writeln!(md, "| 0 (initial) | | | | | {:.4} | {:.4} |", e.accuracy, e.macro_f1);
    }
    for rd in &card.rounds {
        let e = rd.evaluation.as_ref();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            rd.round,
            rd.contributors,
            rd.dropped,
            rd.total_weight,
            if rd.secure_aggregation { format!("yes ({})", rd.secagg_threshold) } else { "no".into() },
            score(e.map(|e| e.accuracy)),
            score(e.map(|e| e.macro_f1))
        );
    }
    let _ = writeln!(
        md,
        "\n## Training configuration\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&card.job.config).unwrap_or_default()
    );
    let _ = writeln!(
        md,
        "\n## Use and limits\n\nA screening aid for trained staff, not a diagnosis. Check the recall of the crisis \
         class above before use, and check the model on your own held-out records with \
         `maeum-site predict --file` (it reproduces a site's reported metrics). Sites install this model \
         only after verifying the signature, both digests and the audit-log entry."
    );
    md
}

/// Accuracy and macro-F1 per round as an SVG line chart (round 0 = the initial model).
pub fn curve_svg(card: &ModelCard) -> String {
    let mut points: Vec<(u32, f64, f64)> = Vec::new();
    if let Some(e) = &card.initial_evaluation {
        points.push((0, e.accuracy, e.macro_f1));
    }
    for r in &card.rounds {
        if let Some(e) = &r.evaluation {
            points.push((r.round, e.accuracy, e.macro_f1));
        }
    }
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 56.0, 24.0, 40.0, 48.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_round = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let x = |r: u32| left + pw * f64::from(r) / f64::from(max_round);
    let y = |v: f64| top + ph * (1.0 - v.clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="14">{} v{}: federated evaluation per round</text>"#,
        xml(&card.consortium),
        card.version
    );
    for i in 0..=5 {
        let v = f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{v:.1}</text>"##,
            y = y(v),
            x2 = left + pw,
            tx = left - 6.0,
            ty = y(v) + 4.0
        );
    }
    let step = (max_round / 10).max(1);
    for r in (0..=max_round).step_by(step as usize) {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{r}</text>"#, x(r), top + ph + 18.0);
    }
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#, left + pw / 2.0, h - 8.0);
    for (name, colour, pick) in [("accuracy", "#1f77b4", 0usize), ("macro-F1", "#d62728", 1)] {
        let value = |p: &(u32, f64, f64)| if pick == 0 { p.1 } else { p.2 };
        let line: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(value(p)))).collect();
        if !line.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                line.join(" ")
            );
        }
        for p in &points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>round {} {name} {:.4}</title></circle>"#,
                x(p.0),
                y(value(p)),
                p.0,
                value(p)
            );
        }
        let ly = if pick == 0 { top + 14.0 } else { top + 30.0 };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{lx2}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{tx}" y="{ty}">{name}</text>"#,
            lx = left + pw - 110.0,
            lx2 = left + pw - 90.0,
            tx = left + pw - 84.0,
            ty = ly + 4.0
        );
    }
    if points.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no evaluation recorded</text>"#,
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_tlog::release::{CARD_FORMAT, CardJob, CardModel, CardRound, CardSecAgg, Manifest, evaluation};

    #[test]
    fn the_release_table_aligns() {
        let v = |version: u32, current: bool, job: &str, refused: bool| ReleaseView {
            version,
            current,
            model_sha256: "ab".repeat(32),
            model_size: 1,
            card_sha256: String::new(),
            job_id: job.into(),
            round: version * 7,
            released: String::new(),
            audit_seq: 1,
            accuracy: Some(0.5),
            macro_f1: None,
            crisis_recall: Some(0.25),
            gate_failures: Vec::new(),
            gate_overrides: Vec::new(),
            release_key_signed: version != 12,
            installs: vec![InstallView {
                site: "s".into(),
                installed: !refused,
                reason: String::new(),
                at: String::new(),
            }],
            card: None,
        };
        let views = [v(1, false, "triage-1", false), v(12, true, "우울-분류-분류-12", true)];
        maeum_runtime::table::assert_aligned(&releases_table(&views));
    }

    fn card() -> ModelCard {
        let labels = vec!["anxiety".to_string(), "suicidewatch".to_string()];
        let e = |a: u64| Some(evaluation(&labels, &[vec![a, 10 - a], vec![2, 8]], 3));
        ModelCard {
            format: CARD_FORMAT.into(),
            consortium: "heart<&>".into(),
            version: 2,
            parent_version: Some(1),
            model: CardModel {
                sha256: "ab".repeat(32),
                size: 10,
                layout_digest: "cd".repeat(32),
                kind: "text-classifier".into(),
                parameters: 3,
                labels: labels.clone(),
                encoder: None,
                adapter: None,
            },
            job: CardJob {
                id: "j-1".into(),
                name: "j".into(),
                spec_sha256: "ef".repeat(32),
                rounds: 2,
                config: serde_json::json!({"rounds": 2}),
            },
            round: 2,
            released_ms: 0,
            secure_aggregation: CardSecAgg { enabled: true, threshold: 0, neighbours: 0, clip: 1.0, max_weight: 9 },
            initial_evaluation: e(3),
            rounds: (1..=2)
                .map(|r| CardRound {
                    round: r,
                    contributors: 3,
                    dropped: 0,
                    total_weight: 100,
                    secure_aggregation: true,
                    secagg_threshold: 3,
                    aggregate_sha256: "00".repeat(32),
                    model_sha256: "11".repeat(32),
                    evaluation: e(5 + r as u64),
                })
                .collect(),
            evaluation: e(7),
            crisis_flag: None,
            privacy: None,
        }
    }

    /// The release message of `card()` at audit entry 41.
    fn release_msg(c: &ModelCard) -> ReleaseMsg {
        ReleaseMsg {
            manifest: Manifest {
                consortium: "c".into(),
                version: 2,
                model_sha256: c.model.sha256.clone(),
                model_size: 10,
                layout_digest: c.model.layout_digest.clone(),
                card_sha256: "99".repeat(32),
            },
            signature: vec![0; 64],
            release_signature: Vec::new(),
            card: Vec::new(),
            audit_seq: 41,
            handovers: Vec::new(),
            log_handovers: Vec::new(),
        }
    }

    #[test]
    fn the_markdown_card_and_the_curve_show_every_round_and_the_crisis_class_first() {
        let c = card();
        let r = release_msg(&c);
        let md = card_markdown(&c, &r, &[]);
        assert!(md.contains("entry #41"), "{md}");
        assert!(md.contains("(supersedes v1)"));
        let crisis = md.find("| suicidewatch |").expect("crisis row");
        let other = md.find("| anxiety |").expect("other row");
        assert!(crisis < other, "crisis class first");
        assert!(md.contains("| 0 (initial) |") && md.contains("| 2 | 3 | 0 | 100 | yes (3) |"));
        let svg = curve_svg(&c);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Three points per series (round 0, 1, 2), two series.
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("heart&lt;&amp;&gt;"), "names are escaped");
        let mut empty = c.clone();
        empty.rounds.clear();
        empty.initial_evaluation = None;
        assert!(curve_svg(&empty).contains("no evaluation recorded"));
    }

    #[test]
    fn the_markdown_card_states_the_crisis_flag_and_every_gate_override() {
        let mut c = card();
        let r = release_msg(&c);
        let md = card_markdown(&c, &r, &[]);
        assert!(!md.contains("## Crisis flag") && !md.contains("overridden"), "{md}");
        c.crisis_flag = Some(maeum_tlog::release::CardCrisisFlag {
            classes: vec!["suicidewatch".into()],
            target_recall: 0.9,
            threshold: Some(0.05),
            recall: Some(0.92),
            precision: Some(0.3),
            examples: 200,
            crisis_examples: 25,
        });
        let o = OverrideView {
            gate: "min_crisis_recall".into(),
            measured: "0.2700".into(),
            threshold: "0.5000".into(),
            operator: "lead".into(),
            reason: "pilot | every case reviewed".into(),
            at: "2026-12-06T00:00:00Z".into(),
            audit_seq: 57,
        };
        let md = card_markdown(&c, &r, std::slice::from_ref(&o));
        assert!(md.contains("## Crisis flag") && md.contains("| 0.05 | 0.9200 | 0.3000 | 0.90 | 200 (25) |"), "{md}");
        assert!(md.contains("## Release gates overridden"), "{md}");
        assert!(
            md.contains("| min_crisis_recall | 0.2700 | 0.5000 | lead | 2026-12-06T00:00:00Z | pilot \\| every case reviewed | #57 |"),
            "{md}"
        );
        let line = o.to_string();
        assert!(line.contains("min_crisis_recall OVERRIDDEN by lead") && line.contains("entry #57"), "{line}");
    }
}
