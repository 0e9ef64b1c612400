//! The coordinator's durable records: sites, jobs with their round history, and
//! counters, as JSON in the [`crate::storage`] database. Every `put_*` is one durable,
//! sealed commit before it returns (the kill -9 tests rely on these commit points).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::storage::{Db, Engine, Tree, Write};

use maeum_models::metrics::CrisisHistogram;
use maeum_protocols::job::JobSpec;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteRecord {
    pub id: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub rounds_contributed: u32,
    pub revoked: bool,
    pub revoked_ms: i64,
    pub cert_fingerprint: String,
    pub cert_not_after_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Aborted,
    Failed,
}

impl JobState {
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Pending | JobState::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Aborted => "aborted",
            JobState::Failed => "failed",
        }
    }
}

/// A content-addressed model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub digest: String,
    pub size: u64,
    pub layout_digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub accept: bool,
    pub reason: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub model: VersionRecord,
    /// Server-optimiser state after this round (blob digest; empty when stateless).
    pub optimizer_state: String,
    pub contributors: Vec<String>,
    pub dropped: Vec<String>,
    pub total_weight: u64,
    pub completed_ms: i64,
    pub attempts: u32,
    /// The job's `attempts_started` when this round was committed: the next round's
    /// attempts are counted from it without reading every round before. `None` in a
    /// round written before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts_through: Option<u32>,
    /// Federated evaluation of this round's model: confusion rows (filled in later).
    pub evaluation: Option<Vec<Vec<u64>>>,
    pub evaluated_by: Vec<String>,
    /// The summed crisis-probability histograms of that evaluation (`None`: the job has
    /// no crisis class, or a site did not report one).
    #[serde(default)]
    pub crisis_histogram: Option<CrisisHistogram>,
    /// Whether the update came from secure aggregation (false only for a job with
    /// the plaintext debugging switch).
    #[serde(default)]
    pub secure_aggregation: bool,
    /// The secure-aggregation threshold of the session that produced this round.
    #[serde(default)]
    pub secagg_threshold: u16,
    /// Blob digest of the unmasked aggregate (the u32 sum of the survivors' quantised
    /// `[w·Δ, w]`, little-endian): all the coordinator learns about the updates.
    #[serde(default)]
    pub aggregate_sha256: String,
    /// Why the round's aggregate was refused (outside what honest inputs can sum to;
    /// the model is then the previous one), empty when it was applied.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refused: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub toml: String,
    pub spec_sha256: String,
    pub state: JobState,
    pub submitted_ms: i64,
    pub initial: Option<VersionRecord>,
    pub initial_evaluation: Option<Vec<Vec<u64>>>,
    pub decisions: BTreeMap<String, Decision>,
    /// Completed rounds, oldest first. Stored apart from the record (tree `job_rounds`,
    /// one value a round): writing a job rewrites only the rounds that changed, where
    /// the whole history once went to disk at every change (the soak run's database and
    /// the coordinator's memory grew with it, `tests/tests/soak.rs`). A record written
    /// before holds its history inline and is read as before.
    ///
    /// A read may hold only the latest rounds ([`Rounds::Latest`]): `rounds_before`
    /// says how many earlier ones it leaves out.
    #[serde(skip)]
    pub history: Vec<RoundRecord>,
    /// How many of the job's earliest rounds this copy leaves out of `history` (0: a
    /// full read). Written back, such a copy touches only the rounds it holds and any
    /// after them.
    #[serde(skip)]
    rounds_before: u32,
    /// Round attempts started so far, across restarts: an update names its attempt, so
    /// one computed before a crash can never be folded into a later attempt.
    pub attempts_started: u32,
    pub error: String,
    /// Sites left out of this job's later attempts, with why: the secure-aggregation
    /// core named them as the cause of a failed attempt (a wrong share, SA-11; a
    /// malformed or half-sent input), so one misbehaving site cannot stall the job.
    #[serde(default)]
    pub excluded: BTreeMap<String, String>,
    /// Sites that failed to deliver in consecutive attempts (a site that reported a
    /// failure, restarted mid-session, went offline or missed a deadline). From
    /// [`STRIKES_TO_BENCH`] in a row a site sits out for a while that doubles with each
    /// further failure, so one sick site neither stalls the job nor is retried every
    /// second; a delivered update clears its count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub strikes: BTreeMap<String, Strikes>,
}

