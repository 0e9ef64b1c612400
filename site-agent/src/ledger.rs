//! The site's privacy ledger: HOME/privacy/ledger.jsonl.
//!
//! Every differentially private job that uses this site's records is charged here,
//! by the site, before the records are touched: a **reservation** of the job's whole
//! planned ε when the site accepts the job (refused if it would exceed the site's total
//! budget), then a **charge** per round before the round's training. Lines are appended
//! and fsynced, so a kill -9 loses nothing that was spent: a charge is durable before
//! training starts, and a torn last line (a crash inside the write) is a charge that
//! never happened, because training had not started.
//!
//! Composition: within a job, Rényi-DP composition over all charged DP-SGD steps (the
//! accountant, `maeum_models::accountant`); across jobs, δ adds up and ε is the smaller
//! of the sum of the jobs' ε and the ε of their RDP curves composed ([`Ledger::total`]).
//! A job's entry counts the larger of its reservation and its spend, so a job that is
//! still running holds its share.
//!
//! A round is charged once per (job, round, base model): the site's noise and sampling
//! for it derive from its secret key and those three values
//! ([`noise_rng`]), so a retried attempt releases the very same update and costs
//! nothing new; another base model for the same round draws fresh noise and is charged
//! again.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::enrol::Home;
use crate::policy::Refusal;
use maeum_protocols::job::PrivacyPlan;

/// HOME/privacy/ledger.jsonl.
pub const LEDGER: &str = "privacy/ledger.jsonl";
/// HOME/privacy/noise.key: 32 secret bytes, mode 0600, made on first use.
pub const NOISE_KEY: &str = "privacy/noise.key";

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Line {
    /// The site accepted a DP job and set aside its planned ε.
    Reserve {
        job_id: String,
        mechanism: String,
        epsilon: f64,
        delta: f64,
        rounds: u32,
        /// The plan's Poisson rate, noise multiplier and total steps (so that totals
        /// compose in RDP across jobs).
        sample_rate: f64,
        noise_multiplier: f64,
        steps: u64,
        /// The distributed mode's d, m and B (absent in the local mode).
        #[serde(default, skip_serializing_if = "Shape::is_local")]
        shape: Shape,
        time_ms: i64,
    },
    /// The site is about to train one round of a DP job.
    Charge {
        job_id: String,
        round: u32,
        base_model: String,
        mechanism: String,
        clip: f64,
        noise_multiplier: f64,
        sample_rate: f64,
        steps: u64,
        delta: f64,
        /// ε of the job over all its charged rounds, this one included.
        epsilon_job: f64,
        #[serde(default, skip_serializing_if = "Shape::is_local")]
        shape: Shape,
        time_ms: i64,
    },
}

/// What the distributed mode's accountant needs beyond q and z: the model's
/// parameters d, the noise shares m and the batch bound B (all 0 in the local mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    #[serde(default)]
    pub dimension: u64,
    #[serde(default)]
    pub noise_shares: u32,
    #[serde(default)]
    pub max_batch: u32,
}

impl Shape {
    fn is_local(&self) -> bool {
        *self == Shape::default()
    }

    fn of(plan: &PrivacyPlan) -> Shape {
        Shape { dimension: plan.dimension, noise_shares: plan.noise_shares, max_batch: plan.max_batch }
    }
}

/// What the ledger says about one job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpend {
    pub job_id: String,
    pub mechanism: String,
    /// ε set aside at acceptance (0 when none was).
    pub reserved: f64,
    /// ε spent by the rounds charged so far.
    pub spent: f64,
    pub delta: f64,
    pub rounds_charged: u32,
    pub rounds_planned: u32,
    /// DP-SGD steps charged so far.
    pub steps: u64,
    #[serde(skip)]
    sample_rate: f64,
    #[serde(skip)]
    noise_multiplier: f64,
    #[serde(skip)]
    shape: Shape,
    #[serde(skip)]
    charged: Vec<(u32, String)>,
    /// Steps the reservation covers.
    #[serde(skip)]
    planned_steps: u64,
}

impl JobSpend {
    /// What the job counts against the total: its reservation while it runs.
    pub fn counted(&self) -> f64 {
        self.reserved.max(self.spent)
    }

