//! The round in progress, as the handlers and the orchestrator share it.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Train,
    Evaluate,
}

/// The round in progress. Memory is O(model): one running sum, whatever the number of
/// sites; updates are staged on disk while they arrive and folded when complete.
#[derive(Debug)]
pub struct RoundState {
    job_id: String,
    round: u32,
    attempt: u32,
    stage: Stage,
    model: ModelRef,
    deadline_ms: i64,
    selected: BTreeSet<String>,
    done: BTreeSet<String>,
    dropped: BTreeSet<String>,
    num_params: u64,
    /// A plaintext round's running Σ w·Δ (the folded updates).
    sum: Vec<f64>,
    /// A secure round's unmasked Σ w·Δ, kept as words and their scale.
    secure_sum: Option<crate::secagg::Decoded>,
    total_weight: u64,
    n_labels: usize,
    evaluation: Vec<Vec<u64>>,
    evaluated: BTreeSet<String>,
    /// Indices of the job's crisis classes.
    crisis_classes: Vec<usize>,
    /// The summed crisis histograms (`None` when the job has no crisis class, or once a
    /// site reported its evaluation without one: the sum would be partial).
    crisis_histogram: Option<CrisisHistogram>,
    pub(super) uploads: HashMap<String, (String, UploadHeader)>,
    /// The secure-aggregation session of a training stage (None: plaintext debugging
    /// job, or an evaluation stage).
    secagg: Option<SecAggRound>,
    /// The digest of the unmasked u32 aggregate (little-endian) once secure aggregation
    /// finished; the blob is already in the store.
    aggregate: Option<String>,
    /// Fault injection only (`crate::attack`, `divergent`): every site but the named
    /// one is handed this model instead. Always `None` in a real coordinator.
    divergent: Option<(String, ModelRef)>,
    /// Why the unmasked aggregate was refused (outside what honest inputs can sum to):
    /// the round is then committed without an update.
    refused: Option<String>,
    /// A secure job's final evaluation: a session whose inputs hold only the weight
    /// word and the evaluation counts (the sites do not train).
    evaluate_only: bool,
    /// SA-06 accusations of this attempt: accused site → the sites that accused it.
    accusations: BTreeMap<String, BTreeSet<String>>,
    /// Why each dropped site left this attempt, in words (for its strikes).
    why_dropped: BTreeMap<String, String>,
    /// Set by [`RoundState::secure_outcome`]: the survivors and the dropped are those
    /// the unmasking decided, and a later drop (a survivor restarting before the commit)
    /// changes neither.
    settled: bool,
}

impl RoundState {
    pub fn new(job: &JobRecord, round: u32, attempt: u32, stage: Stage, model: ModelRef, deadline_ms: i64) -> Self {
        let n_labels = job.spec.labels.len();
        let crisis_classes: Vec<usize> =
            job.spec.labels.iter().enumerate().filter(|(_, l)| is_crisis_label(l)).map(|(i, _)| i).collect();
        let num_params = job.spec.model_spec().map(|s| s.layout().numel() as u64).unwrap_or(0);
        Self {
            job_id: job.id.clone(),
            round,
            attempt,
            stage,
            model,
            deadline_ms,
            selected: BTreeSet::new(),
            done: BTreeSet::new(),
            dropped: BTreeSet::new(),
            num_params,
            // With secure aggregation the running sum is the masked u32 sum inside the
            // session; this f64 sum is filled from the unmasked result.
            sum: if stage == Stage::Train && !job.spec.secure_aggregation.enabled() {
                vec![0.0; num_params as usize]
            } else {
                Vec::new()
            },
            secure_sum: None,
            total_weight: 0,
            n_labels,
            evaluation: vec![vec![0; n_labels]; n_labels],
            evaluated: BTreeSet::new(),
            crisis_classes: crisis_classes.clone(),
            crisis_histogram: (!crisis_classes.is_empty()).then(CrisisHistogram::default),
            uploads: HashMap::new(),
            secagg: None,
            aggregate: None,
            divergent: None,
            refused: None,
            evaluate_only: false,
            accusations: BTreeMap::new(),
            why_dropped: BTreeMap::new(),
            settled: false,
        }
    }

