//! The coordinator's side: one `Server` per session. It relays messages, keeps the
//! running masked sum (O(vector length) memory), and unmasks the sum at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use zeroize::Zeroizing;

use super::client::SHARE_PLAINTEXT_LEN;
use super::crypto::{self, KeyPair};
use super::graph::Graph;
use super::prg::MaskStream;
use super::shamir::Share;
use super::{
    AdvertiseKeys, Check, GraphReveal, GraphReveals, KeyRoster, SecAggError, Session, ShareKeys, SharesFor,
    SurvivorProof, SurvivorSet, SurvivorSignature, UnmaskShares, Verifier, advertise_transcript, survivors_transcript,
};

mod attribution;
mod snapshot;

use attribution::reconstruct;

/// Length of a sealed share: the plaintext and the Poly1305 tag.
const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

/// Words unmasked per pass over the mask streams.
const UNMASK_CHUNK: usize = 64 * 1024;

/// The server's open stage, in protocol order. Callers that drive a session (the
/// coordinator's round) read it from [`Server::current_stage`] rather than keeping their
/// own copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Advertise,
    Reveal,
    Share,
    Masked,
    Consistency,
    Unmask,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Advertise => "advertise",
            Stage::Reveal => "reveal graph nonce",
            Stage::Share => "share keys",
            Stage::Masked => "masked input",
            Stage::Consistency => "consistency",
            Stage::Unmask => "unmask",
        }
    }
}

pub struct Server {
    session: Session,
    session_id: [u8; 32],
    threshold: usize,
    /// Complete from the start without a neighbour graph; with one, empty until
    /// `close_reveals` derives it from every party's nonce (SA-13).
    graph: Graph,
    stage: Stage,
    adverts: BTreeMap<u16, AdvertiseKeys>,
    u1: Vec<u16>,
    reveals: BTreeMap<u16, GraphReveal>,
    shares: BTreeMap<u16, ShareKeys>,
    u2: Vec<u16>,
    /// The running sum of masked inputs (allocated on the first fold).
    sum: Option<Vec<u32>>,
    /// Words folded so far, per party of U2 that started.
    folded: BTreeMap<u16, u64>,
    finished: BTreeSet<u16>,
    u3: Vec<u16>,
    signatures: BTreeMap<u16, SurvivorSignature>,
    u4: Vec<u16>,
    unmasks: BTreeMap<u16, UnmaskShares>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("n", &self.session.n())
            .field("threshold", &self.threshold)
            .field("stage", &self.stage.name())
            .field("u1", &self.u1.len())
            .field("u2", &self.u2.len())
            .field("folding", &self.folded.len())
            .field("u3", &self.u3.len())
            .field("u4", &self.u4.len())
            .field("unmasked", &self.unmasks.len())
            .finish_non_exhaustive()
    }
}

/// The result of a session: the sum over the survivors of their quantised inputs,
/// mod 2^32, and who contributed.
#[derive(Clone, PartialEq, Eq)]
pub struct Outcome {
    pub sum: Vec<u32>,
    /// U3: parties whose input is in the sum.
    pub survivors: Vec<u16>,
    /// Parties selected but not in the sum, in index order.
    pub dropped: Vec<u16>,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("sum", &format_args!("[{} words]", self.sum.len()))
            .field("survivors", &self.survivors)
            .field("dropped", &self.dropped)
            .finish()
    }
}

fn contains(set: &[u16], x: u16) -> bool {
    set.binary_search(&x).is_ok()
}

impl Server {
    /// Validates the session (SA-01).
    pub fn new(session: Session) -> Result<Server, SecAggError> {
        session.validate()?;
        Ok(Server {
            session_id: session.id(),
            threshold: usize::from(session.params.threshold),
            graph: if session.params.degree == 0 {
                Graph::new(session.n(), 0, &[0; 32])
            } else {
                Graph::new(0, 0, &[0; 32])
            },
            stage: Stage::Advertise,
            adverts: BTreeMap::new(),
            u1: Vec::new(),
            reveals: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: Vec::new(),
            sum: None,
            folded: BTreeMap::new(),
            finished: BTreeSet::new(),
            u3: Vec::new(),
            signatures: BTreeMap::new(),
            u4: Vec::new(),
            unmasks: BTreeMap::new(),
            session,
        })
    }

