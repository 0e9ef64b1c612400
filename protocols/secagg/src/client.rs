//! The site's side: one `Client` per session, driven stage by stage. Secrets live only
//! in this value (wiped on drop); a restarted site never rejoins a session.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use zeroize::Zeroizing;

use super::crypto::{self, KeyPair};
use super::graph::Graph;
use super::prg::MaskStream;
use super::shamir;
use super::{
    AdvertiseKeys, Check, EncryptedShare, GraphReveal, GraphReveals, KeyRoster, RevealedShare, SecAggError, Session,
    SharesFor, Signer, SurvivorProof, SurvivorSet, SurvivorSignature, UnmaskShares, Verifier, advertise_transcript,
    survivors_transcript,
};

/// Length of a share plaintext: from (2) ‖ to (2) ‖ self-mask seed share (32) ‖
/// mask-key share (32).
pub(crate) const SHARE_PLAINTEXT_LEN: usize = 2 + 2 + 32 + 32;

/// The associated data sealed with every share: session id ‖ from ‖ to.
pub(crate) fn share_aad(session_id: &[u8; 32], from: u16, to: u16) -> [u8; 36] {
    let mut aad = [0u8; 36];
    aad[..32].copy_from_slice(session_id);
    aad[32..34].copy_from_slice(&from.to_be_bytes());
    aad[34..].copy_from_slice(&to.to_be_bytes());
    aad
}

/// Where a client is in the protocol; each stage's method runs only in its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Created; `advertise` comes next.
    Advertise,
    /// Keys advertised in a session with a neighbour graph; `reveal_graph` comes next.
    RevealGraph,
    /// Keys advertised (and the graph nonce revealed, with a neighbour graph);
    /// `share_keys` comes next.
    ShareKeys,
    /// Shares dealt; `masked_input` comes next.
    MaskedInput,
    /// Masker handed out; `consistency` comes next.
    Consistency,
    /// Survivor set signed; `unmask` comes next.
    Unmask,
    /// Shares revealed; only an identical `unmask` is answered again.
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Advertise => "advertise",
            Stage::RevealGraph => "reveal graph nonce",
            Stage::ShareKeys => "share keys",
            Stage::MaskedInput => "masked input",
            Stage::Consistency => "consistency",
            Stage::Unmask => "unmask",
            Stage::Done => "done",
        }
    }
}

/// The two shares this party holds of one sharer's secrets (decrypted in stage 3).
struct HeldShare {
    self_mask: Zeroizing<[u8; 32]>,
    mask_key: Zeroizing<[u8; 32]>,
}

pub struct Client {
    session: Session,
    session_id: [u8; 32],
    me: u16,
    threshold: usize,
    /// Who masks with whom: complete from the start without a neighbour graph; with
    /// one, empty until `share_keys` derives it from every party's revealed nonce.
    graph: Graph,
    stage: Stage,
    cipher: KeyPair,
    mask: KeyPair,
    /// The mask secret key as drawn (the value that is Shamir-shared).
    mask_secret: Zeroizing<[u8; 32]>,
    /// The self-mask seed b.
    self_mask_seed: Zeroizing<[u8; 32]>,
    /// Seed of the Shamir coefficients (drawn from the session seed in `new`).
    coefficient_seed: Zeroizing<[u8; 32]>,
    /// This party's contribution to the graph seed, committed to in `advertise`.
    graph_nonce: Zeroizing<[u8; 32]>,
    /// The roster this party revealed its graph nonce against: `share_keys` accepts
    /// only this roster (SA-13), so the roster cannot be chosen after the reveal.
    revealed_against: Option<KeyRoster>,
    /// The advertised keys of U1: index → (cipher_pk, mask_pk).
    roster: BTreeMap<u16, ([u8; 32], [u8; 32])>,
    /// U2, as the server announced it in stage 3.
    sharers: Vec<u16>,
    /// Shares held of each sharer's secrets (this party is one of its holders).
    held: BTreeMap<u16, HeldShare>,
    /// U3, as signed in stage 4.
    survivors: Vec<u16>,
    /// The proof answered and the answer, once stage 5 ran.
    answered: Option<(SurvivorProof, UnmaskShares)>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("me", &self.me)
            .field("n", &self.session.n())
            .field("threshold", &self.threshold)
            .field("stage", &self.stage.name())
            .field("u1", &self.roster.len())
            .field("u2", &self.sharers.len())
            .field("held_shares", &self.held.len())
            .field("u3", &self.survivors.len())
            .finish_non_exhaustive()
    }
}

