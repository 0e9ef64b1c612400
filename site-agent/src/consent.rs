//! Consent: with `[policy] auto_accept = false` (the default) a job offer waits for the
//! site's admin. The daemon keeps the offer in HOME/jobs/offers/ID.json; the admin reads
//! it with `maeum-site jobs list|show` and answers with `maeum-site jobs accept|refuse`,
//! which writes HOME/jobs/consent/ID.json; the daemon answers the coordinator at its
//! next poll. A consent names the SHA-256 of the job file it was given for, so it never
//! carries over to a different file offered under the same id.
//!
//! Offers the policy refuses are refused at once without asking anyone.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use maeum_protocols::job::JobSpec;

use crate::enrol::Home;

/// HOME/jobs/offers/ID.json: an offer waiting for (or answered by) the admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub job_id: String,
    /// SHA-256 (hex) of the job file, as the offer and the audit log name it.
    pub spec_sha256: String,
    pub received_ms: i64,
    /// The job file as the lead submitted it.
    pub toml: String,
    /// When the coordinator stopped offering the job while it waited for the admin (it
    /// finished, failed or was aborted, or another job is current); cleared if it is
    /// offered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn_ms: Option<i64>,
}

/// HOME/jobs/consent/ID.json: the admin's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub job_id: String,
    pub accept: bool,
    /// Why (required to refuse; optional to accept).
    #[serde(default)]
    pub reason: String,
    /// The job file the admin read.
    pub spec_sha256: String,
    /// Who answered (the login name, as the OS reports it).
    pub by: String,
    pub time_ms: i64,
}

fn offer_name(job_id: &str) -> String {
    format!("jobs/offers/{job_id}.json")
}

fn consent_name(job_id: &str) -> String {
    format!("jobs/consent/{job_id}.json")
}

