//! The Merkle tree of RFC 9162 §2.1 (identical to RFC 6962 §2.1): tree hashes,
//! inclusion proofs and consistency proofs, with the RFC's verification algorithms.
//!
//! ```text
//! MTH({})       = SHA-256()
//! MTH({d0})     = SHA-256(0x00 || d0)                      leaf hash
//! MTH(D[n])     = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k = largest power of two < n
//! ```
//!
//! [`MerkleTree`] keeps every complete (power-of-two) subtree hash, so a root at any past
//! size, an inclusion proof or a consistency proof costs O(log² n) hashes instead of the
//! O(n) of the RFC's recursive definitions, at 64 bytes of memory per leaf. [`root`]
//! computes a root from a slice in O(n) time and O(log n) memory.

use ring::digest::{Context, SHA256};

/// A SHA-256 hash: a leaf hash, an interior node or a root.
pub type Hash = [u8; 32];

/// `SHA-256("")`, the root of the empty tree.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41,
    0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Why a proof could not be produced or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// A leaf index at or beyond the tree size.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A tree size larger than the tree that exists.
    #[error("tree size {size} exceeds the {available} leaves available")]
    SizeOutOfRange {
        /// The size asked for.
        size: u64,
        /// How many leaves there are.
        available: u64,
    },
    /// A consistency proof from a larger tree to a smaller one.
    #[error("old size {old} is larger than new size {new}")]
    SizeOrder {
        /// The old size.
        old: u64,
        /// The new size.
        new: u64,
    },
    /// The proof has the wrong number of hashes for the sizes it claims.
    #[error("proof has the wrong number of hashes ({found}) for these sizes")]
    WrongLength {
        /// How many hashes the proof has.
        found: usize,
    },
    /// The proof does not lead to the expected root(s).
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(data);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The root of the tree whose leaf hashes are `leaves`, in O(n) time and O(log n)
/// memory (a stack of complete subtrees, merged as the binary counter carries).
pub fn root(leaves: &[Hash]) -> Hash {
    let mut peaks: Vec<(u32, Hash)> = Vec::with_capacity(64);
    for leaf in leaves {
        let mut node = (0u32, *leaf);
        while let Some(&(height, left)) = peaks.last() {
            if height != node.0 {
                break;
            }
            peaks.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        peaks.push(node);
    }
    fold_peaks(peaks.iter().map(|(_, h)| *h))
}

/// Folds the complete subtrees of a tree, largest (leftmost) first, into its root:
/// `H(p0, H(p1, H(p2, ...)))`, which is the RFC's split at the largest power of two.
fn fold_peaks(peaks: impl DoubleEndedIterator<Item = Hash>) -> Hash {
    let mut peaks = peaks.rev();
    let Some(mut acc) = peaks.next() else { return EMPTY_ROOT };
    for left in peaks {
        acc = node_hash(&left, &acc);
    }
    acc
}

/// The largest power of two smaller than `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// A Merkle tree that keeps the hash of every complete subtree: `levels[h][i]` is the
/// root of leaves `i·2^h .. (i+1)·2^h`.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> MerkleTree {
        MerkleTree::default()
    }

    /// The tree of `leaves` (leaf hashes), built level by level in O(n).
    pub fn from_leaves(leaves: &[Hash]) -> MerkleTree {
        let mut levels = vec![leaves.to_vec()];
        while let Some(below) = levels.last().filter(|l| l.len() >= 2) {
            let above: Vec<Hash> = below.chunks_exact(2).map(|pair| node_hash(&pair[0], &pair[1])).collect();
            levels.push(above);
        }
        MerkleTree { levels }
    }

    /// Appends a leaf hash: amortised O(1) node hashes.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut height = 0;
        loop {
            if self.levels.len() == height {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[height];
            level.push(node);
            if level.len() % 2 == 1 {
                return;
            }
            node = node_hash(&level[level.len() - 2], &level[level.len() - 1]);
            height += 1;
        }
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Option<&Hash> {
        self.levels.first()?.get(usize::try_from(index).ok()?)
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        self.mth(0, self.size())
    }

    /// The root of the tree made of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        Ok(self.mth(0, size))
    }

    /// RFC 9162 §2.1.3.1: the inclusion proof of leaf `index` in the tree of the first
    /// `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(size)?;
        if index >= size {
            return Err(MerkleError::IndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    /// RFC 9162 §2.1.4.1: the consistency proof between the trees of the first `old`
    /// and the first `new` leaves. Empty when `old` is 0 or equals `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(new)?;
        if old > new {
            return Err(MerkleError::SizeOrder { old, new });
        }
        let mut proof = Vec::new();
        if old > 0 && old < new {
            self.subproof(old, 0, new, true, &mut proof);
        }
        Ok(proof)
    }

    fn check_size(&self, size: u64) -> Result<(), MerkleError> {
        if size > self.size() {
            return Err(MerkleError::SizeOutOfRange { size, available: self.size() });
        }
        Ok(())
    }

    /// `PATH(m, D[start..start+n])`.
    fn path(&self, m: u64, start: u64, n: u64, proof: &mut Vec<Hash>) {
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, start, k, proof);
            proof.push(self.mth(start + k, n - k));
        } else {
            self.path(m - k, start + k, n - k, proof);
            proof.push(self.mth(start, k));
        }
    }

    /// `SUBPROOF(m, D[start..start+n], b)`.
    fn subproof(&self, m: u64, start: u64, n: u64, complete: bool, proof: &mut Vec<Hash>) {
        if m == n {
            if !complete {
                proof.push(self.mth(start, n));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, k, complete, proof);
            proof.push(self.mth(start + k, n - k));
        } else {
            self.subproof(m - k, start + k, n - k, false, proof);
            proof.push(self.mth(start, k));
        }
    }

    /// `MTH(D[start..start+n])` from the stored complete subtrees. Every range the RFC
    /// recursions visit starts at a multiple of the smallest power of two ≥ `n`, so it
    /// decomposes into stored subtrees, largest first.
    fn mth(&self, start: u64, n: u64) -> Hash {
        let mut peaks = [EMPTY_ROOT; 64];
        let mut count = 0;
        let (mut offset, mut rest) = (start, n);
        while rest > 0 {
            let height = 63 - rest.leading_zeros();
            debug_assert_eq!(offset % (1 << height), 0, "range is aligned");
            // INVARIANT: the subtree lies within the tree (callers checked `start + n`
            // against the size), so its level holds it.
            peaks[count] = self.levels[height as usize][(offset >> height) as usize];
            count += 1;
            offset += 1 << height;
            rest -= 1 << height;
        }
        fold_peaks(peaks[..count].iter().copied())
    }
}

