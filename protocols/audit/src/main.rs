//! `maeum-audit`: verifies a Maeum audit log export offline, shows its timeline, and
//! makes and checks inclusion and consistency proofs, and checks exported model releases
//! against the log. Needs nothing but the files.
//!
//! Exit codes: 0 the check holds; 1 it does not, including a file that does not parse
//! (the message names the first failed check, entry or checkpoint); 2 the command could
//! not run (bad arguments, a file that cannot be read or is of the wrong kind).
//!
//! The auditor's trusted code base: this crate depends on `maeum-tlog` (and through it
//! ring, rustls' WebPKI verifier, x509 parsing and `maeum-pki`'s identities), clap,
//! anyhow, serde_json, safetensors' header parser and `maeum-report` (HTML templates
//! for `report --html`: maud, no IO) — and on nothing that trains or
//! serves. It must never depend on burn, `maeum-models`, tokio, tonic or axum; a test
//! (`scripts/check-boundaries.sh`) fails if any of them appears in its tree. Release
//! checks that need the model's layout read it from the signed model file's header.
#![forbid(unsafe_code)]

mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use maeum_tlog::export::{
    self, CHECKPOINT_FORMAT, CheckpointFile, EXPORT_FORMAT, INCLUSION_FORMAT, InclusionProof, Verified,
};
use maeum_tlog::release::{ModelCard, ModelFile, ReleaseAudit, ReleaseError, ReleaseFile, audit_release};
use maeum_tlog::{AuditError, Entry, Event, hex, rfc3339, unhex32};

/// Verify and inspect a Maeum transparency audit log, offline.
#[derive(Debug, Parser)]
#[command(name = "maeum-audit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify an export: entries, tree, every checkpoint signature, consistency and cosignature.
    Verify {
        /// The export file (`maeum-coordinator audit export --out FILE`).
        file: PathBuf,
        /// The log key you trust: 64 hex digits, or a file holding them (e.g. signing.pub).
        #[arg(long)]
        trust: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the log as a timeline, one line per entry (verifies it first).
    Show {
        /// The export file.
        file: PathBuf,
        /// Only entries about this job.
        #[arg(long)]
        job: Option<String>,
        /// Only entries that name this site.
        #[arg(long)]
        site: Option<String>,
        /// Only entries of this kind (e.g. round_started; see `--kind help`).
        #[arg(long)]
        kind: Option<String>,
        /// Print the entries as JSON lines (their canonical encoding).
        #[arg(long)]
        json: bool,
        /// The log key you trust (as for `verify`).
        #[arg(long)]
        trust: Option<String>,
    },
    /// Print an inclusion proof of one entry against a signed checkpoint (JSON).
    Prove {
        /// The export file.
        file: PathBuf,
        /// The entry's seq.
        #[arg(long)]
        entry: u64,
        /// The checkpoint's tree size (default: the latest checkpoint).
        #[arg(long)]
        size: Option<u64>,
    },
    /// Check an inclusion proof made by `prove`.
    VerifyInclusion {
        /// The proof file.
        proof: PathBuf,
        /// The log key you trust (as for `verify`).
        #[arg(long)]
        trust: Option<String>,
    },
    /// Print the latest checkpoint of an export, to keep and compare later (JSON).
    Checkpoint {
        /// The export file.
        file: PathBuf,
    },
    /// Check an exported release (`maeum-coordinator models export`) against the log:
    /// signature, card, model file, and its `model_release` entry; then say who
    /// promoted it and which sites installed or refused it.
    Release {
        /// The folder `models export` wrote, or the release-vN.json in it (the card
        /// and the model are read beside it: card-vN.json, model-vN.safetensors).
        release: PathBuf,
        /// The audit-log export the release must be in (`audit export`, after the
        /// release).
        #[arg(long)]
        log: PathBuf,
        /// The log key you trust (as for `verify`): the release must be signed by it.
        #[arg(long)]
        trust: Option<String>,
        /// The consortium's release key you trust (hex, `release_public_key` in the
        /// sites' enrolment bundles): the release must carry its signature.
        #[arg(long, value_name = "HEX")]
        release_key: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the auditor's report as one self-contained HTML file: whether the export
    /// verifies, who cosigned what, every job and release with its installs, every
    /// entry; with `--release DIR`, each exported release checked against the log and
    /// its model card. Exit 1 (and a report that says so) if the log does not verify.
    Report {
        /// The export file.
        file: PathBuf,
        /// Where to write the report.
        #[arg(long, value_name = "FILE")]
        html: PathBuf,
        /// The log key you trust (as for `verify`).
        #[arg(long)]
        trust: Option<String>,
        /// An exported release to check and show (as for `release`); repeatable.
        #[arg(long = "release", value_name = "DIR")]
        releases: Vec<PathBuf>,
    },
    /// Does NEW extend OLD? OLD: an export or a checkpoint file; NEW: an export.
    Consistency {
        /// What you saw before.
        old: PathBuf,
        /// What you are shown now.
        new: PathBuf,
        /// The log key you trust (as for `verify`).
        #[arg(long)]
        trust: Option<String>,
    },
}

/// Why a command did not succeed: the check failed (1) or it could not run (2).
enum Failure {
    /// What failed, starting with its rule (AUD-nn or REL-n).
    Check(String),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Run(e)
    }
}

