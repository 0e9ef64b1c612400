//! Reconstructing a secret from revealed shares, and naming the wrong share(s) when it
//! does not match its commitment (SA-11).

use zeroize::Zeroizing;

use crate::shamir::{self, Share};

/// At most this many candidate share subsets are tried to find a wrong share (SA-11).
const ATTRIBUTION_BUDGET: usize = 1024;

/// Tries to name the wrong share(s) among `shares` (all of one secret, more than
/// enough): finds a threshold-sized subset whose secret passes `check` (leave-one-out
/// first, then other subsets, within a budget), then names every share that does not
/// lie on that subset's polynomial.
pub(super) fn reconstruct(
    shares: &[Share],
    threshold: usize,
    check: &dyn Fn(&[u8; 32]) -> bool,
) -> Result<Zeroizing<[u8; 32]>, (Vec<u8>, &'static str)> {
    let all = Zeroizing::new(shamir::combine(shares).map_err(|_| (Vec::new(), "the shares do not combine"))?);
    if check(&all) {
        return Ok(all);
    }
    let m = shares.len();
    if m <= threshold {
        return Err((Vec::new(), "exactly the threshold of shares: the wrong one cannot be named"));
    }
    let mut budget = ATTRIBUTION_BUDGET;
    let mut good: Option<(Vec<usize>, Zeroizing<[u8; 32]>)> = None;
    // Leave-one-out: with one wrong share among more than t, dropping it gives a set
    // of at least t correct shares.
    for skip in 0..m {
        if budget == 0 {
            break;
        }
        budget -= 1;
        let subset: Vec<usize> = (0..m).filter(|&i| i != skip).collect();
        let picked: Vec<Share> = subset.iter().map(|&i| shares[i].clone()).collect();
        if let Ok(s) = shamir::combine(&picked) {
            let s = Zeroizing::new(s);
            // The first t of the subset must give the same secret (they are the base
            // every other share is tested against).
            if check(&s) && shamir::combine(&picked[..threshold]).is_ok_and(|b| b == *s) {
                good = Some((subset, s));
                break;
            }
        }
    }
    // Several wrong shares: threshold-sized subsets in lexicographic order.
    if good.is_none() && m > threshold + 1 {
        let mut idx: Vec<usize> = (0..threshold).collect();
        'search: while budget > 0 {
            budget -= 1;
            let picked: Vec<Share> = idx.iter().map(|&i| shares[i].clone()).collect();
            if let Ok(s) = shamir::combine(&picked) {
                let s = Zeroizing::new(s);
                if check(&s) {
                    good = Some((idx.clone(), s));
                    break;
                }
            }
            // Next combination.
            let mut i = threshold;
            loop {
                if i == 0 {
                    break 'search;
                }
                i -= 1;
                if idx[i] < m - threshold + i {
                    idx[i] += 1;
                    for j in i + 1..threshold {
                        idx[j] = idx[j - 1] + 1;
                    }
                    break;
                }
            }
        }
    }
    let Some((subset, secret)) = good else {
        return Err((Vec::new(), "no subset of the shares matches: the wrong ones cannot be named"));
    };
    // A share j is on the polynomial iff adding it to a good threshold-or-more subset
    // leaves the interpolated secret unchanged (its Lagrange coefficient is non-zero).
    let base: Vec<usize> = subset.iter().copied().take(threshold).collect();
    let mut wrong = Vec::new();
    for j in 0..m {
        if base.contains(&j) {
            continue;
        }
        let mut picked: Vec<Share> = base.iter().map(|&i| shares[i].clone()).collect();
        picked.push(shares[j].clone());
        match shamir::combine(&picked) {
            Ok(s) if s == *secret => {}
            _ => wrong.push(shares[j].x),
        }
    }
    Err((wrong, "a revealed share does not match"))
}
