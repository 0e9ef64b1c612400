//! The coordinator's side of secure aggregation for one round attempt: it owns the
//! sans-IO [`Server`], relays stage messages, and closes each stage when every
//! expected site has spoken, dropped out, or missed the stage deadline.
//!
//! Handlers call [`SecAggRound::submit`] under the round lock and then wait (without
//! the lock) for [`SecAggRound::reply`] to have an answer; the orchestrator calls
//! [`SecAggRound::close_stage`]. A failed stage fails the attempt, and the round is
//! retried with a new session (fresh keys and seeds).

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;
use tracing::warn;

use maeum_protocols::wire::secagg::{Reply, SessionInfo, StageMessage};
use maeum_secagg::quant::Quantiser;
use maeum_secagg::server::Stage;
use maeum_secagg::sign::SessionVerifier;
use maeum_secagg::{
    AdvertiseKeys, GraphReveals, KeyRoster, Outcome, SecAggError, Server, Session, SurvivorProof, SurvivorSet,
};

/// How the sites' words encode their inputs, and so how the unmasked sum decodes and
/// what bounds it must keep.
#[derive(Debug, Clone, Copy)]
pub enum Encoding {
    /// `[w·Δ, w]` quantised to fixed point (`maeum_secagg::quant`).
    Quantised(Quantiser),
    /// A `distributed` DP job's integers (`maeum_models::ddp`), weight 1 per site.
    Distributed(maeum_models::ddp::DistributedDp),
}

/// One session's state at the coordinator.
#[derive(Debug)]
pub struct SecAggRound {
    pub session: Session,
    pub info: SessionInfo,
    pub encoding: Encoding,
    /// Site id → party index, and back.
    pub index: BTreeMap<String, u16>,
    pub site: BTreeMap<u16, String>,
    /// Unix ms at which the current short stage closes regardless (the masked-input
    /// stage uses the round's training deadline).
    pub stage_deadline_ms: i64,
    /// Why the attempt failed, once it has.
    pub failed: Option<String>,
    /// Words after the weight: the secure evaluation's counts
    /// (`JobSpec::evaluation_words`).
    pub eval_words: usize,
    /// The job's L2 bound on each site's update (0: none), checked on the aggregate.
    pub clip_norm: f32,
    server: Option<Server>,
    verifier: SessionVerifier,
    /// Parties whose message was accepted, per stage.
    accepted: BTreeMap<Stage, BTreeSet<u16>>,
    /// The keys each party advertised (to recognise a party that restarted).
    advertised: BTreeMap<u16, AdvertiseKeys>,
    roster: Option<KeyRoster>,
    reveals: Option<GraphReveals>,
    survivors: Option<SurvivorSet>,
    proof: Option<SurvivorProof>,
    /// False from the moment the consistency stage closes until the session is
    /// written down for a restart (`crate::resume`): no site gets the survivor proof,
    /// and so none reveals a share, before a revealed sum can outlive this process.
    pub unmask_durable: bool,
}

fn refused(site: &str, e: &SecAggError) -> Status {
    warn!(site, check = e.check.id(), culprit = ?e.culprit, error = %e, "secure-aggregation message refused");
    Status::invalid_argument(format!("secure aggregation: {e}"))
}

impl SecAggRound {
    /// `distributed`: the job's distributed-DP mechanism, when the words are its integers.
    pub fn new(
        session: Session,
        info: SessionInfo,
        eval_words: usize,
        clip_norm: f32,
        distributed: Option<maeum_models::ddp::DistributedDp>,
    ) -> Result<Self, SecAggError> {
        let encoding = match distributed {
            Some(m) => Encoding::Distributed(m),
            None => Encoding::Quantised(Quantiser::new(session.n(), session.params.clip, session.params.max_weight)?),
        };
        let verifier = SessionVerifier::new(&session);
        let index = session.participants.iter().map(|p| (p.site_id.clone(), p.index)).collect();
        let site = session.participants.iter().map(|p| (p.index, p.site_id.clone())).collect();
        let server = Server::new(session.clone())?;
        Ok(Self {
            session,
            info,
            encoding,
            index,
            site,
            stage_deadline_ms: 0,
            failed: None,
            eval_words,
            clip_norm,
            server: Some(server),
            verifier,
            accepted: BTreeMap::new(),
            advertised: BTreeMap::new(),
            roster: None,
            reveals: None,
            survivors: None,
            proof: None,
            unmask_durable: true,
        })
    }

