//! The site's privacy policy: `[policy]` in HOME/site.toml.
//!
//! The coordinator is not trusted with what a site reveals. Every rule here is checked
//! by the site itself, before it reveals anything the rule protects: a job offer before
//! the site accepts it, a secure-aggregation session before the site advertises keys,
//! the survivor set before it signs it, and the unmask request before it answers it.
//! A refusal names its rule (`[policy] min_cohort`, …), is journalled, reported to the
//! coordinator and counted in the site's metrics. `docs/protocols/threat-model.md`
//! says what each rule defends against.

use serde::{Deserialize, Serialize};

use maeum_protocols::job::JobSpec;

/// The smallest cohort a site may allow: secure aggregation needs two parties, and
/// with two the other party (or a sybil the lead minted) learns this site's update.
pub const MIN_COHORT_FLOOR: u16 = 2;

/// `[policy]` in HOME/site.toml. The defaults are the safe ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Accept job offers without the admin (`maeum-site jobs accept`). Off by default:
    /// an offer waits for the admin's consent. The demo federation turns it on.
    pub auto_accept: bool,
    /// Take part in jobs that aggregate plaintext updates
    /// (`insecure_plaintext_aggregation_for_debugging`): the coordinator then sees this
    /// site's update and weight. Off by default.
    pub allow_plaintext: bool,
    /// The fewest sites this site reveals a sum with: checked against a session's size,
    /// its threshold and the survivor set before anything is revealed (at least 2).
    pub min_cohort: u16,
    /// Model kinds this site trains (`text-classifier`, `encoder-head`, `encoder-lora`,
    /// `tabular-mlp`).
    pub allowed_models: Vec<String>,
    /// The most parameters a job's model may have.
    pub max_params: u64,
    /// The most rounds a job may ask for.
    pub max_rounds: u32,
    /// Aggregation strategies this site takes part in (`fedavg`, `fedprox`,
    /// `fedadam`, `fedyogi`).
    pub allowed_strategies: Vec<String>,
    /// When not empty, the only sites this site shares a session with (besides itself).
    /// The lead holds the consortium CA and can enrol sybils; pinning the member list
    /// is the defence against that.
    pub members: Vec<String>,
    /// `[policy.privacy]`: the differential privacy this site requires.
    pub privacy: PrivacyPolicy,
}

/// `[policy.privacy]` in HOME/site.toml: the record-level guarantee this site requires
/// of any job that trains on its records, and its total budget over all jobs
/// (`docs/protocols/privacy.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// Take part in jobs without differential privacy (`[privacy]` off). On by default,
    /// so that a new site joins the consortium's first jobs; a privacy officer who wants
    /// a formal guarantee per record turns it off.
    pub allow_non_dp: bool,
    /// Largest ε per record any one job may spend.
    pub max_epsilon: f64,
    /// Largest δ any one job may have.
    pub max_delta: f64,
    /// Total ε over all jobs that use this site's records (composed across jobs, `ledger`); 0 = no
    /// total limit.
    pub budget: f64,
    /// `distributed` jobs: the fewest colluding sites a job must tolerate (its
    /// `[privacy] colluders`). The noise is split so that `min_sites − colluders` honest
    /// shares make the whole; a site that trusts fewer of its peers raises this.
    pub min_colluders: u32,
    /// Take part in `distributed` jobs at all (their guarantee relies on secure
    /// aggregation and on the stated colluder bound, unlike `local`).
    pub allow_distributed: bool,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        Self {
            allow_non_dp: true,
            max_epsilon: 10.0,
            max_delta: 1e-5,
            budget: 0.0,
            min_colluders: 0,
            allow_distributed: true,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            auto_accept: false,
            allow_plaintext: false,
            min_cohort: 3,
            // The encoder kinds run only on an encoder the admin installed (`maeum-site
            // encoders add`), which is the opt-in; their update is the head (and the
            // adapters' B), never the encoder. The adapter stand-in is for test fleets and
            // is not here: its update is this site's label frequencies.
            allowed_models: vec!["text-classifier".into(), "encoder-head".into(), "encoder-lora".into()],
            max_params: 1 << 26,
            max_rounds: 1_000,
            allowed_strategies: ["fedavg", "fedprox", "fedadam", "fedyogi"].map(String::from).to_vec(),
            members: Vec::new(),
            privacy: PrivacyPolicy::default(),
        }
    }
}