/// RFC 9162 §2.1.3.2: checks that `leaf` is at `index` in the tree of `size` leaves
/// whose root is `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::WrongLength { found: proof.len() });
    }
    if &r != root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: checks that the tree of `new` leaves with root `new_root` extends
/// the tree of `old` leaves with root `old_root`. Equal sizes need an empty proof and
/// equal roots; the empty tree is extended by every tree (empty proof).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old > new {
        return Err(MerkleError::SizeOrder { old, new });
    }
    if old == new || old == 0 {
        if !proof.is_empty() {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if old == new && old_root != new_root {
            return Err(MerkleError::RootMismatch);
        }
        if old == 0 && old_root != &EMPTY_ROOT {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }
    let wrong_length = MerkleError::WrongLength { found: proof.len() };
    // Step 2: a complete old tree is itself the first node of the path.
    let mut path = proof.iter();
    let first = if old.is_power_of_two() { *old_root } else { *path.next().ok_or(wrong_length.clone())? };
    let (mut fn_, mut sn) = (old - 1, new - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in path {
        if sn == 0 {
            return Err(wrong_length);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(wrong_length);
    }
    if &fr != old_root || &sr != new_root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::{hex, unhex32};

    // Known answers from the Certificate Transparency reference implementation, as
    // republished by transparency-dev/merkle (testonly/constants.go and
    // testonly/reference_test.go, commit e739733c8ca2b89cfc49f35b161e81e16b5957d7).
    const LEAVES: [&str; 8] =
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// (index, size, proof)
    const INCLUSION: [(u64, u64, &[&str]); 7] = [
        (0, 1, &[]),
        (0, 2, &["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"]),
        (1, 2, &["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"]),
        (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    /// (old size, new size, proof)
    const CONSISTENCY: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            8,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
    ];

    fn reference_leaves() -> Vec<Hash> {
        LEAVES.iter().map(|l| leaf_hash(&crate::unhex(l).unwrap())).collect()
    }

    fn hashes(list: &[&str]) -> Vec<Hash> {
        list.iter().map(|h| unhex32(h).unwrap()).collect()
    }

    #[test]
    fn roots_match_the_reference_for_every_size() {
        let leaves = reference_leaves();
        let mut pushed = MerkleTree::new();
        let full = MerkleTree::from_leaves(&leaves);
        assert_eq!(hex(&EMPTY_ROOT), ROOTS[0]);
        assert_eq!(hex(&pushed.root()), ROOTS[0]);
        for (n, leaf) in leaves.iter().enumerate() {
            pushed.push(*leaf);
            let size = n as u64 + 1;
            assert_eq!(hex(&root(&leaves[..=n])), ROOTS[n + 1], "slice root, size {size}");
            assert_eq!(hex(&pushed.root()), ROOTS[n + 1], "pushed root, size {size}");
            assert_eq!(hex(&full.root_at(size).unwrap()), ROOTS[n + 1], "root_at, size {size}");
            assert_eq!(hex(&MerkleTree::from_leaves(&leaves[..=n]).root()), ROOTS[n + 1]);
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference() {
        let tree = MerkleTree::from_leaves(&reference_leaves());
        for (index, size, expected) in INCLUSION {
            let proof = tree.inclusion_proof(index, size).unwrap();
            assert_eq!(proof, hashes(expected), "proof of {index} in {size}");
            let root = unhex32(ROOTS[size as usize]).unwrap();
            verify_inclusion(tree.leaf(index).unwrap(), index, size, &proof, &root).unwrap();
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference() {
        let tree = MerkleTree::from_leaves(&reference_leaves());
        for (old, new, expected) in CONSISTENCY {
            let proof = tree.consistency_proof(old, new).unwrap();
            assert_eq!(proof, hashes(expected), "proof {old} -> {new}");
            let (r1, r2) = (unhex32(ROOTS[old as usize]).unwrap(), unhex32(ROOTS[new as usize]).unwrap());
            verify_consistency(old, new, &r1, &r2, &proof).unwrap();
        }
    }

    /// Every leaf of every tree up to 40 leaves: the proof verifies, and a wrong index,
    /// size, leaf, root, a flipped hash, a dropped or an extra hash are all refused.
    #[test]
    fn every_inclusion_proof_verifies_and_every_corruption_is_refused() {
        let leaves: Vec<Hash> = (0..40u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let tree = MerkleTree::from_leaves(&leaves);
        for size in 1..=40u64 {
            let root = tree.root_at(size).unwrap();
            for index in 0..size {
                let proof = tree.inclusion_proof(index, size).unwrap();
                let leaf = &leaves[index as usize];
                verify_inclusion(leaf, index, size, &proof, &root).unwrap();
                assert!(verify_inclusion(leaf, index ^ 1, size, &proof, &root).is_err() || size == 1);
                assert!(verify_inclusion(&leaves[(index as usize + 1) % 40], index, size, &proof, &root).is_err());
                assert!(verify_inclusion(leaf, index, size, &proof, &tree.root_at(40).unwrap()).is_err() || size == 40);
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][0] ^= 1;
                    assert!(verify_inclusion(leaf, index, size, &bad, &root).is_err());
                    let mut short = proof.clone();
                    short.remove(i);
                    assert!(verify_inclusion(leaf, index, size, &short, &root).is_err());
                }
                let mut long = proof.clone();
                long.push(root);
                assert!(verify_inclusion(leaf, index, size, &long, &root).is_err());
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_every_corruption_is_refused() {
        let leaves: Vec<Hash> = (0..40u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let tree = MerkleTree::from_leaves(&leaves);
        for new in 0..=40u64 {
            let new_root = tree.root_at(new).unwrap();
            for old in 0..=new {
                let old_root = tree.root_at(old).unwrap();
                let proof = tree.consistency_proof(old, new).unwrap();
                verify_consistency(old, new, &old_root, &new_root, &proof).unwrap();
                if old > 0 && old < new {
                    let other = leaf_hash(b"forged");
                    assert!(verify_consistency(old, new, &other, &new_root, &proof).is_err());
                    assert!(verify_consistency(old, new, &old_root, &other, &proof).is_err());
                    assert!(verify_consistency(old - 1, new, &old_root, &new_root, &proof).is_err());
                    for i in 0..proof.len() {
                        let mut bad = proof.clone();
                        bad[i][31] ^= 0x80;
                        assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err());
                        let mut short = proof.clone();
                        short.remove(i);
                        assert!(verify_consistency(old, new, &old_root, &new_root, &short).is_err());
                    }
                }
            }
        }
        assert_eq!(tree.consistency_proof(5, 4), Err(MerkleError::SizeOrder { old: 5, new: 4 }));
        assert!(tree.consistency_proof(1, 41).is_err());
        assert!(tree.inclusion_proof(3, 3).is_err());
    }

    #[test]
    fn pushing_and_building_agree_on_every_size() {
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let mut pushed = MerkleTree::new();
        for (n, leaf) in leaves.iter().enumerate() {
            pushed.push(*leaf);
            assert_eq!(pushed.root(), root(&leaves[..=n]));
        }
        let built = MerkleTree::from_leaves(&leaves);
        for size in [0u64, 1, 2, 3, 100, 255, 256, 257, 300] {
            assert_eq!(built.root_at(size).unwrap(), pushed.root_at(size).unwrap());
            assert_eq!(
                built.consistency_proof(size.min(7), size).unwrap(),
                pushed.consistency_proof(size.min(7), size).unwrap()
            );
        }
    }
}
