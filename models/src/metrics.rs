//! Classification metrics from a confusion matrix. Confusion-matrix counts are also what
//! sites report in federated evaluation: aggregates, never per-example outputs.

use serde::{Deserialize, Serialize};

/// `counts[true][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub counts: Vec<Vec<u64>>,
}

impl Confusion {
    pub fn new(n_labels: usize) -> Self {
        Self { counts: vec![vec![0; n_labels]; n_labels] }
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth][predicted] += 1;
    }

    /// Element-wise sum (federated evaluation).
    pub fn merge(&mut self, other: &Confusion) -> Result<(), String> {
        if other.counts.len() != self.counts.len() {
            return Err(format!("confusion matrices of {} and {} labels", self.counts.len(), other.counts.len()));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            if a.len() != b.len() {
                return Err("ragged confusion matrix".into());
            }
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        Ok(())
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn metrics(&self) -> Metrics {
        let k = self.counts.len();
        let total = self.total();
        let correct: u64 = (0..k).map(|i| self.counts[i][i]).sum();
        let mut precision = Vec::with_capacity(k);
        let mut recall = Vec::with_capacity(k);
        let mut f1 = Vec::with_capacity(k);
        for i in 0..k {
            let tp = self.counts[i][i] as f64;
            let actual: u64 = self.counts[i].iter().sum();
            let predicted: u64 = (0..k).map(|j| self.counts[j][i]).sum();
            let p = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
            let r = if actual == 0 { 0.0 } else { tp / actual as f64 };
            precision.push(p);
            recall.push(r);
            f1.push(if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) });
        }
        // Macro averages over labels present in the truth (as scikit-learn does for the
        // labels it sees); a label absent from the test set says nothing about the model.
        let present: Vec<usize> = (0..k).filter(|&i| self.counts[i].iter().sum::<u64>() > 0).collect();
        let macro_f1 =
            if present.is_empty() { 0.0 } else { present.iter().map(|&i| f1[i]).sum::<f64>() / present.len() as f64 };
        Metrics {
            accuracy: if total == 0 { 0.0 } else { correct as f64 / total as f64 },
            macro_f1,
            per_class_precision: precision,
            per_class_recall: recall,
            per_class_f1: f1,
            n: total,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class_precision: Vec<f64>,
    pub per_class_recall: Vec<f64>,
    pub per_class_f1: Vec<f64>,
    pub n: u64,
}

/// Bins of a [`CrisisHistogram`]: equal widths on [0, 1].
pub const HISTOGRAM_BINS: usize = 100;

/// Counts of held-out examples by the model's largest crisis-class probability, in
/// [`HISTOGRAM_BINS`] equal bins on [0, 1] (bin `i` holds `[i/100, (i+1)/100)`, the last
/// also 1.0), separately for examples whose true label is a crisis class and for the
/// rest. Mergeable like [`Confusion`]: what sites report beside it so that the
/// coordinator can choose an operating threshold for the crisis flag. Aggregates only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrisisHistogram {
    /// Examples whose true label is a crisis class.
    pub crisis: Vec<u64>,
    /// Every other example.
    pub other: Vec<u64>,
}

/// What flagging at a threshold gives on a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// Flag when the largest crisis-class probability is at or above this.
    pub threshold: f64,
    /// Share of crisis examples flagged.
    pub recall: f64,
    /// Share of flagged examples that are crisis examples (`None`: nothing flagged).
    pub precision: Option<f64>,
}

impl Default for CrisisHistogram {
    fn default() -> Self {
        Self { crisis: vec![0; HISTOGRAM_BINS], other: vec![0; HISTOGRAM_BINS] }
    }
}

impl CrisisHistogram {
    /// The bin of a probability (NaN and negatives fall in bin 0, 1.0 and above in the last).
    pub fn bin(p: f64) -> usize {
        if p.is_nan() || p <= 0.0 {
            return 0;
        }
        ((p * HISTOGRAM_BINS as f64).floor() as usize).min(HISTOGRAM_BINS - 1)
    }

    /// The lower edge of bin `i`: flagging at it flags exactly bins `i..`.
    pub fn edge(i: usize) -> f64 {
        i as f64 / HISTOGRAM_BINS as f64
    }

    /// Counts examples: `probabilities[k]` per class for each, `truth[k]` its label;
    /// `crisis` the indices of the crisis classes (none: an empty histogram).
    pub fn from_probabilities(probabilities: &[Vec<f32>], truth: &[usize], crisis: &[usize]) -> Self {
        let mut h = Self::default();
        for (p, t) in probabilities.iter().zip(truth) {
            let top = crisis.iter().filter_map(|&c| p.get(c)).fold(0.0f64, |m, v| m.max(f64::from(*v)));
            let bins = if crisis.contains(t) { &mut h.crisis } else { &mut h.other };
            bins[Self::bin(top)] += 1;
        }
        h
    }