/// Consecutive failed attempts of one site in one job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strikes {
    pub count: u32,
    /// Unix ms until which the site is left out of new attempts (0: not benched).
    pub benched_until_ms: i64,
    /// Why it failed last time, in words.
    pub last: String,
}

impl Strikes {
    /// "for N s more after K failed attempts in a row (last: …)", for `jobs status` and
    /// the job's activity.
    pub fn sitting_out(&self, now_ms: i64) -> String {
        format!(
            "for {} s more after {} failed attempts in a row (last: {})",
            (self.benched_until_ms - now_ms + 999) / 1000,
            self.count,
            self.last
        )
    }
}

/// Consecutive failed attempts after which a site sits out.
pub const STRIKES_TO_BENCH: u32 = 3;
/// How long a site sits out after `count` consecutive failures: 30 s at the third,
/// doubling, at most 10 minutes.
pub fn bench_ms(count: u32) -> i64 {
    let doublings = count.saturating_sub(STRIKES_TO_BENCH).min(5);
    (30_000i64 << doublings).min(600_000)
}

impl JobRecord {
    /// A job as submitted: pending, with no model, decision or attempt yet.
    pub fn submitted(id: String, spec: JobSpec, toml: String, submitted_ms: i64) -> JobRecord {
        JobRecord {
            id,
            spec_sha256: maeum_protocols::job::sha256_hex(toml.as_bytes()),
            spec,
            toml,
            state: JobState::Pending,
            submitted_ms,
            initial: None,
            initial_evaluation: None,
            decisions: BTreeMap::new(),
            history: Vec::new(),
            rounds_before: 0,
            attempts_started: 0,
            error: String::new(),
            excluded: BTreeMap::new(),
            strikes: BTreeMap::new(),
        }
    }

    /// Rounds committed (rounds are numbered 1, 2, … without gaps), whichever of them
    /// this copy holds.
    pub fn completed_rounds(&self) -> u32 {
        self.rounds_before + self.history.len() as u32
    }
    /// How many of the earliest rounds this copy leaves out of `history`.
    pub fn rounds_before(&self) -> u32 {
        self.rounds_before
    }
    /// The latest model: the last round's, or the initial one before any round (`None`
    /// in a copy read without its rounds, which cannot tell).
    pub fn latest(&self) -> Option<&VersionRecord> {
        match self.history.last() {
            Some(r) => Some(&r.model),
            None if self.rounds_before == 0 => self.initial.as_ref(),
            None => None,
        }
    }
    /// Round attempts started since the last commit, which the next committed round
    /// accounts for; `None` when this copy cannot tell (its latest round predates
    /// `attempts_through` and earlier rounds were left out: read them all).
    pub fn attempts_since_commit(&self) -> Option<u32> {
        let counted = match self.history.last() {
            Some(RoundRecord { attempts_through: Some(n), .. }) => *n,
            _ if self.rounds_before == 0 => self.history.iter().map(|h| h.attempts).sum(),
            _ => return None,
        };
        Some(self.attempts_started.saturating_sub(counted))
    }
    pub fn accepted(&self) -> impl Iterator<Item = &String> {
        self.decisions.iter().filter(|(_, d)| d.accept).map(|(s, _)| s)
    }

    /// Whether `site` sits out new attempts at `now_ms`, and why.
    pub fn benched(&self, site: &str, now_ms: i64) -> Option<&Strikes> {
        self.strikes.get(site).filter(|s| s.benched_until_ms > now_ms)
    }

    /// Books an ended attempt: every selected site that delivered (`done`) is cleared;
    /// every site dropped from it for a reason of its own (`why`: a failure it reported,
    /// a restart, going offline, a missed deadline, a refusal) gets a strike. A site that
    /// neither delivered nor left (the attempt ended for the others' reasons first)
    /// keeps its count. Returns the sites benched by this attempt, with their strikes.
    pub fn account_attempt(
        &mut self,
        selected: &BTreeSet<String>,
        done: &BTreeSet<String>,
        why: &BTreeMap<String, String>,
        now_ms: i64,
    ) -> Vec<(String, Strikes)> {
        let mut benched = Vec::new();
        for site in selected {
            if done.contains(site) {
                self.strikes.remove(site);
                continue;
            }
            let Some(reason) = why.get(site) else { continue };
            let s = self.strikes.entry(site.clone()).or_default();
            s.count += 1;
            s.last = reason.clone();
            if s.count >= STRIKES_TO_BENCH {
                s.benched_until_ms = now_ms + bench_ms(s.count);
                benched.push((site.clone(), s.clone()));
            }
        }
        benched
    }
}

