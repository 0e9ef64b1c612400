//! Shamir secret sharing of 32-byte secrets over GF(2^8) (AES polynomial
//! x^8 + x^4 + x^3 + x + 1), byte by byte with independent random polynomials of
//! degree threshold-1. A share's x-coordinate is the holder's session index (1..=255).
//!
//! Field arithmetic uses a bitwise multiply with masks instead of branches or table
//! lookups, so the time it takes does not depend on the (secret) operands.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::{Check, SecAggError};

/// One holder's share of a 32-byte secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    pub x: u8,
    pub y: [u8; 32],
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share {{ x: {}, y: *** }}", self.x)
    }
}

impl Zeroize for Share {
    fn zeroize(&mut self) {
        self.x.zeroize();
        self.y.zeroize();
    }
}

/// Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1 (0x11B), without
/// data-dependent branches or memory accesses.
fn gf_mul(a: u8, b: u8) -> u8 {
    let (mut a, mut b, mut p) = (a, b, 0u8);
    for _ in 0..8 {
        // All ones when the low bit of b is set, else zero.
        p ^= a & 0u8.wrapping_sub(b & 1);
        // Multiply a by x, reducing by 0x1B when the top bit falls off.
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1B & carry);
        b >>= 1;
    }
    p
}

/// The multiplicative inverse a^254 (a^-1 for a != 0; 0 for 0), by a fixed chain of
/// squarings and multiplications.
fn gf_inv(a: u8) -> u8 {
    // 254 = 0b1111_1110: result = a^2 · a^4 · … · a^128.
    let mut result = 1u8;
    let mut square = a;
    for _ in 0..7 {
        square = gf_mul(square, square);
        result = gf_mul(result, square);
    }
    result
}

/// Splits `secret` into one share per x in `xs` (distinct, non-zero); any `threshold`
/// of them reconstruct it, fewer reveal nothing. `coefficients` supplies the random
/// coefficients: it is called for 32 × (threshold-1) bytes.
///
/// It is called exactly once, with a buffer of 32 × (threshold-1) bytes (empty when
/// the threshold is 1). Byte i of the secret is the constant term of the polynomial
/// whose other coefficients are `buf[i*(t-1)..(i+1)*(t-1)]`, lowest degree first
/// (coefficient of x^1, then x^2, …, x^(t-1)). The buffer is wiped afterwards.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u8],
    coefficients: &mut dyn FnMut(&mut [u8]),
) -> Result<Vec<Share>, SecAggError> {
    if threshold < 1 {
        return Err(SecAggError::new(Check::Params, "the sharing threshold must be at least 1"));
    }
    if threshold > xs.len() {
        return Err(SecAggError::new(Check::Params, "the sharing threshold exceeds the number of holders"));
    }
    check_xs(xs.iter().copied(), Check::Params)?;

    let degree = threshold - 1;
    let mut buf = Zeroizing::new(vec![0u8; 32 * degree]);
    coefficients(&mut buf);

    let mut shares: Vec<Share> = xs.iter().map(|&x| Share { x, y: [0u8; 32] }).collect();
    for (i, &constant) in secret.iter().enumerate() {
        let coeffs = &buf[i * degree..(i + 1) * degree];
        for share in &mut shares {
            // Horner: ((c_{t-1}·x + c_{t-2})·x + … + c_1)·x + c_0.
            let mut acc = 0u8;
            for &c in coeffs.iter().rev() {
                acc = gf_mul(acc ^ c, share.x);
            }
            share.y[i] = acc ^ constant;
        }
    }
    Ok(shares)
}

/// Lagrange interpolation at 0 from `shares` (distinct non-zero x). Uses all given
/// shares; the caller picks which.
pub fn combine(shares: &[Share]) -> Result<[u8; 32], SecAggError> {
    if shares.is_empty() {
        return Err(SecAggError::new(Check::Malformed, "no shares to combine"));
    }
    check_xs(shares.iter().map(|s| s.x), Check::Malformed)?;

    let mut secret = [0u8; 32];
    for (i, share) in shares.iter().enumerate() {
        // Lagrange basis at 0: Π_{j≠i} x_j / (x_j − x_i); subtraction is XOR.
        let mut num = 1u8;
        let mut den = 1u8;
        for (j, other) in shares.iter().enumerate() {
            if i != j {
                num = gf_mul(num, other.x);
                den = gf_mul(den, other.x ^ share.x);
            }
        }
        let basis = gf_mul(num, gf_inv(den));
        for (s, &y) in secret.iter_mut().zip(share.y.iter()) {
            *s ^= gf_mul(basis, y);
        }
    }
    Ok(secret)
}

