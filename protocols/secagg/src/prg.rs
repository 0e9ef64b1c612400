//! Mask expansion: the ChaCha20 keystream (RFC 8439 block function, 256-bit key, zero
//! nonce, block counter from 0) read as little-endian u32 words. Seekable, so chunks
//! can be masked in any order or in parallel.
//!
//! The keystream comes from `rand_chacha::ChaCha20Rng` (stream 0), whose 64-bit block
//! counter agrees with RFC 8439's 32-bit counter and zero nonce for the first 2^32
//! blocks (2^36 words, 256 GiB of mask), far beyond any model size.

use std::fmt;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use zeroize::Zeroize;

/// Words of keystream generated per batch: 4 KiB on the stack, 16 ChaCha blocks.
const BATCH_WORDS: usize = 1024;

/// A mask stream from a 256-bit seed.
pub struct MaskStream {
    rng: ChaCha20Rng,
}

impl fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MaskStream {{ word: {}, seed: *** }}", self.rng.get_word_pos())
    }
}

impl MaskStream {
    pub fn new(seed: &[u8; 32]) -> MaskStream {
        MaskStream { rng: ChaCha20Rng::from_seed(*seed) }
    }

    /// Positions the stream at word `word` (0-based).
    pub fn seek(&mut self, word: u64) {
        // `set_word_pos` counts 32-bit words from the start of stream 0.
        self.rng.set_word_pos(u128::from(word));
    }

    /// The position of the next word (0-based).
    pub fn position(&self) -> u64 {
        // Fewer than 2^64 words can be reached through `seek` and reading.
        self.rng.get_word_pos() as u64
    }

    /// Wrapping-adds the next `out.len()` words of keystream into `out`.
    pub fn add_to(&mut self, out: &mut [u32]) {
        self.apply(out, |o, k| o.wrapping_add(k));
    }

    /// Wrapping-subtracts the next `out.len()` words of keystream from `out`.
    pub fn sub_from(&mut self, out: &mut [u32]) {
        self.apply(out, |o, k| o.wrapping_sub(k));
    }

    /// Writes the next `out.len()` words of keystream into `out`.
    pub fn fill(&mut self, out: &mut [u32]) {
        self.apply(out, |_, k| k);
    }

    /// Generates keystream in batches into a stack buffer and combines it word by word
    /// into `out`; the buffer is wiped afterwards.
    #[inline(always)]
    fn apply(&mut self, out: &mut [u32], op: impl Fn(u32, u32) -> u32) {
        let mut buf = [0u8; BATCH_WORDS * 4];
        for chunk in out.chunks_mut(BATCH_WORDS) {
            let bytes = &mut buf[..chunk.len() * 4];
            self.rng.fill_bytes(bytes);
            let (words, _) = bytes.as_chunks::<4>();
            for (o, k) in chunk.iter_mut().zip(words) {
                *o = op(*o, u32::from_le_bytes(*k));
            }
        }
        buf.zeroize();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words_le(hex: &str) -> Vec<u32> {
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// RFC 8439 Appendix A.1, test vectors #1 (block counter 0) and #2 (block counter
    /// 1): all-zero key and nonce.
    const RFC8439_A1_1: &str = "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
                                da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586";
    const RFC8439_A1_2: &str = "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed\
                                29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f";

    #[test]
    fn rfc8439_keystream_vectors() {
        let mut stream = MaskStream::new(&[0; 32]);
        let mut words = [0u32; 32];
        stream.fill(&mut words);
        assert_eq!(words[..16], words_le(RFC8439_A1_1)[..]);
        assert_eq!(words[16..], words_le(RFC8439_A1_2)[..]);

        let mut block1 = [0u32; 16];
        let mut stream = MaskStream::new(&[0; 32]);
        stream.seek(16);
        assert_eq!(stream.position(), 16);
        stream.fill(&mut block1);
        assert_eq!(block1[..], words_le(RFC8439_A1_2)[..]);
        assert_eq!(stream.position(), 32);
    }

    /// Key 00 01 … 1f: words 0..4 and 37..41 from an independent Python implementation
    /// of the RFC 8439 block function (checks seeking into a later, unaligned block).
    #[test]
    fn keystream_with_nonzero_key() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut stream = MaskStream::new(&key);
        let mut head = [0u32; 4];
        stream.fill(&mut head);
        assert_eq!(head, [0x7d2bfd39, 0x6a19c5d9, 0x7703bd8d, 0x494adcb8]);
        stream.seek(37);
        let mut later = [0u32; 4];
        stream.fill(&mut later);
        assert_eq!(later, [0xb7beea47, 0x309ce0f3, 0xe2e380ce, 0x1b02a884]);
    }

    #[test]
    fn add_then_sub_restores() {
        let original: Vec<u32> = (0..5000u32).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
        let mut data = original.clone();
        let mut stream = MaskStream::new(&[7; 32]);
        stream.add_to(&mut data);
        assert_ne!(data, original);
        let mut stream = MaskStream::new(&[7; 32]);
        stream.sub_from(&mut data);
        assert_eq!(data, original);
    }

    #[test]
    fn add_to_zero_is_fill() {
        let mut a = vec![0u32; 3000];
        let mut b = vec![0u32; 3000];
        MaskStream::new(&[9; 32]).add_to(&mut a);
        MaskStream::new(&[9; 32]).fill(&mut b);
        assert_eq!(a, b);
        let mut c = vec![0u32; 3000];
        MaskStream::new(&[9; 32]).sub_from(&mut c);
        assert!(a.iter().zip(&c).all(|(x, y)| x.wrapping_add(*y) == 0));
    }

    #[test]
    fn debug_hides_the_seed() {
        let stream = MaskStream::new(&[0xAB; 32]);
        assert_eq!(format!("{stream:?}"), "MaskStream { word: 0, seed: *** }");
    }

    proptest! {
        /// Masking chunk by chunk, in any order and after seeking, equals masking the
        /// whole vector at once.
        #[test]
        fn chunked_and_seeked_equals_one_shot(
            seed in any::<[u8; 32]>(),
            len in 0usize..5000,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            reverse in any::<bool>(),
        ) {
            let base: Vec<u32> = (0..len as u32).collect();
            let mut one_shot = base.clone();
            MaskStream::new(&seed).add_to(&mut one_shot);

            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
            bounds.push(0);
            bounds.push(len);
            bounds.sort_unstable();
            bounds.dedup();
            let mut ranges: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            if reverse {
                ranges.reverse();
            }
            let mut chunked = base.clone();
            let mut stream = MaskStream::new(&seed);
            for (start, end) in ranges {
                stream.seek(start as u64);
                stream.add_to(&mut chunked[start..end]);
            }
            prop_assert_eq!(&chunked, &one_shot);

            // Sequential reads without seeking continue where the last one stopped.
            let mut sequential = base;
            let mut stream = MaskStream::new(&seed);
            for w in bounds.windows(2) {
                stream.add_to(&mut sequential[w[0]..w[1]]);
            }
            prop_assert_eq!(&sequential, &one_shot);
        }
    }
}