    pub fn session_id(&self) -> [u8; 32] {
        self.session_id
    }

    /// The open stage: "advertise", "reveal graph nonce" (SecAgg+ only), "share keys",
    /// "masked input", "consistency" or "unmask".
    pub fn stage(&self) -> &'static str {
        self.stage.name()
    }

    /// The open stage.
    pub fn current_stage(&self) -> Stage {
        self.stage
    }

    /// U1: parties whose keys are in the roster (empty before `close_advertise`).
    pub fn u1(&self) -> &[u16] {
        &self.u1
    }

    /// U2: parties that shared keys (empty before `close_shares`).
    pub fn u2(&self) -> &[u16] {
        &self.u2
    }

    /// U3: parties whose masked input is in the sum (empty before `close_masked`).
    pub fn u3(&self) -> &[u16] {
        &self.u3
    }

    /// U4: survivors that signed U3 (empty before `close_consistency`).
    pub fn u4(&self) -> &[u16] {
        &self.u4
    }

    fn expect_stage(&self, wanted: Stage) -> Result<(), SecAggError> {
        if self.stage != wanted {
            return Err(SecAggError::new(
                Check::Replay,
                format!("message for stage {} while in stage {}", wanted.name(), self.stage.name()),
            ));
        }
        Ok(())
    }

    fn check_session_id(&self, id: &[u8; 32], party: u16) -> Result<(), SecAggError> {
        if id != &self.session_id {
            return Err(SecAggError::by(
                Check::Replay,
                party,
                "message belongs to another session (round, attempt or federation)",
            ));
        }
        Ok(())
    }

    fn threshold_error(&self, count: usize, what: &str) -> SecAggError {
        SecAggError::new(Check::Threshold, format!("{count} parties {what}; the threshold is {}", self.threshold))
    }

    /// Stage 1: accepts one party's keys (SA-02, SA-03, SA-04, SA-07). Resending the
    /// identical message is accepted; a different one from the same party is refused.
    pub fn receive_advertise(&mut self, msg: AdvertiseKeys, verifier: &dyn Verifier) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Advertise)?;
        if self.session.participant(msg.index).is_none() {
            return Err(SecAggError::new(Check::Replay, format!("party {} is not a participant", msg.index)));
        }
        self.check_session_id(&msg.session_id, msg.index)?;
        if let Some(known) = self.adverts.get(&msg.index) {
            return if *known == msg {
                Ok(())
            } else {
                Err(SecAggError::by(Check::Malformed, msg.index, "a different resend of advertised keys"))
            };
        }
        if !verifier.verify(msg.index, &advertise_transcript(&msg), &msg.signature) {
            return Err(SecAggError::by(
                Check::KeySignature,
                msg.index,
                "the signature over the advertised keys does not verify under the party's identity",
            ));
        }
        if msg.cipher_pk == msg.mask_pk {
            return Err(SecAggError::by(Check::KeyReuse, msg.index, "the cipher and mask keys are the same"));
        }
        let reused = self
            .adverts
            .values()
            .any(|k| [k.cipher_pk, k.mask_pk].iter().any(|pk| *pk == msg.cipher_pk || *pk == msg.mask_pk));
        if reused {
            return Err(SecAggError::by(Check::KeyReuse, msg.index, "an advertised key is another party's key"));
        }
        // Any scalar maps a low-order point to zero.
        let probe = KeyPair::from_secret([0x5a; 32]);
        if probe.agree(&msg.cipher_pk).is_none() || probe.agree(&msg.mask_pk).is_none() {
            return Err(SecAggError::by(Check::KeyReuse, msg.index, "an advertised key is a low-order point"));
        }
        self.adverts.insert(msg.index, msg);
        Ok(())
    }

    /// Parties whose message for the current stage has arrived (for the masked-input
    /// stage: whose input is finished).
    pub fn received(&self) -> Vec<u16> {
        match self.stage {
            Stage::Advertise => self.adverts.keys().copied().collect(),
            Stage::Reveal => self.reveals.keys().copied().collect(),
            Stage::Share => self.shares.keys().copied().collect(),
            Stage::Masked => self.finished.iter().copied().collect(),
            Stage::Consistency => self.signatures.keys().copied().collect(),
            Stage::Unmask => self.unmasks.keys().copied().collect(),
        }
    }

    /// Ends stage 1: SA-05 if fewer than threshold advertised.
    pub fn close_advertise(&mut self) -> Result<KeyRoster, SecAggError> {
        self.expect_stage(Stage::Advertise)?;
        if self.adverts.len() < self.threshold {
            return Err(self.threshold_error(self.adverts.len(), "advertised keys"));
        }
        self.u1 = self.adverts.keys().copied().collect();
        self.stage = if self.session.params.degree > 0 { Stage::Reveal } else { Stage::Share };
        Ok(KeyRoster { session_id: self.session_id, keys: self.adverts.values().cloned().collect() })
    }

    /// Whether the session has a neighbour graph, whose seed the parties reveal after
    /// the roster (`receive_reveal`, `close_reveals`).
    pub fn needs_graph_reveal(&self) -> bool {
        self.session.params.degree > 0
    }

    /// Stage 1b (SecAgg+ only): accepts one party's graph nonce (SA-02, SA-07, SA-13:
    /// it must open the commitment in the party's signed keys).
    pub fn receive_reveal(&mut self, msg: GraphReveal) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Reveal)?;
        self.check_session_id(&msg.session_id, msg.index)?;
        let Some(keys) = self.adverts.get(&msg.index) else {
            return Err(SecAggError::by(Check::Malformed, msg.index, "a graph nonce from a party not in the roster"));
        };
        if crypto::graph_commitment(&self.session_id, msg.index, &msg.nonce) != keys.graph_commitment {
            return Err(SecAggError::by(
                Check::GraphSeed,
                msg.index,
                "the revealed graph nonce does not open the party's signed commitment",
            ));
        }
        // An opening is unique (SHA-256 is collision resistant), so a resend is identical.
        self.reveals.insert(msg.index, msg);
        Ok(())
    }

    /// Ends stage 1b: every party of U1 must have revealed (SA-13; a missing reveal
    /// ends the session — dropping the party would let whoever withholds a nonce pick
    /// among several graphs). Derives the graph and returns the reveals to relay.
    pub fn close_reveals(&mut self) -> Result<GraphReveals, SecAggError> {
        self.expect_stage(Stage::Reveal)?;
        let missing: Vec<u16> = self.u1.iter().copied().filter(|i| !self.reveals.contains_key(i)).collect();
        if !missing.is_empty() {
            return Err(SecAggError::new(
                Check::GraphSeed,
                format!(
                    "{} of {} parties in the roster did not reveal their graph nonce (parties {missing:?}); \
                     the graph cannot be drawn without them",
                    missing.len(),
                    self.u1.len()
                ),
            ));
        }
        let nonces: Vec<(u16, [u8; 32])> = self.reveals.values().map(|r| (r.index, r.nonce)).collect();
        let seed = crypto::graph_seed(&self.session_id, &nonces);
        self.graph = Graph::new(self.session.n(), self.session.params.degree, &seed);
        self.stage = Stage::Share;
        Ok(GraphReveals { session_id: self.session_id, reveals: self.reveals.values().cloned().collect() })
    }

    /// Stage 2: accepts one party's encrypted shares (SA-02, SA-07: one share for each
    /// holder in U1 of that party, no others).
    pub fn receive_shares(&mut self, msg: ShareKeys) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Share)?;
        if self.session.participant(msg.index).is_none() {
            return Err(SecAggError::new(Check::Replay, format!("party {} is not a participant", msg.index)));
        }
        self.check_session_id(&msg.session_id, msg.index)?;
        if !contains(&self.u1, msg.index) {
            return Err(SecAggError::by(
                Check::Malformed,
                msg.index,
                "shares from a party that did not advertise keys",
            ));
        }
        if let Some(known) = self.shares.get(&msg.index) {
            return if *known == msg {
                Ok(())
            } else {
                Err(SecAggError::by(Check::Malformed, msg.index, "a different resend of shares"))
            };
        }
        let holders: Vec<u16> = self.graph.holders(msg.index).into_iter().filter(|&h| contains(&self.u1, h)).collect();
        let mut to = BTreeSet::new();
        for s in &msg.shares {
            if s.from != msg.index {
                return Err(SecAggError::by(Check::Malformed, msg.index, "a share names another sender"));
            }
            if !contains(&holders, s.to) {
                return Err(SecAggError::by(
                    Check::Malformed,
                    msg.index,
                    format!("a share for party {}, not a holder", s.to),
                ));
            }
            if !to.insert(s.to) {
                return Err(SecAggError::by(Check::Malformed, msg.index, format!("two shares for party {}", s.to)));
            }
            if s.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::by(Check::Malformed, msg.index, "a share of the wrong length"));
            }
        }
        if to.len() != holders.len() {
            return Err(SecAggError::by(
                Check::Malformed,
                msg.index,
                format!("{} shares for {} holders", to.len(), holders.len()),
            ));
        }
        self.shares.insert(msg.index, msg);
        Ok(())
    }

    /// Ends stage 2 (SA-05).
    pub fn close_shares(&mut self) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Share)?;
        if self.shares.len() < self.threshold {
            return Err(self.threshold_error(self.shares.len(), "shared keys"));
        }
        self.u2 = self.shares.keys().copied().collect();
        self.stage = Stage::Masked;
        Ok(())
    }

    /// The shares addressed to `recipient` (a member of U2).
    pub fn shares_for(&self, recipient: u16) -> Result<SharesFor, SecAggError> {
        if self.stage < Stage::Masked {
            return Err(SecAggError::new(
                Check::Replay,
                format!("shares are relayed after the share keys stage; the session is in stage {}", self.stage.name()),
            ));
        }
        if !contains(&self.u2, recipient) {
            return Err(SecAggError::by(Check::Replay, recipient, "the party did not share keys in this session"));
        }
        let shares = self
            .u2
            .iter()
            .filter_map(|v| self.shares.get(v))
            .flat_map(|m| m.shares.iter().filter(|s| s.to == recipient).cloned())
            .collect();
        Ok(SharesFor { session_id: self.session_id, recipient, sharers: self.u2.clone(), shares })
    }

    /// SA-02/SA-07: the masked-input stage is open and `party` (in U2) may still add.
    fn open_input(&self, party: u16) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Masked)?;
        if !contains(&self.u2, party) {
            return Err(SecAggError::by(
                Check::Malformed,
                party,
                "a masked input from a party that did not share keys",
            ));
        }
        if self.finished.contains(&party) {
            return Err(SecAggError::by(Check::Malformed, party, "a masked input already finished"));
        }
        Ok(())
    }

    /// Stage 3: adds the next words of `party`'s masked input to the running sum. The
    /// caller folds an input only once it has arrived whole and verified (digest), so a
    /// party is either entirely in the sum or not at all. SA-07 for a party not in U2
    /// or already finished, SA-08 past the session's length.
    ///
    /// An input folded in part and never finished leaves the sum unusable:
    /// `close_masked` then fails (SA-08).
    pub fn fold_masked(&mut self, party: u16, words: &[u32]) -> Result<(), SecAggError> {
        self.open_input(party)?;
        let len = self.session.params.vector_len;
        let at = self.folded.get(&party).copied().unwrap_or(0);
        let end = at.checked_add(words.len() as u64).filter(|&e| e <= len).ok_or_else(|| {
            SecAggError::by(Check::InputLength, party, format!("the masked input runs past the session's {len} words"))
        })?;
        let n =
            usize::try_from(len).map_err(|_| SecAggError::new(Check::Params, "the vector does not fit in memory"))?;
        let sum = self.sum.get_or_insert_with(|| vec![0u32; n]);
        let start = at as usize;
        for (s, w) in sum[start..start + words.len()].iter_mut().zip(words) {
            *s = s.wrapping_add(*w);
        }
        self.folded.insert(party, end);
        Ok(())
    }

    /// Stage 3: `party`'s input is complete (SA-08 unless exactly vector_len words).
    pub fn finish_masked(&mut self, party: u16) -> Result<(), SecAggError> {
        self.open_input(party)?;
        let len = self.session.params.vector_len;
        let got = self.folded.get(&party).copied().unwrap_or(0);
        if got != len {
            return Err(SecAggError::by(
                Check::InputLength,
                party,
                format!("the masked input has {got} words; the session's has {len}"),
            ));
        }
        self.finished.insert(party);
        Ok(())
    }

    /// Ends stage 3: U3 = parties with a finished input (SA-05). SA-08 if an input
    /// was folded in part and never finished (the sum would not be the survivors').
    pub fn close_masked(&mut self) -> Result<SurvivorSet, SecAggError> {
        self.expect_stage(Stage::Masked)?;
        if let Some((&party, _)) = self.folded.iter().find(|(p, _)| !self.finished.contains(p)) {
            return Err(SecAggError::by(
                Check::InputLength,
                party,
                "a masked input was folded in part and never finished; the sum is unusable",
            ));
        }
        if self.finished.len() < self.threshold {
            return Err(self.threshold_error(self.finished.len(), "sent a masked input"));
        }
        self.u3 = self.finished.iter().copied().collect();
        self.stage = Stage::Consistency;
        Ok(SurvivorSet { session_id: self.session_id, survivors: self.u3.clone() })
    }

    /// Stage 4: accepts one survivor's signature over U3 (SA-02, SA-09).
    pub fn receive_survivor_signature(
        &mut self,
        msg: SurvivorSignature,
        verifier: &dyn Verifier,
    ) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Consistency)?;
        if self.session.participant(msg.index).is_none() {
            return Err(SecAggError::new(Check::Replay, format!("party {} is not a participant", msg.index)));
        }
        self.check_session_id(&msg.session_id, msg.index)?;
        if !contains(&self.u3, msg.index) {
            return Err(SecAggError::by(Check::SurvivorSet, msg.index, "a survivor signature from a non-survivor"));
        }
        if let Some(known) = self.signatures.get(&msg.index) {
            return if *known == msg {
                Ok(())
            } else {
                Err(SecAggError::by(Check::Malformed, msg.index, "a different resend of a survivor signature"))
            };
        }
        if !verifier.verify(msg.index, &survivors_transcript(&self.session_id, &self.u3), &msg.signature) {
            return Err(SecAggError::by(
                Check::SurvivorSet,
                msg.index,
                "the survivor signature does not verify over this survivor set",
            ));
        }
        self.signatures.insert(msg.index, msg);
        Ok(())
    }

    /// Ends stage 4 (SA-05).
    pub fn close_consistency(&mut self) -> Result<SurvivorProof, SecAggError> {
        self.expect_stage(Stage::Consistency)?;
        if self.signatures.len() < self.threshold {
            return Err(self.threshold_error(self.signatures.len(), "signed the survivor set"));
        }
        self.u4 = self.signatures.keys().copied().collect();
        self.stage = Stage::Unmask;
        Ok(SurvivorProof {
            session_id: self.session_id,
            survivors: self.u3.clone(),
            signatures: self.signatures.values().cloned().collect(),
        })
    }

    /// Stage 5: accepts one survivor's revealed shares (SA-02, SA-07, SA-10).
    pub fn receive_unmask(&mut self, msg: UnmaskShares) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        if self.session.participant(msg.index).is_none() {
            return Err(SecAggError::new(Check::Replay, format!("party {} is not a participant", msg.index)));
        }
        self.check_session_id(&msg.session_id, msg.index)?;
        if !contains(&self.u4, msg.index) {
            return Err(SecAggError::by(Check::Malformed, msg.index, "shares from a party that did not sign U3"));
        }
        if let Some(known) = self.unmasks.get(&msg.index) {
            return if *known == msg {
                Ok(())
            } else {
                Err(SecAggError::by(Check::Malformed, msg.index, "a different resend of revealed shares"))
            };
        }
        let me = msg.index;
        for list in [&msg.self_mask_shares, &msg.mask_key_shares] {
            let mut owners = BTreeSet::new();
            if let Some(s) = list.iter().find(|s| !owners.insert(s.owner)) {
                return Err(SecAggError::by(
                    Check::Malformed,
                    me,
                    format!("the same share of party {} twice", s.owner),
                ));
            }
        }
        let mut owners = BTreeSet::new();
        for s in msg.self_mask_shares.iter().chain(&msg.mask_key_shares) {
            if !owners.insert(s.owner) {
                return Err(SecAggError::by(
                    Check::DoubleReveal,
                    me,
                    format!("both the self-mask and the mask-key share of party {}", s.owner),
                ));
            }
            if !contains(&self.u2, s.owner) {
                return Err(SecAggError::by(
                    Check::Malformed,
                    me,
                    format!("a share of party {}, which did not share keys", s.owner),
                ));
            }
            if !self.graph.holders(s.owner).contains(&me) {
                return Err(SecAggError::by(
                    Check::Malformed,
                    me,
                    format!("a share of party {}, which it does not hold", s.owner),
                ));
            }
        }
        if let Some(s) = msg.self_mask_shares.iter().find(|s| !contains(&self.u3, s.owner)) {
            return Err(SecAggError::by(
                Check::Malformed,
                me,
                format!("a self-mask share of party {}, which dropped", s.owner),
            ));
        }
        if let Some(s) = msg.mask_key_shares.iter().find(|s| contains(&self.u3, s.owner)) {
            return Err(SecAggError::by(
                Check::DoubleReveal,
                me,
                format!("a mask-key share of party {}, a survivor", s.owner),
            ));
        }
        self.unmasks.insert(me, msg);
        Ok(())
    }

    /// Ends stage 5: reconstructs every needed secret (SA-05 if too few shares, SA-11
    /// for a share that does not match) and returns the masked sum with the seeds that
    /// remove its masks.
    pub fn finish(self) -> Result<Unmasking, SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        let t = self.threshold;
        let sid = self.session_id;
        // (seed, add?) of every stream to remove from the sum.
        let mut streams: Vec<(Zeroizing<[u8; 32]>, bool)> = Vec::new();
        let revealed = |owner: u16, self_mask: bool| -> Vec<Share> {
            self.unmasks
                .values()
                .filter_map(|m| {
                    let list = if self_mask { &m.self_mask_shares } else { &m.mask_key_shares };
                    list.iter().find(|s| s.owner == owner).map(|s| Share { x: m.index as u8, y: s.share })
                })
                .collect()
        };
        let attributed = |owner: u16, what: &str, (wrong, why): (Vec<u8>, &str)| match wrong.first() {
            Some(&x) => SecAggError::by(
                Check::WrongShare,
                u16::from(x),
                format!("{why}: the {what} of party {owner} ({} wrong share(s))", wrong.len()),
            ),
            None => SecAggError::new(Check::WrongShare, format!("{why}: the {what} of party {owner}")),
        };
        // Dropped parties: reconstruct the mask key, then the pair masks with survivors.
        for &d in self.u2.iter().filter(|&&d| !contains(&self.u3, d)) {
            let survivors: Vec<u16> =
                self.graph.neighbours(d).iter().copied().filter(|&u| contains(&self.u3, u)).collect();
            if survivors.is_empty() {
                continue;
            }
            let shares = revealed(d, false);
            if shares.len() < t {
                return Err(SecAggError::new(
                    Check::Threshold,
                    format!("{} shares of the mask key of dropped party {d}; the threshold is {t}", shares.len()),
                ));
            }
            let mask_pk = self.adverts[&d].mask_pk;
            let secret = reconstruct(&shares, t, &|s| KeyPair::from_secret(*s).public() == mask_pk)
                .map_err(|e| attributed(d, "mask key", e))?;
            let pair = KeyPair::from_secret(*secret);
            for u in survivors {
                let shared =
                    Zeroizing::new(pair.agree(&self.adverts[&u].mask_pk).ok_or_else(|| {
                        SecAggError::by(Check::KeyReuse, u, "an advertised key is a low-order point")
                    })?);
                let seed = Zeroizing::new(crypto::pair_mask_seed(&sid, &shared, d, u));
                // u added this stream if u < d and subtracted it otherwise; undo that.
                streams.push((seed, u > d));
            }
        }
        // Survivors: reconstruct each self-mask seed and remove its stream.
        for &u in &self.u3 {
            let shares = revealed(u, true);
            if shares.len() < t {
                return Err(SecAggError::new(
                    Check::Threshold,
                    format!("{} shares of the self-mask seed of party {u}; the threshold is {t}", shares.len()),
                ));
            }
            let commitment = self.shares[&u].self_mask_commitment;
            let seed = reconstruct(&shares, t, &|s| crypto::self_mask_commitment(&sid, u, s) == commitment)
                .map_err(|e| attributed(u, "self-mask seed", e))?;
            streams.push((seed, false));
        }
        let sum = match self.sum {
            Some(s) => s,
            None => return Err(SecAggError::new(Check::Threshold, "no masked input was folded")),
        };
        let dropped = self.session.participants.iter().map(|p| p.index).filter(|&i| !contains(&self.u3, i)).collect();
        Ok(Unmasking { sum, seeds: Seeds(streams), survivors: self.u3, dropped })
    }
}

