//! A WAN link between one site and the coordinator, emulated in user space: a TCP
//! relay on loopback that delays every byte by a one-way latency, holds each direction
//! to a bandwidth, and can go down (every connection cut, new ones refused) for a
//! while, at once or when the site has sent a given number of bytes (mid-upload).
//!
//! This kernel has no `netem` queueing discipline, so latency and outages cannot be
//! made by `tc`; a relay makes them for the site's TCP connections, which is what the
//! protocol sees. Packet loss is not emulated: TCP hides it as lower throughput, which a
//! lower bandwidth stands for.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What a link does to the bytes crossing it.
#[derive(Debug, Clone, Copy)]
pub struct Conditions {
    /// One way (the round trip is twice this).
    pub latency: Duration,
    /// Bits per second, each direction.
    pub bits_per_second: u64,
}

impl Conditions {
    /// A hospital WAN as issue 20 names it: 50 ms round trip, 100 Mbit/s.
    pub const HOSPITAL_WAN: Conditions =
        Conditions { latency: Duration::from_millis(25), bits_per_second: 100_000_000 };
}

/// What the link queues beyond the wire before the sender waits.
const QUEUE: Duration = Duration::from_millis(5);

#[derive(Default)]
struct State {
    /// The link is down until then (new connections are closed at once).
    down_until: Option<Instant>,
    /// Go down for this long once the site has sent this many bytes in all.
    cut_at: Option<(u64, Duration)>,
    /// The relays of the open connections (aborted when the link goes down).
    open: Vec<tokio::task::AbortHandle>,
}

struct Shared {
    to: SocketAddr,
    conditions: Conditions,
    state: Mutex<State>,
    /// Bytes the site sent through the link.
    sent: AtomicU64,
    /// Times the link went down.
    outages: AtomicU32,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn go_down(&self, for_: Duration) {
        let mut s = self.state();
        s.down_until = Some(Instant::now() + for_);
        for relay in s.open.drain(..) {
            relay.abort();
        }
        self.outages.fetch_add(1, Ordering::SeqCst);
    }
}

/// One emulated link, relaying `addr` → the coordinator while it lives.
pub struct Link {
    /// Where the site should dial (`HOST:PORT` on loopback).
    pub addr: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Link {
    /// A link to `to` (the coordinator's `HOST:PORT`) under `conditions`.
    pub fn new(to: &str, conditions: Conditions) -> Link {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the link's runtime");
        let to: SocketAddr = to.parse().expect("coordinator address");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("the link's port");
        let addr = listener.local_addr().expect("addr").to_string();
        let shared = Arc::new(Shared {
            to,
            conditions,
            state: Mutex::new(State::default()),
            sent: AtomicU64::new(0),
            outages: AtomicU32::new(0),
        });
        runtime.spawn(accept(listener, shared.clone()));
        Link { addr, shared, runtime: Some(runtime) }
    }

    /// Takes the link down for `for_`: open connections are cut, new ones refused.
    pub fn go_down(&self, for_: Duration) {
        self.shared.go_down(for_);
    }

    /// Takes the link down for `for_` once the site has sent `more` bytes from now.
    pub fn go_down_after_sending(&self, more: u64, for_: Duration) {
        let at = self.shared.sent.load(Ordering::SeqCst) + more;
        self.shared.state().cut_at = Some((at, for_));
    }

    /// Bytes the site has sent through the link.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// How many times the link went down.
    pub fn outages(&self) -> u32 {
        self.shared.outages.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((site, _)) = listener.accept().await {
        let down = shared.state().down_until.is_some_and(|t| Instant::now() < t);
        if down {
            drop(site);
            continue;
        }
        let Ok(coordinator) = TcpStream::connect(shared.to).await else { continue };
        let _ = (site.set_nodelay(true), coordinator.set_nodelay(true));
        let (site_r, site_w) = site.into_split();
        let (coord_r, coord_w) = coordinator.into_split();
        let up = tokio::spawn(relay(site_r, coord_w, shared.clone(), true));
        let down = tokio::spawn(relay(coord_r, site_w, shared.clone(), false));
        let mut s = shared.state();
        s.open.retain(|h| !h.is_finished());
        s.open.extend([up.abort_handle(), down.abort_handle()]);
    }
}

/// One direction of a connection: bytes leave when the bandwidth allows, and arrive
/// one latency later, in order.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    upstream: bool,
) {
    let Conditions { latency, bits_per_second } = shared.conditions;
    // The bandwidth-delay product and then some, so the pipe stays full.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    shared.state().open.push(writer.abort_handle());
    let mut free = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let serialise = Duration::from_nanos(n as u64 * 8 * 1_000_000_000 / bits_per_second.max(1));
        free = free.max(Instant::now()) + serialise;
        if tx.send((free + latency, buf[..n].to_vec())).await.is_err() {
            break;
        }
        // The sender waits for the wire as a real one would (a router queues a few
        // milliseconds; waiting for each 16 KB alone would meet the timer's 1 ms grain).
        if free > Instant::now() + QUEUE {
            tokio::time::sleep_until(free - QUEUE).await;
        }
        if upstream {
            let sent = shared.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            let cut = {
                let mut s = shared.state();
                match s.cut_at {
                    Some((at, for_)) if sent >= at => {
                        s.cut_at = None;
                        Some(for_)
                    }
                    _ => None,
                }
            };
            if let Some(for_) = cut {
                writer.abort();
                shared.go_down(for_);
                return;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