impl From<AuditError> for Failure {
    fn from(e: AuditError) -> Failure {
        Failure::Check(e.to_string())
    }
}

impl From<ReleaseError> for Failure {
    fn from(e: ReleaseError) -> Failure {
        Failure::Check(format!("{}: {e}", e.code()))
    }
}

fn main() -> ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Check(e)) => {
            eprintln!("FAILED: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Run(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `--trust`: 64 hex digits, or a file that holds them.
fn trust_key(arg: Option<&str>) -> Result<Option<[u8; 32]>> {
    let Some(arg) = arg else { return Ok(None) };
    let text = if arg.len() == 64 && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
        arg.to_owned()
    } else {
        std::fs::read_to_string(arg)
            .with_context(|| format!("--trust {arg:?} is not 64 hex digits or a readable file"))?
    };
    let key = unhex32(text.trim().to_ascii_lowercase().as_str()).context("--trust: expected 64 hex digits")?;
    Ok(Some(key))
}

fn verified(path: &Path, trust: Option<&[u8; 32]>) -> Result<Verified, Failure> {
    let bytes = read(path)?;
    Ok(export::verify_full(&bytes, trust)?)
}

fn format_of(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("format")?.as_str().map(str::to_owned)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value).context("encoding JSON")?);
    Ok(())
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Verify { file, trust, json } => {
            let trust = trust_key(trust.as_deref())?;
            let v = verified(&file, trust.as_ref())?;
            let r = &v.report;
            if json {
                print_json(r)?;
            } else {
                println!("OK: {} verifies", file.display());
                println!("  log         {} (consortium {})", r.origin, r.consortium);
                let trusted = if trust.is_some() { "matches --trust" } else { "not pinned: pass --trust" };
                println!("  log key     {} ({trusted})", r.log_public_key);
                if r.log_key_rotations > 0 {
                    println!(
                        "  rotations   the log key was rotated {} time(s) (log_key_rotated, AUD-22); the latest \
                         checkpoint is signed by {}",
                        r.log_key_rotations, r.current_log_key
                    );
                }
                if r.ca_rotations > 0 {
                    println!(
                        "  CA          rolled over {} time(s) (ca_rotated, AUD-23); the CA in effect is {}",
                        r.ca_rotations, r.current_ca
                    );
                }
                println!("  entries     {} ({} .. {})", r.entries, rfc3339(r.first_time_ms), rfc3339(r.last_time_ms));
                println!("  root        {}", r.root);
                println!("  checkpoints {}, {} cosignatures", r.checkpoints, r.cosignatures);
                println!("  witnesses   {}", list(&r.witnesses));
                println!("  latest checkpoint cosigned by {}", list(&r.latest_witnesses));
            }
            Ok(())
        }
        Command::Show { file, job, site, kind, json, trust } => {
            if let Some(kind) = &kind
                && !Event::KINDS.contains(&kind.as_str())
            {
                return Err(anyhow::anyhow!("--kind {kind:?} is not one of {}", Event::KINDS.join(", ")).into());
            }
            let trust = trust_key(trust.as_deref())?;
            let v = verified(&file, trust.as_ref())?;
            let selected = v.export.entries.iter().filter(|e| {
                job.as_deref().is_none_or(|j| e.event.job() == Some(j))
                    && site.as_deref().is_none_or(|s| e.event.involves_site(s))
                    && kind.as_deref().is_none_or(|k| e.event.kind() == k)
            });
            for entry in selected {
                if json {
                    println!("{}", String::from_utf8_lossy(&entry.encode()));
                } else {
                    println!("{}", line(entry));
                }
            }
            Ok(())
        }
        Command::Prove { file, entry, size } => {
            let v = verified(&file, None)?;
            if entry >= v.report.entries {
                return Err(
                    AuditError::Range(format!("no entry {entry}: the log has {} entries", v.report.entries)).into()
                );
            }
            let proof = v.inclusion_proof(entry, size)?;
            println!("{}", String::from_utf8_lossy(&proof.encode()));
            Ok(())
        }
        Command::VerifyInclusion { proof, trust } => {
            let trust = trust_key(trust.as_deref())?;
            let bytes = read(&proof)?;
            if format_of(&bytes).as_deref() != Some(INCLUSION_FORMAT) {
                return Err(
                    anyhow::anyhow!("{} is not an inclusion proof ({INCLUSION_FORMAT})", proof.display()).into()
                );
            }
            let p = InclusionProof::decode(&bytes)?;
            export::verify_inclusion_proof(&p, trust.as_ref())?;
            println!(
                "OK: entry {} is in log {} at tree size {} (root {})",
                p.entry.seq, p.origin, p.tree_size, p.checkpoint.root
            );
            println!("  {}", line(&p.entry));
            if trust.is_none() {
                println!("  log key {} was not pinned: pass --trust to check it is the consortium's", p.log_public_key);
            }
            Ok(())
        }
        Command::Checkpoint { file } => {
            let v = verified(&file, None)?;
            let cp = CheckpointFile::latest_of(&v).ok_or_else(|| AuditError::Range("no checkpoint".into()))?;
            println!("{}", String::from_utf8_lossy(&cp.encode()));
            Ok(())
        }
        Command::Release { release, log, trust, release_key, json } => {
            let trust = trust_key(trust.as_deref())?;
            let v = verified(&log, trust.as_ref())?;
            let (audit, _) = check_release(&release, &v)?;
            let mut rotations = 0;
            if let Some(want) = release_key.map(|k| k.trim().to_ascii_lowercase()) {
                match &audit.release_public_key {
                    Some(got) if *got == want => {}
                    Some(got) => {
                        // The key may have been rotated: walk the log's rotations from the
                        // key the auditor trusts.
                        let pinned = maeum_tlog::unhex32(&want)
                            .map_err(|_| Failure::Run(anyhow::anyhow!("--release-key is not 32 bytes of hex")))?;
                        let chain =
                            maeum_tlog::handover::logged(maeum_tlog::handover::Role::Release, &v.export.entries);
                        let keys = maeum_tlog::handover::reached(
                            maeum_tlog::handover::Role::Release,
                            &audit.consortium,
                            &pinned,
                            &chain,
                        )
                        .map_err(|e| Failure::Check(format!("REL-4b: the log's release-key rotations: {e}")))?;
                        match keys.iter().position(|k| maeum_tlog::hex(k) == *got) {
                            Some(n) => rotations = n,
                            None => {
                                return Err(Failure::Check(format!(
                                    "REL-4b: the release is signed by release key {got}, not {want} nor a key the log \
                                     shows it handed over to ({} rotation(s) from it)",
                                    keys.len() - 1
                                )));
                            }
                        }
                    }
                    None => {
                        return Err(Failure::Check(format!(
                            "REL-4b: the release carries no signature by release key {want}"
                        )));
                    }
                }
            }
            if json {
                print_json(&audit)?;
            } else {
                print_release(&audit, &log, trust.is_some());
                if rotations > 0 {
                    println!("  rotations   the release key is {rotations} logged rotation(s) from --release-key");
                }
            }
            Ok(())
        }
        Command::Report { file, html, trust, releases } => {
            let pinned = trust_key(trust.as_deref())?;
            let verified = export::verify_full(&read(&file)?, pinned.as_ref()).map_err(|e| e.to_string());
            let mut checked = Vec::new();
            if let Ok(v) = &verified {
                for dir in &releases {
                    checked.push((
                        dir.display().to_string(),
                        check_release(dir, v).map_err(|e| match e {
                            Failure::Check(why) => why,
                            Failure::Run(e) => format!("{e:#}"),
                        }),
                    ));
                }
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let name = file.display().to_string();
            let page = report::render(&name, &verified, pinned.is_some(), &checked, now_ms);
            std::fs::write(&html, page).with_context(|| format!("writing {}", html.display()))?;
            println!("wrote {}", html.display());
            if let Err(why) = verified {
                return Err(Failure::Check(why));
            }
            if let Some((dir, Err(why))) = checked.iter().find(|(_, c)| c.is_err()) {
                return Err(Failure::Check(format!("release {dir}: {why}")));
            }
            Ok(())
        }
        Command::Consistency { old, new, trust } => {
            let trust = trust_key(trust.as_deref())?;
            let old_bytes = read(&old)?;
            let old_cp = match format_of(&old_bytes).as_deref() {
                Some(EXPORT_FORMAT) => {
                    let v = verified(&old, trust.as_ref())?;
                    CheckpointFile::latest_of(&v).ok_or_else(|| AuditError::Range("OLD has no checkpoint".into()))?
                }
                Some(CHECKPOINT_FORMAT) => {
                    let cp = CheckpointFile::decode(&old_bytes)?;
                    if let Some(t) = &trust
                        && hex(t) != cp.log_public_key
                    {
                        return Err(AuditError::LogKey {
                            found: cp.log_public_key,
                            reason: format!("is not the trusted key {}", hex(t)),
                        }
                        .into());
                    }
                    cp
                }
                _ => return Err(anyhow::anyhow!("{}: not an export or a checkpoint file", old.display()).into()),
            };
            let new_bytes = read(&new)?;
            if format_of(&new_bytes).as_deref() != Some(EXPORT_FORMAT) {
                bail_run(format!(
                    "{}: NEW must be an export file (its entries are needed to compute the consistency proof)",
                    new.display()
                ))?;
            }
            let new_v = verified(&new, trust.as_ref())?;
            let r = export::check_extends(&old_cp, &new_v)?;
            println!("OK: {} (size {}) extends {} (size {})", new.display(), r.new_size, old.display(), r.old_size);
            println!("  old root {}", r.old_root);
            println!("  new root {}", r.new_root);
            println!("  consistency proof: {} hashes", r.proof.len());
            for h in &r.proof {
                println!("    {h}");
            }
            Ok(())
        }
    }
}