/// The seeds of every mask stream left in a masked sum, each with whether to add its
/// stream (or subtract it). Never printed: [`fmt::Debug`] shows only how many.
pub struct Seeds(Vec<(Zeroizing<[u8; 32]>, bool)>);

impl fmt::Debug for Seeds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seeds([{} streams])", self.0.len())
    }
}

impl Seeds {
    /// How many keystreams unmasking regenerates over the whole sum: one self mask per
    /// survivor and one pair mask per (dropped party, surviving neighbour). Times the
    /// sum's words, this is the floor of the unmasking's cost.
    pub fn streams(&self) -> usize {
        self.0.len()
    }

    /// Removes the masks from `words`, the part of the sum that starts at word `start`,
    /// chunk by chunk (each stream seeks to `start`), on the calling thread. Parts may be
    /// unmasked in any order and on any threads; every word must be unmasked once.
    pub fn unmask(&self, words: &mut [u32], start: u64) {
        let mut ms: Vec<(MaskStream, bool)> = self
            .0
            .iter()
            .map(|(seed, add)| {
                let mut m = MaskStream::new(seed);
                m.seek(start);
                (m, *add)
            })
            .collect();
        for chunk in words.chunks_mut(UNMASK_CHUNK) {
            for (m, add) in &mut ms {
                if *add { m.add_to(chunk) } else { m.sub_from(chunk) }
            }
        }
    }
}

