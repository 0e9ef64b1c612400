//! Leaving sites out of a job's later attempts: SA-06 accusations and exclusions, and
//! which unmask stages closed (so a late unmask message is not mistaken for a new one).

use super::*;

impl Coord {
    /// SA-06: `site` says the share party `accused` sealed for it did not authenticate,
    /// and leaves the attempt. The coordinator cannot check which of the two is lying
    /// (only they hold the key), so one accusation only drops the accuser; a party two
    /// sites accuse is excluded from the job's later attempts, so a site that seals
    /// garbage for its holders cannot stall the job, and one lying site alone cannot
    /// exclude anyone.
    pub fn accusation(&self, job_id: &str, round: u32, attempt: u32, site: &str, accused: u32) -> anyhow::Result<()> {
        let excluded = {
            let mut guard = lock(&self.round);
            let Some(r) =
                guard.as_mut().filter(|r| r.job_id() == job_id && r.round() == round && r.attempt() == attempt)
            else {
                return Ok(());
            };
            // The accuser leaves the attempt through no fault of its own: no strike.
            r.drop_site(site);
            let Some(name) = u16::try_from(accused)
                .ok()
                .and_then(|i| r.secagg().as_ref().and_then(|sa| sa.names(&[i]).pop()))
                .filter(|n| n != site)
            else {
                return Ok(());
            };
            r.accuse(site, &name).map(|accusers| (name, accusers))
        };
        if let Some((name, accusers)) = excluded {
            let why = format!(
                "SA-06: its shares did not authenticate for {} sites ({}) in round {round} attempt {attempt}",
                accusers.len(),
                accusers.join(", ")
            );
            self.exclude_site(job_id, &name, &why)?;
        }
        self.notify();
        Ok(())
    }

    /// Leaves `site` out of the job's later attempts for `why` (the first reason
    /// stands); logs it once. Returns whether the site was newly excluded.
    pub fn exclude_site(&self, job_id: &str, site: &str, why: &str) -> anyhow::Result<bool> {
        let newly = self
            .store
            .update_job(job_id, Rounds::Latest(0), |j| {
                Ok(!j.excluded.contains_key(site) && {
                    j.excluded.insert(site.to_string(), why.to_string());
                    true
                })
            })?
            .1;
        if newly {
            warn!(site = %site, reason = %why, "site excluded from this job's later attempts");
        }
        Ok(newly)
    }

    /// Records that the unmask stage of (job, round, attempt) closed.
    pub fn note_unmask_closed(&self, job_id: &str, round: u32, attempt: u32) {
        let mut closed = lock(&self.unmask_closed);
        closed.push_back((job_id.to_owned(), round, attempt));
        while closed.len() > 16 {
            closed.pop_front();
        }
    }

    /// Whether the unmask stage of (job, round, attempt) closed.
    pub(super) fn unmask_was_closed(&self, job_id: &str, round: u32, attempt: u32) -> bool {
        lock(&self.unmask_closed).iter().any(|(j, r, a)| j == job_id && *r == round && *a == attempt)
    }
}