    /// The job's RDP curve over the steps it counts (its reservation while it runs).
    fn rdp(&self) -> Option<maeum_models::accountant::Rdp> {
        let mode = PrivacyPlan::mode_of_mechanism(&self.mechanism)?;
        let steps = self.planned_steps.max(self.steps);
        maeum_protocols::job::rdp_of(mode, self.sample_rate, self.noise_multiplier, self.shape.dimension, steps).ok()
    }
}

/// The ledger, read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ledger {
    pub jobs: Vec<JobSpend>,
}

impl Ledger {
    /// Reads HOME/privacy/ledger.jsonl (empty when absent). Any unreadable line but a
    /// torn last one is an error: the site refuses to train on a ledger it cannot read.
    pub fn read(home: &Home) -> Result<Ledger> {
        let path = home.path(LEDGER);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading the privacy ledger {}", path.display())),
        };
        Self::parse(&text, &path)
    }

    fn parse(text: &str, path: &Path) -> Result<Ledger> {
        let complete = if text.ends_with('\n') { text } else { text.rsplit_once('\n').map_or("", |(a, _)| a) };
        let mut jobs: BTreeMap<String, JobSpend> = BTreeMap::new();
        for (i, line) in complete.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line: Line = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a privacy-ledger line", path.display(), i + 1))?;
            let entry = |jobs: &mut BTreeMap<String, JobSpend>, job_id: &str, mechanism: &str| {
                jobs.entry(job_id.to_string())
                    .or_insert_with(|| JobSpend {
                        job_id: job_id.to_string(),
                        mechanism: mechanism.to_string(),
                        reserved: 0.0,
                        spent: 0.0,
                        delta: 0.0,
                        rounds_charged: 0,
                        rounds_planned: 0,
                        steps: 0,
                        sample_rate: 0.0,
                        noise_multiplier: 0.0,
                        shape: Shape::default(),
                        charged: Vec::new(),
                        planned_steps: 0,
                    })
                    .clone()
            };
            match line {
                Line::Reserve {
                    job_id,
                    mechanism,
                    epsilon,
                    delta,
                    rounds,
                    sample_rate,
                    noise_multiplier,
                    steps,
                    shape,
                    ..
                } => {
                    let mut j = entry(&mut jobs, &job_id, &mechanism);
                    j.shape = shape;
                    j.reserved = j.reserved.max(epsilon);
                    j.delta = j.delta.max(delta);
                    j.rounds_planned = rounds;
                    j.sample_rate = sample_rate;
                    j.noise_multiplier = noise_multiplier;
                    j.planned_steps = j.planned_steps.max(steps);
                    jobs.insert(job_id, j);
                }
                Line::Charge {
                    job_id,
                    round,
                    base_model,
                    mechanism,
                    noise_multiplier,
                    sample_rate,
                    steps,
                    delta,
                    epsilon_job,
                    shape,
                    ..
                } => {
                    let mut j = entry(&mut jobs, &job_id, &mechanism);
                    j.shape = shape;
                    j.charged.push((round, base_model));
                    j.rounds_charged =
                        j.charged.iter().map(|(r, _)| *r).collect::<std::collections::BTreeSet<_>>().len() as u32;
                    j.steps += steps;
                    j.spent = j.spent.max(epsilon_job);
                    j.delta = j.delta.max(delta);
                    j.sample_rate = sample_rate;
                    j.noise_multiplier = noise_multiplier;
                    jobs.insert(job_id, j);
                }
            }
        }
        Ok(Ledger { jobs: jobs.into_values().collect() })
    }

    pub fn job(&self, job_id: &str) -> Option<&JobSpend> {
        self.jobs.iter().find(|j| j.job_id == job_id)
    }

    /// (ε, δ) counted against the site's total. δ is the sum of the jobs' δ; ε is the
    /// smaller of two valid bounds: the sum of the jobs' ε (basic composition) and the
    /// ε at that δ of the jobs' RDP curves composed (every job here is a subsampled
    /// Gaussian, so their RDP adds up order by order).
    pub fn total(&self) -> (f64, f64) {
        self.total_with(None)
    }

    /// [`Ledger::total`] with one more job's plan counted.
    fn total_with(&self, extra: Option<&PrivacyPlan>) -> (f64, f64) {
        let (mut basic, mut delta) = self.jobs.iter().fold((0.0, 0.0), |(e, d), j| (e + j.counted(), d + j.delta));
        let mut rdp = Some(maeum_models::accountant::Rdp::zero());
        for j in &self.jobs {
            match (rdp.as_mut(), j.rdp()) {
                (Some(total), Some(r)) => total.compose(&r),
                _ => rdp = None,
            }
        }
        if let Some(p) = extra {
            basic += p.epsilon;
            delta += p.delta;
            match (rdp.as_mut(), p.rdp_after(p.rounds)) {
                (Some(total), Ok(r)) => total.compose(&r),
                _ => rdp = None,
            }
        }
        if self.jobs.is_empty() && extra.is_none() {
            return (0.0, 0.0);
        }
        let composed = rdp.and_then(|r| r.epsilon(delta.min(0.5)).ok()).unwrap_or(f64::INFINITY);
        (basic.min(composed), delta)
    }
}

