//! Transfer throughput (issue 20, docs/benchmarks.md "Transfer throughput"): one site
//! downloads a model blob over the coordinator's real download path (mTLS, HTTP/2, gRPC,
//! chunk digests) and uploads one over the real upload path, against a raw TCP copy of
//! the same bytes on loopback, all in one run. A measurement, not an assertion of
//! speed (the machines are shared): run on demand,
//!
//! ```sh
//! MAEUM_TRIALS=1 cargo test -p maeum-e2e --test transfer -- --nocapture
//! ```
//!
//! `MAEUM_TRANSFER_MB` sets the size (default 400, the 100M-parameter model's),
//! `MAEUM_TRANSFER_RUNS` the number of timed runs of each (default 3; the median counts).

use std::io::{Read, Write};
use std::time::Instant;

use maeum_e2e::Federation;
use maeum_protocols::wire::{Digest, pb};

fn enabled() -> bool {
    let on = std::env::var("MAEUM_TRIALS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("transfer: a measurement; run it with MAEUM_TRIALS=1 (see the file's header)");
    }
    on
}

/// Bytes that do not compress and cost little to make.
fn payload(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw TCP copy on loopback, memory to memory, in seconds.
fn raw_copy(bytes: &std::sync::Arc<Vec<u8>>) -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let source = bytes.clone();
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(&source).expect("send");
    });
    let (mut stream, _) = listener.accept().expect("accept");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let k = stream.read(&mut buf).expect("receive");
        if k == 0 {
            break;
        }
        got += k;
    }
    sender.join().expect("sender");
    assert_eq!(got, bytes.len());
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn transfer_throughput_against_a_raw_tcp_copy() {
    if !enabled() {
        return;
    }
    let mb: usize = std::env::var("MAEUM_TRANSFER_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let bytes = std::sync::Arc::new(payload(mb << 20));
    let digest = Digest::of(&bytes);
    let mut fed = Federation::new(1);
    std::fs::write(fed.coordinator_home().join("blobs").join(digest.hex()), bytes.as_slice()).expect("blob");
    fed.start_coordinator();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let download = || -> f64 {
        rt.block_on(async {
            let mut c = maeum_e2e::site_client(&fed, "site-1").await;
            let t = Instant::now();
            let request = pb::DownloadRequest { digest: digest.hex(), offset: 0 };
            let mut stream = c.download(request).await.expect("download").into_inner();
            let mut got = 0usize;
            while let Some(chunk) = stream.message().await.expect("chunk") {
                got += chunk.data.len();
            }
            assert_eq!(got, bytes.len());
            t.elapsed().as_secs_f64()
        })
    };
    // The first download hashes the blob's pieces (kept for later ones) and warms the
    // page cache; it is not counted.
    download();
    let (mut raw, mut down) = (Vec::new(), Vec::new());
    let runs: usize = std::env::var("MAEUM_TRANSFER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for _ in 0..runs.max(1) {
        raw.push(raw_copy(&bytes));
        down.push(download());
    }
    let (raw, down) = (median(raw), median(down));
    let rate = |s: f64| bytes.len() as f64 / s / 1e6;
    eprintln!(
        "{mb} MiB: raw TCP copy memory → memory {raw:.3} s ({:.0} MB/s); download {down:.3} s ({:.0} MB/s) = {:.2}× the raw copy",
        rate(raw),
        rate(down),
        raw / down
    );
}