/// Which of a job's rounds a read holds in `history`: every one (a release's model
/// card, startup), or the latest `n` (0: none), for the paths that run every round,
/// tick or poll, whose cost then stays flat however long the job grows. A copy read
/// with its earlier rounds left out can be written back: see [`Store::update_job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounds {
    All,
    Latest(u32),
}

impl Rounds {
    /// What a list of jobs holds of each (`ListJobs`, the console's job tables): the
    /// latest two rounds, so that the latest evaluation, recorded on the round before
    /// the last, is among them.
    pub const LISTED: Rounds = Rounds::Latest(2);
}

#[derive(Debug, Clone)]
pub struct Store {
    /// Serialises read-modify-write of job records and counters (orchestrator vs. RPC
    /// handlers).
    write: std::sync::Arc<std::sync::Mutex<()>>,
    db: Db,
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("decoding stored {what} {key}"))
}

/// The key of a job's round in `job_rounds`: the id, a zero byte, the round
/// big-endian (so a job's rounds sort in order and apart from any other job's).
fn round_key(id: &str, round: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 5);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(&round.to_be_bytes());
    key
}

/// The round number in a `job_rounds` key of job `id`.
fn round_of(id: &str, key: &[u8]) -> Result<u32> {
    key.get(id.len() + 1..)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .with_context(|| format!("a stored round key of job {id} is malformed"))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // INVARIANT: plain data always serialises.
    serde_json::to_vec(v).expect("a record serialises")
}

/// The rounds a job record from before rounds had their own tree holds inline (empty for
/// a record written since).
fn inline_history(id: &str, bytes: &[u8]) -> Result<Vec<RoundRecord>> {
    #[derive(Deserialize)]
    struct Inline {
        #[serde(default)]
        history: Vec<RoundRecord>,
    }
    Ok(decode::<Inline>("job", id, bytes)?.history)
}

impl Store {
    /// The state database, for the audit log and the registry (each commit through it is
    /// atomic, durable and sealed; there is no raw engine handle).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Opens the state in `dir` (a new one with `engine`), checked: see [`Db::open`].
    pub fn open(dir: &Path, engine: Engine) -> Result<Self> {
        Ok(Self { write: Default::default(), db: Db::open(dir, engine)? })
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn site(&self, id: &str) -> Result<Option<SiteRecord>> {
        self.db.get(Tree::Sites, id.as_bytes())?.map(|v| decode("site", id, &v)).transpose()
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>> {
        self.db.values(Tree::Sites)?.iter().map(|v| decode("site", "record", v)).collect()
    }

    /// Writes a site record, durably.
    pub fn put_site(&self, s: &SiteRecord) -> Result<()> {
        self.db.commit(vec![Write::put(Tree::Sites, &s.id, encode(s))])
    }

    /// The writes that count one more contributed round for each of `sites` (unknown ids
    /// are passed over), for the commit of that round: counted with it, never apart.
    pub fn contributed_writes<'a>(&self, sites: impl IntoIterator<Item = &'a String>) -> Result<Vec<Write>> {
        let mut writes = Vec::new();
        for id in sites {
            if let Some(mut rec) = self.site(id)? {
                rec.rounds_contributed += 1;
                writes.push(Write::put(Tree::Sites, &rec.id, encode(&rec)));
            }
        }
        Ok(writes)
    }

    /// Job `id`, holding the rounds `rounds` asks for.
    pub fn job(&self, id: &str, rounds: Rounds) -> Result<Option<JobRecord>> {
        self.db.get(Tree::Jobs, id.as_bytes())?.map(|v| self.read_job(id, &v, rounds)).transpose()
    }

    /// Every job, holding the rounds `rounds` asks for, in submission order.
    pub fn jobs(&self, rounds: Rounds) -> Result<Vec<JobRecord>> {
        let mut stored = Vec::new();
        self.db.scan(Tree::Jobs, None, None, false, &mut |k, v| {
            stored.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
            Ok(true)
        })?;
        let mut jobs = stored.iter().map(|(id, v)| self.read_job(id, v, rounds)).collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|j| (j.submitted_ms, j.id.clone()));
        Ok(jobs)
    }