    /// Takes the summed evaluation counts of a secure round (`JobSpec::evaluation_words`
    /// layout: the confusion rows, then the crisis histogram's crisis and other bins).
    /// `Err` when they cannot come from honest sites (a crisis histogram that does not
    /// count the confusion matrix's examples).
    pub fn secure_evaluation(&mut self, counts: &[u32]) -> Result<(), String> {
        // Nothing counts as evaluated unless the counts hold.
        self.evaluated.clear();
        let l = self.n_labels;
        if counts.len() < l * l {
            return Err(format!("{} evaluation words, the job needs {}", counts.len(), l * l));
        }
        let rows: Vec<Vec<u64>> =
            counts[..l * l].chunks(l.max(1)).map(|r| r.iter().map(|&c| u64::from(c)).collect()).collect();
        let rest = &counts[l * l..];
        let histogram = if self.crisis_classes.is_empty() {
            None
        } else {
            let bins = maeum_models::metrics::HISTOGRAM_BINS;
            if rest.len() != 2 * bins {
                return Err(format!("{} histogram words, the job needs {}", rest.len(), 2 * bins));
            }
            let h = CrisisHistogram {
                crisis: rest[..bins].iter().map(|&c| u64::from(c)).collect(),
                other: rest[bins..].iter().map(|&c| u64::from(c)).collect(),
            };
            let crisis_rows: u64 = self.crisis_classes.iter().filter_map(|&i| rows.get(i)).flatten().sum();
            let all: u64 = rows.iter().flatten().sum();
            if h.crisis.iter().sum::<u64>() != crisis_rows || h.other.iter().sum::<u64>() != all - crisis_rows {
                return Err("the crisis histogram does not count the confusion matrix's examples".into());
            }
            Some(h)
        };
        self.evaluation = rows;
        self.crisis_histogram = histogram;
        self.evaluated = self.done.clone();
        Ok(())
    }

    /// Sites still expected to deliver in this stage.
    pub fn waiting(&self) -> BTreeSet<String> {
        let finished: &BTreeSet<String> = if self.stage == Stage::Train { &self.done } else { &self.evaluated };
        self.selected.iter().filter(|s| !finished.contains(*s) && !self.dropped.contains(*s)).cloned().collect()
    }

    /// Whether `site` may still deliver this attempt's update: selected, not dropped,
    /// not done.
    pub fn expects_update(&self, site: &str) -> Result<(), Refused> {
        if !self.selected.contains(site) || self.dropped.contains(site) {
            return Err(Refused::Precondition(format!("site/{site} is not a participant of this round")));
        }
        if self.done.contains(site) {
            return Err(Refused::Duplicate(format!("site/{site} already delivered its update for this round")));
        }
        Ok(())
    }