fn check_id(job_id: &str) -> Result<()> {
    maeum_protocols::wire::job_id("job id", job_id.to_string()).map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn write_json<T: Serialize>(home: &Home, name: &str, value: &T) -> Result<()> {
    let path = home.path(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    maeum_models::write_atomic(&path, serde_json::to_string_pretty(value)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not valid", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The daemon's side: the admin's consent to this exact job file, if given; otherwise
/// the offer is kept (once) for the admin and `None` is returned.
pub fn consent_for(home: &Home, job_id: &str, toml: &str, spec_sha256: &str) -> Result<Option<Consent>> {
    check_id(job_id)?;
    let offer_path = home.path(&offer_name(job_id));
    let kept: Option<Offer> = read_json(&offer_path)?;
    match kept {
        Some(o) if o.spec_sha256 == spec_sha256 => {
            if o.withdrawn_ms.is_some() {
                // Offered again (a coordinator restart, say): it waits again.
                write_json(home, &offer_name(job_id), &Offer { withdrawn_ms: None, ..o })?;
            }
        }
        _ => {
            let offer = Offer {
                job_id: job_id.into(),
                spec_sha256: spec_sha256.into(),
                received_ms: crate::now_ms(),
                toml: toml.into(),
                withdrawn_ms: None,
            };
            write_json(home, &offer_name(job_id), &offer)?;
        }
    }
    let consent: Option<Consent> = read_json(&home.path(&consent_name(job_id)))?;
    Ok(consent.filter(|c| c.spec_sha256 == spec_sha256))
}

/// The daemon's side, on every answer from the coordinator that is not an offer of a
/// waiting job: the coordinator offers a job to a site that has not answered it at
/// every poll while the job is current, so an offer still waiting for the admin that is
/// not `offered` now is withdrawn (the job finished, failed or was aborted). Returns
/// the jobs newly marked.
pub fn withdraw_waiting(home: &Home, offered: Option<&str>) -> Result<Vec<String>> {
    let mut marked = Vec::new();
    for (offer, consent) in offers(home)? {
        if consent.is_some() || offer.withdrawn_ms.is_some() || Some(offer.job_id.as_str()) == offered {
            continue;
        }
        let job_id = offer.job_id.clone();
        write_json(home, &offer_name(&job_id), &Offer { withdrawn_ms: Some(crate::now_ms()), ..offer })?;
        marked.push(job_id);
    }
    Ok(marked)
}

/// The largest job file a decision of the daemon's own is recorded with (real job files
/// are a few kB).
const MAX_RECORDED_JOB_FILE: usize = 64 * 1024;

/// Records a decision the daemon made without the admin (the policy refused the offer,
/// the site cannot serve it, or `auto_accept` took it), so `jobs list` shows every offer
/// this site answered and why. An answer already recorded for this job file (the
/// admin's) is kept.
pub fn record_decision(
    home: &Home,
    job_id: &str,
    toml: &str,
    spec_sha256: &str,
    decision: (bool, &str, &str),
) -> Result<()> {
    let (accept, by, reason) = decision;
    // Every offer the coordinator sends would otherwise be kept: bound what it can make
    // this site store. (The journal records each decision either way.)
    if toml.len() > MAX_RECORDED_JOB_FILE {
        return Ok(());
    }
    check_id(job_id)?;
    let answered: Option<Consent> = read_json(&home.path(&consent_name(job_id)))?;
    if answered.is_none_or(|c| c.spec_sha256 != spec_sha256) {
        let c = Consent {
            job_id: job_id.into(),
            accept,
            reason: reason.into(),
            spec_sha256: spec_sha256.into(),
            by: by.into(),
            time_ms: crate::now_ms(),
        };
        // The answer first, then the offer: `jobs list` never sees this offer waiting.
        write_json(home, &consent_name(job_id), &c)?;
    }
    consent_for(home, job_id, toml, spec_sha256).map(|_| ())
}

/// One offer as `jobs list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub job_id: String,
    /// `waiting`, `accepted`, `refused` or `withdrawn`.
    pub state: String,
    /// Who answered (the admin, `auto_accept` or `this site (policy or data)`), empty
    /// while waiting.
    pub by: String,
    /// Why it was refused, empty otherwise.
    pub reason: String,
    pub name: String,
    pub spec_sha256: String,
    pub received_ms: i64,
}

fn offers(home: &Home) -> Result<Vec<(Offer, Option<Consent>)>> {
    let dir = home.path("jobs/offers");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Some(offer) = read_json::<Offer>(&path)? else { continue };
        let consent = read_json::<Consent>(&home.path(&consent_name(&offer.job_id)))?
            .filter(|c| c.spec_sha256 == offer.spec_sha256);
        out.push((offer, consent));
    }
    out.sort_by_key(|(o, _)| (o.received_ms, o.job_id.clone()));
    Ok(out)
}

fn state(offer: &Offer, consent: Option<&Consent>) -> &'static str {
    match consent {
        None if offer.withdrawn_ms.is_some() => "withdrawn",
        None => "waiting",
        Some(c) if c.accept => "accepted",
        Some(_) => "refused",
    }
}

/// The offers this site received, oldest first, with their answers.
pub fn listed(home: &Home) -> Result<Vec<Listed>> {
    Ok(offers(home)?
        .into_iter()
        .map(|(o, c)| Listed {
            name: JobSpec::from_toml("job", &o.toml).map(|s| s.name).unwrap_or_else(|_| "(invalid job file)".into()),
            state: state(&o, c.as_ref()).into(),
            by: c.as_ref().map(|c| c.by.clone()).unwrap_or_default(),
            reason: match (&c, o.withdrawn_ms) {
                (Some(c), _) => c.reason.clone(),
                (None, Some(at)) => format!(
                    "the coordinator stopped offering it at {} (it finished, failed or was aborted); nothing to answer",
                    maeum_tlog::rfc3339(at)
                ),
                (None, None) => String::new(),
            },
            job_id: o.job_id,
            spec_sha256: o.spec_sha256,
            received_ms: o.received_ms,
        })
        .collect())
}

/// `maeum-site jobs list`.
pub fn list(dir: &Path, json: bool) -> Result<()> {
    let listed = listed(&Home::new(dir))?;
    if json {
        println!("{}", serde_json::to_string(&listed)?);
        return Ok(());
    }
    if listed.is_empty() {
        println!("no job offers (with [policy] auto_accept = false, offers wait here for your answer)");
        return Ok(());
    }
    let mut t = maeum_runtime::table::table(&["job", "name", "state", "by", "job file SHA-256"], &[]);
    for l in &listed {
        t.add_row(vec![
            l.job_id.clone(),
            l.name.clone(),
            l.state.clone(),
            l.by.clone(),
            l.spec_sha256[..16].to_string(),
        ]);
    }
    println!("{t}");
    for l in listed.iter().filter(|l| !l.reason.is_empty()) {
        println!("{}: {}", l.job_id, l.reason);
    }
    println!(
        "`maeum-site jobs show JOB` explains what a job asks; `jobs accept JOB` or `jobs refuse JOB --reason …` answers."
    );
    Ok(())
}

fn find(home: &Home, job_id: &str) -> Result<(Offer, Option<Consent>)> {
    check_id(job_id)?;
    offers(home)?
        .into_iter()
        .find(|(o, _)| o.job_id == job_id)
        .with_context(|| format!("no offer of job {job_id} here (see `maeum-site jobs list`)"))
}

/// What a job asks of this site, in plain words.
pub fn describe(spec: &JobSpec, policy: &crate::policy::Policy) -> Vec<(String, String)> {
    let sa = &spec.secure_aggregation;
    let params = spec.model_spec().map(|m| m.layout().numel().to_string()).unwrap_or_else(|e| format!("invalid: {e}"));
    let threshold = if sa.threshold == 0 {
        "automatic: more than 2/3 of each round's sites".to_string()
    } else {
        format!("at least {} (more than 2/3 of each round's sites if that is higher)", sa.threshold)
    };
    let mut rows = vec![
        ("name".to_string(), spec.name.clone()),
        ("description".to_string(), spec.description.clone().unwrap_or_else(|| "-".into())),
        (
            "model".to_string(),
            format!("{} with {params} parameters, {} labels", spec.model.kind.as_str(), spec.labels.len()),
        ),
        ("rounds".to_string(), format!("{} (each: train on your records, send a masked update)", spec.rounds)),
    ];
    if let Some(e) = spec.model_spec().ok().as_ref().and_then(maeum_models::model::ModelSpec::encoder) {
        rows.push((
            "encoder".to_string(),
            format!(
                "{} (weights {}, tokenizer {}): runs here on your records, which it turns into vectors \
                 kept in this home; only the head is trained and sent",
                e.name,
                &e.sha256[..16],
                &e.tokenizer_sha256[..16]
            ),
        ));
    }
    rows.extend([
        ("cohort".to_string(), format!("at least {} sites per round (min_sites)", spec.min_sites)),
        (
            "secure aggregation".to_string(),
            if sa.enabled() {
                format!("on: the coordinator sees only sums; threshold {threshold}")
            } else {
                "OFF: the coordinator would see this site's own update and record count".into()
            },
        ),
        ("strategy".to_string(), spec.strategy.kind.as_str().to_string()),
        (
            "differential privacy".to_string(),
            match spec.privacy_plan() {
                Ok(Some(p)) => match p.distributed() {
                    Some(m) => format!(
                        "yes, distributed DP-SGD: ε = {:.3} per record at δ = {:e} over {} rounds (clip {}, noise \
                         multiplier {:.3}, sampling rate {}); your site adds 1/{} of the noise and sends its words \
                         only inside secure aggregation: the guarantee assumes at most {} colluding sites",
                        p.epsilon,
                        p.delta,
                        p.rounds,
                        p.clip,
                        p.noise_multiplier,
                        p.sample_rate,
                        m.noise_shares,
                        spec.privacy.colluders
                    ),
                    None => format!(
                        "yes, local DP-SGD: ε = {:.3} per record at δ = {:e} over {} rounds (clip {}, noise multiplier \
                         {:.3}, sampling rate {}); your site adds all the noise itself",
                        p.epsilon, p.delta, p.rounds, p.clip, p.noise_multiplier, p.sample_rate
                    ),
                },
                Ok(None) => "none: the released model carries no per-record guarantee".into(),
                Err(e) => format!("invalid: {e}"),
            },
        ),
        (
            "who else".to_string(),
            if policy.members.is_empty() {
                "any site the consortium approved; each round's members are checked when the round starts".into()
            } else {
                format!("only the sites your policy pins: {}", policy.members.join(", "))
            },
        ),
    ]);
    rows.push((
        "your policy".to_string(),
        match policy.check_job(spec) {
            Ok(()) => format!("allows it (sessions below {} sites are refused)", policy.min_cohort),
            Err(r) => r.to_string(),
        },
    ));
    rows
}

/// `maeum-site jobs show JOB`.
pub fn show(dir: &Path, job_id: &str, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let (offer, consent) = find(&home, job_id)?;
    let spec = JobSpec::from_toml(&format!("job {job_id}"), &offer.toml)?;
    let policy = home.config()?.policy;
    let mut rows = describe(&spec, &policy);
    // The budget needs the ledger: a job the rules allow may still not fit in it.
    if let Ok(Some(plan)) = spec.privacy_plan()
        && let Err(r) = crate::ledger::check_budget(&home, job_id, &plan, policy.privacy.budget)
        && let Some(row) = rows.iter_mut().find(|(k, _)| k == "your policy")
    {
        row.1 = r.to_string();
    }
    // Whether this site can run the job's encoder at all (else the daemon refuses it).
    if let Some(e) = spec.model_spec().ok().as_ref().and_then(maeum_models::model::ModelSpec::encoder)
        && let Some(row) = rows.iter_mut().find(|(k, _)| k == "encoder")
    {
        match crate::encoders::missing(&home, e) {
            None => row.1.push_str("; installed here and verified"),
            Some(why) => row.1 = format!("{}; CANNOT RUN HERE: {why}", row.1),
        }
    }
    if json {
        let map: serde_json::Map<String, serde_json::Value> =
            rows.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        let v = serde_json::json!({
            "job_id": offer.job_id, "state": state(&offer, consent.as_ref()), "spec_sha256": offer.spec_sha256,
            "asks": map, "job_file": offer.toml,
        });
        println!("{v}");
        return Ok(());
    }
    println!("job {} ({}), job file SHA-256 {}", offer.job_id, state(&offer, consent.as_ref()), offer.spec_sha256);
    for (k, v) in rows {
        println!("  {k:<21} {v}");
    }
    Ok(())
}

/// `maeum-site jobs accept|refuse JOB`.
pub fn answer(dir: &Path, job_id: &str, accept: bool, reason: Option<String>) -> Result<()> {
    let home = Home::new(dir);
    let (offer, previous) = find(&home, job_id)?;
    let reason = reason.unwrap_or_default().trim().to_string();
    if !accept && reason.is_empty() {
        bail!("--reason is required to refuse a job (the coordinator and the audit log record it)");
    }
    if let Some(p) = previous {
        bail!(
            "job {job_id} was already {} by {} (the coordinator may already have the answer)",
            if p.accept { "accepted" } else { "refused" },
            p.by
        );
    }
    if let Some(at) = offer.withdrawn_ms {
        bail!(
            "job {job_id} is no longer offered: the coordinator stopped offering it at {} (it finished, failed or was \
             aborted); nothing to answer",
            maeum_tlog::rfc3339(at)
        );
    }
    if accept {
        let spec = JobSpec::from_toml(&format!("job {job_id}"), &offer.toml)?;
        let policy = home.config()?.policy;
        policy.check_job(&spec).map_err(|r| anyhow::anyhow!("{r}"))?;
        if let Some(plan) = spec.privacy_plan()? {
            crate::ledger::check_budget(&home, job_id, &plan, policy.privacy.budget)
                .map_err(|r| anyhow::anyhow!("{r}"))?;
        }
    }
    let consent = Consent {
        job_id: job_id.into(),
        accept,
        reason: reason.chars().take(400).collect(),
        spec_sha256: offer.spec_sha256.clone(),
        by: std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()),
        time_ms: crate::now_ms(),
    };
    write_json(&home, &consent_name(job_id), &consent)?;
    println!(
        "{} job {job_id} (job file SHA-256 {}); the daemon tells the coordinator at its next poll",
        if accept { "accepted" } else { "refused" },
        offer.spec_sha256
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "name = \"triage\"\nlabels = [\"a\", \"b\"]\nrounds = 2\n";

    #[test]
    fn an_offer_waits_for_consent_to_its_own_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        std::fs::write(home.path("site.toml"), "[data]\n").expect("site.toml");
        let sha = maeum_protocols::job::sha256_hex(JOB.as_bytes());
        assert_eq!(consent_for(&home, "triage-1", JOB, &sha).expect("kept"), None);
        let refused = answer(dir.path(), "triage-1", false, None).expect_err("a refusal needs a reason");
        assert!(refused.to_string().contains("--reason"), "{refused}");
        answer(dir.path(), "triage-1", true, None).expect("accepted");
        let c = consent_for(&home, "triage-1", JOB, &sha).expect("read").expect("consent");
        assert!(c.accept);
        // A different file under the same id is a new offer: the consent does not carry over.
        let other = format!("{JOB}min_sites = 5\n");
        let other_sha = maeum_protocols::job::sha256_hex(other.as_bytes());
        assert_eq!(consent_for(&home, "triage-1", &other, &other_sha).expect("kept"), None);
        assert!(answer(dir.path(), "nope", true, None).is_err());

        // An offer the coordinator stopped sending while it waited is withdrawn: listed
        // so, and not answerable, until it is offered again.
        let waiting = format!("{JOB}min_sites = 4\n");
        let waiting_sha = maeum_protocols::job::sha256_hex(waiting.as_bytes());
        assert_eq!(consent_for(&home, "triage-2", &waiting, &waiting_sha).expect("kept"), None);
        // triage-1's second file waits too, and is not what the coordinator offers now.
        assert_eq!(withdraw_waiting(&home, Some("triage-2")).expect("marked"), vec!["triage-1".to_owned()]);
        assert_eq!(withdraw_waiting(&home, None).expect("marked"), vec!["triage-2".to_owned()]);
        assert_eq!(withdraw_waiting(&home, None).expect("once"), Vec::<String>::new());
        let l = listed(&home).expect("listed");
        let two = l.iter().find(|o| o.job_id == "triage-2").expect("listed");
        assert_eq!(two.state, "withdrawn");
        assert!(two.reason.contains("stopped offering it"), "{}", two.reason);
        let late = answer(dir.path(), "triage-2", true, None).expect_err("withdrawn");
        assert!(late.to_string().contains("no longer offered"), "{late}");
        assert_eq!(consent_for(&home, "triage-2", &waiting, &waiting_sha).expect("kept"), None);
        assert_eq!(listed(&home).expect("listed").iter().find(|o| o.job_id == "triage-2").expect("x").state, "waiting");
        assert!(answer(dir.path(), "../x", true, None).is_err(), "ids are checked");

        // The daemon's own refusal is listed, but never over the admin's answer, and a
        // huge job file is not kept.
        record_decision(&home, "triage-1", JOB, &sha, (false, "this site (policy or data)", "no")).expect("kept");
        assert!(consent_for(&home, "triage-1", JOB, &sha).expect("read").expect("consent").accept);
        let big = format!("{JOB}# {}\n", "x".repeat(MAX_RECORDED_JOB_FILE));
        let big_sha = maeum_protocols::job::sha256_hex(big.as_bytes());
        record_decision(&home, "huge-1", &big, &big_sha, (false, "this site (policy or data)", "no")).expect("ok");
        assert!(!home.path(&offer_name("huge-1")).exists());
        let small = format!("{JOB}# refused\n");
        let small_sha = maeum_protocols::job::sha256_hex(small.as_bytes());
        record_decision(&home, "plain-1", &small, &small_sha, (false, "this site (policy or data)", "plaintext"))
            .expect("ok");
        let c = consent_for(&home, "plain-1", &small, &small_sha).expect("read").expect("recorded");
        assert!(!c.accept && c.reason == "plaintext" && c.by == "this site (policy or data)");
    }

    #[test]
    fn a_job_is_described_in_plain_words() {
        let spec = JobSpec::from_toml("job", JOB).expect("job");
        let rows = describe(&spec, &crate::policy::Policy::default());
        let text: Vec<String> = rows.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let text = text.join("\n");
        assert!(text.contains("secure aggregation: on"), "{text}");
        assert!(text.contains("cohort: at least 3 sites"), "{text}");
        assert!(text.contains("your policy: allows it"), "{text}");
        assert!(!text.contains("encoder:"), "{text}");
        let enc = JobSpec::from_toml(
            "job",
            &format!("{JOB}[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\n"),
        )
        .expect("job");
        let rows = describe(&enc, &crate::policy::Policy::default());
        let (_, line) = rows.iter().find(|(k, _)| k == "encoder").expect("an encoder row");
        assert!(line.starts_with("all-minilm-l6-v2 (weights 53aa51172d142c89, tokenizer be50c3628f2bf5bb)"), "{line}");
        assert!(line.ends_with("only the head is trained and sent"), "{line}");
        // The admin is told who adds the noise, and what the distributed mode assumes.
        let privacy = |extra: &str| -> String {
            let spec = JobSpec::from_toml("job", &format!("{JOB}{extra}")).expect("job");
            let rows = describe(&spec, &crate::policy::Policy::default());
            rows.into_iter().find(|(k, _)| k == "differential privacy").expect("a privacy row").1
        };
        let local = privacy("[privacy]\nmode = \"local\"\nepsilon = 4.0\n");
        assert!(local.starts_with("yes, local DP-SGD") && local.ends_with("adds all the noise itself"), "{local}");
        let ddp = privacy("[privacy]\nmode = \"distributed\"\nepsilon = 4.0\nsample_rate = 1.0\ncolluders = 1\n");
        assert!(ddp.starts_with("yes, distributed DP-SGD"), "{ddp}");
        assert!(ddp.ends_with("adds 1/2 of the noise and sends its words only inside secure aggregation: the guarantee assumes at most 1 colluding sites"), "{ddp}");
    }
}
