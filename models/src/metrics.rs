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
}
