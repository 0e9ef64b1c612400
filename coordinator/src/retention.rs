//! What HOME/blobs keeps of finished rounds (`retention.round_blobs` in
//! `consortium.json`, 10 by default).
//!
//! Each committed round stores its model and its unmasked aggregate (and a server
//! optimiser's state): 2 × the model a round, 800 MB a round for a 100M-parameter
//! adapter. After every committed round the coordinator removes those of the job's
//! rounds older than its latest `round_blobs` (the `round_blobs` rounds before the
//! window, read without the rest of the history: a blob whose removal failed is tried
//! again at each of the next `round_blobs` commits; lowering `round_blobs` mid-job leaves
//! the blobs of rounds already older than twice the new value), unless something still names them: a
//! release (every released model stays, for export and for sites installing it), a
//! kept round, or a job's initial model. The audit log, the job history and the model
//! cards name every digest whatever is removed; what goes is the bytes. `0` keeps
//! every round.

use anyhow::Result;
use std::collections::HashSet;
use tracing::info;

use maeum_protocols::wire::Digest;

use crate::server::Coord;
use crate::store::Rounds;

/// Removes the blobs of job `id`'s rounds that left the retention window (see the
/// module documentation). Returns the blobs and bytes removed. Runs in the orchestrator
/// after a round is committed, so no blob of this job is being made meanwhile.
pub fn sweep(c: &Coord, id: &str) -> Result<(usize, u64)> {
    let keep_rounds = c.home.consortium()?.retention.round_blobs as usize;
    let window = u32::try_from(keep_rounds.saturating_mul(2)).unwrap_or(u32::MAX);
    let Some(job) = c.store.job(id, Rounds::Latest(window))? else { return Ok((0, 0)) };
    if keep_rounds == 0 || job.history.len() <= keep_rounds {
        return Ok((0, 0));
    }
    let (old, kept) = job.history.split_at(job.history.len() - keep_rounds);
    let digests = |r: &crate::store::RoundRecord| {
        [r.model.digest.clone(), r.aggregate_sha256.clone(), r.optimizer_state.clone()].into_iter()
    };
    let mut keep: HashSet<String> = kept.iter().flat_map(digests).collect();
    keep.extend(c.registry.releases()?.into_iter().map(|r| r.model.digest));
    keep.extend(c.store.jobs(Rounds::Latest(0))?.into_iter().filter_map(|j| j.initial.map(|v| v.digest)));
    let (mut files, mut bytes) = (0, 0);
    for digest in old.iter().flat_map(digests).filter(|d| !d.is_empty() && !keep.contains(d)) {
        let Ok(digest) = Digest::parse("blob", &digest) else { continue };
        if let Some(size) = c.blobs.remove(&digest)? {
            (files, bytes) = (files + 1, bytes + size);
        }
    }
    if files > 0 {
        info!(job = %job.id, files, bytes, keep_rounds, "removed the blobs of rounds outside the retention window");
    }
    Ok((files, bytes))
}