fn stage_error(wanted: Stage, now: Stage) -> SecAggError {
    SecAggError::new(Check::Replay, format!("message for stage {} while in stage {}", wanted.name(), now.name()))
}

fn strictly_sorted(xs: &[u16]) -> bool {
    xs.windows(2).all(|w| w[0] < w[1])
}

impl Client {
    /// `me` is this site's index in `session`; `seed` (32 bytes from the OS RNG) is
    /// the only source of randomness (keys, self-mask seed, Shamir coefficients).
    /// Validates the session (SA-01).
    pub fn new(session: Session, me: u16, seed: [u8; 32]) -> Result<Client, SecAggError> {
        session.validate()?;
        if session.participant(me).is_none() {
            return Err(SecAggError::new(Check::Params, format!("party {me} is not a participant of this session")));
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut draw = || {
            let mut b = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(&mut b[..]);
            b
        };
        let cipher_secret = draw();
        let mask_secret = draw();
        let self_mask_seed = draw();
        let coefficient_seed = draw();
        let graph_nonce = draw();
        let graph =
            if session.params.degree == 0 { Graph::new(session.n(), 0, &[0; 32]) } else { Graph::new(0, 0, &[0; 32]) };
        Ok(Client {
            session_id: session.id(),
            me,
            threshold: usize::from(session.params.threshold),
            graph,
            stage: Stage::Advertise,
            cipher: KeyPair::from_secret(*cipher_secret),
            mask: KeyPair::from_secret(*mask_secret),
            mask_secret,
            self_mask_seed,
            coefficient_seed,
            graph_nonce,
            revealed_against: None,
            roster: BTreeMap::new(),
            sharers: Vec::new(),
            held: BTreeMap::new(),
            survivors: Vec::new(),
            answered: None,
            session,
        })
    }

    /// This party's index.
    pub fn index(&self) -> u16 {
        self.me
    }

    /// The stage whose method runs next: "advertise", "reveal graph nonce" (SecAgg+),
    /// "share keys", "masked input", "consistency", "unmask" or "done".
    pub fn stage(&self) -> &'static str {
        self.stage.name()
    }

    fn expect_stage(&self, wanted: Stage) -> Result<(), SecAggError> {
        if self.stage != wanted { Err(stage_error(wanted, self.stage)) } else { Ok(()) }
    }

    fn check_session_id(&self, id: &[u8; 32], what: &str) -> Result<(), SecAggError> {
        if id != &self.session_id {
            return Err(SecAggError::new(
                Check::Replay,
                format!("{what} belongs to another session (round, attempt or federation)"),
            ));
        }
        Ok(())
    }

    /// Whether the session has a neighbour graph, so that `reveal_graph` runs between
    /// `advertise` and `share_keys`.
    pub fn needs_graph_reveal(&self) -> bool {
        self.session.params.degree > 0
    }

    /// Stage 1: generates and signs this party's keys and its graph commitment.
    pub fn advertise(&mut self, signer: &dyn Signer) -> Result<AdvertiseKeys, SecAggError> {
        self.expect_stage(Stage::Advertise)?;
        let mut keys = AdvertiseKeys {
            session_id: self.session_id,
            index: self.me,
            cipher_pk: self.cipher.public(),
            mask_pk: self.mask.public(),
            graph_commitment: crypto::graph_commitment(&self.session_id, self.me, &self.graph_nonce),
            signature: Vec::new(),
        };
        keys.signature = signer.sign(&advertise_transcript(&keys));
        self.stage = if self.needs_graph_reveal() { Stage::RevealGraph } else { Stage::ShareKeys };
        Ok(keys)
    }