/// Stage 5 done: the masked sum and the seeds that remove its masks. Removing them is
/// the bulk of the server's work (streams × words of keystream); the core stays
/// single-threaded, so [`Unmasking::outcome`] does it on the calling thread and a caller
/// with cores to spare uses [`Unmasking::outcome_with`] to run [`Seeds::unmask`] on
/// parts of the sum in parallel.
#[derive(Debug)]
pub struct Unmasking {
    sum: Vec<u32>,
    seeds: Seeds,
    survivors: Vec<u16>,
    dropped: Vec<u16>,
}

impl Unmasking {
    /// Words in the sum.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Whether the sum is empty (a zero-length session).
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Unmasks on the calling thread and returns the sum.
    pub fn outcome(self) -> Outcome {
        self.outcome_with(|sum, seeds| seeds.unmask(sum, 0))
    }

    /// Unmasks with the caller's parallelism: `unmask_all` must call [`Seeds::unmask`]
    /// exactly once for every word of the sum (each part with its offset in the sum).
    pub fn outcome_with(mut self, unmask_all: impl FnOnce(&mut [u32], &Seeds)) -> Outcome {
        unmask_all(&mut self.sum, &self.seeds);
        Outcome { sum: self.sum, survivors: self.survivors, dropped: self.dropped }
    }
}