/// Whether `plan` fits in the site's total budget (`[policy.privacy] budget`, 0 = no
/// total) beside what the ledger already holds; `Ok(true)` when `job_id` already has
/// its reservation.
pub fn check_budget(home: &Home, job_id: &str, plan: &PrivacyPlan, budget: f64) -> std::result::Result<bool, Refusal> {
    let refusal = |why: String| Refusal { rule: "privacy.budget", why };
    let ledger = Ledger::read(home).map_err(|e| refusal(format!("{e:#}")))?;
    if ledger.job(job_id).is_some_and(|j| j.reserved >= plan.epsilon) {
        return Ok(true);
    }
    let (spent, _) = ledger.total();
    let (after, _) = ledger.total_with(Some(plan));
    if budget > 0.0 && after > budget {
        return Err(refusal(format!(
            "the job needs ε = {:.3} per record, which would bring this site's total to ε = {after:.3}, above its \
             budget of {budget} (spent or set aside: ε = {spent:.3}, remaining {:.3})",
            plan.epsilon,
            (budget - spent).max(0.0)
        )));
    }
    Ok(false)
}

/// Sets aside `plan`'s ε for `job_id` (idempotent), or refuses it under the site's
/// total budget with the numbers.
pub fn reserve(home: &Home, job_id: &str, plan: &PrivacyPlan, budget: f64) -> std::result::Result<(), Refusal> {
    if check_budget(home, job_id, plan, budget)? {
        return Ok(());
    }
    let line = Line::Reserve {
        job_id: job_id.into(),
        mechanism: plan.mode.mechanism().into(),
        epsilon: plan.epsilon,
        delta: plan.delta,
        rounds: plan.rounds,
        sample_rate: plan.sample_rate,
        noise_multiplier: plan.noise_multiplier,
        steps: plan.steps_per_round * u64::from(plan.rounds),
        shape: Shape::of(plan),
        time_ms: crate::now_ms(),
    };
    append(home, &line)
        .map_err(|e| Refusal { rule: "privacy.budget", why: format!("cannot record the reservation: {e:#}") })
}

/// What a round's charge came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Charged {
    /// ε of the job after this round.
    pub epsilon_job: f64,
    /// False when this (round, base model) was charged before (a retried attempt).
    pub new: bool,
    /// DP-SGD steps of the job charged so far.
    pub steps: u64,
}