    /// A session restored in the unmask stage after a restart (`crate::resume`), with
    /// what the other stages' replies need (a site may still be waiting for one).
    #[allow(clippy::too_many_arguments)]
    pub fn resumed(
        session: Session,
        info: SessionInfo,
        eval_words: usize,
        clip_norm: f32,
        distributed: Option<maeum_models::ddp::DistributedDp>,
        server: Server,
        roster: KeyRoster,
        reveals: Option<GraphReveals>,
        survivors: SurvivorSet,
        proof: SurvivorProof,
    ) -> Result<Self, SecAggError> {
        let mut sa = SecAggRound::new(session, info, eval_words, clip_norm, distributed)?;
        let set = |xs: &[u16]| xs.iter().copied().collect::<BTreeSet<u16>>();
        sa.accepted.insert(Stage::Advertise, roster.keys.iter().map(|k| k.index).collect());
        if let Some(r) = &reveals {
            sa.accepted.insert(Stage::Reveal, r.reveals.iter().map(|x| x.index).collect());
        }
        sa.accepted.insert(Stage::Share, set(server.u2()));
        sa.accepted.insert(Stage::Consistency, proof.signatures.iter().map(|x| x.index).collect());
        sa.advertised = roster.keys.iter().map(|k| (k.index, k.clone())).collect();
        sa.roster = Some(roster);
        sa.reveals = reveals;
        sa.survivors = Some(survivors);
        sa.proof = Some(proof);
        // The restored server is in its unmask stage: the session's stage is its.
        sa.server = Some(server);
        Ok(sa)
    }

    /// What a restart needs besides the session itself: the replies of the closed
    /// stages, and the server's snapshot with its masked sum as little-endian bytes
    /// (unmask stage only).
    #[allow(clippy::type_complexity)]
    pub fn for_resume(
        &self,
    ) -> Result<(KeyRoster, Option<GraphReveals>, SurvivorSet, SurvivorProof, Vec<u8>, Vec<u32>), SecAggError> {
        let missing = |what: &str| SecAggError::new(maeum_secagg::Check::Replay, format!("no {what} to save"));
        let server = self.server.as_ref().ok_or_else(|| missing("server"))?;
        Ok((
            self.roster.clone().ok_or_else(|| missing("roster"))?,
            self.reveals.clone(),
            self.survivors.clone().ok_or_else(|| missing("survivor set"))?,
            self.proof.clone().ok_or_else(|| missing("survivor proof"))?,
            server.snapshot()?,
            // One exact-size copy (written out of the lock, little-endian, piece by piece).
            server.masked_sum().to_vec(),
        ))
    }

    /// Whether `site` has a message of `msg`'s stage accepted already.
    pub fn has_spoken(&self, site: &str, msg: &StageMessage) -> bool {
        let me = self.index.get(site).copied().unwrap_or(0);
        self.accepted.get(&Self::stage_of(msg)).is_some_and(|a| a.contains(&me))
    }

    /// The open stage, as the SecAgg core's server has it (`None` once the unmask stage
    /// ended and [`SecAggRound::take_server`] took the server).
    pub fn stage(&self) -> Option<Stage> {
        self.server.as_ref().map(Server::current_stage)
    }

