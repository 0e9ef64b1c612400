//! The coordinator's Prometheus metrics, served on the ops endpoint
//! (`maeum_runtime::ops`, `serve --ops-listen ADDR`). Names carry the prefix
//! `maeum_coordinator_`; label values are fixed strings chosen here, never peer input.

use std::time::Duration;

use maeum_runtime::ops::{LabelledCounter, LabelledHistogram, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Stage durations span a second to an hour.
const STAGE_BUCKETS: [f64; 10] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0, 1800.0];
/// Heartbeat intervals: one a second plus the round trip when nothing stalls.
const HEARTBEAT_BUCKETS: [f64; 8] = [1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];

/// Handles to every coordinator metric (cheap to clone).
#[derive(Debug, Clone)]
pub struct CoordMetrics {
    /// The registry and the readiness flag.
    pub ops: Metrics,
    /// Round attempts by outcome: `committed`, `failed`.
    pub rounds: LabelledCounter,
    /// Seconds per round stage: `train` (selection to the last update, secure
    /// aggregation included), `commit` (aggregate, step, store), `evaluate` (final).
    pub stage_seconds: LabelledHistogram,
    /// Update payload bytes received from sites.
    pub bytes_received: Counter,
    /// Model bytes sent to sites.
    pub bytes_sent: Counter,
    /// Sites whose heartbeat is recent.
    pub sites_online: Gauge,
    /// Seconds between two heartbeats of one site as they arrive, by the stage the site
    /// reports (`idle`, `training`, `uploading`, …). Sites send one a second: a longer
    /// interval is a missed heartbeat, from a stalled site, network or coordinator.
    pub heartbeat_interval: LabelledHistogram,
    /// Sites dropped from secure-aggregation sessions.
    pub secagg_dropouts: Counter,
    /// Refused peer input by kind: `revoked_site`, `cosignature`, `audit_root`.
    pub verification_failures: LabelledCounter,
    /// gRPC calls that ended in an error, by status code (`invalid_argument`, …).
    pub errors: LabelledCounter,
    /// Entries in the audit log.
    pub audit_entries: Gauge,
    /// Model releases made (signed and logged).
    pub releases: Counter,
    /// Release installs sites refused (a failed signature, digest or log check).
    pub release_refusals: Counter,
    /// Requests sites refused under their privacy policy, by rule.
    pub site_refusals: LabelledCounter,
    /// 1 while the state database cannot write for lack of space (the job is paused).
    pub disk_full: Gauge,
    /// Certificates renewed without a restart, by kind: `server`, `site`.
    pub certificates_renewed: LabelledCounter,
    /// When the coordinator's TLS certificate in service expires, Unix seconds.
    pub server_certificate_expiry: Gauge,
}

impl Default for CoordMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordMetrics {
    pub fn new() -> Self {
        let ops = Metrics::new("maeum_coordinator");
        CoordMetrics {
            rounds: ops.counter_vec("rounds", "Round attempts by outcome", "outcome"),
            stage_seconds: ops.histogram_vec("stage_seconds", "Seconds per round stage", "stage", &STAGE_BUCKETS),
            bytes_received: ops.counter("received_bytes", "Update payload bytes received from sites"),
            bytes_sent: ops.counter("sent_bytes", "Model bytes sent to sites"),
            sites_online: ops.gauge("sites_online", "Sites with a recent heartbeat"),
            heartbeat_interval: ops.histogram_vec(
                "heartbeat_interval_seconds",
                "Seconds between two heartbeats of one site (sites send one a second)",
                "stage",
                &HEARTBEAT_BUCKETS,
            ),
            secagg_dropouts: ops.counter("secagg_dropouts", "Sites dropped from secure-aggregation sessions"),
            verification_failures: ops.counter_vec("verification_failures", "Refused peer input by kind", "kind"),
            errors: ops.counter_vec("errors", "gRPC calls that ended in an error, by status code", "code"),
            audit_entries: ops.gauge("audit_entries", "Entries in the audit log"),
            releases: ops.counter("releases", "Model releases signed and logged"),
            release_refusals: ops.counter("release_refusals", "Release installs refused by sites"),
            disk_full: ops.gauge("disk_full", "1 while the state database cannot write for lack of space"),
            certificates_renewed: ops.counter_vec(
                "certificates_renewed",
                "Certificates renewed without a restart, by kind",
                "kind",
            ),
            server_certificate_expiry: ops.gauge(
                "server_certificate_expiry_seconds",
                "When the coordinator's TLS certificate in service expires (Unix seconds)",
            ),
            site_refusals: ops.counter_vec(
                "site_refusals",
                "Requests sites refused under their privacy policy",
                "rule",
            ),
            ops,
        }
    }

    /// Records how long a stage took.
    pub fn stage(&self, stage: &str, took: Duration) {
        self.stage_seconds.observe(stage, took.as_secs_f64());
    }

    /// Counts a gRPC response's status from its headers (an error answer is
    /// trailers-only, so its `grpc-status` is a header; a success has none there).
    pub fn count_status(&self, headers: &tonic::codegen::http::HeaderMap) {
        let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok())
        else {
            return;
        };
        let code = tonic::Code::from_i32(code);
        if code != tonic::Code::Ok {
            self.errors.inc(code_name(code));
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