/// Charges one round of `plan` for `job_id` on `base_model` before training, durably;
/// refuses a round beyond the plan's (the coordinator cannot buy more rounds than the
/// job declared) or one the reservation does not cover.
pub fn charge(
    home: &Home,
    job_id: &str,
    round: u32,
    base_model: &str,
    plan: &PrivacyPlan,
) -> std::result::Result<Charged, Refusal> {
    let refusal = |why: String| Refusal { rule: "privacy.budget", why };
    let ledger = Ledger::read(home).map_err(|e| refusal(format!("{e:#}")))?;
    let job = ledger.job(job_id);
    if let Some(j) = job
        && j.charged.iter().any(|(r, b)| *r == round && b == base_model)
    {
        return Ok(Charged { epsilon_job: j.spent, new: false, steps: j.steps });
    }
    let steps = job.map_or(0, |j| j.steps) + plan.steps_per_round;
    let epsilon_job = plan
        .rdp_of_steps(steps)
        .and_then(|r| r.epsilon(plan.delta).map_err(|e| e.to_string()))
        .map_err(|e| refusal(format!("the accountant refused the plan: {e}")))?;
    let reserved = job.map_or(0.0, |j| j.reserved);
    // The accountant's own rounding aside, a job never spends beyond what it reserved.
    if epsilon_job > reserved * (1.0 + 1e-9) {
        return Err(refusal(format!(
            "round {round} would bring job {job_id} to ε = {epsilon_job:.3} per record, beyond the ε = {reserved:.3} \
             this site set aside when it accepted the job ({} rounds charged of {} planned)",
            job.map_or(0, |j| j.rounds_charged),
            job.map_or(0, |j| j.rounds_planned)
        )));
    }
    let line = Line::Charge {
        job_id: job_id.into(),
        round,
        base_model: base_model.into(),
        mechanism: plan.mode.mechanism().into(),
        clip: plan.clip,
        noise_multiplier: plan.noise_multiplier,
        sample_rate: plan.sample_rate,
        steps: plan.steps_per_round,
        delta: plan.delta,
        epsilon_job,
        shape: Shape::of(plan),
        time_ms: crate::now_ms(),
    };
    append(home, &line).map_err(|e| refusal(format!("cannot record the charge: {e:#}")))?;
    Ok(Charged { epsilon_job, new: true, steps })
}

fn append(home: &Home, line: &Line) -> Result<()> {
    // INVARIANT: a ledger line is strings and numbers, which always serialise.
    let text = serde_json::to_string(line).expect("a ledger line serialises");
    crate::witness::append_line(home, LEDGER, &text)
}

/// The secret RNG of one round's DP-SGD: ChaCha20 keyed by HMAC-SHA256 under the
/// site's noise key over (job, round, base model). Whoever knew the seed could
/// subtract the noise, so the key never leaves the site; the same round on the same
/// base model draws the same sample and noise (a retry releases nothing new).
pub fn noise_rng(home: &Home, job_id: &str, round: u32, base_model: &str) -> Result<ChaCha20Rng> {
    let key = noise_key(home)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for part in
        [b"maeum/dp-noise/v1\0".as_slice(), job_id.as_bytes(), b"\0", &round.to_le_bytes(), base_model.as_bytes()]
    {
        ctx.update(part);
    }
    let tag = ctx.sign();
    let mut seed = [0u8; 32];
    seed.copy_from_slice(tag.as_ref());
    Ok(ChaCha20Rng::from_seed(seed))
}