    /// Stage 1b, with a neighbour graph only: checks the roster as `share_keys` will
    /// (SA-02…SA-05, SA-07), remembers it, and reveals this party's graph nonce. From
    /// now on only this roster is accepted (SA-13): since the seed includes this
    /// party's nonce, nobody could predict the graph when the roster was fixed.
    pub fn reveal_graph(&mut self, roster: &KeyRoster, verifier: &dyn Verifier) -> Result<GraphReveal, SecAggError> {
        self.expect_stage(Stage::RevealGraph)?;
        self.check_roster(roster, verifier)?;
        self.revealed_against = Some(roster.clone());
        self.stage = Stage::ShareKeys;
        Ok(GraphReveal { session_id: self.session_id, index: self.me, nonce: *self.graph_nonce })
    }

    /// Derives the neighbour graph from `reveals` (SA-13): exactly one reveal for each
    /// party of `roster`, in index order, each opening that party's signed commitment.
    fn derive_graph(&self, roster: &KeyRoster, reveals: &GraphReveals) -> Result<Graph, SecAggError> {
        let bad = |culprit: Option<u16>, m: &str| SecAggError { check: Check::GraphSeed, culprit, message: m.into() };
        self.check_session_id(&reveals.session_id, "the graph reveals")?;
        if reveals.reveals.len() != roster.keys.len() {
            return Err(bad(
                None,
                &format!(
                    "{} graph nonces revealed for a roster of {}: every party of the roster must reveal",
                    reveals.reveals.len(),
                    roster.keys.len()
                ),
            ));
        }
        let mut nonces = Vec::with_capacity(roster.keys.len());
        for (k, r) in roster.keys.iter().zip(&reveals.reveals) {
            if r.index != k.index || r.session_id != self.session_id {
                return Err(bad(None, "the graph reveals do not list the roster's parties in order"));
            }
            if crypto::graph_commitment(&self.session_id, r.index, &r.nonce) != k.graph_commitment {
                return Err(bad(Some(r.index), "a revealed graph nonce does not open the party's signed commitment"));
            }
            nonces.push((r.index, r.nonce));
        }
        if nonces.iter().any(|&(i, nonce)| i == self.me && nonce != *self.graph_nonce) {
            return Err(bad(None, "the graph reveals list another nonce for this party"));
        }
        let seed = crypto::graph_seed(&self.session_id, &nonces);
        Ok(Graph::new(self.session.n(), self.session.params.degree, &seed))
    }

    /// Checks the key roster (SA-02, SA-03, SA-04, SA-05, SA-07) and returns U1.
    fn check_roster(&self, roster: &KeyRoster, verifier: &dyn Verifier) -> Result<Vec<u16>, SecAggError> {
        self.check_session_id(&roster.session_id, "the key roster")?;
        let n = self.session.n();
        let indices: Vec<u16> = roster.keys.iter().map(|k| k.index).collect();
        if !strictly_sorted(&indices) {
            return Err(SecAggError::new(Check::Malformed, "the key roster is not sorted by index without repeats"));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i == 0 || usize::from(i) > n) {
            return Err(SecAggError::new(
                Check::Malformed,
                format!("the key roster lists party {bad}, not a participant"),
            ));
        }
        let mut seen = BTreeSet::new();
        for k in &roster.keys {
            if k.session_id != self.session_id {
                return Err(SecAggError::by(Check::Replay, k.index, "advertised keys belong to another session"));
            }
            if !verifier.verify(k.index, &advertise_transcript(k), &k.signature) {
                return Err(SecAggError::by(
                    Check::KeySignature,
                    k.index,
                    "the signature over the advertised keys does not verify under the party's identity",
                ));
            }
            if k.cipher_pk == k.mask_pk {
                return Err(SecAggError::by(Check::KeyReuse, k.index, "the cipher and mask keys are the same"));
            }
            for pk in [&k.cipher_pk, &k.mask_pk] {
                if !seen.insert(*pk) {
                    return Err(SecAggError::by(Check::KeyReuse, k.index, "an advertised key is another party's key"));
                }
            }
            if k.index != self.me
                && (self.cipher.agree(&k.cipher_pk).is_none() || self.mask.agree(&k.mask_pk).is_none())
            {
                return Err(SecAggError::by(Check::KeyReuse, k.index, "an advertised key is a low-order point"));
            }
        }
        let mine = roster.keys.iter().find(|k| k.index == self.me).ok_or_else(|| {
            SecAggError::new(Check::Replay, "the key roster does not list this party: it is not for this party")
        })?;
        if mine.cipher_pk != self.cipher.public()
            || mine.mask_pk != self.mask.public()
            || mine.graph_commitment != crypto::graph_commitment(&self.session_id, self.me, &self.graph_nonce)
        {
            return Err(SecAggError::new(Check::Malformed, "the key roster lists other keys for this party"));
        }
        if indices.len() < self.threshold {
            return Err(SecAggError::new(
                Check::Threshold,
                format!("{} parties advertised keys; the threshold is {}", indices.len(), self.threshold),
            ));
        }
        Ok(indices)
    }