    /// The open stage's name, or "finished".
    pub fn stage_name(&self) -> &'static str {
        self.stage().map_or("finished", Stage::name)
    }

    fn server(&mut self) -> Result<&mut Server, Status> {
        self.server.as_mut().ok_or_else(|| Status::failed_precondition("secure aggregation already finished"))
    }

    fn stage_of(msg: &StageMessage) -> Stage {
        match msg {
            StageMessage::Advertise(_) => Stage::Advertise,
            StageMessage::GraphReveal(_) => Stage::Reveal,
            StageMessage::ShareKeys(_) => Stage::Share,
            StageMessage::AwaitSurvivors { .. } => Stage::Masked,
            StageMessage::SurvivorSignature(_) => Stage::Consistency,
            StageMessage::Unmask(_) => Stage::Unmask,
        }
    }

    /// Accepts `site`'s message (`done` = sites whose masked input is folded).
    pub fn submit(&mut self, site: &str, msg: StageMessage, done: &BTreeSet<String>) -> Result<(), Status> {
        if let Some(why) = &self.failed {
            return Err(Status::aborted(format!("this round attempt failed: {why}")));
        }
        let me = *self
            .index
            .get(site)
            .ok_or_else(|| Status::permission_denied(format!("site/{site} is not a party to this session")))?;
        if msg.index() != me {
            return Err(Status::permission_denied(format!(
                "site/{site} is party {me} of this session and cannot speak for party {}",
                msg.index()
            )));
        }
        let wanted = Self::stage_of(&msg);
        if wanted == Stage::Masked {
            return if done.contains(site) {
                Ok(())
            } else {
                Err(Status::failed_precondition("no complete masked input from this site in this round"))
            };
        }
        if self.accepted.get(&wanted).is_some_and(|a| a.contains(&me)) {
            // A resend after a lost reply: the first copy stands (the server refuses a
            // differing copy while the stage is open; afterwards nothing can change).
            if self.stage() == Some(wanted) {
                self.deliver(site, msg)?;
            }
            return Ok(());
        }
        if self.stage() != Some(wanted) {
            return Err(Status::failed_precondition(format!(
                "the {} stage is not open (the session is at {})",
                wanted.name(),
                self.stage_name()
            )));
        }
        let keys = match &msg {
            StageMessage::Advertise(keys) => Some(keys.clone()),
            _ => None,
        };
        self.deliver(site, msg)?;
        // Only accepted keys count: a refused advertisement may be followed by a good one.
        if let Some(keys) = keys {
            self.advertised.insert(me, keys);
        }
        self.accepted.entry(wanted).or_default().insert(me);
        Ok(())
    }

    /// Whether `msg` advertises keys other than those `site` already advertised in this
    /// session: the site restarted and lost the session's secrets (they live only in
    /// its memory), so it can no longer take part; the others may already hold its old
    /// keys. The caller drops it from the attempt at once rather than waiting for the
    /// stage deadline (the round goes on without it, or is retried if too few remain).
    pub fn rejoined(&self, site: &str, msg: &StageMessage) -> bool {
        let StageMessage::Advertise(keys) = msg else { return false };
        self.index.get(site).and_then(|me| self.advertised.get(me)).is_some_and(|first| first != keys)
    }

    fn deliver(&mut self, site: &str, msg: StageMessage) -> Result<(), Status> {
        let verifier = &self.verifier;
        let server = self.server.as_mut().ok_or_else(|| Status::failed_precondition("session finished"))?;
        match msg {
            StageMessage::Advertise(m) => server.receive_advertise(m, verifier),
            StageMessage::GraphReveal(m) => server.receive_reveal(m),
            StageMessage::ShareKeys(m) => server.receive_shares(m),
            StageMessage::SurvivorSignature(m) => server.receive_survivor_signature(m, verifier),
            StageMessage::Unmask(m) => server.receive_unmask(m),
            StageMessage::AwaitSurvivors { .. } => Ok(()),
        }
        .map_err(|e| refused(site, &e))
    }

    /// The answer to `site`'s message of `msg`'s stage, once that stage has closed.
    pub fn reply(&mut self, site: &str, msg: &StageMessage) -> Result<Option<Reply>, Status> {
        if let Some(why) = &self.failed {
            return Err(Status::aborted(format!("this round attempt failed: {why}")));
        }
        let wanted = Self::stage_of(msg);
        if self.stage().is_some_and(|open| open <= wanted) || (wanted == Stage::Consistency && !self.unmask_durable) {
            return Ok(None);
        }
        let me = self.index.get(site).copied().unwrap_or(0);
        Ok(Some(match wanted {
            Stage::Advertise => Reply::Roster(self.roster.clone().ok_or_else(|| Status::internal("no roster"))?),
            Stage::Reveal => {
                let mut reveals = self.reveals.clone().ok_or_else(|| Status::internal("no graph reveals"))?;
                if crate::attack::current() == Some(crate::attack::Attack::GraphSeed(site.to_string())) {
                    self.grind_graph(me, &mut reveals);
                }
                Reply::Reveals(reveals)
            }
            Stage::Share => {
                let shares = self.server()?.shares_for(me).map_err(|e| refused(site, &e))?;
                Reply::Shares(shares)
            }
            Stage::Masked => {
                Reply::Survivors(self.survivors.clone().ok_or_else(|| Status::internal("no survivor set"))?)
            }
            Stage::Consistency => Reply::Proof(self.proof.clone().ok_or_else(|| Status::internal("no proof"))?),
            Stage::Unmask => Reply::Done,
        }))
    }

    /// Fault injection (`graph-seed:SITE`): what a coordinator that could choose the
    /// SecAgg+ graph would do. Having seen every nonce, it tries substitutes for the
    /// last other party's nonce until `me`'s neighbours are the lowest-indexed other
    /// parties (its colluders, say), and relays that substitute to `me` only. Sites
    /// refuse it (SA-13): the nonce does not open that party's signed commitment.
    fn grind_graph(&self, me: u16, reveals: &mut GraphReveals) {
        let n = self.session.n();
        let degree = self.session.params.degree;
        let Some(victim) = reveals.reveals.iter().rposition(|r| r.index != me) else { return };
        let mut wanted: Vec<u16> = (1..=n as u16).filter(|&i| i != me).take(usize::from(degree)).collect();
        wanted.sort_unstable();
        let sid = self.session.id();
        for candidate in 0u8..=255 {
            let mut trial = reveals.clone();
            trial.reveals[victim].nonce = [candidate; 32];
            let nonces: Vec<(u16, [u8; 32])> = trial.reveals.iter().map(|r| (r.index, r.nonce)).collect();
            let graph = maeum_secagg::graph::Graph::new(n, degree, &maeum_secagg::crypto::graph_seed(&sid, &nonces));
            if graph.neighbours(me) == wanted.as_slice() || candidate == 255 {
                warn!(party = me, neighbours = ?graph.neighbours(me), "FAULT INJECTION: relaying a ground graph nonce");
                *reveals = trial;
                return;
            }
        }
    }

    /// The parties expected to speak in the current stage.
    pub fn expected(&self, done: &BTreeSet<String>) -> BTreeSet<String> {
        let of = |set: &[u16]| set.iter().filter_map(|i| self.site.get(i).cloned()).collect::<BTreeSet<_>>();
        let Some(stage) = self.stage() else { return BTreeSet::new() };
        match stage {
            Stage::Advertise => self.index.keys().cloned().collect(),
            Stage::Reveal | Stage::Share => self
                .roster
                .as_ref()
                .map(|r| of(&r.keys.iter().map(|k| k.index).collect::<Vec<_>>()))
                .unwrap_or_default(),
            Stage::Masked => {
                self.accepted.get(&Stage::Share).map(|s| of(&s.iter().copied().collect::<Vec<_>>())).unwrap_or_default()
            }
            Stage::Consistency => self.survivors.as_ref().map(|s| of(&s.survivors)).unwrap_or_default(),
            Stage::Unmask => self
                .proof
                .as_ref()
                .map(|p| of(&p.signatures.iter().map(|s| s.index).collect::<Vec<_>>()))
                .unwrap_or_default(),
        }
        .into_iter()
        .filter(|s| stage != Stage::Masked || !done.contains(s))
        .collect()
    }

    /// Sites that have spoken in the current stage.
    pub fn spoken(&self, done: &BTreeSet<String>) -> BTreeSet<String> {
        let Some(stage) = self.stage() else { return BTreeSet::new() };
        if stage == Stage::Masked {
            return done.iter().filter(|s| self.index.contains_key(*s)).cloned().collect();
        }
        self.accepted
            .get(&stage)
            .map(|s| s.iter().filter_map(|i| self.site.get(i).cloned()).collect())
            .unwrap_or_default()
    }

    /// Closes the current stage (not the last: see [`SecAggRound::take_server`]).
    pub fn close_stage(&mut self, next_deadline_ms: i64) -> Result<(), SecAggError> {
        let server = match self.server.as_mut() {
            Some(s) => s,
            None => return Ok(()),
        };
        // The server moves itself to the next stage (the reveal stage only with a
        // neighbour graph).
        match server.current_stage() {
            Stage::Advertise => self.roster = Some(server.close_advertise()?),
            Stage::Reveal => self.reveals = Some(server.close_reveals()?),
            Stage::Share => server.close_shares()?,
            Stage::Masked => self.survivors = Some(server.close_masked()?),
            Stage::Consistency => {
                self.proof = Some(server.close_consistency()?);
                self.unmask_durable = false;
            }
            Stage::Unmask => return Ok(()),
        }
        self.stage_deadline_ms = next_deadline_ms;
        Ok(())
    }

    /// Ends the unmask stage: the server, to finish outside the round lock.
    pub fn take_server(&mut self) -> Option<Server> {
        self.server.take()
    }

    /// Folds `words` of `site`'s masked input into the running sum.
    pub fn fold(&mut self, site: &str, words: &[u32]) -> Result<(), Status> {
        let me = self.index.get(site).copied().unwrap_or(0);
        let server = self.server()?;
        server.fold_masked(me, words).map_err(|e| refused(site, &e))
    }

    pub fn finish_input(&mut self, site: &str) -> Result<(), Status> {
        let me = self.index.get(site).copied().unwrap_or(0);
        let server = self.server()?;
        server.finish_masked(me).map_err(|e| refused(site, &e))
    }

    /// Whether `site` may upload a masked input now (it is in U2).
    pub fn may_upload(&self, site: &str) -> Result<(), Status> {
        if self.stage() != Some(Stage::Masked) {
            return Err(Status::failed_precondition(format!(
                "masked inputs are not collected now (the session is at {})",
                self.stage_name()
            )));
        }
        let me = self.index.get(site).copied().unwrap_or(0);
        if !self.accepted.get(&Stage::Share).is_some_and(|s| s.contains(&me)) {
            return Err(Status::failed_precondition(format!("site/{site} did not share keys in this session")));
        }
        Ok(())
    }

    /// Decodes an outcome into Σ w·Δ, Σ w and the summed evaluation counts, taking the
    /// outcome's words: Σ w·Δ stays those words and their scale ([`Decoded`], 4 bytes a
    /// parameter). In a `distributed` DP job, Σ w·Δ is the negated noisy sum of clipped
    /// gradients (a descent direction; each site's weight is 1).
    pub fn decode(&self, outcome: &mut Outcome) -> (Decoded, u64, Vec<u32>) {
        let mut words = std::mem::take(&mut outcome.sum);
        let n = words.len().saturating_sub(1 + self.eval_words);
        let counts = words.get(n + 1..).unwrap_or_default().to_vec();
        let weight = u64::from(words.get(n).copied().unwrap_or(0));
        words.truncate(n);
        words.shrink_to_fit();
        let scale = match &self.encoding {
            Encoding::Distributed(m) => -1.0 / m.scale(),
            Encoding::Quantised(q) => q.step,
        };
        (Decoded { words, scale }, weight, counts)
    }

    /// Checks an unmasked aggregate against what `survivors` honest inputs can sum to:
    /// 1 ≤ Σw ≤ |U3|·max_weight, every coordinate |Σ w·Δ| ≤ Σw·clip, and with the
    /// job's `clip_norm` ‖Σ w·Δ‖₂ ≤ Σw·clip_norm, each plus the rounding slack (one
    /// quantisation step per input and coordinate).
    pub fn check_bounds<I>(&self, sum: I, total_weight: u64, survivors: usize) -> Result<(), String>
    where
        I: IntoIterator<Item = f64>,
        I::IntoIter: Clone,
    {
        let sum = sum.into_iter();
        let q = match &self.encoding {
            Encoding::Quantised(q) => q,
            Encoding::Distributed(m) => return Self::check_distributed(m, sum, total_weight, survivors),
        };
        let most = survivors as u64 * u64::from(q.max_weight);
        if total_weight == 0 || total_weight > most {
            return Err(format!(
                "the aggregate weight {total_weight} is outside 1..={most} ({survivors} sites × max_weight {})",
                q.max_weight
            ));
        }
        let bound = total_weight as f64 * f64::from(q.clip) + (survivors as f64 + 1.0) * q.step;
        // The reason goes to the audit log: it names the coordinate, never its value.
        if let Some(i) = sum.clone().position(|v| !v.is_finite() || v.abs() > bound) {
            return Err(format!("aggregate coordinate {i} is beyond Σw·clip ({bound:.4e} for Σw = {total_weight})"));
        }
        if self.clip_norm > 0.0 {
            let (squares, len) = sum.fold((0.0f64, 0usize), |(acc, n), v| (acc + v * v, n + 1));
            let norm = squares.sqrt();
            let slack = (len as f64).sqrt() * (survivors as f64 + 1.0) * q.step;
            let bound = total_weight as f64 * f64::from(self.clip_norm) + slack;
            if norm > bound {
                return Err(format!(
                    "the aggregate's L2 norm is beyond Σw·clip_norm ({bound:.4e} for Σw = {total_weight})"
                ));
            }
        }
        Ok(())
    }

    /// [`Self::check_bounds`] for a `distributed` DP job: weight 1 per survivor, and a
    /// norm within the survivors' bounded clipped sums (C·B each), rounding and noise.
    fn check_distributed(
        m: &maeum_models::ddp::DistributedDp,
        sum: impl Iterator<Item = f64>,
        total_weight: u64,
        survivors: usize,
    ) -> Result<(), String> {
        if total_weight != survivors as u64 {
            return Err(format!("the aggregate weight {total_weight} is not 1 for each of {survivors} sites"));
        }
        let norm = sum.map(|v| v * v).sum::<f64>().sqrt();
        let bound = m.aggregate_bound(survivors);
        if !norm.is_finite() || norm > bound {
            return Err(format!(
                "the aggregate's L2 norm is beyond what {survivors} sites' bounded sums and noise reach ({bound:.4e})"
            ));
        }
        Ok(())
    }

    /// |U3|: the sites whose masked inputs the sum holds (0 before the masked-input
    /// stage closed).
    pub fn survivor_count(&self) -> usize {
        self.survivors.as_ref().map_or(0, |s| s.survivors.len())
    }

    pub fn names(&self, parties: &[u16]) -> Vec<String> {
        parties.iter().filter_map(|i| self.site.get(i).cloned()).collect()
    }
}