fn noise_key(home: &Home) -> Result<[u8; 32]> {
    let path = home.path(NOISE_KEY);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                bail!(
                    "{} is not a 32-byte key; restore it from backup (it is not a secret to regenerate mid-job)",
                    path.display()
                );
            };
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            maeum_models::write_file(&path, &key, true).with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `maeum-site privacy`: spent and remaining per job and in total.
pub fn show(dir: &Path, json: bool) -> Result<()> {
    crate::enrol::check_home(dir)?;
    let home = Home::new(dir);
    let ledger = Ledger::read(&home)?;
    let policy = home.config()?.policy.privacy;
    let (total, total_delta) = ledger.total();
    let remaining = (policy.budget > 0.0).then(|| (policy.budget - total).max(0.0));
    if json {
        let v = serde_json::json!({
            "jobs": ledger.jobs, "total_epsilon": total, "total_delta": total_delta,
            "budget": (policy.budget > 0.0).then_some(policy.budget), "remaining": remaining,
            "policy": policy,
        });
        println!("{v}");
        return Ok(());
    }
    if ledger.jobs.is_empty() {
        println!("no differentially private job has used this site's records");
    } else {
        let mut t =
            maeum_runtime::table::table(&["job", "mechanism", "rounds", "ε spent", "ε reserved", "δ"], &[2, 3, 4]);
        for j in &ledger.jobs {
            t.add_row(vec![
                j.job_id.clone(),
                j.mechanism.clone(),
                format!("{}/{}", j.rounds_charged, j.rounds_planned),
                format!("{:.3}", j.spent),
                format!("{:.3}", j.reserved),
                format!("{:e}", j.delta),
            ]);
        }
        println!("{t}");
    }
    if ledger.jobs.is_empty() {
        println!(
            "total: nothing spent{}",
            match remaining {
                Some(r) => format!("; budget {} leaves ε = {r:.3}", policy.budget),
                None => "; no total budget set ([policy.privacy] budget)".into(),
            }
        );
        return Ok(());
    }
    println!(
        "total: ε = {total:.3}, δ = {total_delta:e} (composed across jobs){}",
        match remaining {
            Some(r) => format!("; budget {} leaves ε = {r:.3}", policy.budget),
            None => "; no total budget set ([policy.privacy] budget)".into(),
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(epsilon_target: f64, rounds: u32) -> PrivacyPlan {
        let t = maeum_protocols::job::PrivacyTable {
            mode: maeum_protocols::job::PrivacyMode::Local,
            epsilon: epsilon_target,
            ..Default::default()
        };
        t.plan(rounds, 1, 0, 3).expect("valid").expect("a plan")
    }

    fn distributed(epsilon_target: f64, rounds: u32) -> PrivacyPlan {
        let t = maeum_protocols::job::PrivacyTable {
            mode: maeum_protocols::job::PrivacyMode::Distributed,
            epsilon: epsilon_target,
            sample_rate: 1.0,
            ..Default::default()
        };
        t.plan(rounds, 1, 52_763, 5).expect("valid").expect("a plan")
    }

    #[test]
    fn distributed_rounds_are_charged_and_compose_with_local_jobs() {
        let (_d, home) = home();
        let p = distributed(3.0, 4);
        assert_eq!((p.steps_per_round, p.noise_shares, p.dimension), (1, 5, 52_763));
        reserve(&home, "ddp", &p, 0.0).expect("reserve");
        for round in 1..=4 {
            charge(&home, "ddp", round, &format!("base{round}"), &p).expect("charge");
        }
        let err = charge(&home, "ddp", 5, "base5", &p).expect_err("beyond the plan");
        assert_eq!(err.rule, "privacy.budget");
        // Read back, the job's curve is the Skellam one: spent = the plan's ε.
        let l = Ledger::read(&home).expect("read");
        let j = l.job("ddp").expect("job");
        assert_eq!(j.mechanism, "dp-sgd-distributed-skellam");
        assert!((j.spent - p.epsilon).abs() < 1e-9, "{} vs {}", j.spent, p.epsilon);
        let (alone, _) = l.total();
        assert!((alone - p.epsilon).abs() < 1e-6, "one job's total is its ε: {alone}");
        // With a local job beside it, the RDP curves add up order by order: below the sum.
        reserve(&home, "local", &plan(3.0, 3), 0.0).expect("reserve");
        let (total, delta) = Ledger::read(&home).expect("read").total();
        assert!((delta - 2e-5).abs() < 1e-12);
        assert!(total < 2.0 * 3.0 && total > 3.0, "composed total {total}");
        let text = std::fs::read_to_string(home.path(LEDGER)).expect("ledger");
        assert!(text.contains("\"shape\":{\"dimension\":52763,\"noise_shares\":5,\"max_batch\":1024}"), "{text}");
    }

    fn home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        (dir, home)
    }

    #[test]
    fn a_job_beyond_the_budget_is_refused_with_the_numbers() {
        // 1 unit of budget left; the job needs 2.
        let (_d, home) = home();
        let two = plan(2.0, 3);
        let err = reserve(&home, "second", &two, 1.0).expect_err("over budget");
        assert_eq!(err.rule, "privacy.budget");
        assert!(err.why.contains("needs ε = 2.000") && err.why.contains("remaining 1.000"), "{}", err.why);
        assert!(err.why.contains("above its budget of 1"), "{}", err.why);
        // With a job already counted: ε ≈ 2 of 2.2 spent, a second ε-2 job would bring
        // the composed total to ≈ 2.53.
        reserve(&home, "first", &two, 2.2).expect("fits");
        let err = reserve(&home, "second", &two, 2.2).expect_err("over budget");
        assert!(err.why.contains("total to ε = 2.53") && err.why.contains("remaining 0.200"), "{}", err.why);
        // Without a total budget it fits; reserving twice is idempotent.
        reserve(&home, "second", &two, 0.0).expect("no total");
        reserve(&home, "second", &two, 0.0).expect("again");
        let l = Ledger::read(&home).expect("read");
        assert_eq!(l.jobs.len(), 2);
        assert!(l.total().0 <= 2.0 * two.epsilon + 1e-9, "{:?}", l.total());
    }

    #[test]
    fn totals_compose_in_rdp_and_never_exceed_the_sum_of_the_jobs() {
        let (_d, home) = home();
        let p = plan(2.0, 3);
        for job in ["a", "b", "c"] {
            reserve(&home, job, &p, 0.0).expect("reserve");
        }
        let (total, delta) = Ledger::read(&home).expect("read").total();
        assert!((delta - 3e-5).abs() < 1e-12);
        // Three ε ≈ 2 jobs: the sum is ≈ 6; their RDP composed at δ = 3e-5 is less.
        assert!(total < 3.0 * p.epsilon - 0.5 && total > p.epsilon, "total {total}");
        // So a budget of 5.5 takes a third job that basic composition (≈ 6) would refuse...
        let (_d2, home2) = self::home();
        reserve(&home2, "a", &p, 5.5).expect("a");
        reserve(&home2, "b", &p, 5.5).expect("b");
        reserve(&home2, "c", &p, 5.5).expect("c, by RDP composition");
        // ...and the budget still binds.
        let err = reserve(&home2, "d", &plan(8.0, 3), 5.5).expect_err("over budget");
        assert!(err.why.contains("above its budget of 5.5"), "{}", err.why);
    }

    #[test]
    fn rounds_are_charged_once_per_base_model_and_never_beyond_the_plan() {
        let (_d, home) = home();
        let p = plan(4.0, 2);
        let err = charge(&home, "j", 1, "base1", &p).expect_err("no reservation");
        assert_eq!(err.rule, "privacy.budget");
        reserve(&home, "j", &p, 0.0).expect("reserve");
        let first = charge(&home, "j", 1, "base1", &p).expect("round 1");
        assert!(first.new && first.epsilon_job < p.epsilon);
        // A retried attempt on the same base model releases the same update: free.
        let again = charge(&home, "j", 1, "base1", &p).expect("retry");
        assert_eq!(again, Charged { epsilon_job: first.epsilon_job, new: false, steps: p.steps_per_round });
        let second = charge(&home, "j", 2, "base2", &p).expect("round 2");
        assert!((second.epsilon_job - p.epsilon).abs() < 1e-9, "{} vs {}", second.epsilon_job, p.epsilon);
        // A third charge (another base model for round 2, or a round 3) exceeds the plan.
        let err = charge(&home, "j", 2, "other", &p).expect_err("beyond the plan");
        assert!(err.why.contains("beyond the ε"), "{}", err.why);
        let j = Ledger::read(&home).expect("read").job("j").cloned().expect("job");
        assert_eq!((j.rounds_charged, j.steps), (2, 2 * p.steps_per_round));
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_corrupt_one_is_an_error() {
        let (_d, home) = home();
        let p = plan(4.0, 2);
        reserve(&home, "j", &p, 0.0).expect("reserve");
        let path = home.path(LEDGER);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str("{\"kind\":\"charge\",\"job_id\":\"j\",\"rou");
        std::fs::write(&path, &text).expect("write");
        assert_eq!(Ledger::read(&home).expect("torn tail").job("j").map(|j| j.rounds_charged), Some(0));
        std::fs::write(&path, "garbage\n").expect("write");
        let err = Ledger::read(&home).expect_err("corrupt");
        assert!(format!("{err:#}").contains("ledger.jsonl:1: not a privacy-ledger line"), "{err:#}");
        assert!(charge(&home, "j", 1, "b", &p).is_err(), "no training on an unreadable ledger");
    }

    #[test]
    fn the_noise_stream_is_secret_keyed_and_bound_to_the_round_and_model() {
        use rand::RngCore;
        let (_d, home) = home();
        let draw = |job: &str, round: u32, base: &str| noise_rng(&home, job, round, base).expect("rng").next_u64();
        let a = draw("j", 1, "m");
        assert_eq!(a, draw("j", 1, "m"), "a retry draws the same noise");
        assert_ne!(a, draw("j", 2, "m"));
        assert_ne!(a, draw("j", 1, "other"));
        let (_d2, other_site) = self::home();
        assert_ne!(a, noise_rng(&other_site, "j", 1, "m").expect("rng").next_u64(), "keys differ per site");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(home.path(NOISE_KEY)).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
