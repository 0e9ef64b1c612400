//! Maeum coordinator library: the glue the `maeum-coordinator` binary runs.
//!
//! `home` (consortium files and enrolment), `storage` and `store` (the checksummed, sealed state database), `blobs` (content-
//! addressed models), `server` (gRPC fleet and control services), `rounds` (the round
//! orchestrator), `secagg` (one secure-aggregation session), `strategy` (server-side
//! aggregation), `audit` (the transparency log), `registry` (signed model
//! releases and promotions), `client` (the operator CLI), `console` (the read-only web
//! console), `demo` (the one-command local
//! federation).
#![forbid(unsafe_code)]

pub mod attack;
pub mod audit;
pub mod blobs;
pub mod ca_rollover;
pub mod certs;
pub mod client;
pub mod console;
pub mod demo;
pub mod doctor;
pub mod home;
pub mod metrics;
pub mod models;
pub mod registry;
pub mod release_key;
pub mod resume;
pub mod retention;
pub mod rounds;
pub mod secagg;
pub mod server;
pub mod signing_key;
pub mod storage;
pub mod store;
pub mod strategy;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;

use maeum_pki::tls;
use maeum_protocols::wire::pb;

/// Where `serve` runs the read-only web console ([`console`]).
#[derive(Debug, Clone, Copy)]
pub struct ConsoleOptions {
    pub listen: SocketAddr,
    /// HTTPS with operator certificates even on loopback (always on other addresses).
    pub tls: bool,
}

/// `maeum-coordinator serve`: the fleet and control services on one mTLS listener, and
/// the round orchestrator. Returns when `shutdown` resolves.
pub async fn serve(
    home: &Path,
    listen: Option<SocketAddr>,
    ops_listen: Option<SocketAddr>,
    console: Option<ConsoleOptions>,
    settings: server::Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let home = home::Home::new(home);
    let consortium = home.consortium()?;
    let listen = match listen {
        Some(a) => a,
        None => {
            let port = consortium.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(7443);
            SocketAddr::from(([0, 0, 0, 0], port))
        }
    };
    let coord = server::Coord::open(home.clone(), settings)?;
    // Before the fleet port opens: no site is handed a model the log does not name, and
    // sites resending revealed shares find their session.
    resume::log_cut_off_commits(&coord).context("logging rounds committed before a stop")?;
    resume::load(&coord);
    let server_cert =
        tls::ServerCertificate::new(&home.identity("server")?).context("HOME/server.pem and server.key")?;
    let config = tls::server_config(&home.trusted_cas_pem()?, &server_cert, coord.revocations.clone())
        .context("building the TLS configuration")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    info!(%listen, consortium = %consortium.name, "coordinator listening");
    let incoming = tls::incoming(listener, config, coord.revocations.clone());
    // One signal stops both listeners: the ops endpoint turns NOT_SERVING at once, the
    // gRPC server stops accepting and lets calls in flight finish.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    if let Some(addr) = ops_listen {
        maeum_runtime::ops::serve(addr, coord.metrics.ops.clone(), stopped()).await?;
    }
    if let Some(o) = console {
        console::serve(coord.clone(), &server_cert, o.listen, o.tls, stopped()).await?;
    }
    let orchestrator = tokio::spawn(rounds::orchestrate(coord.clone()));
    // Renewed or replaced, the server certificate is served from the next handshake on.
    let keeper = tokio::spawn(certs::keep_server_certificate(coord.clone(), server_cert));
    let stop_rounds = orchestrator.abort_handle();
    // `sites approve` works offline on HOME/sites; a key replaced there is revoked and
    // logged within a second, without a restart.
    let watcher = {
        let coord = coord.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let c = coord.clone();
                match tokio::task::spawn_blocking(move || c.sync_if_changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "syncing HOME/sites"),
                    Err(e) => tracing::warn!(error = %e, "syncing HOME/sites"),
                }
            }
        })
    };
    coord.metrics.audit_entries.set(i64::try_from(coord.audit.size()).unwrap_or(i64::MAX));
    coord.metrics.ops.set_ready(true);
    let metrics = coord.metrics.clone();
    let count_status = tower::util::MapResponseLayer::new(move |response: tonic::codegen::http::Response<_>| {
        metrics.count_status(response.headers());
        response
    });
    let fatal = coord.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => info!("stop requested: no new calls; finishing the ones in flight"),
            () = fatal.fatal.notified() => {
                // Nothing more is done with this state. Witnesses still get the
                // evidence for a while: each fetches the checkpoint on its next
                // heartbeat, and keeps it with its own (AUD-17).
                stop_rounds.abort();
                fatal.metrics.ops.set_ready(false);
                tokio::time::sleep(Duration::from_secs(10)).await;
                info!("stopping: this coordinator must not serve its state");
            }
        }
        let _ = stop_tx.send(true);
    });
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .max_frame_size(maeum_protocols::wire::H2_MAX_FRAME)
        .initial_stream_window_size(maeum_protocols::wire::H2_COORDINATOR_STREAM_WINDOW)
        .initial_connection_window_size(maeum_protocols::wire::H2_COORDINATOR_CONNECTION_WINDOW)
        .layer(count_status)
        .add_service(pb::fleet_server::FleetServer::new(server::Fleet(coord.clone())))
        .add_service(pb::control_server::ControlServer::new(server::Control(coord.clone())))
        .serve_with_incoming_shutdown(incoming, stopped())
        .await
        .context("serving");
    coord.metrics.ops.set_ready(false);
    orchestrator.abort();
    watcher.abort();
    keeper.abort();
    let fatal = server::lock(&coord.fatal_why).clone();
    if let Some(why) = fatal {
        // A rolled-back log gets no new signature.
        anyhow::bail!("{why}");
    }
    // Whatever the rounds left unsigned gets a checkpoint (every entry is already
    // committed; on a full disk the stop is still clean, the checkpoint waits for the
    // next start).
    if coord.audit.size() > 0
        && let Err(e) = coord.audit.checkpoint()
    {
        tracing::warn!(error = %format!("{e:#}"), "the final audit checkpoint could not be stored; the next start signs it");
    }
    info!("coordinator stopped");
    result
}
