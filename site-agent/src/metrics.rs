//! The site agent's Prometheus metrics, served on the ops endpoint
//! (`maeum_runtime::ops`, `run --ops-listen ADDR`). Names carry the prefix
//! `maeum_site_`; label values are fixed strings chosen here. Nothing is pushed
//! anywhere: the endpoint only answers whoever scrapes it on the site's own network.

use std::time::Duration;

use maeum_runtime::ops::{LabelledCounter, LabelledHistogram, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

const STAGE_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];

/// Handles to every site metric (cheap to clone).
#[derive(Debug, Clone)]
pub struct SiteMetrics {
    /// The registry and the readiness flag.
    pub ops: Metrics,
    /// Updates delivered (one per round attempt this site trained for, and one for a
    /// secure job's final evaluation, whose counts also travel masked), as
    /// `outcome="delivered"`; a work item that fails counts in `errors{kind="work_item"}`.
    pub rounds: LabelledCounter,
    /// Seconds per stage: `download`, `train`, `upload`, `evaluate`.
    pub stage_seconds: LabelledHistogram,
    /// Update bytes sent to the coordinator.
    pub bytes_sent: Counter,
    /// Model bytes received from the coordinator.
    pub bytes_received: Counter,
    /// 1 while the coordinator answers heartbeats.
    pub connected: Gauge,
    /// Audit checkpoints verified and cosigned.
    pub checkpoints_witnessed: Counter,
    /// 1 while this site refuses all work because it caught the coordinator showing it
    /// a forked audit log (until `maeum-site audit clear`).
    pub halted: Gauge,
    /// Refused input from the coordinator by kind: `model_digest`, `audit`, `fork`,
    /// `release` (a release that failed a check and was not installed).
    pub verification_failures: LabelledCounter,
    /// Releases verified and put in service.
    pub releases_installed: Counter,
    /// Failures by kind: `connection`, `work_item`, `certificate_renewal`.
    pub errors: LabelledCounter,
    /// This site's certificate renewed without a restart.
    pub certificate_renewals: Counter,
    /// Offers, sessions, survivor sets and unmask requests this site refused under its
    /// `[policy]`, by rule (`min_cohort`, `allow_plaintext`, `reveal_once`, …).
    pub policy_refusals: LabelledCounter,
}

impl Default for SiteMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SiteMetrics {
    pub fn new() -> Self {
        let ops = Metrics::new("maeum_site");
        SiteMetrics {
            rounds: ops.counter_vec("rounds", "Updates delivered, one per round attempt trained for", "outcome"),
            stage_seconds: ops.histogram_vec("stage_seconds", "Seconds per stage", "stage", &STAGE_BUCKETS),
            bytes_sent: ops.counter("sent_bytes", "Update bytes sent to the coordinator"),
            bytes_received: ops.counter("received_bytes", "Model bytes received from the coordinator"),
            connected: ops.gauge("connected", "1 while the coordinator answers heartbeats"),
            checkpoints_witnessed: ops.counter("checkpoints_witnessed", "Audit checkpoints verified and cosigned"),
            halted: ops
                .gauge("halted", "1 while this site refuses all work because the coordinator's audit log forked"),
            verification_failures: ops.counter_vec(
                "verification_failures",
                "Refused input from the coordinator by kind",
                "kind",
            ),
            errors: ops.counter_vec("errors", "Failures by kind", "kind"),
            releases_installed: ops.counter("releases_installed", "Releases verified and put in service"),
            certificate_renewals: ops.counter("certificate_renewals", "Certificates renewed without a restart"),
            policy_refusals: ops.counter_vec("policy_refusals", "Requests refused under the site's policy", "rule"),
            ops,
        }
    }

    /// Records how long a stage took.
    pub fn stage(&self, stage: &str, took: Duration) {
        self.stage_seconds.observe(stage, took.as_secs_f64());
    }
}