    /// A stored job record with the rounds `rounds` asks for: from `job_rounds`, or
    /// every round for a record written before rounds had their own tree (inline).
    fn read_job(&self, id: &str, bytes: &[u8], rounds: Rounds) -> Result<JobRecord> {
        let mut job: JobRecord = decode("job", id, bytes)?;
        job.history = inline_history(id, bytes)?;
        if !job.history.is_empty() {
            return Ok(job);
        }
        let limit = match rounds {
            Rounds::All => u32::MAX,
            Rounds::Latest(n) => n,
        };
        let (last, held) = self.latest_rounds(id, u32::MAX, limit)?;
        // Rounds are numbered from 1 without gaps; saturating, should a stored one not be.
        job.rounds_before = last.unwrap_or(0).saturating_sub(held.len() as u32);
        job.history = held;
        Ok(job)
    }

    /// Up to `limit` of job `id`'s stored rounds numbered below `before`, the latest
    /// ones, oldest first; and the number of the latest such round (read even when
    /// `limit` is 0). A reverse scan that stops one round past what it returns.
    fn latest_rounds(&self, id: &str, before: u32, limit: u32) -> Result<(Option<u32>, Vec<RoundRecord>)> {
        let (mut last, mut held) = (None, Vec::new());
        let (from, to) = (round_key(id, 0), round_key(id, before));
        self.db.scan(Tree::JobRounds, Some(&from), Some(&to), true, &mut |k, v| {
            if last.is_none() {
                last = Some(round_of(id, k)?);
            }
            if held.len() as u32 >= limit {
                return Ok(false);
            }
            held.push(decode::<RoundRecord>("round of job", id, v)?);
            Ok(true)
        })?;
        held.reverse();
        Ok((last, held))
    }

    /// Job `id`'s rounds numbered below `before` (`u32::MAX`: every one), the latest
    /// `limit` of them, oldest first: a page of a long history, read-only. `None`: no
    /// such job.
    pub fn job_rounds(&self, id: &str, before: u32, limit: u32) -> Result<Option<Vec<RoundRecord>>> {
        let Some(bytes) = self.db.get(Tree::Jobs, id.as_bytes())? else { return Ok(None) };
        let inline = inline_history(id, &bytes)?;
        if !inline.is_empty() {
            let below: Vec<RoundRecord> = inline.into_iter().filter(|r| r.round < before).collect();
            let skip = below.len().saturating_sub(limit as usize);
            return Ok(Some(below.into_iter().skip(skip).collect()));
        }
        Ok(Some(self.latest_rounds(id, before, limit)?.1))
    }

    /// Commits a job record durably, with the rounds that changed since the stored
    /// copy (new, altered or gone), in one batch.
    pub fn put_job(&self, j: &JobRecord) -> Result<()> {
        self.db.commit(self.job_writes(j)?)
    }

    /// What writing `j` changes: its record, its rounds that changed, stored rounds
    /// after those it leaves out that it no longer holds removed. The rounds it leaves
    /// out (`rounds_before`) are neither read nor touched.
    fn job_writes(&self, j: &JobRecord) -> Result<Vec<Write>> {
        let first = j.rounds_before + 1;
        for (r, expected) in j.history.iter().zip(first..) {
            anyhow::ensure!(
                r.round == expected,
                "job {}: round {} stored where round {expected} belongs",
                j.id,
                r.round
            );
        }
        let mut stored = BTreeMap::new();
        self.db.scan(
            Tree::JobRounds,
            Some(&round_key(&j.id, first)),
            Some(&round_key(&j.id, u32::MAX)),
            false,
            &mut |k, v| {
                stored.insert(k.to_vec(), v.to_vec());
                Ok(true)
            },
        )?;
        let mut writes = vec![Write::put(Tree::Jobs, &j.id, encode(j))];
        for r in &j.history {
            let (key, value) = (round_key(&j.id, r.round), encode(r));
            if stored.remove(&key).as_ref() != Some(&value) {
                writes.push(Write::put(Tree::JobRounds, key, value));
            }
        }
        writes.extend(stored.into_keys().map(|key| Write { tree: Tree::JobRounds, key, value: None }));
        Ok(writes)
    }

