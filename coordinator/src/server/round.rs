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
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub stage: Stage,
    pub model: ModelRef,
    pub deadline_ms: i64,
    pub selected: BTreeSet<String>,
    pub done: BTreeSet<String>,
    pub dropped: BTreeSet<String>,
    pub num_params: u64,
    pub sum: Vec<f64>,
    pub total_weight: u64,
    pub n_labels: usize,
    pub evaluation: Vec<Vec<u64>>,
    pub evaluated: BTreeSet<String>,
    /// Indices of the job's crisis classes.
    pub crisis_classes: Vec<usize>,
    /// The summed crisis histograms (`None` when the job has no crisis class, or once a
    /// site reported its evaluation without one: the sum would be partial).
    pub crisis_histogram: Option<CrisisHistogram>,
    pub(super) uploads: HashMap<String, (String, UploadHeader)>,
    /// The secure-aggregation session of a training stage (None: plaintext debugging
    /// job, or an evaluation stage).
    pub secagg: Option<SecAggRound>,
    /// The unmasked u32 aggregate once secure aggregation finished (little-endian).
    pub aggregate: Option<Vec<u8>>,
    /// Fault injection only (`crate::attack`, `divergent`): every site but the named
    /// one is handed this model instead. Always `None` in a real coordinator.
    pub divergent: Option<(String, ModelRef)>,
    /// Why the unmasked aggregate was refused (outside what honest inputs can sum to):
    /// the round is then committed without an update.
    pub refused: Option<String>,
    /// A secure job's final evaluation: a session whose inputs hold only the weight
    /// word and the evaluation counts (the sites do not train).
    pub evaluate_only: bool,
    /// SA-06 accusations of this attempt: accused site → the sites that accused it.
    pub accusations: BTreeMap<String, BTreeSet<String>>,
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
        }
    }

    /// Takes the summed evaluation counts of a secure round (`JobSpec::evaluation_words`
    /// layout: the confusion rows, then the crisis histogram's crisis and other bins).
    /// `Err` when they cannot come from honest sites (a crisis histogram that does not
    /// count the confusion matrix's examples).
    pub fn secure_evaluation(&mut self, counts: &[u32]) -> Result<(), String> {
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
        Ok(())
    }

    /// Sites still expected to deliver in this stage.
    pub fn waiting(&self) -> BTreeSet<String> {
        let finished: &BTreeSet<String> = if self.stage == Stage::Train { &self.done } else { &self.evaluated };
        self.selected.iter().filter(|s| !finished.contains(*s) && !self.dropped.contains(*s)).cloned().collect()
    }
}