/// `release`: a folder holding one release-vN.json, or the file itself; and its folder.
/// An exported release (its folder or release-vN.json) checked against a verified log:
/// the audit and the card.
fn check_release(release: &Path, v: &Verified) -> Result<(ReleaseAudit, ModelCard), Failure> {
    let (file_path, dir) = release_file(release)?;
    let file = ReleaseFile::decode(&read(&file_path)?)?;
    let n = file.manifest.version;
    let card = read(&dir.join(format!("card-v{n}.json")))?;
    let model_path = dir.join(format!("model-v{n}.safetensors"));
    let model = read(&model_path)?;
    let sha256 = sha256(&model);
    // Parse the model only once it is known to be the signed one.
    let loaded = if hex(&sha256) == file.manifest.model_sha256 {
        model_header(&model).map_err(|e| format!("it does not load: {e}"))
    } else {
        Err("not loaded: its digest is not the signed one".into())
    };
    let audit = audit_release(&file, &card, &ModelFile { sha256, loaded }, v)?;
    // audit_release checked the card against the signed manifest.
    let card = ModelCard::decode(&card)?;
    Ok((audit, card))
}

fn release_file(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if !path.is_dir() {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Ok((path.to_path_buf(), dir.to_path_buf()));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("release-v") && n.ends_with(".json"))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok((found.remove(0), path.to_path_buf())),
        0 => bail!(
            "{} holds no release-vN.json (write one with `maeum-coordinator models export VERSION --out DIR`)",
            path.display()
        ),
        _ => bail!(
            "{} holds several releases ({}): name the release-vN.json to check",
            path.display(),
            found.iter().filter_map(|p| p.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn print_release(a: &ReleaseAudit, log: &Path, pinned: bool) {
    println!("OK: release v{} of consortium {} verifies against {}", a.version, a.consortium, log.display());
    let trusted = if pinned { "matches --trust" } else { "not pinned: pass --trust" };
    println!("  signature   Ed25519 by the log key {} ({trusted})", a.signing_public_key);
    if let Some(k) = &a.release_public_key {
        println!(
            "  release key Ed25519 by the release key {k} (compare with the sites' bundles, or pass --release-key)"
        );
    }
    println!("  model       {} ({} bytes, layout {})", a.model_sha256, a.model_size, short(&a.layout_digest));
    println!(
        "  card        {} (job {} \"{}\", round {} of {})",
        a.card_sha256, a.job_id, a.job_name, a.round, a.rounds
    );
    match &a.evaluation {
        Some(e) => {
            let crisis: Vec<String> = e
                .recall
                .iter()
                .filter(|c| c.crisis)
                .map(|c| format!("{} recall {}", c.label, c.recall.map_or("n/a".into(), |r| format!("{r:.4}"))))
                .collect();
            println!(
                "  evaluation  accuracy {:.4}, macro-F1 {:.4} on {} held-out examples at {} sites{}",
                e.accuracy,
                e.macro_f1,
                e.examples,
                e.evaluated_by,
                if crisis.is_empty() { String::new() } else { format!("; {}", crisis.join(", ")) }
            );
        }
        None => println!("  evaluation  none on the card"),
    }
    match &a.privacy {
        Some(p) => println!(
            "  privacy     {}: ε = {:.3} per record per site at δ = {:e}; {} privacy_charged entries in the log, the \
             largest ε = {:.3} (REL-10)",
            p.mechanism, p.epsilon, p.delta, p.charges, p.max_site_epsilon
        ),
        None => println!("  privacy     no differential privacy on the card"),
    }
    let l = &a.logged;
    println!(
        "  logged      entry #{} model_release {}, in checkpoint {} (cosigned by {})",
        l.seq,
        rfc3339(l.time_ms),
        l.checkpoint_size,
        list(&l.cosigned_by)
    );
    if l.latest_checkpoint_size != l.checkpoint_size {
        println!(
            "              latest checkpoint {} extends it (cosigned by {})",
            l.latest_checkpoint_size,
            list(&l.latest_cosigned_by)
        );
    }
    if a.promotions.is_empty() {
        println!("  promoted    never");
    } else {
        let p: Vec<String> =
            a.promotions.iter().map(|p| format!("#{} {} by {}", p.seq, rfc3339(p.time_ms), p.operator)).collect();
        println!("  promoted    {}", p.join("; "));
    }
    for o in &a.gate_overrides {
        println!(
            "  OVERRIDE    #{} {} by {}: gate {} (measured {}, threshold {}): {:?}",
            o.seq,
            rfc3339(o.time_ms),
            o.operator,
            o.gate,
            o.measured,
            o.threshold,
            o.reason
        );
    }
    println!("  current     {}", if a.current { "yes (the last promotion in the log)" } else { "no" });
    println!("  installed   {}", list(&a.installed_by));
    if a.refused_by.is_empty() {
        println!("  refused     none");
    } else {
        for r in &a.refused_by {
            println!("  refused     {} (#{}): {}", r.site, r.seq, r.reason);
        }
    }
}

fn bail_run(message: String) -> Result<()> {
    bail!(message)
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".to_owned() } else { items.join(",") }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// One timeline line: `#12 2026-11-28T03:12:01Z round_started job=j-1 round=2 …`.
fn line(entry: &Entry) -> String {
    let detail = match &entry.event {
        Event::ConsortiumInit { consortium, ca_fingerprint, log_key } => {
            format!("consortium={consortium} ca={} log_key={log_key}", short(ca_fingerprint))
        }
        Event::SiteApproved { site, cert_fingerprint, not_after_ms } => {
            format!("site={site} cert={} not_after={}", short(cert_fingerprint), rfc3339(*not_after_ms))
        }
        Event::SiteRevoked { site, reason } => format!("site={site} reason={reason:?}"),
        Event::SiteKeyReplaced { site, old_cert_fingerprint, new_cert_fingerprint, not_after_ms, operator } => format!(
            "site={site} old_cert={} new_cert={} not_after={} operator={operator}",
            short(old_cert_fingerprint),
            short(new_cert_fingerprint),
            rfc3339(*not_after_ms)
        ),
        Event::JobSubmitted { job_id, name, spec_sha256, operator } => {
            format!("job={job_id} name={name:?} spec={} operator={operator}", short(spec_sha256))
        }
        Event::JobDecision { job_id, site, accepted, reason } => {
            format!("job={job_id} site={site} accepted={} reason={reason:?}", yes(*accepted))
        }
        Event::RoundStarted { job_id, round, attempt, sites, secure_aggregation } => format!(
            "job={job_id} round={round} attempt={attempt} sites={} secure_aggregation={}",
            list(sites),
            yes(*secure_aggregation)
        ),
        Event::RoundSecagg { job_id, round, attempt, survivors, dropped } => format!(
            "job={job_id} round={round} attempt={attempt} survivors={} dropped={}",
            list(survivors),
            list(dropped)
        ),
        Event::JobStarted { job_id, initial_model, sites } => {
            format!("job={job_id} initial_model={} sites={}", short(initial_model), list(sites))
        }
        Event::RoundFailed { job_id, round, attempt, reason } => {
            format!("job={job_id} round={round} attempt={attempt} reason={reason:?}")
        }
        Event::SiteRefused { job_id, round, attempt, site, rule, detail } => {
            format!("job={job_id} round={round} attempt={attempt} site={site} rule={rule} detail={detail:?}")
        }
        Event::PrivacyCharged {
            job_id,
            round,
            site,
            mechanism,
            epsilon,
            delta,
            clip,
            noise_multiplier,
            sample_rate,
            steps,
        } => format!(
            "job={job_id} round={round} site={site} mechanism={mechanism} epsilon={epsilon} delta={delta} clip={clip} \
             noise_multiplier={noise_multiplier} sample_rate={sample_rate} steps={steps}"
        ),
        Event::RoundCommitted { job_id, round, aggregate_sha256, model, contributors } => format!(
            "job={job_id} round={round} aggregate={} model={} contributors={}",
            short(aggregate_sha256),
            short(model),
            list(contributors)
        ),
        Event::ModelRelease { job_id, round, version_sha256, card_sha256 } => {
            format!("job={job_id} round={round} version={version_sha256} card={}", short(card_sha256))
        }
        Event::ReleasePromoted { version_sha256, operator } => format!("version={version_sha256} operator={operator}"),
        Event::ReleaseGateOverridden { version_sha256, gate, measured, threshold, operator, reason } => {
            format!(
                "version={version_sha256} gate={gate} measured={measured} threshold={threshold} operator={operator} reason={reason:?}"
            )
        }
        Event::ReleaseInstall { site, version_sha256, installed, reason } => {
            if *installed {
                format!("site={site} version={version_sha256} installed")
            } else {
                format!("site={site} version={version_sha256} REFUSED: {reason}")
            }
        }
        Event::OperatorCommand { operator, command, result } => {
            format!("operator={operator} command={command:?} result={result:?}")
        }
        Event::ReleaseKeyRotated { operator, old_key, new_key, .. }
        | Event::LogKeyRotated { operator, old_key, new_key, .. } => {
            format!("operator={operator} from={} to={}", short(old_key), short(new_key))
        }
        Event::CaRotated { operator, old_ca, new_ca, .. } => {
            format!("operator={operator} from={} to={}", short(old_ca), short(new_ca))
        }
        Event::JobFinished { job_id, state } => format!("job={job_id} state={state}"),
        Event::Checkpoint { size, root } => format!("size={size} root={}", short(root)),
        other => format!("{other:?}"),
    };
    format!("#{} {} {} {detail}", entry.seq, rfc3339(entry.time_ms), entry.event.kind())
}

/// The first 16 hex digits of a digest, for reading (the JSON output has all 64).
fn short(digest: &str) -> String {
    digest.get(..16).map_or_else(|| digest.to_owned(), |s| format!("{s}…"))
}

/// SHA-256 of a file's bytes.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// The layout digest and labels a model file declares, read from its safetensors header
/// (`maeum.layout_digest`, and the labels of the `maeum.model` spec) without the models
/// crate: the caller has checked that the file is the signed one, so its header is what
/// was released. The whole file must parse as safetensors (header, offsets, sizes).
fn model_header(bytes: &[u8]) -> Result<(String, Vec<String>), String> {
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let layout = meta.get("maeum.layout_digest").ok_or("no maeum.layout_digest entry in the header")?;
    let spec = meta.get("maeum.model").ok_or("no maeum.model entry in the header")?;
    let spec: serde_json::Value = serde_json::from_str(spec).map_err(|e| format!("maeum.model: {e}"))?;
    // `labels` is a label set: `{"labels": [...]}`.
    let labels = spec
        .get("labels")
        .and_then(|l| l.get("labels").or(Some(l)))
        .and_then(serde_json::Value::as_array)
        .ok_or("maeum.model names no labels")?
        .iter()
        .map(|l| l.as_str().map(str::to_owned).ok_or("maeum.model: a label is not a string"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((layout.clone(), labels))
}

/// Makes a closed stdout (`maeum-audit timeline … | head -1`) end the process quietly
/// with status 141, as a Unix tool killed by SIGPIPE does, instead of a panic report.
/// Rust ignores SIGPIPE, so `println!` to a closed pipe panics with "failed printing to
/// stdout"; this hook recognises only that panic and leaves every other to the default
/// hook. (The same hook as `maeum_runtime::runtime`'s, repeated here so that the
/// auditor's verifier links no daemon glue.)
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info);
    }));
}