    /// Element-wise sum (federated evaluation).
    pub fn merge(&mut self, other: &CrisisHistogram) -> Result<(), String> {
        if other.crisis.len() != self.crisis.len() || other.other.len() != self.other.len() {
            return Err(format!(
                "histograms of {} and {} bins",
                self.crisis.len().max(self.other.len()),
                other.crisis.len().max(other.other.len())
            ));
        }
        self.crisis.iter_mut().zip(&other.crisis).for_each(|(a, b)| *a += b);
        self.other.iter_mut().zip(&other.other).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Examples counted.
    pub fn total(&self) -> u64 {
        self.crisis.iter().chain(&self.other).sum()
    }

    /// What flagging at the lower edge of bin `i` gives (`None` without crisis examples).
    pub fn at_bin(&self, i: usize) -> Option<OperatingPoint> {
        let positives: u64 = self.crisis.iter().sum();
        if positives == 0 {
            return None;
        }
        let tp: u64 = self.crisis.iter().skip(i).sum();
        let fp: u64 = self.other.iter().skip(i).sum();
        Some(OperatingPoint {
            threshold: Self::edge(i),
            recall: tp as f64 / positives as f64,
            precision: (tp + fp > 0).then(|| tp as f64 / (tp + fp) as f64),
        })
    }

    /// The largest threshold (a bin edge) whose recall on these counts is at least
    /// `target`; `None` when there is no crisis example to measure recall on. The
    /// threshold 0 flags everything (recall 1), so a target in [0, 1] always has one.
    pub fn choose_threshold(&self, target: f64) -> Option<OperatingPoint> {
        (0..self.crisis.len().max(1))
            .rev()
            .filter_map(|i| self.at_bin(i))
            .find(|p| p.recall >= target)
            .or_else(|| self.at_bin(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // truth 0: 3 right, 1 as 1; truth 1: 2 right, 2 as 0.
        let c = Confusion { counts: vec![vec![3, 1], vec![2, 2]] };
        let m = c.metrics();
        assert!((m.accuracy - 5.0 / 8.0).abs() < 1e-12);
        assert!((m.per_class_precision[0] - 0.6).abs() < 1e-12);
        assert!((m.per_class_recall[0] - 0.75).abs() < 1e-12);
        assert!((m.per_class_recall[1] - 0.5).abs() < 1e-12);
        let f0 = 2.0 * 0.6 * 0.75 / 1.35;
        let f1 = 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5);
        assert!((m.macro_f1 - (f0 + f1) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn merge_adds_and_checks_shape() {
        let mut a = Confusion { counts: vec![vec![1, 0], vec![0, 1]] };
        a.merge(&Confusion { counts: vec![vec![0, 2], vec![1, 0]] }).expect("same shape");
        assert_eq!(a.counts, vec![vec![1, 2], vec![1, 1]]);
        assert!(a.merge(&Confusion::new(3)).is_err());
    }

    #[test]
    fn the_threshold_is_the_largest_bin_edge_that_keeps_the_target_recall() {
        let mut h = CrisisHistogram::default();
        // Ten crisis examples: scores in bins 2, 5 (x2), 30, 50 (x3), 80, 95, 99.
        for b in [2, 5, 5, 30, 50, 50, 50, 80, 95, 99] {
            h.crisis[b] += 1;
        }
        // Twenty others, low scores mostly.
        for b in [0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 10, 10, 20, 30, 40, 50, 60, 60, 90] {
            h.other[b] += 1;
        }
        // Recall 0.9 needs 9 of 10: everything from bin 5 up, so threshold 0.05.
        let p = h.choose_threshold(0.9).expect("crisis examples");
        assert!((p.threshold - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.recall - 0.9).abs() < 1e-12);
        // Flagged from bin 5: 9 crisis, 10 others (bins 5,10,10,20,30,40,50,60,60,90).
        assert!((p.precision.expect("flagged") - 9.0 / 19.0).abs() < 1e-12, "{p:?}");
        // Recall 0.5 keeps bins 50.. (5 crisis; others 50, 60, 60, 90).
        let p = h.choose_threshold(0.5).expect("crisis examples");
        assert!((p.threshold - 0.5).abs() < 1e-12 && (p.recall - 0.6).abs() < 1e-12, "{p:?}");
        assert!((p.precision.expect("flagged") - 6.0 / 10.0).abs() < 1e-12);
        // Recall 1.0 needs bin 2 (the lowest crisis score).
        assert!((h.choose_threshold(1.0).expect("some").threshold - 0.02).abs() < 1e-12);
        // No crisis example: no threshold can be chosen.
        assert_eq!(CrisisHistogram::default().choose_threshold(0.9), None);
    }

    #[test]
    fn histograms_bin_the_top_crisis_probability_and_merge() {
        let probs = vec![vec![0.5, 0.3, 0.2], vec![0.1, 0.05, 0.85], vec![0.0, 1.0, 0.0]];
        let h = CrisisHistogram::from_probabilities(&probs, &[0, 2, 1], &[1, 2]);
        assert_eq!(h.other[30], 1, "truth 0: max(0.3, 0.2)");
        assert_eq!(h.crisis[85], 1);
        assert_eq!(h.crisis[99], 1, "1.0 falls in the last bin");
        assert_eq!(h.total(), 3);
        let mut sum = h.clone();
        sum.merge(&h).expect("same bins");
        assert_eq!(sum.total(), 6);
        assert!(sum.merge(&CrisisHistogram { crisis: vec![0; 3], other: vec![0; 3] }).is_err());
        assert_eq!(CrisisHistogram::bin(f64::NAN), 0);
    }
}
