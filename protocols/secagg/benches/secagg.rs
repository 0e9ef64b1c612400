//! Secure-aggregation costs: `cargo bench -p maeum-protocols --bench secagg [-- --quick]`
//! (`--only-n 50 --only-m 1e7` runs just the matching rows; `--budget S` runs rows
//! estimated to take up to S seconds, 60 by default).
//!
//! Runs whole in-memory sessions with the production identity adapter (ECDSA P-256
//! signatures) and prints a Markdown table:
//! - client: one party's time for every stage (key generation, advertise, share keys,
//!   masked input including masking all M words, consistency, unmask);
//! - server: every receive/close call, the relaying of shares, the fold of the
//!   surviving masked inputs and `finish` (reconstruction and unmasking);
//! - upload per party: the masked input (4·M bytes) plus the stage messages' fields
//!   (without protobuf framing).
//!
//! Dropouts happen after the share-keys stage (the costly case for the server: it must
//! reconstruct the dropped parties' mask keys and remove their pair masks with every
//! surviving neighbour). The other parties' masking is simulated in parallel threads,
//! chunk by chunk, and is not timed. Also printed: raw PRG throughput and the plaintext
//! baseline (summing N f32 vectors into an f64 accumulator, as the coordinator does
//! without secure aggregation).

use std::time::{Duration, Instant};

use maeum_pki::identity::site_request;
use maeum_secagg::graph::Graph;
use maeum_secagg::prg::MaskStream;
use maeum_secagg::sign::{EcdsaSigner, SessionVerifier};
use maeum_secagg::{
    AdvertiseKeys, Client, Masker, Participant, Server, Session, SessionParams, ShareKeys, SurvivorSignature,
    UnmaskShares,
};

/// Words per chunk when masking and folding.
const CHUNK: usize = 1 << 18;
/// Configurations estimated to take longer than this are skipped.
const BUDGET_S: f64 = 60.0;

#[derive(Clone, Copy)]
struct Config {
    n: u16,
    degree: u16,
    m: u64,
    dropout_pct: u32,
}

struct Measured {
    t: u16,
    dropped: usize,
    client: Duration,
    client_mask: Duration,
    server: Duration,
    server_fold: Duration,
    finish: Duration,
    finish_cpu: Option<f64>,
    /// Keystreams `finish` regenerated ([`maeum_secagg::Seeds::streams`]).
    streams: usize,
    upload: u64,
    exact: bool,
}

/// The process's user + system CPU seconds (Linux; assumes 100 clock ticks a second).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Party `p`'s input word `i` (cheap to generate, so the expected sum can be checked).
fn input_word(p: u16, i: u64) -> u32 {
    (i as u32).wrapping_mul(0x9e37_79b1) ^ u32::from(p).wrapping_mul(0x85eb_ca6b).rotate_left(7)
}

fn fill_input(p: u16, start: u64, out: &mut [u32]) {
    for (k, w) in out.iter_mut().enumerate() {
        *w = input_word(p, start + k as u64);
    }
}

struct Identities {
    signers: Vec<EcdsaSigner<ring::rand::SystemRandom>>,
}

impl Identities {
    fn new(n: usize) -> Identities {
        let signers = (1..=n)
            .map(|i| {
                let (key, _csr) = site_request(&format!("site-{i}")).expect("site key");
                EcdsaSigner::from_pkcs8_pem(key.expose(), ring::rand::SystemRandom::new()).expect("signer")
            })
            .collect();
        Identities { signers }
    }
}

fn session(ids: &Identities, n: u16, degree: u16, m: u64) -> Session {
    let group = if degree == 0 { usize::from(n) } else { usize::from(degree) + 1 };
    Session {
        consortium: "bench".into(),
        job_id: "bench-job".into(),
        round: 1,
        attempt: 0,
        participants: (1..=n)
            .map(|i| Participant {
                index: i,
                site_id: format!("site-{i}"),
                identity_key: ids.signers[usize::from(i) - 1].public_key(),
            })
            .collect(),
        params: SessionParams {
            threshold: SessionParams::default_threshold(group),
            degree,
            vector_len: m,
            clip: 1.0,
            max_weight: 1000,
        },
        binding: [9; 32],
    }
}