    /// Stage 2: checks every advertised key (SA-02, SA-03, SA-04, SA-05), and with a
    /// neighbour graph that `roster` is the one this party revealed against and
    /// `reveals` derive the graph (SA-13); then deals Shamir shares of the self-mask
    /// seed and of the mask secret key to each holder. `reveals` is ignored without a
    /// neighbour graph.
    pub fn share_keys(
        &mut self,
        roster: &KeyRoster,
        reveals: Option<&GraphReveals>,
        verifier: &dyn Verifier,
    ) -> Result<super::ShareKeys, SecAggError> {
        self.expect_stage(Stage::ShareKeys)?;
        let indices = self.check_roster(roster, verifier)?;
        if self.needs_graph_reveal() {
            if self.revealed_against.as_ref() != Some(roster) {
                return Err(SecAggError::new(
                    Check::GraphSeed,
                    "the key roster differs from the one this party revealed its graph nonce against",
                ));
            }
            let reveals = reveals.ok_or_else(|| {
                SecAggError::new(Check::GraphSeed, "no graph reveals: this session has a neighbour graph")
            })?;
            self.graph = self.derive_graph(roster, reveals)?;
        }
        let holders: Vec<u16> =
            self.graph.holders(self.me).into_iter().filter(|h| indices.binary_search(h).is_ok()).collect();
        if holders.len() < self.threshold {
            return Err(SecAggError::new(
                Check::Threshold,
                format!(
                    "{} holders of this party's shares advertised keys; the threshold is {}",
                    holders.len(),
                    self.threshold
                ),
            ));
        }
        let xs: Vec<u8> = holders.iter().map(|&h| h as u8).collect();
        let mut rng = ChaCha20Rng::from_seed(*self.coefficient_seed);
        let mut coefficients = |buf: &mut [u8]| rng.fill_bytes(buf);
        let self_mask_shares = shamir::split(&self.self_mask_seed, self.threshold, &xs, &mut coefficients)?;
        let mask_key_shares = shamir::split(&self.mask_secret, self.threshold, &xs, &mut coefficients)?;
        let keys: BTreeMap<u16, ([u8; 32], [u8; 32])> =
            roster.keys.iter().map(|k| (k.index, (k.cipher_pk, k.mask_pk))).collect();
        let mut shares = Vec::with_capacity(holders.len());
        for ((&h, b), s) in holders.iter().zip(&self_mask_shares).zip(&mask_key_shares) {
            let their_cipher_pk = &keys.get(&h).ok_or_else(|| SecAggError::new(Check::Malformed, "holder missing"))?.0;
            let shared = Zeroizing::new(
                self.cipher
                    .agree(their_cipher_pk)
                    .ok_or_else(|| SecAggError::by(Check::KeyReuse, h, "an advertised key is a low-order point"))?,
            );
            let key = Zeroizing::new(crypto::share_key(&self.session_id, &shared, self.me, h));
            let mut plaintext = Zeroizing::new([0u8; SHARE_PLAINTEXT_LEN]);
            plaintext[..2].copy_from_slice(&self.me.to_be_bytes());
            plaintext[2..4].copy_from_slice(&h.to_be_bytes());
            plaintext[4..36].copy_from_slice(&b.y);
            plaintext[36..].copy_from_slice(&s.y);
            let ciphertext = crypto::seal(&key, &share_aad(&self.session_id, self.me, h), &plaintext[..]);
            shares.push(EncryptedShare { from: self.me, to: h, ciphertext });
        }
        let self_mask_commitment = crypto::self_mask_commitment(&self.session_id, self.me, &self.self_mask_seed);
        self.roster = keys;
        self.stage = Stage::MaskedInput;
        Ok(super::ShareKeys { session_id: self.session_id, index: self.me, self_mask_commitment, shares })
    }