    /// Reads job `id` with the rounds `rounds` asks for, modifies it and durably writes
    /// it, atomically with respect to every other update (so an abort or a site's
    /// decision is never overwritten by a stale copy). `f` may refuse the change by
    /// returning an error. Ask for the fewest rounds `f` needs: a change of the record
    /// alone (attempts, strikes, exclusions) reads none, and its cost stays flat
    /// however long the history grows.
    pub fn update_job<T>(
        &self,
        id: &str,
        rounds: Rounds,
        f: impl FnOnce(&mut JobRecord) -> Result<T>,
    ) -> Result<(JobRecord, T)> {
        let _guard = self.guard();
        let mut job = self.job(id, rounds)?.with_context(|| format!("no job {id}"))?;
        let out = f(&mut job)?;
        self.put_job(&job)?;
        Ok((job, out))
    }

    /// [`Store::update_job`] whose change is logged in the same durable write: `f`
    /// changes the job and returns the audit event that records the change (`None`:
    /// nothing to log, a retried call), and the job's writes and the log's entry commit
    /// together (`AuditLog::append_with`), so a stop can never leave one without the
    /// other. Returns the job, `f`'s value and the entry's seq.
    pub fn update_job_logged<T>(
        &self,
        id: &str,
        rounds: Rounds,
        audit: &crate::audit::AuditLog,
        f: impl FnOnce(&mut JobRecord) -> Result<(T, Option<maeum_tlog::Event>)>,
    ) -> Result<(JobRecord, T, Option<u64>)> {
        self.update_job_logged_with(id, rounds, audit, Vec::new(), f)
    }

    /// [`Store::update_job_logged`] with `extra` writes in the same durable write (a
    /// round's commit counts its contributors: [`Store::contributed_writes`]).
    pub fn update_job_logged_with<T>(
        &self,
        id: &str,
        rounds: Rounds,
        audit: &crate::audit::AuditLog,
        extra: Vec<Write>,
        f: impl FnOnce(&mut JobRecord) -> Result<(T, Option<maeum_tlog::Event>)>,
    ) -> Result<(JobRecord, T, Option<u64>)> {
        let _guard = self.guard();
        let mut job = self.job(id, rounds)?.with_context(|| format!("no job {id}"))?;
        let (out, event) = f(&mut job)?;
        let mut writes = self.job_writes(&job)?;
        writes.extend(extra);
        let seq = match event {
            Some(event) => Some(audit.append_with(crate::home::now_ms(), event, writes)?),
            None => {
                self.db.commit(writes)?;
                None
            }
        };
        Ok((job, out, seq))
    }

    /// Stores a new job and logs `event` (its `job_submitted`) in one durable write.
    /// Refuses an id that exists.
    pub fn insert_job_logged(
        &self,
        job: &JobRecord,
        audit: &crate::audit::AuditLog,
        event: maeum_tlog::Event,
    ) -> Result<u64> {
        let _guard = self.guard();
        anyhow::ensure!(self.db.get(Tree::Jobs, job.id.as_bytes())?.is_none(), "job {} exists already", job.id);
        audit.append_with(crate::home::now_ms(), event, self.job_writes(job)?)
    }