    /// Checks an update's header against this attempt (before any byte is staged):
    /// round and attempt, participation, base model, aggregation kind and layout.
    /// Returns the words the update must hold. `divergent` is the fault-injection
    /// coordinator that hands out other models (it skips the base-model check).
    pub fn admit(&self, site: &str, h: &UploadHeader, divergent: bool) -> Result<u64, Refused> {
        if h.job_id != self.job_id || self.stage != Stage::Train {
            return Err(Refused::Precondition(format!("job {} is not collecting updates now", h.job_id)));
        }
        if h.round != self.round || h.attempt != self.attempt {
            return Err(Refused::Precondition(format!(
                "stale update: it is for round {} attempt {}, the job is at round {} attempt {}",
                h.round, h.attempt, self.round, self.attempt
            )));
        }
        self.expects_update(site)?;
        if h.base_digest != self.model.digest && !divergent {
            return Err(Refused::Invalid(format!(
                "update computed against model {}, but round {} distributed {}",
                h.base_digest, self.round, self.model.digest
            )));
        }
        match (&self.secagg, h.masked) {
            (Some(sa), true) => sa.may_upload(site).map_err(|s| Refused::Precondition(s.message().to_string()))?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(Refused::Precondition(
                    "this round uses secure aggregation: a plaintext update is refused".into(),
                ));
            }
            (None, true) => return Err(Refused::Precondition("this round does not use secure aggregation".into())),
        }
        // A masked input's num_params is the session's vector length minus the weight
        // word: the parameters and the evaluation counts.
        let expected = match &self.secagg {
            Some(sa) if h.masked => sa.session.params.vector_len - 1,
            _ => self.num_params,
        };
        if h.layout_digest != self.model.layout_digest || h.num_params != expected {
            return Err(Refused::Invalid(format!(
                "update layout {} with {} words does not match the round's layout {} with {expected} words",
                h.layout_digest, h.num_params, self.model.layout_digest
            )));
        }
        Ok(expected)
    }

    /// Adds a plaintext update of `weight` (values in layout order, already verified
    /// by the caller: digest and finiteness) to the running sum and marks `site` done.
    /// The sum is O(model) and there is no room for a second copy, so a value that
    /// cannot be read or is not finite halfway through (the staged file changed under
    /// the caller) poisons the attempt: it is refused and commits without an update,
    /// never with a partial sum.
    pub fn fold_plain(
        &mut self,
        site: &str,
        weight: u64,
        values: &mut dyn Iterator<Item = Result<f32, String>>,
    ) -> Result<(), Refused> {
        self.expects_update(site)?;
        if self.secagg.is_some() || self.stage != Stage::Train {
            return Err(Refused::Precondition("this round takes no plaintext update".into()));
        }
        let w = weight as f64;
        let mut folded = 0usize;
        let mut bad = None;
        for (acc, v) in self.sum.iter_mut().zip(values) {
            match v {
                Ok(v) if v.is_finite() => *acc += w * f64::from(v),
                Ok(_) => bad = Some(format!("update value {folded} is not a finite number")),
                Err(e) => bad = Some(e),
            }
            if bad.is_some() {
                break;
            }
            folded += 1;
        }
        if bad.is_none() && folded != self.sum.len() {
            bad = Some(format!("{folded} values, the round's model has {}", self.sum.len()));
        }
        if let Some(why) = bad {
            if folded > 0 {
                self.refused = Some(format!("site/{site}'s update broke off while it was folded: {why}"));
            }
            return Err(Refused::Invalid(why));
        }
        self.total_weight += weight;
        self.done.insert(site.to_string());
        Ok(())
    }

    /// Marks `site`'s masked input complete (its words are in the session's sum).
    pub fn masked_input_done(&mut self, site: &str) -> Result<(), Refused> {
        self.expects_update(site)?;
        self.done.insert(site.to_string());
        Ok(())
    }

    /// Drops `site` from this attempt; whether it was still expected to deliver.
    pub fn drop_site(&mut self, site: &str) -> bool {
        if self.settled {
            return false;
        }
        let waiting = self.waiting().contains(site);
        if self.selected.contains(site) {
            self.dropped.insert(site.to_string());
        }
        waiting
    }

    /// Drops `site` for `why` (kept for its strikes); whether it was a participant not
    /// dropped before.
    pub fn drop_for(&mut self, site: &str, why: impl Into<String>) -> bool {
        if self.settled || !self.selected.contains(site) || self.dropped.contains(site) {
            return false;
        }
        self.drop_site(site);
        self.why_dropped.insert(site.to_string(), why.into());
        true
    }

    /// A plaintext round's evaluation report from `site`: its confusion rows and, for a
    /// job with crisis classes, its crisis histogram (already checked against the rows).
    pub fn add_evaluation(
        &mut self,
        site: &str,
        rows: &[Vec<u64>],
        histogram: Option<&CrisisHistogram>,
    ) -> Result<(), Refused> {
        if !self.selected.contains(site) {
            return Err(Refused::Precondition(format!("site/{site} is not a participant of this round")));
        }
        if self.secagg.is_some() || self.evaluate_only {
            return Err(Refused::Precondition(
                "this round uses secure aggregation: evaluation counts travel inside the masked input".into(),
            ));
        }
        if rows.len() != self.n_labels || rows.iter().any(|r| r.len() != self.n_labels) {
            return Err(Refused::Invalid(format!("confusion rows must be {0} × {0}", self.n_labels)));
        }
        if self.evaluated.contains(site) {
            return Err(Refused::Duplicate("evaluation already reported".into()));
        }
        // The histogram is merged first: a bad one changes nothing.
        match (&mut self.crisis_histogram, histogram) {
            (Some(sum), Some(h)) => sum.merge(h).map_err(Refused::Invalid)?,
            (sum, None) => *sum = None,
            (None, Some(_)) => {}
        }
        self.evaluated.insert(site.to_string());
        for (acc, row) in self.evaluation.iter_mut().zip(rows) {
            acc.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// The unmasked result of this attempt's secure aggregation: the decoded sum, its
    /// weight, the survivors (done) and the dropped, and why the aggregate is refused
    /// (`Some`: the round commits without an update).
    pub fn secure_outcome(
        &mut self,
        sum: crate::secagg::Decoded,
        total_weight: u64,
        survivors: Vec<String>,
        dropped: Vec<String>,
        refused: Option<String>,
    ) {
        self.secure_sum = Some(sum);
        self.total_weight = total_weight;
        self.done = survivors.into_iter().collect();
        self.dropped = dropped.into_iter().collect();
        self.refused = refused;
        self.settled = true;
    }
}

/// What the orchestrator and the handlers read of the round; every change goes
/// through the methods above and below, which keep its invariants (a site is done or
/// dropped at most once, the sum is folded once per site, nothing changes after the
/// secure outcome settled the survivors).
impl RoundState {
    pub fn job_id(&self) -> &str {
        &self.job_id
    }
    pub fn round(&self) -> u32 {
        self.round
    }
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    pub fn stage(&self) -> Stage {
        self.stage
    }
    pub fn model(&self) -> &ModelRef {
        &self.model
    }
    pub fn deadline_ms(&self) -> i64 {
        self.deadline_ms
    }
    pub fn selected(&self) -> &BTreeSet<String> {
        &self.selected
    }
    pub fn done(&self) -> &BTreeSet<String> {
        &self.done
    }
    pub fn dropped(&self) -> &BTreeSet<String> {
        &self.dropped
    }
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }
    pub fn n_labels(&self) -> usize {
        self.n_labels
    }
    pub fn evaluation(&self) -> &Vec<Vec<u64>> {
        &self.evaluation
    }
    pub fn evaluated(&self) -> &BTreeSet<String> {
        &self.evaluated
    }
    pub fn crisis_classes(&self) -> &[usize] {
        &self.crisis_classes
    }
    pub fn crisis_histogram(&self) -> &Option<CrisisHistogram> {
        &self.crisis_histogram
    }
    pub fn secagg(&self) -> &Option<SecAggRound> {
        &self.secagg
    }
    pub fn aggregate(&self) -> &Option<String> {
        &self.aggregate
    }
    pub fn divergent(&self) -> &Option<(String, ModelRef)> {
        &self.divergent
    }
    pub fn refused(&self) -> &Option<String> {
        &self.refused
    }
    pub fn evaluate_only(&self) -> bool {
        self.evaluate_only
    }
    pub fn why_dropped(&self) -> &BTreeMap<String, String> {
        &self.why_dropped
    }

    /// The session, for the stage calls that drive it.
    pub fn session_mut(&mut self) -> Option<&mut SecAggRound> {
        self.secagg.as_mut()
    }

    /// The attempt's participants, chosen before anything was handed out.
    pub fn select(&mut self, selected: BTreeSet<String>) {
        debug_assert!(self.done.is_empty() && self.dropped.is_empty(), "select before the attempt starts");
        self.selected = selected;
    }

    /// The attempt's secure-aggregation session (`evaluate_only`: the final
    /// evaluation, whose inputs carry the weight and the counts only).
    pub fn attach_session(&mut self, session: SecAggRound, evaluate_only: bool) {
        self.secagg = Some(session);
        self.evaluate_only = evaluate_only;
    }

    /// A session restored after a restart, with what it had decided: the inputs in
    /// its sum (`done`) and who is out (`dropped`).
    pub fn restore_session(
        &mut self,
        session: SecAggRound,
        done: BTreeSet<String>,
        dropped: BTreeSet<String>,
        evaluate_only: bool,
    ) {
        self.selected = session.session.participants.iter().map(|p| p.site_id.clone()).collect();
        self.done = done;
        self.dropped = dropped;
        self.attach_session(session, evaluate_only);
    }

    /// Fault injection only (`crate::attack`, `divergent`).
    pub fn hand_divergent(&mut self, target: String, model: ModelRef) {
        self.divergent = Some((target, model));
    }

    /// Commits this attempt without an update, for `why`.
    pub fn refuse(&mut self, why: impl Into<String>) {
        self.refused = Some(why.into());
    }

    /// The digest of the unmasked aggregate, once stored.
    pub fn set_aggregate(&mut self, digest: Option<String>) {
        self.aggregate = digest;
    }

    /// Records that `accuser` says `accused`'s share did not authenticate (SA-06);
    /// returns the accusers once two distinct sites have named `accused` (then it is
    /// excluded).
    pub fn accuse(&mut self, accuser: &str, accused: &str) -> Option<Vec<String>> {
        let accusers = self.accusations.entry(accused.to_string()).or_default();
        accusers.insert(accuser.to_string());
        (accusers.len() >= 2).then(|| accusers.iter().cloned().collect())
    }

    /// The mean update Σ w·Δ / Σ w, taken out of the round (`None`: refused). An
    /// error when the aggregate weight is 0.
    pub fn take_mean(&mut self) -> anyhow::Result<Option<Vec<f32>>> {
        if self.refused.is_some() {
            return Ok(None);
        }
        anyhow::ensure!(self.total_weight > 0, "round {}: the aggregate weight is 0", self.round);
        let w = self.total_weight as f64;
        Ok(Some(match self.secure_sum.take() {
            Some(sum) => sum.into_mean(w),
            None => std::mem::take(&mut self.sum).into_iter().map(|s| (s / w) as f32).collect(),
        }))
    }
}