/// Parties dropped after sharing keys: the highest indices, skipping any whose loss
/// would leave some neighbourhood with fewer than t revealing holders (with SecAgg+ a
/// random 20% could; the round would then fail with SA-05).
fn dropouts(s: &Session, g: &Graph, want: usize) -> Vec<u16> {
    let n = s.n() as u16;
    let t = usize::from(s.params.threshold);
    let mut dropped: Vec<u16> = Vec::new();
    for d in (2..=n).rev() {
        if dropped.len() == want {
            break;
        }
        let trial: Vec<u16> = dropped.iter().copied().chain([d]).collect();
        let ok = (1..=n).all(|p| g.holders(p).iter().filter(|h| !trial.contains(h)).count() >= t)
            && n as usize - trial.len() >= t;
        if ok {
            dropped = trial;
        }
    }
    dropped.sort_unstable();
    dropped
}

fn advertise_bytes(m: &AdvertiseKeys) -> u64 {
    (32 + 2 + 32 + 32 + 32 + m.signature.len()) as u64
}

fn share_bytes(m: &ShareKeys) -> u64 {
    (32 + 2 + 32 + m.shares.iter().map(|s| 4 + s.ciphertext.len()).sum::<usize>()) as u64
}

fn signature_bytes(m: &SurvivorSignature) -> u64 {
    (32 + 2 + m.signature.len()) as u64
}

fn unmask_bytes(m: &UnmaskShares) -> u64 {
    (32 + 2 + 34 * (m.self_mask_shares.len() + m.mask_key_shares.len())) as u64
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *acc += start.elapsed();
    out
}