/// A policy rule said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule's key in `[policy]` (or a protocol rule such as `reveal_once`).
    pub rule: &'static str,
    pub why: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused by this site's policy ([policy] {}): {}", self.rule, self.why)
    }
}

impl std::error::Error for Refusal {}

fn refuse(rule: &'static str, why: String) -> Result<(), Refusal> {
    Err(Refusal { rule, why })
}

/// What a session asks of this site, as the site sees it.
#[derive(Debug, Clone)]
pub struct SessionView<'a> {
    pub me: &'a str,
    /// Every participant's site id (this site included).
    pub members: Vec<&'a str>,
    pub threshold: u16,
    /// 0 = every pair masks; k = SecAgg+ with k neighbours.
    pub degree: u16,
    /// The job's `min_sites`.
    pub min_sites: u32,
}

impl Policy {
    /// Checks the policy itself (called when site.toml is read).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_cohort < MIN_COHORT_FLOOR {
            return Err(format!("[policy] min_cohort must be at least {MIN_COHORT_FLOOR}, got {}", self.min_cohort));
        }
        if usize::from(self.min_cohort) > maeum_secagg::params::MAX_PARTIES {
            return Err(format!("[policy] min_cohort must be at most 255, got {}", self.min_cohort));
        }
        let known_models = ["text-classifier", "encoder-head", "encoder-lora", "adapter-stand-in", "tabular-mlp"];
        if let Some(m) = self.allowed_models.iter().find(|m| !known_models.contains(&m.as_str())) {
            return Err(format!(
                "[policy] allowed_models: unknown model kind {m:?} (known: {})",
                known_models.join(", ")
            ));
        }
        let known = ["fedavg", "fedprox", "fedadam", "fedyogi"];
        if let Some(s) = self.allowed_strategies.iter().find(|s| !known.contains(&s.as_str())) {
            return Err(format!("[policy] allowed_strategies: unknown strategy {s:?} (known: {})", known.join(", ")));
        }
        for m in &self.members {
            maeum_pki::identity::validate_name(m).map_err(|e| format!("[policy] members: {m:?}: {e}"))?;
        }
        let p = &self.privacy;
        if !(p.max_epsilon.is_finite() && p.max_epsilon > 0.0) {
            return Err(format!("[policy.privacy] max_epsilon must be positive, got {}", p.max_epsilon));
        }
        if !(p.max_delta > 0.0 && p.max_delta < 1.0) {
            return Err(format!("[policy.privacy] max_delta must be in (0, 1), got {}", p.max_delta));
        }
        if !(p.budget.is_finite() && p.budget >= 0.0) {
            return Err(format!("[policy.privacy] budget must be 0 (no total) or positive, got {}", p.budget));
        }
        Ok(())
    }

    /// Whether this site takes a job with this specification at all.
    pub fn check_job(&self, job: &JobSpec) -> Result<(), Refusal> {
        if !job.secure_aggregation.enabled() && !self.allow_plaintext {
            return refuse(
                "allow_plaintext",
                "the job turns secure aggregation off (insecure_plaintext_aggregation_for_debugging), which would \
                 show the coordinator this site's own update and record count"
                    .into(),
            );
        }
        let kind = job.model.kind.as_str();
        if !self.allowed_models.iter().any(|m| m == kind) {
            return refuse(
                "allowed_models",
                format!("the job's model kind {kind} is not among {}", self.allowed_models.join(", ")),
            );
        }
        if let Ok(spec) = job.model_spec() {
            let n = spec.layout().numel() as u64;
            if n > self.max_params {
                return refuse("max_params", format!("the job's model has {n} parameters, above {}", self.max_params));
            }
        }
        if job.rounds > self.max_rounds {
            return refuse("max_rounds", format!("the job asks for {} rounds, above {}", job.rounds, self.max_rounds));
        }
        let strategy = job.strategy.kind.as_str();
        if !self.allowed_strategies.iter().any(|s| s == strategy) {
            return refuse(
                "allowed_strategies",
                format!("the job's strategy {strategy} is not among {}", self.allowed_strategies.join(", ")),
            );
        }
        self.check_privacy(job)
    }

    /// `[policy.privacy]`: the job's own plan, recomputed here with this site's
    /// accountant (never taken from the coordinator), against the site's limits.
    fn check_privacy(&self, job: &JobSpec) -> Result<(), Refusal> {
        let p = &self.privacy;
        let plan = match job.privacy_plan() {
            Ok(Some(plan)) => plan,
            Ok(None) if p.allow_non_dp => return Ok(()),
            Ok(None) => {
                return refuse(
                    "privacy.allow_non_dp",
                    "the job has no differential privacy ([privacy] mode = \"none\"), and this site requires it".into(),
                );
            }
            Err(e) => return refuse("privacy.max_epsilon", format!("the job's privacy plan is not valid: {e}")),
        };
        if plan.epsilon > p.max_epsilon {
            return refuse(
                "privacy.max_epsilon",
                format!(
                    "the job spends ε = {:.3} per record over {} rounds, above this site's limit of {}",
                    plan.epsilon, plan.rounds, p.max_epsilon
                ),
            );
        }
        if plan.delta > p.max_delta {
            return refuse(
                "privacy.max_delta",
                format!("the job's δ = {:e} is above this site's limit of {:e}", plan.delta, p.max_delta),
            );
        }
        if plan.distributed().is_some() {
            if !p.allow_distributed {
                return refuse(
                    "privacy.allow_distributed",
                    "the job splits the noise among the sites ([privacy] mode = \"distributed\"), and this site \
                     takes only local DP"
                        .into(),
                );
            }
            if job.privacy.colluders < p.min_colluders {
                return refuse(
                    "privacy.min_colluders",
                    format!(
                        "the job's noise holds against {} colluding sites, this site requires {}",
                        job.privacy.colluders, p.min_colluders
                    ),
                );
            }
        }
        Ok(())
    }

    /// Checks a proposed secure-aggregation session before this site advertises keys.
    pub fn check_session(&self, s: &SessionView<'_>) -> Result<(), Refusal> {
        let n = s.members.len();
        let floor = usize::from(self.min_cohort);
        if n < floor {
            return refuse("min_cohort", format!("the session has {n} sites, below this site's floor of {floor}"));
        }
        let group = if s.degree == 0 { n } else { usize::from(s.degree) + 1 };
        let t = usize::from(s.threshold);
        if t < floor {
            return refuse(
                "min_cohort",
                format!("the session's threshold {t} would unmask sums over fewer than this site's floor of {floor}"),
            );
        }
        if t < s.min_sites as usize && (s.min_sites as usize) <= group {
            return refuse(
                "min_threshold",
                format!("the session's threshold {t} is below the job's min_sites {}", s.min_sites),
            );
        }
        // More than 2/3 of the group: below that an active coordinator colluding with
        // fewer than 2t−n sites is no longer the bound the protocol promises.
        if 3 * t <= 2 * group {
            return refuse(
                "min_threshold",
                format!("the session's threshold {t} is not above 2/3 of its group of {group} sites"),
            );
        }
        if !self.members.is_empty() {
            let mut strangers: Vec<&str> =
                s.members.iter().copied().filter(|m| *m != s.me && !self.members.iter().any(|p| p == m)).collect();
            strangers.sort_unstable();
            if !strangers.is_empty() {
                return refuse(
                    "members",
                    format!("the session includes sites outside the pinned member list: {}", strangers.join(", ")),
                );
            }
        }
        Ok(())
    }

    /// Checks the survivor set U3 (the sites whose masked inputs the sum will hold)
    /// before this site signs it and reveals the shares that unmask it.
    pub fn check_survivors(&self, survivors: usize, min_sites: u32) -> Result<(), Refusal> {
        let floor = usize::from(self.min_cohort).max(min_sites as usize);
        if survivors < floor {
            return refuse(
                "min_cohort",
                format!(
                    "only {survivors} sites' inputs would be summed, below {floor} (this site's floor {}, the job's \
                     min_sites {min_sites})",
                    self.min_cohort
                ),
            );
        }
        Ok(())
    }

    /// One line per rule, for `maeum-site status` and `doctor`.
    pub fn summary(&self) -> Vec<(&'static str, String)> {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        vec![
            ("auto_accept", yes_no(self.auto_accept)),
            ("allow_plaintext", yes_no(self.allow_plaintext)),
            ("min_cohort", self.min_cohort.to_string()),
            ("allowed_models", self.allowed_models.join(", ")),
            ("max_params", self.max_params.to_string()),
            ("max_rounds", self.max_rounds.to_string()),
            ("allowed_strategies", self.allowed_strategies.join(", ")),
            ("members", if self.members.is_empty() { "any approved site".into() } else { self.members.join(", ") }),
            ("privacy.allow_non_dp", yes_no(self.privacy.allow_non_dp)),
            ("privacy.max_epsilon", format!("{} at δ ≤ {:e}", self.privacy.max_epsilon, self.privacy.max_delta)),
            ("privacy.allow_distributed", yes_no(self.privacy.allow_distributed)),
            ("privacy.min_colluders", self.privacy.min_colluders.to_string()),
            (
                "privacy.budget",
                if self.privacy.budget > 0.0 { self.privacy.budget.to_string() } else { "no total".into() },
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> JobSpec {
        JobSpec::from_toml("t.toml", &format!("name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 3\n{extra}"))
            .expect("job")
    }

    fn view<'a>(members: &[&'a str], threshold: u16, degree: u16) -> SessionView<'a> {
        SessionView { me: members[0], members: members.to_vec(), threshold, degree, min_sites: 3 }
    }

    #[test]
    fn the_defaults_refuse_plaintext_and_accept_a_secure_job() {
        let p = Policy::default();
        assert_eq!(p.check_job(&job("")), Ok(()));
        let plain = job("[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n");
        assert_eq!(p.check_job(&plain).expect_err("refused").rule, "allow_plaintext");
        let opted_in = Policy { allow_plaintext: true, ..Policy::default() };
        assert_eq!(opted_in.check_job(&plain), Ok(()));
    }

    #[test]
    fn model_rounds_and_strategy_limits_name_their_rule() {
        let p = Policy { max_rounds: 2, ..Policy::default() };
        assert_eq!(p.check_job(&job("")).expect_err("rounds").rule, "max_rounds");
        let p = Policy { max_params: 10, ..Policy::default() };
        assert_eq!(p.check_job(&job("")).expect_err("params").rule, "max_params");
        let p = Policy { allowed_strategies: vec!["fedadam".into()], ..Policy::default() };
        assert_eq!(p.check_job(&job("")).expect_err("strategy").rule, "allowed_strategies");
        let p = Policy { allowed_models: vec!["tabular-mlp".into()], ..Policy::default() };
        assert_eq!(p.check_job(&job("")).expect_err("model").rule, "allowed_models");
    }

    #[test]
    fn a_default_site_refuses_the_adapter_stand_in_which_would_reveal_its_label_frequencies() {
        let stand_in = job("[model]\nkind = \"adapter-stand-in\"\nparams = 1000\n");
        let err = Policy::default().check_job(&stand_in).expect_err("not opted in");
        assert_eq!(err.rule, "allowed_models");
        assert!(err.why.contains("adapter-stand-in"), "{err}");
        let test_fleet = Policy { allowed_models: vec!["adapter-stand-in".into()], ..Policy::default() };
        test_fleet.validate().expect("a known kind");
        assert_eq!(test_fleet.check_job(&stand_in), Ok(()));
    }

    #[test]
    fn a_site_that_demands_epsilon_3_refuses_an_epsilon_8_job_and_a_non_dp_job() {
        let strict = Policy {
            privacy: PrivacyPolicy { allow_non_dp: false, max_epsilon: 3.0, ..PrivacyPolicy::default() },
            ..Policy::default()
        };
        let dp = |eps: f64| job(&format!("[privacy]\nmode = \"local\"\nepsilon = {eps}\n"));
        let err = strict.check_job(&dp(8.0)).expect_err("ε 8");
        assert_eq!(err.rule, "privacy.max_epsilon");
        assert!(err.why.contains("above this site's limit of 3"), "{err}");
        assert_eq!(strict.check_job(&job("")).expect_err("non-DP").rule, "privacy.allow_non_dp");
        assert_eq!(strict.check_job(&dp(3.0)), Ok(()));
        let delta = job("[privacy]\nmode = \"local\"\nepsilon = 2.0\ndelta = 1e-4\n");
        assert_eq!(strict.check_job(&delta).expect_err("δ").rule, "privacy.max_delta");
        // The default takes both.
        assert_eq!(Policy::default().check_job(&dp(8.0)), Ok(()));
        assert_eq!(Policy::default().check_job(&job("")), Ok(()));
        let bad = Policy {
            privacy: PrivacyPolicy { max_epsilon: f64::NAN, ..PrivacyPolicy::default() },
            ..Policy::default()
        };
        assert!(bad.validate().expect_err("NaN").contains("max_epsilon"));
    }

    #[test]
    fn small_sessions_and_low_thresholds_are_refused() {
        let p = Policy::default();
        // Two sites, threshold 2: the other one (or a sybil) learns this site's update.
        assert_eq!(p.check_session(&view(&["a", "b"], 2, 0)).expect_err("n=2").rule, "min_cohort");
        assert_eq!(p.check_session(&view(&["a", "b", "c"], 3, 0)), Ok(()));
        assert_eq!(p.check_session(&view(&["a", "b", "c", "d", "e"], 4, 0)), Ok(()));
        // t = 3 of 5 is a majority but not above 2/3.
        let low = p.check_session(&view(&["a", "b", "c", "d", "e"], 3, 0)).expect_err("t=3 of 5");
        assert_eq!(low.rule, "min_threshold", "{low}");
        // SecAgg+: the group is the neighbourhood (k + 1).
        let members = ["a", "b", "c", "d", "e", "f", "g", "h"];
        assert_eq!(p.check_session(&view(&members, 4, 4)), Ok(()));
        assert_eq!(p.check_session(&view(&members, 3, 4)).expect_err("t=3 of 5").rule, "min_threshold");
        // A floor of 2 is the least a site can set.
        let two = Policy { min_cohort: 2, ..Policy::default() };
        assert_eq!(two.validate(), Ok(()));
        assert!(Policy { min_cohort: 1, ..Policy::default() }.validate().is_err());
    }

    #[test]
    fn a_threshold_below_min_sites_is_refused() {
        let p = Policy::default();
        let s =
            SessionView { me: "a", members: vec!["a", "b", "c", "d", "e", "f"], threshold: 5, degree: 0, min_sites: 6 };
        assert_eq!(p.check_session(&s).expect_err("t < min_sites").rule, "min_threshold");
    }

    #[test]
    fn a_pinned_member_list_refuses_strangers() {
        let p = Policy { members: vec!["b".into(), "c".into()], ..Policy::default() };
        assert_eq!(p.check_session(&view(&["a", "b", "c"], 3, 0)), Ok(()));
        let e = p.check_session(&view(&["a", "b", "sybil"], 3, 0)).expect_err("sybil");
        assert_eq!(
            (e.rule, e.why.as_str()),
            ("members", "the session includes sites outside the pinned member list: sybil")
        );
    }

    #[test]
    fn the_survivor_set_must_reach_the_floor_and_min_sites() {
        let p = Policy::default();
        assert_eq!(p.check_survivors(3, 3), Ok(()));
        assert_eq!(p.check_survivors(2, 1).expect_err("2 < floor").rule, "min_cohort");
        assert_eq!(p.check_survivors(4, 5).expect_err("4 < min_sites").rule, "min_cohort");
    }
}
