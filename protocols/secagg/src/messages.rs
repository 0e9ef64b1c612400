//! The messages of the five stages. Parties are named by their 1-based session index.
//! Every message carries the session id; a message from another session, round or
//! attempt is refused (SA-02). `wire.rs` converts these to and from protobuf.

/// Stage 1, client → server: this party's two public keys and its commitment to a
/// graph nonce, signed with its enrolled identity over `advertise_transcript`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub session_id: [u8; 32],
    pub index: u16,
    /// X25519 public key for encrypting shares.
    pub cipher_pk: [u8; 32],
    /// X25519 public key for pairwise masks.
    pub mask_pk: [u8; 32],
    /// SHA-256("maeum/secagg/v1/graph-nonce" || session id || index || nonce): the
    /// party's contribution to the SecAgg+ graph seed, opened by [`GraphReveal`] once
    /// the roster is fixed (SA-13). Sent in every session; opened only when the session
    /// has a neighbour graph.
    pub graph_commitment: [u8; 32],
    pub signature: Vec<u8>,
}

/// Stage 1, server → clients: the advertised keys of every party that advertised
/// (the set U1), sorted by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoster {
    pub session_id: [u8; 32],
    pub keys: Vec<AdvertiseKeys>,
}

/// Stage 1b (SecAgg+ only), client → server, after the key roster: the nonce this
/// party committed to in its advertised keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphReveal {
    pub session_id: [u8; 32],
    pub index: u16,
    pub nonce: [u8; 32],
}

/// Stage 1b (SecAgg+ only), server → clients: the revealed nonce of every party in the
/// roster (U1), sorted by index. The graph seed is derived from all of them
/// (`crypto::graph_seed`), so no party — the coordinator included — chooses the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphReveals {
    pub session_id: [u8; 32],
    pub reveals: Vec<GraphReveal>,
}

/// One share pair (self-mask seed share, mask-key share) encrypted from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    pub from: u16,
    pub to: u16,
    pub ciphertext: Vec<u8>,
}

/// Stage 2, client → server: encrypted shares for each holder (its neighbours in U1
/// and itself), and a commitment to its self-mask seed
/// (SHA-256("maeum/secagg/v1/self-mask" || session id || index || seed)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKeys {
    pub session_id: [u8; 32],
    pub index: u16,
    pub self_mask_commitment: [u8; 32],
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2, server → one client: the parties that shared keys (U2) and the shares
/// addressed to this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesFor {
    pub session_id: [u8; 32],
    pub recipient: u16,
    pub sharers: Vec<u16>,
    pub shares: Vec<EncryptedShare>,
}

/// Stage 4, server → clients: the parties whose masked input arrived whole (U3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorSet {
    pub session_id: [u8; 32],
    pub survivors: Vec<u16>,
}

/// Stage 4, client → server: this party's signature over the survivor set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorSignature {
    pub session_id: [u8; 32],
    pub index: u16,
    pub signature: Vec<u8>,
}

/// Stage 5, server → clients: the survivor set and at least `threshold` signatures
/// over it (U4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorProof {
    pub session_id: [u8; 32],
    pub survivors: Vec<u16>,
    pub signatures: Vec<SurvivorSignature>,
}

/// One revealed share: `owner`'s secret, evaluated at the revealing party's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealedShare {
    pub owner: u16,
    pub share: [u8; 32],
}

/// Stage 5, client → server: self-mask seed shares of survivors, mask-key shares of
/// parties that shared keys but did not survive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskShares {
    pub session_id: [u8; 32],
    pub index: u16,
    pub self_mask_shares: Vec<RevealedShare>,
    pub mask_key_shares: Vec<RevealedShare>,
}

/// The bytes a party signs when advertising its keys: the domain tag, session id,
/// index, both public keys and the graph commitment.
pub fn advertise_transcript(keys: &AdvertiseKeys) -> Vec<u8> {
    let mut m = Vec::with_capacity(25 + 32 + 2 + 96);
    m.extend_from_slice(b"maeum/secagg/v1/advertise");
    m.extend_from_slice(&keys.session_id);
    m.extend_from_slice(&keys.index.to_be_bytes());
    m.extend_from_slice(&keys.cipher_pk);
    m.extend_from_slice(&keys.mask_pk);
    m.extend_from_slice(&keys.graph_commitment);
    m
}

/// The bytes a party signs to confirm the survivor set.
pub fn survivors_transcript(session_id: &[u8; 32], survivors: &[u16]) -> Vec<u8> {
    let mut m = Vec::with_capacity(25 + 32 + 8 + 2 * survivors.len());
    m.extend_from_slice(b"maeum/secagg/v1/survivors");
    m.extend_from_slice(session_id);
    m.extend_from_slice(&(survivors.len() as u64).to_be_bytes());
    for s in survivors {
        m.extend_from_slice(&s.to_be_bytes());
    }
    m
}
