//! Seeded, reproducible splits: stratified train/test, and non-IID site shards drawn
//! from a Dirichlet(α) over labels (Hsu et al. 2019). α → ∞ approaches an IID split;
//! α = 0.5 gives each site a few dominant labels, as real institutions have.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Gamma};

/// Splits indices `0..labels.len()` into (train, test), stratified by label: each label
/// contributes `round(n_label × test_fraction)` examples to the test set, at least one
/// when the label has two or more examples and the fraction is positive, and always
/// leaves at least one in the training set.
pub fn stratified_split(labels: &[usize], test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n_labels = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_label = vec![Vec::new(); n_labels];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l].push(i);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut idx in by_label {
        idx.shuffle(&mut rng);
        let mut k = (idx.len() as f64 * test_fraction).round() as usize;
        if k == 0 && test_fraction > 0.0 {
            k = 1;
        }
        let k = k.min(idx.len().saturating_sub(1));
        test.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SplitError {
    #[error("need at least one site")]
    NoSites,
    #[error("alpha must be a positive finite number, got {0}")]
    BadAlpha(f64),
    #[error("{examples} examples cannot give each of {sites} sites at least {min} examples")]
    TooFewExamples { examples: usize, sites: usize, min: usize },
}

/// Assigns each example to one of `sites` shards. For every label, the proportions
/// across sites are drawn from Dirichlet(α·1); the label's (shuffled) examples are cut
/// at those proportions. Every site is guaranteed `min_per_site` examples: draws that
/// violate it are redrawn (with the same RNG stream, so the result stays reproducible).
pub fn dirichlet_shards(
    labels: &[usize],
    sites: usize,
    alpha: f64,
    min_per_site: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, SplitError> {
    if sites == 0 {
        return Err(SplitError::NoSites);
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(SplitError::BadAlpha(alpha));
    }
    if labels.len() < sites * min_per_site {
        return Err(SplitError::TooFewExamples { examples: labels.len(), sites, min: min_per_site });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n_labels = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_label = vec![Vec::new(); n_labels];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l].push(i);
    }
    for idx in &mut by_label {
        idx.shuffle(&mut rng);
    }
    // Dirichlet with one site is degenerate: everything goes to it.
    if sites == 1 {
        return Ok(vec![(0..labels.len()).collect()]);
    }
    // Dirichlet(α·1) as normalised Gamma(α, 1) draws.
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| SplitError::BadAlpha(alpha))?;
    for _attempt in 0..1000 {
        let mut shards = vec![Vec::new(); sites];
        for idx in &by_label {
            let g: Vec<f64> = (0..sites).map(|_| gamma.sample(&mut rng)).collect();
            let total: f64 = g.iter().sum();
            let p: Vec<f64> =
                if total > 0.0 { g.iter().map(|x| x / total).collect() } else { vec![1.0 / sites as f64; sites] };
            // Cumulative cut points over this label's examples.
            let mut acc = 0.0;
            let mut start = 0usize;
            for (s, ps) in p.iter().enumerate() {
                acc += ps;
                let end =
                    if s + 1 == sites { idx.len() } else { ((acc * idx.len() as f64).round() as usize).min(idx.len()) };
                let end = end.max(start);
                shards[s].extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if shards.iter().all(|s| s.len() >= min_per_site) {
            for s in &mut shards {
                s.sort_unstable();
            }
            return Ok(shards);
        }
        // A retry continues the same stream, so it draws new proportions.
    }
    Err(SplitError::TooFewExamples { examples: labels.len(), sites, min: min_per_site })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, k: usize) -> Vec<usize> {
        (0..n).map(|i| i % k).collect()
    }

    #[test]
    fn stratified_split_is_stratified_and_disjoint() {
        let l = labels(1000, 10);
        let (train, test) = stratified_split(&l, 0.2, 7);
        assert_eq!(train.len() + test.len(), 1000);
        assert_eq!(test.len(), 200);
        for k in 0..10 {
            assert_eq!(test.iter().filter(|&&i| l[i] == k).count(), 20);
        }
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1000);
    }

    #[test]
    fn stratified_split_is_reproducible_and_seed_dependent() {
        let l = labels(500, 5);
        assert_eq!(stratified_split(&l, 0.2, 7), stratified_split(&l, 0.2, 7));
        assert_ne!(stratified_split(&l, 0.2, 7).1, stratified_split(&l, 0.2, 8).1);
    }

    #[test]
    fn dirichlet_split_is_reproducible_and_covers_everything() {
        let l = labels(2700, 27);
        let a = dirichlet_shards(&l, 7, 0.5, 50, 42).expect("split");
        let b = dirichlet_shards(&l, 7, 0.5, 50, 42).expect("split");
        assert_eq!(a, b);
        let c = dirichlet_shards(&l, 7, 0.5, 50, 43).expect("split");
        assert_ne!(a, c);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..2700).collect::<Vec<_>>());
        assert!(a.iter().all(|s| s.len() >= 50));
    }

    /// Label skew: the largest share one site holds of a label is much larger at small α.
    fn max_share(alpha: f64) -> f64 {
        let l = labels(2700, 27);
        let shards = dirichlet_shards(&l, 5, alpha, 10, 1).expect("split");
        let mut total = 0.0;
        for k in 0..27 {
            let best = shards.iter().map(|s| s.iter().filter(|&&i| l[i] == k).count()).max().unwrap_or(0);
            total += best as f64 / 100.0;
        }
        total / 27.0
    }

    #[test]
    fn small_alpha_is_skewed_large_alpha_is_near_iid() {
        assert!(max_share(0.1) > 0.6, "{}", max_share(0.1));
        assert!(max_share(1000.0) < 0.3, "{}", max_share(1000.0));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let l = labels(10, 2);
        assert_eq!(dirichlet_shards(&l, 0, 0.5, 1, 1), Err(SplitError::NoSites));
        assert_eq!(dirichlet_shards(&l, 2, 0.0, 1, 1), Err(SplitError::BadAlpha(0.0)));
        assert_eq!(
            dirichlet_shards(&l, 3, 0.5, 5, 1),
            Err(SplitError::TooFewExamples { examples: 10, sites: 3, min: 5 })
        );
    }
}