/// Below this many words the masks are removed on the calling thread only.
const PARALLEL_MIN_WORDS: usize = 1 << 20;

/// Ends a session: the core reconstructs the dropped and surviving parties' secrets
/// (single-threaded), then the masks are removed from the sum here, split across the
/// available cores for large vectors (each part seeks its own streams). Blocking: run it
/// on a blocking thread, outside the round lock.
pub fn finish(server: Server) -> Result<Outcome, SecAggError> {
    let unmasking = server.finish()?;
    let threads = if unmasking.len() < PARALLEL_MIN_WORDS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(unmasking.len() / (PARALLEL_MIN_WORDS / 4))
    };
    if threads <= 1 {
        return Ok(unmasking.outcome());
    }
    Ok(unmasking.outcome_with(|sum, seeds| {
        let per = sum.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, words) in sum.chunks_mut(per).enumerate() {
                scope.spawn(move || seeds.unmask(words, (i * per) as u64));
            }
        });
    }))
}

/// An unmasked Σ w·Δ as the summed words and their scale: coordinate `i` is
/// `(words[i] as i32) · scale`. Kept this way (4 bytes a parameter) from the unmasking
/// to the commit, where [`Decoded::into_mean`] turns it into the mean update in place.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub words: Vec<u32>,
    pub scale: f64,
}

