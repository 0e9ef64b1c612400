//! The ops endpoint both daemons serve: metrics for Prometheus and health for probes.
//!
//! [`Metrics`] is a daemon's metric registry (counters, gauges, labelled counters and
//! histograms, all with the daemon's prefix); [`serve`] exposes it on one listener that
//! speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c, as the Kubernetes `grpc:`
//! probe speaks):
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | 200, OpenMetrics text (`application/openmetrics-text; version=1.0.0; charset=utf-8`) |
//! | `GET /healthz` | 200 `ok` while the process runs (liveness) |
//! | `GET /readyz` | 200 `ready` after [`Metrics::set_ready`]`(true)`, else 503 `not ready` |
//! | `grpc.health.v1.Health/Check`, `/Watch` | service `""`: `SERVING` when ready, else `NOT_SERVING` |
//!
//! Anything else is 404 (which gRPC clients read as `UNIMPLEMENTED`).
//!
//! The endpoint is plaintext and unauthenticated: bind it to a private or pod network
//! (or loopback), never to the consortium-facing address. Peer traffic and its mTLS stay
//! on the gRPC port; this port carries no job data. Metrics are pull-only: nothing is
//! ever sent anywhere (no push gateway, no telemetry). Metric names and label values are
//! short fixed strings chosen by code, never secrets, identifiers from peers, or data.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic_health::ServingStatus;

/// The `Content-Type` of `GET /metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The gRPC health service name for the whole server.
const WHOLE_SERVER: &str = "";

/// Metrics registry shared by a daemon's code; cheap to clone (`Arc` inside).
///
/// Register each metric once at startup and keep (or clone) the returned handle;
/// registering the same name twice panics. Also holds the readiness flag that `/readyz`
/// and the gRPC health service report.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    prefix: String,
    registry: Mutex<Registered>,
    /// Readiness; [`serve`] subscribes to forward it to the gRPC health service.
    ready: watch::Sender<bool>,
}

struct Registered {
    registry: Registry,
    names: HashSet<String>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("prefix", &self.inner.prefix)
            .field("ready", &*self.inner.ready.borrow())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry whose metric names get `"{prefix}_"` (e.g. `maeum_coordinator`), not ready.
    ///
    /// # Panics
    /// If `prefix` is not a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    pub fn new(prefix: &str) -> Metrics {
        assert!(is_valid_metric_name(prefix), "invalid metric prefix {prefix:?}");
        let (ready, _) = watch::channel(false);
        Metrics {
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                registry: Mutex::new(Registered { registry: Registry::with_prefix(prefix), names: HashSet::new() }),
                ready,
            }),
        }
    }

    /// Registers a counter and returns its handle. The encoder adds `_total` to the name
    /// (a trailing `_total` in `name` is dropped, so it is never doubled).
    ///
    /// # Panics
    /// If `name` is invalid or already registered.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.register(counter_name(name), help, counter.clone());
        counter
    }

    /// Registers a counter with one label (e.g. `kind` or `outcome`) whose values code picks.
    ///
    /// # Panics
    /// If `name` or `label` is invalid or `name` is already registered.
    pub fn counter_vec(&self, name: &str, help: &str, label: &'static str) -> LabelledCounter {
        assert!(is_valid_label_name(label), "invalid label name {label:?} for metric {name:?}");
        let family = Family::default();
        self.register(counter_name(name), help, family.clone());
        LabelledCounter { label, family }
    }

    /// Registers a gauge and returns its handle.
    ///
    /// # Panics
    /// If `name` is invalid or already registered.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        let gauge = Gauge::default();
        self.register(name, help, gauge.clone());
        gauge
    }

    /// Registers a histogram of durations in seconds with one label; `buckets` are the
    /// finite upper bounds, strictly increasing (`+Inf` is always added).
    ///
    /// # Panics
    /// If `name` or `label` is invalid, `name` is already registered, or `buckets` is
    /// empty, not finite or not strictly increasing.
    pub fn histogram_vec(&self, name: &str, help: &str, label: &'static str, buckets: &[f64]) -> LabelledHistogram {
        assert!(is_valid_label_name(label), "invalid label name {label:?} for metric {name:?}");
        assert!(
            !buckets.is_empty()
                && buckets.iter().all(|b| b.is_finite())
                && buckets.windows(2).all(|pair| pair[0] < pair[1]),
            "histogram {name:?} needs finite, strictly increasing buckets, got {buckets:?}"
        );
        let family = Family::new_with_constructor(Buckets(buckets.into()));
        self.register(name, help, family.clone());
        LabelledHistogram { label, family }
    }

    /// Sets readiness: `/readyz` answers 200 and gRPC health `SERVING` while true.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.send_if_modified(|current| std::mem::replace(current, ready) != ready);
    }

    /// The registry in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let registered = self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        // Writing to a `String` cannot fail, and our metrics encode without error.
        if let Err(error) = encode(&mut text, &registered.registry) {
            tracing::warn!(%error, "encoding metrics");
        }
        text
    }

    fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        assert!(is_valid_metric_name(name), "invalid metric name {name:?}");
        let mut registered = self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(registered.names.insert(name.to_owned()), "metric {name:?} registered twice");
        // The registry appends a full stop to the help text.
        let help = help.trim_end().trim_end_matches('.').replace(['\\', '\n'], " ");
        registered.registry.register(name, help, metric);
    }
}

