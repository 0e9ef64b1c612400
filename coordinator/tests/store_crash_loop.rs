//! The storage trial of issue 19, on the real `Store`, `AuditLog` and seal, with both
//! engines behind the same interface:
//!
//! 1. **Crash loop.** A child process (this binary, `--child`) writes the coordinator's
//!    records in a loop (a job's read-modify-write, an audit entry, a checkpoint every
//!    seventh step, the job counter) and prints what each commit acknowledged. The
//!    parent kills it with SIGKILL at a random moment, reopens the state as `serve`
//!    would, and requires every acknowledged change to be there (and at most the one in
//!    flight beyond it).
//! 2. **Flipped bytes.** On a closed database, random bytes of the engine's files are
//!    flipped; opening must then refuse with an error, or read back exactly what was
//!    written. Reading back anything else (a silent rollback or a changed record) fails.
//!
//! `MAEUM_STORE_KILLS` (default 12 per engine) and `MAEUM_STORE_FLIPS` (default 12 per
//! engine and size) size it; `docs/benchmarks.md` records the 200-kill run.
//! `MAEUM_STORE_SEED` replays one run. The harness is this file's `main` (no libtest),
//! because the child is this same binary.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, SeedableRng};

use maeum_coordinator::audit::AuditLog;
use maeum_coordinator::storage::{Engine, Tree};
use maeum_coordinator::store::{JobRecord, JobState, Rounds, Store};
use maeum_protocols::job::JobSpec;
use maeum_tlog::Event;

const ORIGIN: &str = "maeum/trial";
const JOB: &str = "t-1";

fn engine_of(name: &str) -> Result<Engine> {
    match name {
        "sled" => Ok(Engine::Sled),
        "redb" => Ok(Engine::Redb),
        other => bail!("unknown engine {other}"),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn new_job() -> Result<JobRecord> {
    let toml = "name = \"trial\"\nlabels = [\"a\", \"b\"]\nrounds = 2\n";
    let mut job = JobRecord::submitted(JOB.into(), JobSpec::from_toml("trial.toml", toml)?, toml.into(), 1);
    job.state = JobState::Running;
    Ok(job)
}

/// What a state holds, in the counters the writer advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    attempts: u32,
    entries: u64,
    counter: u64,
}

fn counter(store: &Store) -> Result<u64> {
    Ok(store.db().get(Tree::Meta, b"job")?.map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))))
}

/// Opens the state as `serve` does (store, then audit log) and reads its progress.
fn open(state: &Path, engine: Engine, key: &[u8]) -> Result<(Store, AuditLog, Progress)> {
    let store = Store::open(state, engine)?;
    let log = AuditLog::open(store.db(), ORIGIN.into(), key, &[])?;
    let attempts = store.job(JOB, Rounds::All)?.map_or(0, |j| j.attempts_started);
    let progress = Progress { attempts, entries: log.size(), counter: counter(&store)? };
    Ok((store, log, progress))
}

