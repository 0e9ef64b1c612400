//! Hashed word and character n-grams.
//!
//! Language-agnostic: no vocabulary is built or shared, so a site's vocabulary never
//! leaks and Korean works as well as English. Every site must hash identically, so the
//! hash is a fixed, documented function (64-bit FNV-1a over the UTF-8 bytes of a
//! namespace tag and the n-gram), not `std`'s randomised hasher.
//!
//! Term weighting: a document's features carry `1 + ln(tf)` (sublinear term frequency)
//! and are L2-normalised, so long posts do not dominate and repeated words saturate.

use serde::{Deserialize, Serialize};

/// Featuriser settings; part of a model's identity (stored in its metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// Number of hash buckets (a power of two).
    pub buckets: u32,
    /// Word n-gram orders, inclusive (`[1, 2]` = unigrams and bigrams; `[0, 0]` = none).
    pub word_ngrams: [u8; 2],
    /// Character n-gram orders within word boundaries, inclusive (`[0, 0]` = none).
    pub char_ngrams: [u8; 2],
    /// Characters of a document used; the rest is ignored (bounds cost on huge posts).
    pub max_chars: u32,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self { buckets: 1 << 16, word_ngrams: [1, 2], char_ngrams: [3, 5], max_chars: 4000 }
    }
}

impl FeatureConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.buckets.is_power_of_two() || self.buckets < 16 {
            return Err(format!("buckets must be a power of two ≥ 16, got {}", self.buckets));
        }
        for (name, [lo, hi]) in [("word_ngrams", self.word_ngrams), ("char_ngrams", self.char_ngrams)] {
            if lo > hi || (lo == 0 && hi != 0) || hi > 8 {
                return Err(format!("{name} must be [lo, hi] with 1 ≤ lo ≤ hi ≤ 8 or [0, 0], got [{lo}, {hi}]"));
            }
        }
        if self.word_ngrams[1] == 0 && self.char_ngrams[1] == 0 {
            return Err("at least one of word_ngrams and char_ngrams must be enabled".into());
        }
        if self.max_chars == 0 {
            return Err("max_chars must be positive".into());
        }
        Ok(())
    }
}

/// A document's features: sorted unique bucket ids and their weights (unit L2 norm).
/// `Debug` shows only the feature count: features are derived from a record.
#[derive(Clone, PartialEq, Default)]
pub struct SparseDoc {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl std::fmt::Debug for SparseDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseDoc {{ {} features }}", self.ids.len())
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a, continued from `state`.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Feature hashing of one document.
pub fn featurize(text: &str, cfg: &FeatureConfig) -> SparseDoc {
    let mask = u64::from(cfg.buckets - 1);
    let text: String = text.chars().take(cfg.max_chars as usize).flat_map(char::to_lowercase).collect();
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let mut hashes: Vec<u32> = Vec::with_capacity(words.len() * 8);

    let [wlo, whi] = cfg.word_ngrams;
    if whi > 0 {
        for n in usize::from(wlo)..=usize::from(whi) {
            for win in words.windows(n) {
                let mut h = fnv1a(FNV_OFFSET, b"w");
                for (i, w) in win.iter().enumerate() {
                    if i > 0 {
                        h = fnv1a(h, b" ");
                    }
                    h = fnv1a(h, w.as_bytes());
                }
                hashes.push((h & mask) as u32);
            }
        }
    }

    let [clo, chi] = cfg.char_ngrams;
    if chi > 0 {
        let tag = fnv1a(FNV_OFFSET, b"c");
        let mut chars = Vec::new();
        for w in &words {
            // fastText-style boundary markers: "<word>".
            chars.clear();
            chars.extend(std::iter::once('<').chain(w.chars()).chain(std::iter::once('>')));
            for n in usize::from(clo)..=usize::from(chi) {
                if n > chars.len() {
                    break;
                }
                for win in chars.windows(n) {
                    // FNV-1a over the window's UTF-8 bytes, without building a string.
                    let h = win.iter().fold(tag, |h, c| fnv1a(h, c.encode_utf8(&mut [0; 4]).as_bytes()));
                    hashes.push((h & mask) as u32);
                }
            }
        }
    }

    hashes.sort_unstable();
    let mut doc = SparseDoc::default();
    let mut i = 0;
    while i < hashes.len() {
        let mut j = i;
        while j < hashes.len() && hashes[j] == hashes[i] {
            j += 1;
        }
        doc.ids.push(hashes[i]);
        doc.weights.push(1.0 + ((j - i) as f32).ln());
        i = j;
    }
    let norm = doc.weights.iter().map(|w| w * w).sum::<f32>().sqrt();
    if norm > 0.0 {
        doc.weights.iter_mut().for_each(|w| *w /= norm);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_answers() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn features_are_stable_across_releases() {
        // Changing the hash changes every trained model: pin the exact ids.
        let cfg = FeatureConfig { buckets: 1024, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 100 };
        let doc = featurize("I feel low", &cfg);
        assert_eq!(doc.ids, vec![246, 300, 781]);
    }

    #[test]
    fn char_ngrams_hash_the_tagged_utf8_of_the_window() {
        let cfg = FeatureConfig { buckets: 1 << 20, word_ngrams: [0, 0], char_ngrams: [3, 3], max_chars: 100 };
        let expected: Vec<u32> = {
            let mut ids: Vec<u32> = ["<우울", "우울>"]
                .iter()
                .map(|g| (fnv1a(fnv1a(FNV_OFFSET, b"c"), g.as_bytes()) & ((1 << 20) - 1)) as u32)
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(featurize("우울", &cfg).ids, expected);
    }

    #[test]
    fn unit_norm_and_sorted_unique() {
        let doc = featurize("sad sad sad but hopeful", &FeatureConfig::default());
        let norm: f32 = doc.weights.iter().map(|w| w * w).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(doc.ids.windows(2).all(|w| w[0] < w[1]));
        assert!(doc.ids.iter().all(|&i| i < 1 << 16));
    }

    #[test]
    fn case_insensitive_and_korean() {
        let cfg = FeatureConfig::default();
        assert_eq!(featurize("Hello World", &cfg), featurize("hello world", &cfg));
        let ko = featurize("요즘 너무 우울해요", &cfg);
        assert!(ko.ids.len() > 5, "Korean text must produce features");
        assert_ne!(ko, featurize("요즘 너무 행복해요", &cfg));
    }

    #[test]
    fn term_frequency_is_sublinear() {
        let cfg = FeatureConfig { buckets: 1 << 20, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 100 };
        let doc = featurize("a a a a b", &cfg);
        let (wa, wb) =
            (doc.weights.iter().cloned().fold(0.0, f32::max), doc.weights.iter().cloned().fold(1.0, f32::min));
        assert!(((wa / wb) - (1.0 + 4f32.ln())).abs() < 1e-5);
    }

    #[test]
    fn empty_text_has_no_features() {
        assert!(featurize("!!! ...", &FeatureConfig::default()).ids.is_empty());
    }

    #[test]
    fn config_validation() {
        assert!(FeatureConfig::default().validate().is_ok());
        let bad = FeatureConfig { buckets: 1000, ..Default::default() };
        assert!(bad.validate().expect_err("refused").contains("power of two"));
        let bad = FeatureConfig { word_ngrams: [2, 1], ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