fn run(ids: &Identities, cfg: Config) -> Measured {
    let s = session(ids, cfg.n, cfg.degree, cfg.m);
    let n = cfg.n;
    let t = s.params.threshold;
    let want = (usize::from(n) * cfg.dropout_pct as usize).div_ceil(100);
    let verifier = SessionVerifier::new(&s);
    let signer = |i: u16| &ids.signers[usize::from(i) - 1];
    let (mut client_t, mut mask_t, mut server_t, mut fold_t) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut upload = 4 * cfg.m;

    let mut server = timed(&mut server_t, || Server::new(s.clone()).expect("server"));
    let mut clients: Vec<Client> = (1..=n)
        .map(|i| {
            let mut seed = [0x42; 32];
            seed[..2].copy_from_slice(&i.to_be_bytes());
            if i == 1 {
                timed(&mut client_t, || Client::new(s.clone(), i, seed))
            } else {
                Client::new(s.clone(), i, seed)
            }
            .expect("client")
        })
        .collect();

    // Stage 1.
    for (k, c) in clients.iter_mut().enumerate() {
        let i = k as u16 + 1;
        let msg = if i == 1 { timed(&mut client_t, || c.advertise(signer(i))) } else { c.advertise(signer(i)) }
            .expect("advertise");
        if i == 1 {
            upload += advertise_bytes(&msg);
        }
        timed(&mut server_t, || server.receive_advertise(msg, &verifier)).expect("receive advertise");
    }
    let roster = timed(&mut server_t, || server.close_advertise()).expect("roster");

    // Stage 1b (SecAgg+ only): every party reveals its graph nonce; the graph is drawn.
    let mut reveals = None;
    let graph = if server.needs_graph_reveal() {
        for (k, c) in clients.iter_mut().enumerate() {
            let i = k as u16 + 1;
            let msg = if i == 1 {
                timed(&mut client_t, || c.reveal_graph(&roster, &verifier))
            } else {
                c.reveal_graph(&roster, &verifier)
            }
            .expect("reveal graph nonce");
            if i == 1 {
                upload += 32 + 2 + 32;
            }
            timed(&mut server_t, || server.receive_reveal(msg)).expect("receive reveal");
        }
        let r = timed(&mut server_t, || server.close_reveals()).expect("close reveals");
        let nonces: Vec<(u16, [u8; 32])> = r.reveals.iter().map(|x| (x.index, x.nonce)).collect();
        reveals = Some(r);
        Graph::new(s.n(), s.params.degree, &maeum_secagg::crypto::graph_seed(&s.id(), &nonces))
    } else {
        Graph::new(s.n(), 0, &[0; 32])
    };
    let dropped = dropouts(&s, &graph, want);
    let survivors: Vec<u16> = (1..=n).filter(|p| !dropped.contains(p)).collect();

    // Stage 2: everyone shares keys.
    for (k, c) in clients.iter_mut().enumerate() {
        let i = k as u16 + 1;
        let msg = if i == 1 {
            timed(&mut client_t, || c.share_keys(&roster, reveals.as_ref(), &verifier))
        } else {
            c.share_keys(&roster, reveals.as_ref(), &verifier)
        }
        .expect("share keys");
        if i == 1 {
            upload += share_bytes(&msg);
        }
        timed(&mut server_t, || server.receive_shares(msg)).expect("receive shares");
    }
    timed(&mut server_t, || server.close_shares()).expect("close shares");

    // Stage 3: party 1 alone (timed), then the other survivors in parallel.
    let shares = timed(&mut server_t, || server.shares_for(1)).expect("shares for 1");
    let mut masker = timed(&mut client_t, || clients[0].masked_input(&shares)).expect("masker");
    let mut buf = vec![0u32; CHUNK];
    let mut at = 0u64;
    while at < cfg.m {
        let len = (cfg.m - at).min(CHUNK as u64) as usize;
        let words = &mut buf[..len];
        fill_input(1, at, words);
        timed(&mut mask_t, || masker.mask(words)).expect("mask");
        timed(&mut fold_t, || server.fold_masked(1, words)).expect("fold");
        at += len as u64;
    }
    timed(&mut mask_t, || masker.finish()).expect("finish masking");
    timed(&mut server_t, || server.finish_masked(1)).expect("finish input");
    drop(buf);

    let mut others: Vec<(u16, Masker, Vec<u32>)> = survivors
        .iter()
        .filter(|&&i| i != 1)
        .map(|&i| {
            let shares = timed(&mut server_t, || server.shares_for(i)).expect("shares for");
            let masker = clients[usize::from(i) - 1].masked_input(&shares).expect("masker");
            (i, masker, vec![0u32; CHUNK])
        })
        .collect();
    let threads = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let per = others.len().div_ceil(threads).max(1);
    let mut at = 0u64;
    while at < cfg.m {
        let len = (cfg.m - at).min(CHUNK as u64) as usize;
        std::thread::scope(|scope| {
            for group in others.chunks_mut(per) {
                scope.spawn(move || {
                    for (i, masker, buf) in group {
                        fill_input(*i, at, &mut buf[..len]);
                        masker.mask(&mut buf[..len]).expect("mask");
                    }
                });
            }
        });
        for (i, _, buf) in &others {
            timed(&mut fold_t, || server.fold_masked(*i, &buf[..len])).expect("fold");
        }
        at += len as u64;
    }
    for (i, masker, _) in others {
        masker.finish().expect("finish masking");
        timed(&mut server_t, || server.finish_masked(i)).expect("finish input");
    }
    let set = timed(&mut server_t, || server.close_masked()).expect("survivors");

    // Stage 4.
    for &i in &survivors {
        let c = &mut clients[usize::from(i) - 1];
        let msg = if i == 1 {
            timed(&mut client_t, || c.consistency(&set, signer(i)))
        } else {
            c.consistency(&set, signer(i))
        }
        .expect("consistency");
        if i == 1 {
            upload += signature_bytes(&msg);
        }
        timed(&mut server_t, || server.receive_survivor_signature(msg, &verifier)).expect("receive signature");
    }
    let proof = timed(&mut server_t, || server.close_consistency()).expect("proof");

    // Stage 5.
    for &i in &survivors {
        let c = &mut clients[usize::from(i) - 1];
        let msg =
            if i == 1 { timed(&mut client_t, || c.unmask(&proof, &verifier)) } else { c.unmask(&proof, &verifier) }
                .expect("unmask");
        if i == 1 {
            upload += unmask_bytes(&msg);
        }
        timed(&mut server_t, || server.receive_unmask(msg)).expect("receive unmask");
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut streams = 0;
    // Unmasked in parallel, as the coordinator does (the core itself is single-threaded).
    let outcome = server.finish().expect("finish").outcome_with(|sum, seeds| {
        streams = seeds.streams();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = sum.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (i, words) in sum.chunks_mut(per).enumerate() {
                scope.spawn(move || seeds.unmask(words, (i * per) as u64));
            }
        });
    });
    let finish = start.elapsed();
    let finish_cpu = cpu0.and_then(|a| cpu_seconds().map(|b| b - a));

    let exact = outcome
        .sum
        .iter()
        .enumerate()
        .all(|(k, &w)| w == survivors.iter().fold(0u32, |acc, &p| acc.wrapping_add(input_word(p, k as u64))))
        && outcome.survivors == survivors;
    Measured {
        t,
        dropped: dropped.len(),
        client: client_t + mask_t,
        client_mask: mask_t,
        server: server_t + fold_t + finish,
        server_fold: fold_t,
        finish,
        finish_cpu,
        streams,
        upload,
        exact,
    }
}