impl Decoded {
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The coordinates of Σ w·Δ.
    pub fn values(&self) -> impl Iterator<Item = f64> + Clone + '_ {
        let scale = self.scale;
        self.words.iter().map(move |&w| f64::from(w as i32) * scale)
    }

    /// The mean update Σ w·Δ / Σ w in f32, in the words' own memory.
    pub fn into_mean(self, total_weight: f64) -> Vec<f32> {
        let scale = self.scale;
        self.words.into_iter().map(|w| (f64::from(w as i32) * scale / total_weight) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_secagg::{Participant, SessionParams};

    fn round(clip_norm: f32) -> SecAggRound {
        round_with(clip_norm, None)
    }

    fn round_with(clip_norm: f32, distributed: Option<maeum_models::ddp::DistributedDp>) -> SecAggRound {
        let participants = (1..=3)
            .map(|i| Participant { index: i, site_id: format!("s{i}"), identity_key: vec![i as u8; 65] })
            .collect();
        let params = SessionParams { threshold: 3, degree: 0, vector_len: 3, clip: 1.0, max_weight: 100 };
        let session = Session {
            consortium: "c".into(),
            job_id: "j".into(),
            round: 1,
            attempt: 1,
            participants,
            params: params.clone(),
            binding: [0; 32],
        };
        let info = SessionInfo { consortium: "c".into(), params, members: Vec::new() };
        SecAggRound::new(session, info, 0, clip_norm, distributed).expect("round")
    }

    #[test]
    fn a_distributed_dp_sum_decodes_to_the_negated_gradient_sum_and_keeps_its_bounds() {
        let m = maeum_models::ddp::DistributedDp {
            clip: 1.0,
            noise_multiplier: 2.0,
            sample_rate: 1.0,
            dimension: 2,
            noise_shares: 3,
            max_batch: 10,
        };
        let r = round_with(0.0, Some(m));
        // Σk = γ·(3, −1.5), then the weight word (3 sites) and no evaluation words.
        let gamma = m.scale();
        let words = [((3.0 * gamma).round() as i32) as u32, ((-1.5 * gamma).round() as i32) as u32, 3];
        let mut outcome = Outcome { sum: words.to_vec(), survivors: vec![1, 2, 3], dropped: Vec::new() };
        let (decoded, weight, counts) = r.decode(&mut outcome);
        assert_eq!((weight, counts.len(), decoded.len()), (3, 0, 2));
        let sum: Vec<f64> = decoded.values().collect();
        assert!((sum[0] + 3.0).abs() < 1.0 / gamma && (sum[1] - 1.5).abs() < 1.0 / gamma, "negated: {sum:?}");
        assert_eq!(r.check_bounds(decoded.values(), 3, 3), Ok(()));
        assert!(r.check_bounds(decoded.values(), 4, 3).expect_err("weight").contains("not 1 for each of 3 sites"));
        let far = [m.aggregate_bound(3) + 1.0, 0.0];
        assert!(r.check_bounds(far, 3, 3).expect_err("norm").contains("bounded sums and noise"));
        // The mean, in the words' memory: Σ w·Δ / Σ w.
        let mean = decoded.clone().into_mean(3.0);
        assert_eq!(mean, vec![(sum[0] / 3.0) as f32, (sum[1] / 3.0) as f32]);
    }

    #[test]
    fn aggregates_outside_what_honest_sites_can_sum_are_refused() {
        let r = round(0.0);
        assert_eq!(r.check_bounds([10.0, -10.0], 20, 3), Ok(()));
        assert!(r.check_bounds([1.0, 1.0], 0, 3).expect_err("Σw 0").contains("aggregate weight 0"));
        assert!(r.check_bounds([1.0, 1.0], 301, 3).expect_err("Σw > 3·100").contains("outside 1..=300"));
        assert!(r.check_bounds([21.0, 0.0], 20, 3).expect_err("coordinate").contains("coordinate 0"));
        assert!(r.check_bounds([f64::NAN, 0.0], 20, 3).is_err());
        // With an L2 bound of 1 per site, Σw = 20 allows a norm of 20.
        let r = round(1.0);
        assert_eq!(r.check_bounds([12.0, 16.0], 20, 3), Ok(()));
        assert!(r.check_bounds([15.0, 15.0], 20, 3).expect_err("norm 21.2").contains("L2 norm"));
    }
}
