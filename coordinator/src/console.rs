//! The read-only web console (`serve --console ADDR`, `demo --serve-console`): jobs with
//! their round charts, sites, releases with their cards, and the audit log, rendered on
//! the server by `maeum-report` from what the coordinator already records. Pages update
//! in place every 2 s (the page's script asks for its `<main>` again).
//!
//! **Access.** Off unless asked for. On a loopback address it serves plain HTTP to this
//! machine only (and answers only requests whose `Host` names loopback, so a web page
//! elsewhere cannot reach it through DNS rebinding). On any other address, or with
//! `--console-tls`, it serves HTTPS with the coordinator's certificate and requires a
//! client certificate of the consortium CA whose identity is an operator
//! (`maeum://operator/NAME`); a site's certificate gets a 403 and nothing else.
//!
//! **What it shows.** Only what the coordinator legitimately holds: sums over sites
//! (federated evaluation, participation counts), names of who took part, refused or
//! dropped, and what the audit log records. No per-site metric exists here to show.
//!
//! Every request is a GET; nothing here changes state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use tokio::io::AsyncWriteExt as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected as _;
use tracing::{info, warn};

use maeum_pki::identity::Role;
use maeum_pki::tls::{self, PeerStream};
use maeum_report::card::{self as cardview, Standing};
use maeum_report::chart::num;
use maeum_report::{FRAGMENT_HEADER, Markup, Page, Tone, badge, duration, short_digest, time};
use maeum_tlog::entry::{Entry, Event};
use maeum_tlog::release::{self, CardEvaluation, ModelCard};
use maud::html;

use crate::server::Coord;
use crate::store::JobRecord;

mod pages;
use pages::*;

const NAV: &[(&str, &str)] =
    &[("/", "Overview"), ("/jobs", "Jobs"), ("/sites", "Sites"), ("/releases", "Releases"), ("/audit", "Audit log")];

/// Entries the audit page lists at most (newest first; the search narrows them).
const AUDIT_PAGE: usize = 200;

/// How the console is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Plain HTTP on a loopback address.
    Loopback,
    /// HTTPS; only operator certificates of the consortium CA.
    OperatorTls,
}

/// A console that is listening.
#[derive(Debug, Clone)]
pub struct Console {
    pub addr: SocketAddr,
    pub access: Access,
}

impl Console {
    /// The address to open.
    pub fn url(&self) -> String {
        let scheme = if self.access == Access::Loopback { "http" } else { "https" };
        format!("{scheme}://{}/", self.addr)
    }
}

#[derive(Clone)]
struct Shared {
    coord: Arc<Coord>,
    /// For loopback HTTP: the port a `Host` header must name.
    loopback_port: Option<u16>,
    csp: HeaderValue,
}

/// Starts the console on `listen` (TLS when `tls` or when `listen` is not loopback);
/// it stops when `stop` completes.
pub async fn serve(
    coord: Arc<Coord>,
    server_cert: &Arc<tls::ServerCertificate>,
    listen: SocketAddr,
    tls: bool,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Console> {
    let access = if tls || !listen.ip().is_loopback() { Access::OperatorTls } else { Access::Loopback };
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the console on {listen}"))?;
    let addr = listener.local_addr().context("reading the console's address")?;
    let script_hash =
        maeum_tlog::base64(ring::digest::digest(&ring::digest::SHA256, maeum_report::LIVE_JS.as_bytes()).as_ref());
    let csp = HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; connect-src 'self'; \
         img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ))
    .context("the console's content security policy")?;
    let shared =
        Shared { coord: coord.clone(), loopback_port: (access == Access::Loopback).then_some(addr.port()), csp };
    let app = Router::new().fallback(handle).with_state(shared);
    match access {
        Access::Loopback => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    warn!(error = %e, "console stopped");
                }
            });
        }
        Access::OperatorTls => {
            let home = &coord.home;
            let mut config = (*tls::server_config(&home.trusted_cas_pem()?, server_cert, coord.revocations.clone())
                .context("the console's TLS configuration")?)
            .clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let incoming = tls::incoming(listener, Arc::new(config), coord.revocations.clone());
            let listener = OperatorsOnly { incoming: Box::pin(incoming), addr };
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    warn!(error = %e, "console stopped");
                }
            });
        }
    }
    let console = Console { addr, access };
    info!(url = %console.url(), access = ?access, "console listening (read-only)");
    Ok(console)
}