/// Seconds to sum `n` f32 vectors of `m` into an f64 accumulator.
fn plaintext_baseline(n: u16, m: u64) -> f64 {
    let v: Vec<f32> = (0..m).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut acc = vec![0f64; m as usize];
    let start = Instant::now();
    for _ in 0..n {
        for (a, x) in acc.iter_mut().zip(&v) {
            *a += f64::from(*x);
        }
        std::hint::black_box(&mut acc);
    }
    start.elapsed().as_secs_f64()
}

/// Words per second of one MaskStream (fill), single thread.
fn prg_words_per_second() -> f64 {
    let mut out = vec![0u32; 10_000_000];
    // Warm up (and fault in every page of the output first).
    MaskStream::new(&[9; 32]).fill(&mut out);
    let start = Instant::now();
    let mut s = MaskStream::new(&[7; 32]);
    for chunk in out.chunks_mut(CHUNK) {
        s.fill(chunk);
    }
    std::hint::black_box(&out);
    out.len() as f64 / start.elapsed().as_secs_f64()
}

/// A rough estimate of the configuration's wall time (seconds), from the PRG speed.
fn estimate(cfg: Config, prg: f64, cores: f64) -> f64 {
    let n = f64::from(cfg.n);
    let m = cfg.m as f64;
    let neighbours = if cfg.degree == 0 { n - 1.0 } else { f64::from(cfg.degree) };
    let dropped = (n * f64::from(cfg.dropout_pct) / 100.0).ceil();
    let survivors = n - dropped;
    let client = (neighbours + 1.0) * m / prg;
    let others = (survivors - 1.0) * (neighbours + 1.0) * m / (prg * cores * 0.6);
    let server = (survivors + dropped * neighbours.min(survivors)) * m / (prg * cores * 0.6);
    let setup = n * n * 2e-4;
    client + others + server + setup
}

fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only-n N` / `--only-m M`: run just the matching rows.
    let only = |flag: &str| -> Option<u64> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let (only_n, only_m) = (only("--only-n"), only("--only-m"));
    // `--budget S`: skip configurations estimated to take longer than S seconds.
    let budget = only("--budget").map_or(BUDGET_S, |s| s as f64);
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let (sizes, ms): (Vec<(u16, u16)>, Vec<u64>) = if quick {
        (vec![(5, 0), (10, 0)], vec![100_000, 1_000_000])
    } else {
        (vec![(5, 0), (10, 0), (20, 0), (50, 0), (50, 8)], vec![100_000, 1_000_000, 10_000_000])
    };
    println!("# Secure aggregation benchmark{}\n", if quick { " (--quick)" } else { "" });
    println!(
        "{cores} cores available (server unmasking and the simulated other parties use them; one client is timed alone).\n"
    );
    let prg = prg_words_per_second();
    println!(
        "PRG (ChaCha20 MaskStream::fill, one thread, 1e7 words): {:.2} GB/s ({:.0} Mwords/s)\n",
        prg * 4.0 / 1e9,
        prg / 1e6
    );
    let max_n = sizes.iter().map(|&(n, _)| usize::from(n)).max().unwrap_or(0);
    let ids = Identities::new(max_n);

    println!(
        "| N | k | t | M | dropped | client total s | of which masking s | server total s | of which fold s | finish s (CPU s) | keystreams | floor CPU s | CPU / floor | upload/party | plaintext sum s | exact |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut skipped = Vec::new();
    for &m in &ms {
        if only_m.is_some_and(|o| o != m) {
            continue;
        }
        for &(n, degree) in &sizes {
            if only_n.is_some_and(|o| o != u64::from(n)) {
                continue;
            }
            let plain = plaintext_baseline(n, m);
            for dropout_pct in [0, 20] {
                let cfg = Config { n, degree, m, dropout_pct };
                let est = estimate(cfg, prg, cores as f64);
                if est > budget {
                    skipped.push(format!("N={n} k={degree} M={m} dropout {dropout_pct}% (estimated {est:.0} s)"));
                    continue;
                }
                let r = run(&ids, cfg);
                let cpu = r.finish_cpu.map(|c| format!(" ({c:.2})")).unwrap_or_default();
                // The floor: generating every regenerated keystream once, at the PRG's
                // single-thread rate measured above.
                let floor = r.streams as f64 * m as f64 / prg;
                let ratio = r.finish_cpu.map_or("–".to_string(), |c| format!("{:.2}", c / floor));
                println!(
                    "| {n} | {degree} | {} | {m:.0e} | {} ({dropout_pct}%) | {:.3} | {:.3} | {:.3} | {:.3} | {:.3}{cpu} | {} | {floor:.2} | {ratio} | {} | {:.4} | {} |",
                    r.t,
                    r.dropped,
                    r.client.as_secs_f64(),
                    r.client_mask.as_secs_f64(),
                    r.server.as_secs_f64(),
                    r.server_fold.as_secs_f64(),
                    r.finish.as_secs_f64(),
                    r.streams,
                    fmt_bytes(r.upload),
                    plain,
                    if r.exact { "yes" } else { "NO" },
                );
                assert!(r.exact, "the unmasked sum is not the survivors' plain sum");
            }
        }
    }
    if !skipped.is_empty() {
        println!("\nSkipped (estimated over {budget:.0} s each; --budget S runs them):");
        for s in skipped {
            println!("- {s}");
        }
    }
    println!(
        "\nk = 0: every pair masks (SecAgg); k > 0: SecAgg+ k-regular graph, t of the k+1 holders.\n\
         Dropped parties leave after sharing keys. Upload = 4·M bytes of masked input + the\n\
         stage messages' fields (ECDSA P-256 signatures, sealed shares), without framing.\n\
         Plaintext sum = the coordinator adding N f32 vectors into an f64 accumulator.\n\
         Keystreams = the masks `finish` regenerates (survivors' self masks, and each dropped\n\
         party's pair masks with its surviving neighbours); floor = keystreams × M words at\n\
         the single-thread PRG rate above; CPU / floor = finish's CPU seconds over it (key\n\
         reconstruction and agreements are in the CPU, not in the floor)."
    );
}
