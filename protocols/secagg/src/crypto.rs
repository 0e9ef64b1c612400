//! Key agreement, key derivation and share encryption.
//! - X25519 (x25519-dalek `StaticSecret`: the mask secret key must be Shamir-shared,
//!   which ring's ephemeral keys do not allow).
//! - HKDF-SHA256 (ring) with the session id as salt and a domain-separated info string.
//! - ChaCha20-Poly1305 (ring) with a key used for exactly one message, zero nonce.
//!
//! Party indices in info strings and hashes are big-endian u16.

use std::fmt;

use ring::{aead, digest, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::{Check, SecAggError};

const PAIR_MASK_INFO: &[u8] = b"maeum/secagg/v1/pair-mask";
const SHARE_KEY_INFO: &[u8] = b"maeum/secagg/v1/share-key";
const SELF_MASK_DOMAIN: &[u8] = b"maeum/secagg/v1/self-mask";
const GRAPH_NONCE_DOMAIN: &[u8] = b"maeum/secagg/v1/graph-nonce";
const GRAPH_SEED_DOMAIN: &[u8] = b"maeum/secagg/v1/graph-seed";

/// An X25519 key pair whose secret is wiped on drop.
pub struct KeyPair {
    // `StaticSecret` zeroizes itself on drop (x25519-dalek's `zeroize` feature).
    secret: StaticSecret,
    public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair").field("public", &self.public.as_bytes()).field("secret", &"***").finish()
    }
}

impl KeyPair {
    /// From 32 secret bytes (clamped as X25519 requires).
    ///
    /// The bytes are kept as given (clamping is applied in every scalar
    /// multiplication), so `secret_bytes` returns exactly `secret`.
    pub fn from_secret(mut secret: [u8; 32]) -> KeyPair {
        let static_secret = StaticSecret::from(secret);
        secret.zeroize();
        let public = PublicKey::from(&static_secret);
        KeyPair { secret: static_secret, public }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// X25519 with `their_public`; None if the result is all zeros (low-order point).
    pub fn agree(&self, their_public: &[u8; 32]) -> Option<[u8; 32]> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*their_public));
        // `SharedSecret` wipes itself on drop.
        shared.was_contributory().then(|| *shared.as_bytes())
    }
}

/// HKDF output length for ring: one SHA-256 block.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// HKDF-SHA256(salt = session id, ikm = shared, info = label || index || index) → 32
/// bytes.
fn derive(session_id: &[u8; 32], shared: &[u8; 32], label: &[u8], first: u16, second: u16) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, session_id).extract(shared);
    let (first, second) = (first.to_be_bytes(), second.to_be_bytes());
    let info: [&[u8]; 3] = [label, &first, &second];
    let mut out = [0u8; 32];
    // ring refuses only output longer than 255 × 32 bytes.
    prk.expand(&info, Len32).and_then(|okm| okm.fill(&mut out)).expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// The pairwise mask seed of parties `a` and `b` (order-independent):
/// HKDF(salt = session id, ikm = X25519 shared secret,
///      info = "maeum/secagg/v1/pair-mask" || min(a,b) || max(a,b)) → 32 bytes.
pub fn pair_mask_seed(session_id: &[u8; 32], shared: &[u8; 32], a: u16, b: u16) -> [u8; 32] {
    derive(session_id, shared, PAIR_MASK_INFO, a.min(b), a.max(b))
}

/// The one-message key for shares from `from` to `to`:
/// HKDF(salt = session id, ikm = X25519 shared secret,
///      info = "maeum/secagg/v1/share-key" || from || to) → 32 bytes.
pub fn share_key(session_id: &[u8; 32], shared: &[u8; 32], from: u16, to: u16) -> [u8; 32] {
    derive(session_id, shared, SHARE_KEY_INFO, from, to)
}

fn aead_key(key: &[u8; 32]) -> aead::LessSafeKey {
    // ring refuses only a key of the wrong length; ChaCha20-Poly1305 takes 32 bytes.
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("32 bytes is a ChaCha20-Poly1305 key"),
    )
}

/// Seals `plaintext` with ChaCha20-Poly1305 under `key`, zero nonce, with `aad`.
///
/// The output is the ciphertext followed by the 16-byte tag. The zero nonce is safe
/// only because each key seals exactly one message.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(plaintext.len() + aead::CHACHA20_POLY1305.tag_len());
    buf.extend_from_slice(plaintext);
    // ring refuses only messages longer than ChaCha20's 256 GiB limit.
    aead_key(key)
        .seal_in_place_append_tag(aead::Nonce::assume_unique_for_key([0; 12]), aead::Aad::from(aad), &mut buf)
        .expect("a share is far below the ChaCha20-Poly1305 length limit");
    buf
}

