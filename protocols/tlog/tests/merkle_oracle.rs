//! The Merkle tree against an oracle written straight from RFC 9162 §2.1: the recursive
//! MTH, PATH (§2.1.3.1) and PROOF/SUBPROOF (§2.1.4.1) definitions, O(n) each and
//! independent of `MerkleTree`'s stored subtrees. For random trees up to 1,100 leaves
//! (crossing 2^10) and random sizes and indices, the roots and proofs must be identical,
//! and the RFC's verifiers must accept them.

use maeum_tlog::merkle::{Hash, MerkleTree, leaf_hash, node_hash, verify_consistency, verify_inclusion};
use proptest::prelude::*;

/// The largest power of two smaller than n (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]) on leaf hashes.
fn mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => maeum_tlog::merkle::EMPTY_ROOT,
        1 => d[0],
        n => {
            let k = split(n);
            node_hash(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

/// PATH(m, D[n]).
fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    let n = d.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = path(m, &d[..k]);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = path(m - k, &d[k..]);
        p.push(mth(&d[..k]));
        p
    }
}

/// SUBPROOF(m, D[n], b).
fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { Vec::new() } else { vec![mth(d)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &d[..k], b);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = subproof(m - k, &d[k..], false);
        p.push(mth(&d[..k]));
        p
    }
}

/// PROOF(m, D[n]) for 0 < m < n; empty otherwise.
fn proof(m: usize, d: &[Hash]) -> Vec<Hash> {
    if m == 0 || m >= d.len() { Vec::new() } else { subproof(m, d, true) }
}

fn leaves(n: usize, salt: u64) -> Vec<Hash> {
    (0..n).map(|i| leaf_hash(&[salt.to_le_bytes(), (i as u64).to_le_bytes()].concat())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn roots_and_inclusion_proofs_equal_the_rfc_definitions(
        n in 1usize..1100, salt in any::<u64>(), size_frac in 0.0f64..=1.0, index_frac in 0.0f64..1.0
    ) {
        let d = leaves(n, salt);
        let tree = MerkleTree::from_leaves(&d);
        let size = ((n as f64 * size_frac).ceil() as usize).clamp(1, n);
        let index = ((size as f64 * index_frac) as usize).min(size - 1);
        let root = mth(&d[..size]);
        prop_assert_eq!(tree.root_at(size as u64).expect("root"), root);
        let want = path(index, &d[..size]);
        let got = tree.inclusion_proof(index as u64, size as u64).expect("inclusion proof");
        prop_assert_eq!(&got, &want);
        prop_assert!(verify_inclusion(&d[index], index as u64, size as u64, &got, &root).is_ok());
    }

    #[test]
    fn consistency_proofs_equal_the_rfc_definition(
        n in 1usize..1100, salt in any::<u64>(), old_frac in 0.0f64..=1.0, new_frac in 0.0f64..=1.0
    ) {
        let d = leaves(n, salt);
        let tree = MerkleTree::from_leaves(&d);
        let new = ((n as f64 * new_frac).round() as usize).min(n);
        let old = ((new as f64 * old_frac).round() as usize).min(new);
        let want = proof(old, &d[..new]);
        let got = tree.consistency_proof(old as u64, new as u64).expect("consistency proof");
        prop_assert_eq!(&got, &want);
        let (old_root, new_root) = (mth(&d[..old]), mth(&d[..new]));
        prop_assert!(verify_consistency(old as u64, new as u64, &old_root, &new_root, &got).is_ok());
    }
}