    /// Next value of a named durable counter (job numbers).
    pub fn next(&self, counter: &str) -> Result<u64> {
        let _guard = self.guard();
        // The key is the counter's bare name, as before the storage interface (so a
        // migrated home keeps its job numbers); `format` and `commit` are the store's.
        anyhow::ensure!(!matches!(counter, "format" | "commit"), "{counter:?} is not a counter name");
        let key = counter.to_owned();
        let old = self.db.get(Tree::Meta, key.as_bytes())?;
        let n = match old {
            None => 0,
            Some(b) => u64::from_be_bytes(
                <[u8; 8]>::try_from(b.as_slice()).map_err(|_| anyhow!("the counter {counter} is not 8 bytes"))?,
            ),
        } + 1;
        self.db.commit(vec![Write::put(Tree::Meta, key, n.to_be_bytes().to_vec())])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> JobRecord {
        let toml = "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 2\n";
        JobRecord::submitted(id.into(), JobSpec::from_toml("t.toml", toml).expect("spec"), toml.into(), 1)
    }

    #[test]
    fn a_site_that_keeps_failing_sits_out_longer_each_time_and_delivering_clears_it() {
        let mut j = job("t-1");
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let mut why: BTreeMap<String, String> = [("c".to_string(), "local_failure: disk full".to_string())].into();
        let all = set(&["a", "b", "c"]);
        for n in 1..STRIKES_TO_BENCH {
            assert!(j.account_attempt(&all, &set(&["a", "b"]), &why, 1_000).is_empty(), "attempt {n}");
            assert!(j.benched("c", 1_000).is_none());
        }
        // b neither delivers nor leaves (the attempt ended for c's reasons first): no
        // strike for b; c's third in a row benches it.
        let benched = j.account_attempt(&all, &set(&["a"]), &why, 1_000);
        let names: Vec<&str> = benched.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["c"]);
        assert!(!j.strikes.contains_key("b"), "b left for no reason of its own");
        assert_eq!(j.benched("c", 1_000).map(|s| (s.count, s.last.as_str())), Some((3, "local_failure: disk full")));
        assert!(j.benched("c", 1_000 + 30_000).is_none(), "30 s at the third");
        why.insert("b".into(), "went offline".into());
        j.account_attempt(&all, &set(&["a"]), &why, 50_000);
        assert_eq!(j.strikes["c"].benched_until_ms, 50_000 + 60_000, "then doubling");
        assert_eq!((j.strikes["b"].count, j.strikes["b"].last.as_str()), (1, "went offline"));
        assert_eq!(bench_ms(40), 600_000, "at most ten minutes");
        j.account_attempt(&set(&["b", "c"]), &set(&["b", "c"]), &why, 60_000);
        assert!(j.strikes.is_empty(), "a delivered update clears the count");
    }

    #[test]
    fn a_job_change_and_its_log_entry_are_one_write() {
        use maeum_tlog::Event;
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
        let key = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let log = crate::audit::AuditLog::open(s.db(), "maeum/heart".into(), key.as_ref(), &[]).expect("log");
        let submitted = |id: &str| Event::JobSubmitted {
            job_id: id.into(),
            name: "t".into(),
            spec_sha256: "00".into(),
            operator: "lead".into(),
        };
        assert_eq!(s.insert_job_logged(&job("t-1"), &log, submitted("t-1")).expect("insert"), 0);
        assert!(s.job("t-1", Rounds::All).expect("read").is_some());
        let again = s.insert_job_logged(&job("t-1"), &log, submitted("t-1")).expect_err("an id that exists");
        assert!(again.to_string().contains("exists already"), "{again}");
        assert_eq!(log.size(), 1, "a refused insert logs nothing");
        // A change with its entry, a retried one without.
        let decided = |j: &mut JobRecord| {
            let event = Event::JobFinished { job_id: j.id.clone(), state: "aborted".into() };
            j.state = JobState::Aborted;
            Ok(((), Some(event)))
        };
        let (j, (), seq) = s.update_job_logged("t-1", Rounds::All, &log, decided).expect("update");
        assert_eq!((j.state, seq), (JobState::Aborted, Some(1)));
        let (_, (), seq) = s.update_job_logged("t-1", Rounds::All, &log, |_| Ok(((), None))).expect("retry");
        assert_eq!((seq, log.size()), (None, 2));
        // A refused change writes neither.
        let refused =
            s.update_job_logged("t-1", Rounds::All, &log, |_| -> Result<((), Option<Event>)> { anyhow::bail!("no") });
        assert!(refused.is_err());
        assert_eq!((log.size(), s.job("t-1", Rounds::All).expect("read").expect("job").state), (2, JobState::Aborted));
    }