/// The child: writes until killed, acknowledging each step on stdout.
fn child(engine: Engine, home: &Path) -> Result<()> {
    let key = std::fs::read(home.join("signing.key"))?;
    let (store, log, _) = open(&home.join("state"), engine, &key)?;
    if store.job(JOB, Rounds::All)?.is_none() {
        store.put_job(&new_job()?)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    loop {
        let (job, ()) = store.update_job(JOB, Rounds::All, |j| {
            j.attempts_started += 1;
            j.error = format!("attempt {} of a crash-loop trial {}", j.attempts_started, "x".repeat(200));
            Ok(())
        })?;
        let n = job.attempts_started;
        log.append(1_000 + i64::from(n), Event::JobFinished { job_id: format!("j-{n}"), state: "completed".into() })?;
        if n % 7 == 0 {
            log.checkpoint()?;
        }
        let c = store.next("job")?;
        writeln!(out, "ack {n} {} {c}", log.size())?;
        out.flush()?;
    }
}

fn parse_ack(line: &str) -> Option<Progress> {
    let mut it = line.strip_prefix("ack ")?.split(' ').map(|x| x.parse::<u64>().ok());
    Some(Progress { attempts: it.next()?? as u32, entries: it.next()??, counter: it.next()?? })
}

struct Tally {
    kills: usize,
    acknowledged: u64,
    refused_opens: usize,
    lost: usize,
    open_ms: Vec<f64>,
}

fn crash_loop(engine: Engine, name: &str, kills: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Tally> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().to_path_buf();
    let key = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key"))?;
    std::fs::write(home.join("signing.key"), key.as_ref())?;
    let exe = std::env::current_exe()?;
    let mut t = Tally { kills: 0, acknowledged: 0, refused_opens: 0, lost: 0, open_ms: Vec::new() };
    let mut before = Progress { attempts: 0, entries: 0, counter: 0 };
    for k in 0..kills {
        let mut child = Command::new(&exe)
            .args(["--child", name])
            .arg(&home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the writer")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(60)).context("the writer never became ready")?;
        ensure!(first == "ready", "writer said {first:?}");
        std::thread::sleep(Duration::from_micros(rng.random_range(0..150_000)));
        child.kill().context("SIGKILL")?;
        child.wait()?;
        reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let last = rx.try_iter().filter_map(|l| parse_ack(&l)).last().unwrap_or(before);
        t.kills += 1;
        t.acknowledged += u64::from(last.attempts - before.attempts);
        let started = Instant::now();
        match open(&home.join("state"), engine, key.as_ref()) {
            Err(e) => {
                t.refused_opens += 1;
                bail!("{name}: kill {k}: the state no longer opens: {e:#}");
            }
            Ok((_, _, now)) => {
                t.open_ms.push(started.elapsed().as_secs_f64() * 1e3);
                let ok = now.attempts >= last.attempts
                    && now.attempts <= last.attempts + 1
                    && now.entries >= last.entries
                    && now.counter >= last.counter;
                if !ok {
                    t.lost += 1;
                    bail!("{name}: kill {k}: acknowledged {last:?} but the state holds {now:?}");
                }
                before = now;
            }
        }
    }
    Ok(t)
}

/// Every record of every tree, for comparison.
fn dump(store: &Store) -> Result<Vec<Vec<Vec<u8>>>> {
    Tree::ALL.iter().map(|t| store.db().values(*t)).collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[derive(Default, Debug)]
struct Flips {
    refused: usize,
    /// Of `refused`: by a record's checksum, by the seal, by the audit log's own checks,
    /// and by the engine itself.
    by_checksum: usize,
    by_seal: usize,
    by_log: usize,
    by_engine: usize,
    /// The engines' own messages, shortened, for the record.
    engine_messages: std::collections::BTreeSet<String>,
    panicked: usize,
    intact: usize,
    silent: usize,
}

fn flips(engine: Engine, trials: usize, bytes: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Flips> {
    let dir = tempfile::tempdir()?;
    let reference = dir.path().join("reference");
    let key = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key"))?;
    let expected = {
        let (store, log, _) = open(&reference.join("state"), engine, key.as_ref())?;
        store.put_job(&new_job()?)?;
        for n in 0..60 {
            store.update_job(JOB, Rounds::All, |j| {
                j.attempts_started += 1;
                Ok(())
            })?;
            log.append(1_000 + n, Event::JobFinished { job_id: format!("j-{n}"), state: "completed".into() })?;
            if n % 7 == 0 {
                log.checkpoint()?;
            }
        }
        dump(&store)?
    };
    let mut out = Flips::default();
    for trial in 0..trials {
        let copy = dir.path().join(format!("trial-{trial}"));
        copy_dir(&reference, &copy)?;
        let state = copy.join("state");
        let targets = files(&state);
        for _ in 0..bytes {
            let file = &targets[rng.random_range(0..targets.len())];
            let mut data = std::fs::read(file)?;
            let at = rng.random_range(0..data.len());
            data[at] ^= 1 << rng.random_range(0..8);
            std::fs::write(file, data)?;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            open(&state, engine, key.as_ref()).and_then(|(s, _, _)| dump(&s))
        }));
        match result {
            Err(_) => out.panicked += 1,
            Ok(Err(e)) => {
                out.refused += 1;
                let text = format!("{e:#}");
                if text.contains("fails its checksum") {
                    out.by_checksum += 1;
                } else if text.contains("seal") || text.contains("rolled back") {
                    out.by_seal += 1;
                } else if text.contains("audit log") {
                    out.by_log += 1;
                } else {
                    out.by_engine += 1;
                    let cause = text.rsplit(": ").next().unwrap_or(&text);
                    let short: String = cause.chars().take(110).collect();
                    out.engine_messages.insert(short);
                }
            }
            Ok(Ok(found)) if found == expected => out.intact += 1,
            Ok(Ok(_)) => out.silent += 1,
        }
        std::fs::remove_dir_all(&copy)?;
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let engine = engine_of(args.get(2).context("--child ENGINE HOME")?)?;
        return child(engine, Path::new(args.get(3).context("--child ENGINE HOME")?));
    }
    if args.iter().skip(1).any(|a| a == "--list") {
        println!("store_crash_loop: test");
        return Ok(());
    }
    let seed = std::env::var("MAEUM_STORE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("store_crash_loop: seed {seed} (MAEUM_STORE_SEED replays it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let kills = env_usize("MAEUM_STORE_KILLS", 12);
    let trials = env_usize("MAEUM_STORE_FLIPS", 12);
    // Panics of the engines' own recovery are caught and counted; keep them quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for name in ["sled", "redb"] {
        let engine = engine_of(name)?;
        let started = Instant::now();
        let t = crash_loop(engine, name, kills, &mut rng)?;
        let mean = t.open_ms.iter().sum::<f64>() / t.open_ms.len().max(1) as f64;
        println!(
            "{name}: {} kills in {:.1} s, {} commits acknowledged, {} refused opens, {} lost, mean reopen {mean:.1} ms",
            t.kills,
            started.elapsed().as_secs_f64(),
            t.acknowledged,
            t.refused_opens,
            t.lost
        );
        for bytes in [1, 64] {
            let f = flips(engine, trials, bytes, &mut rng)?;
            println!(
                "{name}: {trials} trials of {bytes} flipped byte(s): {} refused with an error ({} by a checksum, {} by \
                 the seal, {} by the audit log, {} by the engine), {} by a panic, {} read back intact, {} silently \
                 different",
                f.refused, f.by_checksum, f.by_seal, f.by_log, f.by_engine, f.panicked, f.intact, f.silent
            );
            for m in f.engine_messages.iter().take(3) {
                println!("  {name} engine error: {m}");
            }
            if f.silent > 0 {
                failures.push(format!(
                    "{name}: {} of {trials} trials with {bytes} flipped bytes read back changed",
                    f.silent
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    println!("test result: ok. storage trial passed");
    Ok(())
}