    /// Stage 3: records the shares addressed to this party (checked: SA-02, SA-05,
    /// SA-06, SA-07) and returns the masker for this party's input.
    pub fn masked_input(&mut self, shares: &SharesFor) -> Result<Masker, SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        self.check_session_id(&shares.session_id, "the shares")?;
        if shares.recipient != self.me {
            return Err(SecAggError::new(
                Check::Replay,
                format!("shares addressed to party {}, not to this party", shares.recipient),
            ));
        }
        let u2 = &shares.sharers;
        if !strictly_sorted(u2) {
            return Err(SecAggError::new(Check::Malformed, "the sharers are not sorted by index without repeats"));
        }
        if let Some(&v) = u2.iter().find(|v| !self.roster.contains_key(v)) {
            return Err(SecAggError::new(Check::Malformed, format!("sharer {v} did not advertise keys")));
        }
        if u2.binary_search(&self.me).is_err() {
            return Err(SecAggError::new(Check::Malformed, "the sharers do not include this party"));
        }
        if u2.len() < self.threshold {
            return Err(SecAggError::new(
                Check::Threshold,
                format!("{} parties shared keys; the threshold is {}", u2.len(), self.threshold),
            ));
        }
        // Exactly one share from every sharer this party holds shares of.
        let mut from: BTreeMap<u16, &EncryptedShare> = BTreeMap::new();
        for s in &shares.shares {
            if s.to != self.me {
                return Err(SecAggError::by(Check::Malformed, s.from, "a share addressed to another party"));
            }
            if u2.binary_search(&s.from).is_err() {
                return Err(SecAggError::by(Check::Malformed, s.from, "a share from a party that did not share keys"));
            }
            if s.from != self.me && !self.graph.neighbours(self.me).contains(&s.from) {
                return Err(SecAggError::by(Check::Malformed, s.from, "a share from a party that is not a neighbour"));
            }
            if from.insert(s.from, s).is_some() {
                return Err(SecAggError::by(Check::Malformed, s.from, "two shares from the same party"));
            }
        }
        let holding: Vec<u16> =
            u2.iter().copied().filter(|&v| v == self.me || self.graph.neighbours(self.me).contains(&v)).collect();
        if let Some(&v) = holding.iter().find(|v| !from.contains_key(v)) {
            return Err(SecAggError::by(Check::Malformed, v, "no share from a party that shared keys"));
        }
        let mut held = BTreeMap::new();
        for (&v, s) in &from {
            let (their_cipher_pk, _) = self.roster[&v];
            let shared = Zeroizing::new(
                self.cipher
                    .agree(&their_cipher_pk)
                    .ok_or_else(|| SecAggError::by(Check::KeyReuse, v, "an advertised key is a low-order point"))?,
            );
            let key = Zeroizing::new(crypto::share_key(&self.session_id, &shared, v, self.me));
            let plaintext = Zeroizing::new(
                crypto::open(&key, &share_aad(&self.session_id, v, self.me), &s.ciphertext)
                    .map_err(|_| SecAggError::by(Check::ShareAuth, v, "a share does not decrypt and authenticate"))?,
            );
            if plaintext.len() != SHARE_PLAINTEXT_LEN
                || plaintext[..2] != v.to_be_bytes()
                || plaintext[2..4] != self.me.to_be_bytes()
            {
                return Err(SecAggError::by(Check::ShareAuth, v, "a share names the wrong sender or recipient"));
            }
            let mut self_mask = Zeroizing::new([0u8; 32]);
            let mut mask_key = Zeroizing::new([0u8; 32]);
            self_mask.copy_from_slice(&plaintext[4..36]);
            mask_key.copy_from_slice(&plaintext[36..]);
            held.insert(v, HeldShare { self_mask, mask_key });
        }
        // Masks: the self mask, and one pairwise mask with each neighbour that shared.
        let mut streams = vec![(MaskStream::new(&self.self_mask_seed), true)];
        for &v in self.graph.neighbours(self.me) {
            if u2.binary_search(&v).is_err() {
                continue;
            }
            let (_, their_mask_pk) = self.roster[&v];
            let shared = Zeroizing::new(
                self.mask
                    .agree(&their_mask_pk)
                    .ok_or_else(|| SecAggError::by(Check::KeyReuse, v, "an advertised key is a low-order point"))?,
            );
            let seed = Zeroizing::new(crypto::pair_mask_seed(&self.session_id, &shared, self.me, v));
            streams.push((MaskStream::new(&seed), self.me < v));
        }
        self.held = held;
        self.sharers = u2.clone();
        self.stage = Stage::Consistency;
        Ok(Masker { streams, position: 0, len: self.session.params.vector_len })
    }

    /// Stage 4: checks the survivor set (SA-02, SA-05, SA-09) and signs it.
    pub fn consistency(
        &mut self,
        survivors: &SurvivorSet,
        signer: &dyn Signer,
    ) -> Result<SurvivorSignature, SecAggError> {
        self.expect_stage(Stage::Consistency)?;
        self.check_session_id(&survivors.session_id, "the survivor set")?;
        let u3 = &survivors.survivors;
        if !strictly_sorted(u3) {
            return Err(SecAggError::new(
                Check::SurvivorSet,
                "the survivor set is not sorted by index without repeats",
            ));
        }
        if let Some(&v) = u3.iter().find(|v| self.sharers.binary_search(v).is_err()) {
            return Err(SecAggError::new(
                Check::SurvivorSet,
                format!("the survivor set names party {v}, which did not share keys"),
            ));
        }
        if u3.binary_search(&self.me).is_err() {
            return Err(SecAggError::new(Check::SurvivorSet, "the survivor set does not include this party"));
        }
        if u3.len() < self.threshold {
            return Err(SecAggError::new(
                Check::Threshold,
                format!("{} parties survived; the threshold is {}", u3.len(), self.threshold),
            ));
        }
        let signature = signer.sign(&survivors_transcript(&self.session_id, u3));
        self.survivors = u3.clone();
        self.stage = Stage::Unmask;
        Ok(SurvivorSignature { session_id: self.session_id, index: self.me, signature })
    }

    /// Stage 5: checks the signatures over the survivor set (SA-09), decrypts the
    /// held shares (SA-06) and reveals the self-mask share of each survivor and the
    /// mask-key share of each party that shared but did not survive (SA-10).
    ///
    /// A party answers once: the same proof again gets the same answer, a different
    /// proof is refused (SA-09). (The shares were decrypted and checked in stage 3.)
    pub fn unmask(&mut self, proof: &SurvivorProof, verifier: &dyn Verifier) -> Result<UnmaskShares, SecAggError> {
        if let Some((answered, reply)) = &self.answered {
            return if answered == proof {
                Ok(reply.clone())
            } else {
                Err(SecAggError::new(Check::SurvivorSet, "a second, different survivor proof after unmasking"))
            };
        }
        self.expect_stage(Stage::Unmask)?;
        self.check_session_id(&proof.session_id, "the survivor proof")?;
        if proof.survivors != self.survivors {
            return Err(SecAggError::new(
                Check::SurvivorSet,
                "the survivor proof names another set than the one signed",
            ));
        }
        let transcript = survivors_transcript(&self.session_id, &self.survivors);
        let mut signers = BTreeSet::new();
        for s in &proof.signatures {
            if s.session_id != self.session_id {
                return Err(SecAggError::by(Check::Replay, s.index, "a survivor signature belongs to another session"));
            }
            if self.survivors.binary_search(&s.index).is_err() {
                return Err(SecAggError::by(Check::SurvivorSet, s.index, "a survivor signature from a non-survivor"));
            }
            if !signers.insert(s.index) {
                return Err(SecAggError::by(
                    Check::SurvivorSet,
                    s.index,
                    "two survivor signatures from the same party",
                ));
            }
            if !verifier.verify(s.index, &transcript, &s.signature) {
                return Err(SecAggError::by(
                    Check::SurvivorSet,
                    s.index,
                    "a survivor signature does not verify over this survivor set",
                ));
            }
        }
        if signers.len() < self.threshold {
            return Err(SecAggError::new(
                Check::Threshold,
                format!("{} survivors signed the survivor set; the threshold is {}", signers.len(), self.threshold),
            ));
        }
        let mut self_mask_shares = Vec::new();
        let mut mask_key_shares = Vec::new();
        for (&v, share) in &self.held {
            if self.survivors.binary_search(&v).is_ok() {
                self_mask_shares.push(RevealedShare { owner: v, share: *share.self_mask });
            } else {
                mask_key_shares.push(RevealedShare { owner: v, share: *share.mask_key });
            }
        }
        if self_mask_shares.iter().any(|s| mask_key_shares.iter().any(|m| m.owner == s.owner)) {
            return Err(SecAggError::new(Check::DoubleReveal, "would reveal both shares of one party"));
        }
        let reply = UnmaskShares { session_id: self.session_id, index: self.me, self_mask_shares, mask_key_shares };
        self.answered = Some((proof.clone(), reply.clone()));
        self.stage = Stage::Done;
        Ok(reply)
    }
}