    /// A store holding job `t-1` with rounds 1–3 (the job returned as written).
    fn store_with_three_rounds() -> (tempfile::TempDir, Store, JobRecord) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
        let mut j = job("t-1");
        j.history = (1..=3).map(round).collect();
        s.put_job(&j).expect("put");
        (dir, s, j)
    }

    #[test]
    fn a_change_of_the_record_alone_writes_no_round_and_keeps_them_all() {
        let (_dir, s, _) = store_with_three_rounds();
        let (head, n) = s
            .update_job("t-1", Rounds::Latest(0), |j| {
                j.attempts_started += 1;
                Ok(j.attempts_started)
            })
            .expect("head update");
        assert!(head.history.is_empty() && n == 1);
        assert_eq!((head.completed_rounds(), head.rounds_before()), (3, 3), "a head still counts its rounds");
        assert!(head.latest().is_none(), "a head cannot tell the latest model");
        let back = s.job("t-1", Rounds::All).expect("read").expect("t-1");
        assert_eq!((back.attempts_started, back.history.len()), (1, 3), "the rounds stay");
        let misplaced = s.update_job("t-1", Rounds::Latest(0), |j| {
            j.history.push(round(2));
            Ok(())
        });
        assert!(misplaced.is_err(), "a round goes only after the last one");
        assert_eq!(s.job("t-1", Rounds::All).expect("read").expect("t-1").history.len(), 3);
        // A record from before rounds had their own tree: read whole, written whole,
        // its rounds moved to their tree.
        let mut legacy = serde_json::to_value(job("t-2")).expect("json");
        legacy["history"] = serde_json::to_value(vec![round(1)]).expect("json");
        s.db().commit(vec![Write::put(Tree::Jobs, "t-2", serde_json::to_vec(&legacy).expect("bytes"))]).expect("put");
        let (read, ()) = s
            .update_job("t-2", Rounds::Latest(0), |j| {
                j.attempts_started = 7;
                Ok(())
            })
            .expect("legacy head update");
        assert_eq!(read.history.len(), 1, "a legacy record is read whole");
        let back = s.job("t-2", Rounds::Latest(0)).expect("read").expect("t-2");
        assert_eq!((back.attempts_started, back.completed_rounds()), (7, 1), "the inline round survives");
        assert_eq!(s.job_rounds("t-2", u32::MAX, 5).expect("page").map(|p| p.len()), Some(1));
    }

    #[test]
    fn the_latest_rounds_read_write_and_page_without_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
        let mut j = job("t-1");
        j.attempts_started = 12;
        j.history = (1..=10).map(round).collect();
        s.put_job(&j).expect("put");
        s.put_job(&job("t-10")).expect("a job whose id extends this one's");
        let digests = |h: &[RoundRecord]| h.iter().map(|r| r.model.digest.clone()).collect::<Vec<_>>();
        let recent = s.job("t-1", Rounds::Latest(2)).expect("read").expect("t-1");
        assert_eq!(digests(&recent.history), ["m9", "m10"]);
        assert_eq!((recent.rounds_before(), recent.completed_rounds()), (8, 10));
        assert_eq!(recent.latest().map(|v| v.digest.as_str()), Some("m10"));
        // Rounds written before `attempts_through`: a partial copy cannot count the
        // attempts since the last commit, a full one can (1 a round in `round`).
        assert_eq!(recent.attempts_since_commit(), None);
        assert_eq!(s.job("t-1", Rounds::All).expect("read").expect("t-1").attempts_since_commit(), Some(2));
        // A commit on the latest round: round 9 changed, round 11 added, 1–8 untouched.
        let (written, ()) = s
            .update_job("t-1", Rounds::Latest(1), |j| {
                j.history[0].evaluated_by = vec!["a".into()];
                let mut r = round(11);
                r.attempts_through = Some(j.attempts_started);
                j.history.push(r);
                Ok(())
            })
            .expect("commit");
        assert_eq!(written.completed_rounds(), 11);
        let all = s.job("t-1", Rounds::All).expect("read").expect("t-1");
        assert_eq!(all.history.len(), 11);
        assert_eq!(all.history[9].evaluated_by, ["a"]);
        assert!(all.history[..9].iter().all(|r| r.evaluated_by.is_empty()), "earlier rounds untouched");
        let latest = s.job("t-1", Rounds::Latest(1)).expect("read").expect("t-1");
        assert_eq!(latest.attempts_since_commit(), Some(0), "counted from the latest round alone");
        // Paging back: the latest 3 rounds before round 5, then past the first.
        assert_eq!(digests(&s.job_rounds("t-1", 5, 3).expect("page").expect("t-1")), ["m2", "m3", "m4"]);
        assert_eq!(digests(&s.job_rounds("t-1", 3, 100).expect("page").expect("t-1")), ["m1", "m2"]);
        assert!(s.job_rounds("t-1", 1, 100).expect("page").expect("t-1").is_empty());
        assert!(s.job_rounds("nope", 5, 3).expect("page").is_none());
        assert_eq!(s.job("t-10", Rounds::Latest(5)).expect("read").expect("t-10").completed_rounds(), 0);
        assert_eq!(
            s.jobs(Rounds::Latest(1))
                .expect("jobs")
                .iter()
                .map(|j| (j.completed_rounds(), j.history.len()))
                .collect::<Vec<_>>(),
            [(11, 1), (0, 0)]
        );
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
            s.put_job(&job("t-1")).expect("put");
            s.put_site(&SiteRecord { id: "a".into(), revoked: true, ..Default::default() }).expect("site");
            assert_eq!(s.next("job").expect("next"), 1);
            assert_eq!(s.next("job").expect("next"), 2);
        }
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("reopen");
        assert_eq!(s.job("t-1", Rounds::All).expect("job").map(|j| j.state), Some(JobState::Pending));
        assert!(s.site("a").expect("site").is_some_and(|r| r.revoked));
        assert_eq!(s.next("job").expect("next"), 3, "counters never repeat");
    }

    fn round(n: u32) -> RoundRecord {
        serde_json::from_value(serde_json::json!({
            "round": n, "model": {"digest": format!("m{n}"), "size": 8, "layout_digest": "l"},
            "optimizer_state": "", "contributors": ["a", "b"], "dropped": [], "total_weight": 9,
            "completed_ms": 5, "attempts": 1, "evaluation": null, "evaluated_by": [],
        }))
        .expect("round record")
    }

    #[test]
    fn rounds_are_stored_apart_from_the_job_and_an_inline_history_still_reads() {
        let (_dir, s, mut j) = store_with_three_rounds();
        s.put_job(&job("t-10")).expect("another job, whose id extends this one's");
        let head = s.db().get(Tree::Jobs, b"t-1").expect("get").expect("stored");
        assert!(!String::from_utf8_lossy(&head).contains("\"history\""), "the record holds no rounds");
        assert_eq!(s.db().len(Tree::JobRounds).expect("len"), 3);
        let read = |s: &Store| s.job("t-1", Rounds::All).expect("job").expect("t-1").history;
        assert_eq!(read(&s).iter().map(|r| r.model.digest.clone()).collect::<Vec<_>>(), ["m1", "m2", "m3"]);
        // A changed round is rewritten, a round gone is removed.
        j.history[1].evaluated_by = vec!["a".into()];
        j.history.truncate(2);
        s.put_job(&j).expect("put");
        assert_eq!(s.db().len(Tree::JobRounds).expect("len"), 2);
        assert_eq!(read(&s)[1].evaluated_by, ["a"]);
        assert!(s.job("t-10", Rounds::All).expect("job").expect("t-10").history.is_empty());
        let head = s.job("t-1", Rounds::Latest(0)).expect("head").expect("t-1");
        assert!(head.history.is_empty() && head.state == JobState::Pending);
        s.put_job(&head).expect("a head writes the record alone");
        assert_eq!(s.db().len(Tree::JobRounds).expect("len"), 2, "a head never removes the rounds");
        assert_eq!(s.jobs(Rounds::All).expect("jobs").iter().map(|j| j.history.len()).collect::<Vec<_>>(), [2, 0]);
        // A record written before rounds had their own tree keeps its inline history.
        let mut legacy = serde_json::to_value(job("t-2")).expect("json");
        legacy["history"] = serde_json::to_value(vec![round(1)]).expect("json");
        s.db().commit(vec![Write::put(Tree::Jobs, "t-2", serde_json::to_vec(&legacy).expect("bytes"))]).expect("put");
        assert_eq!(s.job("t-2", Rounds::All).expect("job").expect("t-2").history.len(), 1);
    }

    #[test]
    fn update_job_never_loses_a_concurrent_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
        s.put_job(&job("t-1")).expect("put");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        s.update_job("t-1", Rounds::All, |j| {
                            j.attempts_started += 1;
                            Ok(())
                        })
                        .expect("update");
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().expect("thread"));
        assert_eq!(s.job("t-1", Rounds::All).expect("job").map(|j| j.attempts_started), Some(200));
    }

    #[test]
    fn a_refused_update_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state"), Engine::Sled).expect("open");
        s.put_job(&job("t-1")).expect("put");
        let r: Result<(JobRecord, ())> = s.update_job("t-1", Rounds::All, |j| {
            j.state = JobState::Aborted;
            anyhow::bail!("no")
        });
        assert!(r.is_err());
        assert_eq!(s.job("t-1", Rounds::All).expect("job").map(|j| j.state), Some(JobState::Pending));
        assert!(s.update_job("missing", Rounds::All, |_| Ok(())).is_err(), "an unknown job is an error");
    }
}