/// Non-zero and pairwise distinct x-coordinates.
fn check_xs(xs: impl Iterator<Item = u8>, check: Check) -> Result<(), SecAggError> {
    let mut seen = [false; 256];
    for x in xs {
        if x == 0 {
            return Err(SecAggError::new(check, "a share's x-coordinate is zero"));
        }
        let slot = &mut seen[usize::from(x)];
        if *slot {
            return Err(SecAggError::new(check, "duplicate share x-coordinate"));
        }
        *slot = true;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An independent reference multiply: carry-less product, then reduction modulo
    /// 0x11B by long division.
    fn ref_mul(a: u8, b: u8) -> u8 {
        let mut prod: u16 = 0;
        for i in 0..8 {
            if b & (1 << i) != 0 {
                prod ^= u16::from(a) << i;
            }
        }
        for bit in (8..16).rev() {
            if prod & (1 << bit) != 0 {
                prod ^= 0x11B << (bit - 8);
            }
        }
        prod as u8
    }

    /// Reference evaluation: Σ c_k · x^k with x^k by repeated multiplication.
    fn ref_eval(coeffs: &[u8], x: u8) -> u8 {
        let mut sum = 0u8;
        for (k, &c) in coeffs.iter().enumerate() {
            let mut power = 1u8;
            for _ in 0..k {
                power = ref_mul(power, x);
            }
            sum ^= ref_mul(c, power);
        }
        sum
    }

    fn fixed(bytes: Vec<u8>) -> impl FnMut(&mut [u8]) {
        move |buf: &mut [u8]| {
            assert_eq!(buf.len(), bytes.len());
            buf.copy_from_slice(&bytes);
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn gf_mul_known_products() {
        // FIPS-197 §4.2: {57}·{83} = {c1}; {57}·{13} = {fe}.
        assert_eq!(gf_mul(0x57, 0x83), 0xC1);
        assert_eq!(gf_mul(0x57, 0x13), 0xFE);
        // By hand: {53} and {ca} are inverses in the AES field (FIPS-197 §4.2):
        // {53}·{ca}: 0x53 = x^6+x^4+x+1, 0xca = x^7+x^6+x^3+x;
        // carry-less product = 0x3f7e = x^13+x^12+x^11+x^10+x^9+x^8+x^6+x^5+x^4+x^3+x^2+x,
        // reduced modulo x^8+x^4+x^3+x+1 gives 1.
        assert_eq!(gf_mul(0x53, 0xCA), 0x01);
        assert_eq!(gf_inv(0x53), 0xCA);
        assert_eq!(gf_mul(0x02, 0x80), 0x1B);
    }

    #[test]
    fn gf_mul_matches_reference_exhaustively() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(gf_mul(a, b), ref_mul(a, b), "{a:#x}·{b:#x}");
            }
            if a != 0 {
                assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a:#x}");
            }
        }
        assert_eq!(gf_inv(0), 0);
    }

    #[test]
    fn split_known_answer() {
        // Secret 00 01 … 1f, threshold 3, holders 1, 2, 3, coefficient byte j = 7j + 1.
        let secret: [u8; 32] = std::array::from_fn(|i| i as u8);
        let coeffs: Vec<u8> = (0..64u32).map(|j| (7 * j + 1) as u8).collect();
        let shares = split(&secret, 3, &[1, 2, 3], &mut fixed(coeffs.clone())).unwrap();
        // Computed independently (Python: shift-and-add multiply modulo 0x11B, powers of x
        // by repeated multiplication) and cross-checked against `ref_eval` below.
        let expected = [
            "09183b1a7d0c0f0e01f01332150407061908eb0a2d1c1f1e112003e205141716",
            "2247a89d6da8c77211d96d98b3b682f74421e34da6e38ca2c1240bd36366c9bc",
            "2b5e918414a1ce7b182074a1aabf8bfe4d381a549fea85abc81d122a7a6fc0b5",
        ];
        for (share, want) in shares.iter().zip(expected) {
            let reference: Vec<u8> = (0..32)
                .map(|i| {
                    let mut poly = vec![secret[i]];
                    poly.extend_from_slice(&coeffs[2 * i..2 * i + 2]);
                    ref_eval(&poly, share.x)
                })
                .collect();
            assert_eq!(hex(&share.y), hex(&reference), "x = {}", share.x);
            assert_eq!(hex(&share.y), want, "x = {}", share.x);
        }
        // Byte 0 at x = 1 by hand: 0 ^ 1 ^ 8 = 0x09 (at x = 1 the share is the XOR of
        // all coefficients).
        assert_eq!(shares[0].y[0], 0x09);
        assert_eq!(combine(&shares).unwrap(), secret);
        // Two shares of a degree-2 polynomial do not give the secret.
        assert_ne!(combine(&shares[1..]).unwrap(), secret);
    }

    #[test]
    fn threshold_one_shares_are_the_secret() {
        let secret = [0xA5u8; 32];
        let mut calls = 0;
        let shares = split(&secret, 1, &[4, 9], &mut |buf: &mut [u8]| {
            calls += 1;
            assert!(buf.is_empty());
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert!(shares.iter().all(|s| s.y == secret));
        assert_eq!(combine(&shares[1..]).unwrap(), secret);
    }

    #[test]
    fn split_rejects_bad_parameters() {
        let secret = [1u8; 32];
        let mut zero = |buf: &mut [u8]| buf.fill(0);
        for (threshold, xs) in [(0, &[1u8, 2][..]), (3, &[1, 2]), (2, &[0, 1, 2]), (2, &[1, 2, 1])] {
            let err = split(&secret, threshold, xs, &mut zero).unwrap_err();
            assert_eq!(err.check, Check::Params, "t = {threshold}, xs = {xs:?}");
        }
    }

    #[test]
    fn combine_rejects_malformed_sets() {
        let share = |x| Share { x, y: [0; 32] };
        for shares in [vec![], vec![share(0)], vec![share(1), share(2), share(1)]] {
            assert_eq!(combine(&shares).unwrap_err().check, Check::Malformed);
        }
    }

    #[test]
    fn debug_hides_the_share_value() {
        let share = Share { x: 3, y: [0xAB; 32] };
        assert_eq!(format!("{share:?}"), "Share { x: 3, y: *** }");
    }

    /// Perfect secrecy, exhaustively for one byte: with threshold 3, the pair of shares
    /// at x = 1, 2 is a bijection of the two random coefficients for every secret, so
    /// any t-1 shares are uniform whatever the secret.
    #[test]
    fn fewer_than_threshold_shares_are_uniform() {
        for secret in [0x00u8, 0x53, 0xFF] {
            let mut seen = vec![false; 1 << 16];
            for c1 in 0..=255u8 {
                for c2 in 0..=255u8 {
                    let poly = [secret, c1, c2];
                    let (y1, y2) = (ref_eval(&poly, 1), ref_eval(&poly, 2));
                    seen[usize::from(y1) << 8 | usize::from(y2)] = true;
                }
            }
            assert!(seen.iter().all(|&s| s), "secret {secret:#x}");
        }
    }

    proptest! {
        #[test]
        fn any_threshold_subset_reconstructs(
            secret in any::<[u8; 32]>(),
            (t, n) in (1usize..=8).prop_flat_map(|t| (Just(t), t..=12usize)),
            seed in any::<[u8; 32]>(),
            perm_seed in any::<u64>(),
            x_offset in 0u8..200,
        ) {
            use rand_chacha::ChaCha20Rng;
            use rand_chacha::rand_core::{RngCore, SeedableRng};
            let mut rng = ChaCha20Rng::from_seed(seed);
            let xs: Vec<u8> = (1..=n as u8).map(|i| i + x_offset).collect();
            let shares = split(&secret, t, &xs, &mut |buf: &mut [u8]| rng.fill_bytes(buf)).unwrap();
            prop_assert_eq!(shares.len(), n);
            // A pseudo-random t-subset.
            let mut order: Vec<usize> = (0..n).collect();
            let mut prng = ChaCha20Rng::seed_from_u64(perm_seed);
            for i in (1..n).rev() {
                order.swap(i, (prng.next_u64() % (i as u64 + 1)) as usize);
            }
            let subset: Vec<Share> = order[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(combine(&subset).unwrap(), secret);
            // All n shares also reconstruct (more than t points of a degree t-1 curve).
            prop_assert_eq!(combine(&shares).unwrap(), secret);
            // t-1 shares interpolate a polynomial of lower degree: with random
            // coefficients the result equals the secret with probability 2^-256.
            if t >= 2 {
                prop_assert_ne!(combine(&subset[..t - 1]).unwrap(), secret);
            }
        }
    }
}