/// Adds this party's masks to its quantised input, chunk by chunk, in order.
pub struct Masker {
    /// Each mask stream and whether it is added (true) or subtracted.
    streams: Vec<(MaskStream, bool)>,
    position: u64,
    len: u64,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("streams", &self.streams.len())
            .field("position", &self.position)
            .field("len", &self.len)
            .finish()
    }
}

/// Words masked per pass over the streams (keeps the working set in cache).
const MASK_BLOCK: usize = 16 * 1024;

impl Masker {
    /// Masks the next `words.len()` words in place (wrapping add of the self mask and
    /// ± each pairwise mask). SA-08 if this would run past the session's length.
    pub fn mask(&mut self, words: &mut [u32]) -> Result<(), SecAggError> {
        let end = self.position.checked_add(words.len() as u64).filter(|&e| e <= self.len);
        let Some(end) = end else {
            return Err(SecAggError::new(
                Check::InputLength,
                format!(
                    "masking {} more words after {} runs past the session's {} words",
                    words.len(),
                    self.position,
                    self.len
                ),
            ));
        };
        for block in words.chunks_mut(MASK_BLOCK) {
            for (stream, add) in &mut self.streams {
                if *add { stream.add_to(block) } else { stream.sub_from(block) }
            }
        }
        self.position = end;
        Ok(())
    }

    /// Words masked so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// SA-08 unless exactly the session's length was masked.
    pub fn finish(self) -> Result<(), SecAggError> {
        if self.position != self.len {
            return Err(SecAggError::new(
                Check::InputLength,
                format!("{} words masked; the session's input has {}", self.position, self.len),
            ));
        }
        Ok(())
    }
}