/// Opens what `seal` produced; an error (SA-06) if it does not authenticate.
pub fn open(key: &[u8; 32], aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, SecAggError> {
    let mut buf = ciphertext.to_vec();
    let len = aead_key(key)
        .open_in_place(aead::Nonce::assume_unique_for_key([0; 12]), aead::Aad::from(aad), &mut buf)
        .map_err(|_| SecAggError::new(Check::ShareAuth, "share does not authenticate"))?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// SHA-256("maeum/secagg/v1/graph-nonce" || session id || index || nonce): a party's
/// commitment to its share of the SecAgg+ graph seed.
pub fn graph_commitment(session_id: &[u8; 32], index: u16, nonce: &[u8; 32]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(GRAPH_NONCE_DOMAIN);
    ctx.update(session_id);
    ctx.update(&index.to_be_bytes());
    ctx.update(nonce);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The SecAgg+ graph seed: SHA-256("maeum/secagg/v1/graph-seed" || session id ||
/// count (u64) || for each party of U1 in index order: index || nonce). Every party's
/// nonce is committed before the roster is fixed and revealed after it, so the seed is
/// unpredictable to any party when the roster is set, and cannot be changed afterwards
/// except by aborting the session.
pub fn graph_seed(session_id: &[u8; 32], reveals: &[(u16, [u8; 32])]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(GRAPH_SEED_DOMAIN);
    ctx.update(session_id);
    ctx.update(&(reveals.len() as u64).to_be_bytes());
    for (index, nonce) in reveals {
        ctx.update(&index.to_be_bytes());
        ctx.update(nonce);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// SHA-256("maeum/secagg/v1/self-mask" || session id || index || seed).
pub fn self_mask_commitment(session_id: &[u8; 32], index: u16, seed: &[u8; 32]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(SELF_MASK_DOMAIN);
    ctx.update(session_id);
    ctx.update(&index.to_be_bytes());
    ctx.update(seed);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ring::hmac;

    fn unhex<const N: usize>(hex: &str) -> [u8; N] {
        assert_eq!(hex.len(), 2 * N);
        std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
    }

    /// RFC 5869 by hand with HMAC-SHA256: PRK = HMAC(salt, ikm); T(1) = HMAC(PRK, info || 0x01).
    fn hkdf_by_hand(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
        let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
        let mut msg = info.to_vec();
        msg.push(1);
        let t1 = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &msg);
        t1.as_ref().try_into().unwrap()
    }

    #[test]
    fn x25519_rfc7748_vector() {
        // RFC 7748 §6.1.
        let alice = KeyPair::from_secret(unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let bob = KeyPair::from_secret(unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
        assert_eq!(alice.public(), unhex::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        assert_eq!(bob.public(), unhex::<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let shared: [u8; 32] = unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(alice.agree(&bob.public()), Some(shared));
        assert_eq!(bob.agree(&alice.public()), Some(shared));
    }

    #[test]
    fn secret_bytes_round_trip() {
        let bytes = [0x42u8; 32];
        let pair = KeyPair::from_secret(bytes);
        assert_eq!(pair.secret_bytes(), bytes);
        let again = KeyPair::from_secret(pair.secret_bytes());
        assert_eq!(again.public(), pair.public());
    }

    #[test]
    fn low_order_points_are_refused() {
        let pair = KeyPair::from_secret([0x42; 32]);
        // The identity (0) and the order-2 point (1).
        assert_eq!(pair.agree(&[0; 32]), None);
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(pair.agree(&one), None);
    }

    #[test]
    fn debug_hides_the_secret() {
        let pair = KeyPair::from_secret([0x42; 32]);
        let text = format!("{pair:?}");
        assert!(text.contains("secret: \"***\""), "{text}");
        assert!(!text.contains("66, 66, 66"), "{text}");
    }

    #[test]
    fn derivation_known_answers() {
        // Recorded outputs, also computed with Python's hmac/hashlib and checked here
        // against HKDF by hand with ring::hmac.
        let sid = [0x11u8; 32];
        let shared = [0x22u8; 32];
        let pair = pair_mask_seed(&sid, &shared, 3, 7);
        assert_eq!(pair, unhex::<32>("6978fba92f06c541a74cf4877d09aa12b226cce0b7c9a09959096fb0b02ccaba"));
        assert_eq!(pair, hkdf_by_hand(&sid, &shared, b"maeum/secagg/v1/pair-mask\x00\x03\x00\x07"));
        let key = share_key(&sid, &shared, 3, 7);
        assert_eq!(key, unhex::<32>("e66aee27bbf22548c76c60fc56ccdf7c6936f1e21a0ba959e98cb9f00562a4c0"));
        assert_eq!(key, hkdf_by_hand(&sid, &shared, b"maeum/secagg/v1/share-key\x00\x03\x00\x07"));
        let back = share_key(&sid, &shared, 7, 3);
        assert_eq!(back, unhex::<32>("5d603d0b8ad146c144118582935b9561e49177eceaa8e682737bbb13c32bd196"));
        let commitment = self_mask_commitment(&sid, 5, &[0x33; 32]);
        assert_eq!(commitment, unhex::<32>("9504ae66a803ee15911b3f9a3a19dc85ca250f675b4fec8506f66017bab20f04"));
        // The graph commitment and seed, computed with Python's hashlib.
        let nonce = graph_commitment(&sid, 5, &[0x33; 32]);
        assert_eq!(nonce, unhex::<32>("015751f165a40345f5dc1f909408afff2d9ba09264364741186f23364e89ac96"));
        let seed = graph_seed(&sid, &[(1, [0x33; 32]), (2, [0x44; 32])]);
        assert_eq!(seed, unhex::<32>("f851c6e6aafc146c6014b94eb7c7cb7b05f6dc8e08682c0c6e170ef950e61a11"));
    }

    #[test]
    fn derivations_are_deterministic_and_separated() {
        let sid = [1u8; 32];
        let shared = [2u8; 32];
        assert_eq!(pair_mask_seed(&sid, &shared, 4, 9), pair_mask_seed(&sid, &shared, 4, 9));
        assert_eq!(pair_mask_seed(&sid, &shared, 4, 9), pair_mask_seed(&sid, &shared, 9, 4));
        assert_eq!(share_key(&sid, &shared, 4, 9), share_key(&sid, &shared, 4, 9));
        assert_ne!(share_key(&sid, &shared, 4, 9), share_key(&sid, &shared, 9, 4));
        // Different labels, sessions, secrets and indices give different outputs.
        assert_ne!(pair_mask_seed(&sid, &shared, 4, 9), share_key(&sid, &shared, 4, 9));
        assert_ne!(pair_mask_seed(&sid, &shared, 4, 9), pair_mask_seed(&[3; 32], &shared, 4, 9));
        assert_ne!(pair_mask_seed(&sid, &shared, 4, 9), pair_mask_seed(&sid, &[3; 32], 4, 9));
        assert_ne!(pair_mask_seed(&sid, &shared, 4, 9), pair_mask_seed(&sid, &shared, 4, 10));
        // Indices are fixed-width, so (1, 2) and (0x0102, …) cannot collide by concatenation.
        assert_ne!(share_key(&sid, &shared, 1, 2), share_key(&sid, &shared, 0x0102, 0));
        let seed = [5u8; 32];
        assert_ne!(self_mask_commitment(&sid, 1, &seed), self_mask_commitment(&sid, 2, &seed));
        assert_ne!(self_mask_commitment(&sid, 1, &seed), self_mask_commitment(&[0; 32], 1, &seed));
    }

    #[test]
    fn seal_open_round_trip() {
        let key = [9u8; 32];
        for len in [0usize, 1, 64, 1000] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = seal(&key, b"aad", &plaintext);
            assert_eq!(sealed.len(), len + 16);
            assert_eq!(open(&key, b"aad", &sealed).unwrap(), plaintext);
        }
    }

    #[test]
    fn tampering_is_detected() {
        let key = [9u8; 32];
        let sealed = seal(&key, b"from 1 to 2", b"a share of 32 bytes, more or less");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            let err = open(&key, b"from 1 to 2", &bad).unwrap_err();
            assert_eq!(err.check, Check::ShareAuth);
        }
        assert_eq!(open(&key, b"from 1 to 3", &sealed).unwrap_err().check, Check::ShareAuth);
        assert_eq!(open(&[8; 32], b"from 1 to 2", &sealed).unwrap_err().check, Check::ShareAuth);
        assert_eq!(open(&key, b"from 1 to 2", &sealed[..sealed.len() - 1]).unwrap_err().check, Check::ShareAuth);
        assert_eq!(open(&key, b"from 1 to 2", &[]).unwrap_err().check, Check::ShareAuth);
    }

    #[test]
    fn agreed_keys_match_between_parties() {
        let a = KeyPair::from_secret([0x10; 32]);
        let b = KeyPair::from_secret([0x20; 32]);
        let sid = [7u8; 32];
        let s_ab = a.agree(&b.public()).unwrap();
        let s_ba = b.agree(&a.public()).unwrap();
        assert_eq!(pair_mask_seed(&sid, &s_ab, 1, 2), pair_mask_seed(&sid, &s_ba, 2, 1));
        let sealed = seal(&share_key(&sid, &s_ab, 1, 2), b"", b"share");
        assert_eq!(open(&share_key(&sid, &s_ba, 1, 2), b"", &sealed).unwrap(), b"share");
    }
}