/// Why the round refused a site's message, without any transport in it: the handlers
/// turn it into a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not now: stale, not a participant, the wrong kind of round.
    Precondition(String),
    /// Already delivered.
    Duplicate(String),
    /// The content cannot be right.
    Invalid(String),
}

impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        match r {
            Refused::Precondition(m) => Status::failed_precondition(m),
            Refused::Duplicate(m) => Status::already_exists(m),
            Refused::Invalid(m) => Status::invalid_argument(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JobRecord, JobState};

    const LABELS: &str = "labels = [\"a\", \"suicidewatch\"]";

    fn job(extra: &str) -> JobRecord {
        let toml = format!(
            "name = \"t\"\n{LABELS}\nrounds = 2\n[model]\nkind = \"text-classifier\"\nbuckets = 64\nembed_dim = 2\n\
             hidden = 2\n{extra}"
        );
        let mut j = JobRecord::submitted("t-1".into(), JobSpec::from_toml("t.toml", &toml).expect("spec"), toml, 1);
        j.state = JobState::Running;
        j.attempts_started = 1;
        j
    }

    fn model() -> ModelRef {
        ModelRef { digest: Digest::of(b"base"), size: 1, layout_digest: Digest::of(b"layout") }
    }

    /// A plaintext training attempt (round 2, attempt 3) with sites a, b, c selected.
    fn round() -> RoundState {
        let j = job("[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n");
        let mut r = RoundState::new(&j, 2, 3, Stage::Train, model(), 0);
        r.selected = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        r
    }

    fn header(r: &RoundState) -> UploadHeader {
        UploadHeader {
            job_id: "t-1".into(),
            round: 2,
            attempt: 3,
            base_digest: Digest::of(b"base"),
            layout_digest: Digest::of(b"layout"),
            num_params: r.num_params,
            weight: 5,
            sha256: Digest::of(b""),
            masked: false,
        }
    }

    fn ones(n: usize, v: f32) -> impl Iterator<Item = Result<f32, String>> {
        std::iter::repeat_n(Ok(v), n)
    }

    fn precondition(r: Result<impl std::fmt::Debug, Refused>, what: &str) {
        match r {
            Err(Refused::Precondition(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("want a precondition refusal with {what:?}, got {other:?}"),
        }
    }

    #[test]
    fn admit_checks_the_attempt_the_participant_the_model_and_the_layout() {
        let mut r = round();
        let h = header(&r);
        assert_eq!(r.admit("a", &h, false), Ok(r.num_params));
        precondition(r.admit("a", &UploadHeader { job_id: "t-2".into(), ..h.clone() }, false), "not collecting");
        precondition(r.admit("a", &UploadHeader { attempt: 2, ..h.clone() }, false), "stale update");
        precondition(r.admit("z", &h, false), "not a participant");
        precondition(r.admit("a", &UploadHeader { masked: true, ..h.clone() }, false), "does not use secure");
        let other = UploadHeader { base_digest: Digest::of(b"other"), ..h.clone() };
        assert!(matches!(r.admit("a", &other, false), Err(Refused::Invalid(m)) if m.contains("computed against")));
        assert!(r.admit("a", &other, true).is_ok(), "the divergent-model attack skips the check");
        let short = UploadHeader { num_params: r.num_params - 1, ..h.clone() };
        assert!(matches!(r.admit("a", &short, false), Err(Refused::Invalid(m)) if m.contains("does not match")));
        r.drop_site("b");
        precondition(r.admit("b", &h, false), "not a participant");
        r.fold_plain("c", 1, &mut ones(r.sum.len(), 0.5)).expect("fold");
        assert!(matches!(r.admit("c", &h, false), Err(Refused::Duplicate(_))));
        let mut eval = RoundState::new(&job(""), 2, 3, Stage::Evaluate, model(), 0);
        eval.selected = r.selected.clone();
        precondition(eval.admit("a", &h, false), "not collecting");
    }

    #[test]
    fn folds_add_weighted_updates_once_and_a_broken_fold_poisons_the_attempt() {
        let mut r = round();
        let n = r.sum.len();
        r.fold_plain("a", 2, &mut ones(n, 0.5)).expect("a");
        r.fold_plain("b", 3, &mut ones(n, -1.0)).expect("b");
        assert!(r.sum.iter().all(|&v| v == 2.0 * 0.5 - 3.0), "{:?}", &r.sum[..3]);
        assert_eq!((r.total_weight, r.done.len()), (5, 2));
        assert_eq!(r.waiting(), ["c".to_string()].into_iter().collect());
        assert!(matches!(r.fold_plain("a", 2, &mut ones(n, 0.5)), Err(Refused::Duplicate(_))));
        assert_eq!(r.total_weight, 5, "a duplicate adds nothing");
        // A read error before any value: refused, nothing changed, nothing poisoned.
        let before = r.sum.clone();
        let mut failing = std::iter::once(Err::<f32, String>("disk".into()));
        assert!(matches!(r.fold_plain("c", 1, &mut failing), Err(Refused::Invalid(m)) if m == "disk"));
        assert_eq!((r.sum == before, r.refused.clone()), (true, None));
        // Too few values: refused; the prefix was added, so the attempt is poisoned.
        assert!(matches!(r.fold_plain("c", 1, &mut ones(n - 1, 1.0)), Err(Refused::Invalid(_))));
        assert!(r.refused.as_deref().is_some_and(|w| w.contains("site/c's update broke off")), "{:?}", r.refused);
        assert!(!r.done.contains("c"), "a broken update does not count as delivered");
        // A non-finite value midway also poisons.
        let mut r = round();
        let mut values = ones(3, 1.0).chain(std::iter::once(Ok(f32::NAN))).chain(ones(n, 1.0));
        assert!(matches!(r.fold_plain("a", 1, &mut values), Err(Refused::Invalid(m)) if m.contains("value 3")));
        assert!(r.refused.is_some());
        precondition(r.fold_plain("z", 1, &mut ones(n, 1.0)), "not a participant");
    }

    #[test]
    fn one_accusation_excludes_nobody_and_two_sites_exclude_the_accused() {
        let mut r = round();
        assert_eq!(r.accuse("site-1", "site-5"), None, "one site alone cannot exclude anyone");
        assert_eq!(r.accuse("site-1", "site-5"), None, "the same accuser twice is still one");
        assert_eq!(r.accuse("site-2", "site-4"), None);
        assert_eq!(r.accuse("site-3", "site-5"), Some(vec!["site-1".to_string(), "site-3".to_string()]));
    }

    #[test]
    fn dropping_takes_a_site_out_of_what_the_stage_waits_for() {
        let mut r = round();
        let n = r.sum.len();
        r.fold_plain("a", 1, &mut ones(n, 1.0)).expect("a");
        assert!(r.drop_site("b"), "b was still expected");
        assert!(!r.drop_site("a"), "a had delivered");
        assert!(!r.drop_site("z"), "z was never selected");
        assert!(!r.dropped.contains("z"));
        assert_eq!(r.waiting(), ["c".to_string()].into_iter().collect());
        assert!(r.drop_site("c"));
        assert!(r.waiting().is_empty(), "the stage can close");
        precondition(r.masked_input_done("c"), "not a participant");
    }

    #[test]
    fn a_site_dropped_for_a_reason_keeps_it_once() {
        let mut r = round();
        assert!(r.drop_for("b", "local_failure: disk full"), "a participant not dropped before");
        assert!(!r.drop_for("b", "went offline"), "the first reason stays");
        assert!(!r.drop_for("z", "restarted mid-session"), "never selected");
        assert_eq!(r.why_dropped.get("b").map(String::as_str), Some("local_failure: disk full"));
        assert!(!r.why_dropped.contains_key("z"));
        assert!(!r.waiting().contains("b"));
    }

    #[test]
    fn evaluations_are_summed_once_per_site_and_never_in_a_secure_round() {
        let mut r = round();
        r.stage = Stage::Evaluate;
        let rows = vec![vec![3, 1], vec![0, 2]];
        let h = |crisis: Vec<u64>, other: Vec<u64>| CrisisHistogram { crisis, other };
        let bins = maeum_models::metrics::HISTOGRAM_BINS;
        let mut crisis = vec![0; bins];
        crisis[bins - 1] = 2;
        let mut other = vec![0; bins];
        other[0] = 4;
        r.add_evaluation("a", &rows, Some(&h(crisis.clone(), other.clone()))).expect("a");
        r.add_evaluation("b", &rows, Some(&h(crisis.clone(), other.clone()))).expect("b");
        assert_eq!(r.evaluation, vec![vec![6, 2], vec![0, 4]]);
        assert_eq!(r.crisis_histogram.as_ref().map(|h| h.crisis[bins - 1]), Some(4));
        assert!(matches!(r.add_evaluation("a", &rows, None), Err(Refused::Duplicate(_))));
        assert_eq!(r.evaluation, vec![vec![6, 2], vec![0, 4]], "a duplicate adds nothing");
        assert!(matches!(r.add_evaluation("c", &[vec![1, 2, 3]], None), Err(Refused::Invalid(_))));
        precondition(r.add_evaluation("z", &rows, None), "not a participant");
        // A site without a histogram makes the sum partial: none is kept.
        r.add_evaluation("c", &rows, None).expect("c");
        assert!(r.crisis_histogram.is_none());
        assert!(r.waiting().is_empty());
        r.evaluate_only = true;
        precondition(r.add_evaluation("c", &rows, None), "secure aggregation");
    }

    #[test]
    fn a_secure_outcome_sets_the_sum_its_survivors_and_why_it_is_refused() {
        let mut r = RoundState::new(&job(""), 1, 1, Stage::Train, model(), 0);
        r.selected = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(r.sum.is_empty() && r.secure_sum.is_none(), "a secure round keeps no sum until it is unmasked");
        let sum = crate::secagg::Decoded { words: vec![2, 4], scale: 0.5 };
        r.secure_outcome(sum.clone(), 2, vec!["a".into(), "b".into()], vec!["c".into()], Some("norm".into()));
        assert_eq!((r.secure_sum.as_ref(), r.total_weight, r.refused.as_deref()), (Some(&sum), 2, Some("norm")));
        assert!(r.sum.is_empty(), "the plaintext sum stays empty");
        assert!(r.waiting().is_empty());
        assert_eq!(r.done.len(), 2);
        // A survivor that restarts between the unmasking and the commit (its new agent
        // instance reports in) stays a survivor: its input is in the sum. Recording it as
        // dropped too made a round's history count it twice (a flaky e2e test).
        assert!(!r.drop_for("a", "a restarted agent instance"));
        assert!(!r.drop_site("c"));
        assert_eq!(r.done.iter().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.dropped.iter().map(String::as_str).collect::<Vec<_>>(), ["c"]);
        assert!(r.why_dropped.is_empty());
        // The evaluation words of a secure round: a histogram that does not count the
        // confusion matrix's examples is refused.
        let bins = maeum_models::metrics::HISTOGRAM_BINS;
        let mut words = vec![1u32, 0, 0, 1];
        words.extend(std::iter::repeat_n(0, 2 * bins));
        assert!(r.secure_evaluation(&words).expect_err("histogram").contains("does not count"));
        words[4 + bins - 1] = 1;
        words[4 + bins] = 1;
        r.secure_evaluation(&words).expect("counts");
        assert_eq!(r.evaluation, vec![vec![1, 0], vec![0, 1]]);
    }
}