/// The URLs a coordinator's log announces for its console (`console listening
/// url=…`), in order: one per start. The demo and the tests read it from there, since
/// `--console 127.0.0.1:0` picks the port.
pub fn urls_in_log(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("console listening"))
        .filter_map(|l| {
            let at = l.find("url=")? + 4;
            Some(l[at..].split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// The TLS listener: hands axum only connections whose client certificate is an
/// operator's; others get a 403 and are closed.
struct OperatorsOnly {
    incoming: Pin<Box<dyn Stream<Item = io::Result<PeerStream>> + Send>>,
    addr: SocketAddr,
}

impl axum::serve::Listener for OperatorsOnly {
    type Io = PeerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (PeerStream, SocketAddr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let info = stream.connect_info();
                    if info.peer.role == Role::Operator {
                        return (stream, info.remote);
                    }
                    warn!(remote = %info.remote, peer = %info.peer, "console: refused a certificate that is not an operator's");
                    tokio::spawn(refuse(stream, info.peer.to_string()));
                }
                Some(Err(e)) => warn!(error = %e, "console: accepting a connection failed"),
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

async fn refuse(mut stream: PeerStream, peer: String) {
    let body =
        format!("The console needs an operator certificate of this consortium; this connection presented {peer}.\n");
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

fn plain(status: StatusCode, text: &str) -> Response {
    let mut r = Response::new(Body::from(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn handle(State(s): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "the console is read-only: GET only");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if let Some(port) = s.loopback_port {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let allowed = [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")];
        if !allowed.iter().any(|a| a == host) {
            return plain(StatusCode::MISDIRECTED_REQUEST, "this console answers only on its loopback address");
        }
    }
    let fragment = headers.contains_key(FRAGMENT_HEADER);
    let (coord, path, query) = (s.coord.clone(), uri.path().to_owned(), uri.query().unwrap_or("").to_owned());
    let rendered = tokio::task::spawn_blocking(move || render(&coord, &path, &query)).await;
    let (status, view) = match rendered {
        Ok(Ok(Some(view))) => (StatusCode::OK, view),
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            View::new(
                "Not found",
                "",
                html! { p { "There is no such page. " a href="/" { "Back to the overview." } } },
            ),
        ),
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), path = %uri.path(), "console: rendering a page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                View::new(
                    "Error",
                    "",
                    html! { p.alert { "This page could not be made; the coordinator's log says why." } },
                ),
            )
        }
        Err(e) => {
            warn!(error = %e, "console: the page task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                View::new("Error", "", html! { p.alert { "This page could not be made." } }),
            )
        }
    };
    let current = NAV
        .iter()
        .rev()
        .find(|(href, _)| uri.path() == *href || (*href != "/" && uri.path().starts_with(href)))
        .map_or("", |n| n.0);
    let page = Page {
        title: &view.title,
        subtitle: &view.subtitle,
        nav: NAV,
        current,
        live: true,
        generated_ms: maeum_runtime::runtime::now_ms(),
        generator: concat!("maeum-coordinator ", env!("CARGO_PKG_VERSION")),
        body: view.body,
    };
    let text = if fragment { page.fragment() } else { page.render() };
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CONTENT_SECURITY_POLICY, s.csp.clone());
    r
}

/// A page's title, subtitle and body.
struct View {
    title: String,
    subtitle: String,
    body: Markup,
}

impl View {
    fn new(title: &str, subtitle: &str, body: Markup) -> View {
        View { title: title.into(), subtitle: subtitle.into(), body }
    }
}

fn query_param(query: &str, name: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.chars().take(200).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_decode_and_stay_short() {
        assert_eq!(query_param("q=hospital+a%26b&kind=x", "q"), "hospital a&b");
        assert_eq!(query_param("kind=round_started", "q"), "");
        assert_eq!(query_param(&format!("q={}", "a".repeat(500)), "q").len(), 200);
    }

    #[test]
    fn the_log_names_each_start_s_url() {
        let log = "2026 INFO console listening (read-only) url=http://127.0.0.1:4100/ access=Loopback\nother\n\
                   2026 INFO console listening (read-only) url=https://127.0.0.1:4200/ access=OperatorTls\n";
        assert_eq!(urls_in_log(log), ["http://127.0.0.1:4100/", "https://127.0.0.1:4200/"]);
        assert!(urls_in_log("no console here").is_empty());
    }

    #[test]
    fn refusals_and_failures_are_marked() {
        let e = Event::JobDecision { job_id: "j".into(), site: "s".into(), accepted: false, reason: "no".into() };
        assert!(entry_is_bad(&e));
        assert!(!entry_is_bad(&Event::JobFinished { job_id: "j".into(), state: "completed".into() }));
    }
}