/// A counter with one label, from [`Metrics::counter_vec`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct LabelledCounter {
    label: &'static str,
    family: Family<LabelSet, Counter>,
}

impl LabelledCounter {
    /// Adds one to the series whose label has `value`.
    pub fn inc(&self, value: &str) {
        self.family.get_or_create(&[(self.label, value.to_owned())]).inc();
    }

    /// Adds `n` to the series whose label has `value`.
    pub fn inc_by(&self, value: &str, n: u64) {
        self.family.get_or_create(&[(self.label, value.to_owned())]).inc_by(n);
    }

    /// The count of the series whose label has `value` (0 if never incremented).
    pub fn get(&self, value: &str) -> u64 {
        self.family.get(&[(self.label, value.to_owned())]).map_or(0, |counter| counter.get())
    }
}

/// A histogram of seconds with one label, from [`Metrics::histogram_vec`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct LabelledHistogram {
    label: &'static str,
    family: Family<LabelSet, Histogram, Buckets>,
}

impl LabelledHistogram {
    /// Records a duration of `seconds` in the series whose label has `value`.
    pub fn observe(&self, value: &str, seconds: f64) {
        self.family.get_or_create(&[(self.label, value.to_owned())]).observe(seconds);
    }
}

/// One label: its name, fixed by code, and its value.
type LabelSet = [(&'static str, String); 1];

/// Builds each series of a labelled histogram with the buckets it was registered with.
#[derive(Clone, Debug)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Counter names without the `_total` the encoder adds.
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the Prometheus metric name syntax.
fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved), nor `le` (histogram buckets).
fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name != "le"
}

/// Serves `metrics` on `addr` over plain HTTP/1.1 and HTTP/2 (h2c prior knowledge, as the
/// Kubernetes `grpc:` probe speaks): `GET /metrics`, `/healthz`, `/readyz` and the
/// `grpc.health.v1.Health` service (see the [module docs](self)).
///
/// Returns the bound address (`addr` may use port 0) once listening; the server runs in a
/// background task until `shutdown` resolves, which closes the listener at once, reports
/// `NOT_SERVING` to gRPC health watchers and lets requests in flight finish.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the ops endpoint {addr}"))?;
    let local = listener.local_addr().context("reading the ops endpoint address")?;

    // The gRPC health service reports readiness; a task forwards every change of the flag
    // (set_ready is synchronous, the reporter is not).
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut ready = metrics.inner.ready.subscribe();
    let initially_ready = *ready.borrow_and_update();
    reporter.set_service_status(WHOLE_SERVER, serving_status(initially_ready)).await;
    let forward = tokio::spawn({
        let reporter = reporter.clone();
        async move {
            while ready.changed().await.is_ok() {
                let now_ready = *ready.borrow_and_update();
                reporter.set_service_status(WHOLE_SERVER, serving_status(now_ready)).await;
            }
        }
    });
    let signal = async move {
        shutdown.await;
        forward.abort();
        reporter.set_service_status(WHOLE_SERVER, ServingStatus::NotServing).await;
    };

    let http = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(metrics);
    let app = tonic::service::Routes::new(health)
        .into_axum_router()
        .merge(http)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") });

    tracing::info!(addr = %local, "ops endpoint listening (plaintext: /metrics, /healthz, /readyz, grpc.health.v1)");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(signal).await {
            tracing::warn!(%error, "ops endpoint stopped");
        }
    });
    Ok(local)
}

fn serving_status(ready: bool) -> ServingStatus {
    if ready { ServingStatus::Serving } else { ServingStatus::NotServing }
}

async fn metrics_text(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], metrics.encode())
}

async fn readiness(State(metrics): State<Metrics>) -> impl IntoResponse {
    if metrics.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
    use tonic_health::pb::health_client::HealthClient;

    /// Starts `serve` on loopback; dropping the sender (or sending) shuts it down.
    async fn start(metrics: &Metrics) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        (addr, stop)
    }

    /// One HTTP/1.1 GET with a raw socket: (status code, content type, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let content_type = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            .map(|(_, value)| value.trim().to_owned())
            .unwrap_or_default();
        (status, content_type, body.to_owned())
    }

    async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
        // http:// makes tonic speak HTTP/2 with prior knowledge (h2c).
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        HealthClient::new(channel)
    }

    async fn check(client: &mut HealthClient<tonic::transport::Channel>) -> WireStatus {
        let response = client.check(HealthCheckRequest { service: String::new() }).await.unwrap();
        response.into_inner().status()
    }

    /// Polls the gRPC health until it reports `want` (the flag is forwarded by a task).
    async fn wait_for(client: &mut HealthClient<tonic::transport::Channel>, want: WireStatus) {
        for _ in 0..200 {
            if check(client).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("gRPC health never reported {want:?}");
    }

    #[test]
    fn metric_names() {
        let check = |name: &str, valid: bool| assert_eq!(is_valid_metric_name(name), valid, "{name:?}");
        check("maeum_coordinator", true);
        check("rounds", true);
        check("_x:y9", true);
        check("", false);
        check("9rounds", false);
        check("round-trips", false);
        check("rounds total", false);
        check("rondas_é", false);
    }

    #[test]
    fn label_names() {
        let check = |name: &str, valid: bool| assert_eq!(is_valid_label_name(name), valid, "{name:?}");
        check("kind", true);
        check("outcome_2", true);
        check("", false);
        check("__name__", false);
        check("le", false);
        check("a:b", false);
        check("2x", false);
    }

    #[test]
    fn encodes_every_kind_with_prefix_and_labels() {
        let metrics = Metrics::new("maeum_test");
        let rounds = metrics.counter("rounds_total", "Rounds completed.");
        let rejected = metrics.counter_vec("rejected", "Messages rejected", "kind");
        let sites = metrics.gauge("sites", "Sites connected");
        let stage = metrics.histogram_vec("stage_seconds", "Stage durations", "stage", &[0.1, 1.0]);
        rounds.inc_by(3);
        rejected.inc("bad_signature");
        rejected.inc_by("stale", 2);
        sites.set(4);
        stage.observe("shares", 0.5);
        assert_eq!(rejected.get("stale"), 2);
        assert_eq!(rejected.get("never"), 0);

        let text = metrics.encode();
        for line in [
            "# HELP maeum_test_rounds Rounds completed.",
            "# TYPE maeum_test_rounds counter",
            "maeum_test_rounds_total 3",
            "# TYPE maeum_test_rejected counter",
            "maeum_test_rejected_total{kind=\"bad_signature\"} 1",
            "maeum_test_rejected_total{kind=\"stale\"} 2",
            "# HELP maeum_test_sites Sites connected.",
            "maeum_test_sites 4",
            "# TYPE maeum_test_stage_seconds histogram",
            "maeum_test_stage_seconds_sum{stage=\"shares\"} 0.5",
            "maeum_test_stage_seconds_count{stage=\"shares\"} 1",
            "maeum_test_stage_seconds_bucket{le=\"0.1\",stage=\"shares\"} 0",
            "maeum_test_stage_seconds_bucket{le=\"1.0\",stage=\"shares\"} 1",
            "maeum_test_stage_seconds_bucket{le=\"+Inf\",stage=\"shares\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[tokio::test]
    async fn http1_metrics_health_and_readiness() {
        let metrics = Metrics::new("maeum_test");
        let requests = metrics.counter("requests", "Requests served");
        requests.inc();
        requests.inc();
        let (addr, _stop) = start(&metrics).await;

        let (status, content_type, body) = get(addr, "/metrics").await;
        assert_eq!((status, content_type.as_str()), (200, OPENMETRICS_CONTENT_TYPE));
        assert!(body.lines().any(|l| l == "maeum_test_requests_total 2"), "{body}");
        requests.inc();
        let (_, _, body) = get(addr, "/metrics").await;
        assert!(body.lines().any(|l| l == "maeum_test_requests_total 3"), "{body}");

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/healthz").await.2, "ok\n");
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready\n"));
        metrics.set_ready(true);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        metrics.set_ready(false);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn grpc_health_over_h2c_follows_readiness() {
        let metrics = Metrics::new("maeum_test");
        let (addr, _stop) = start(&metrics).await;
        let mut client = health_client(addr).await;
        assert_eq!(check(&mut client).await, WireStatus::NotServing);
        let mut watch = client.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(watch.next().await.unwrap().unwrap().status(), WireStatus::NotServing);

        metrics.set_ready(true);
        wait_for(&mut client, WireStatus::Serving).await;
        assert_eq!(watch.next().await.unwrap().unwrap().status(), WireStatus::Serving);
        metrics.set_ready(false);
        wait_for(&mut client, WireStatus::NotServing).await;

        let unknown = client.check(HealthCheckRequest { service: "maeum.v1.Nope".into() }).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn ready_before_serving_is_reported_at_once() {
        let metrics = Metrics::new("maeum_test");
        metrics.set_ready(true);
        let (addr, _stop) = start(&metrics).await;
        assert_eq!(check(&mut health_client(addr).await).await, WireStatus::Serving);
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let metrics = Metrics::new("maeum_test");
        metrics.set_ready(true);
        let (addr, stop) = start(&metrics).await;
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let mut client = health_client(addr).await;
        let mut watch = client.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(watch.next().await.unwrap().unwrap().status(), WireStatus::Serving);

        stop.send(()).unwrap();
        // Watchers hear NOT_SERVING before the listener closes.
        assert_eq!(watch.next().await.unwrap().unwrap().status(), WireStatus::NotServing);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the ops endpoint still accepts connections after shutdown");
    }
}
