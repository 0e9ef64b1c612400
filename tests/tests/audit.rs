//! The audit log end to end: sites witness (verify and cosign) every checkpoint of a
//! real job, prove their own part with inclusion proofs, and catch a coordinator that
//! shows one of them a forked log (that site then refuses all work until its admin
//! clears the evidence); the export of the real job survives no tampering.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, bin, run_ok};
use maeum_tlog::export::{Export, verify};
use maeum_tlog::unhex32;

#[path = "../../protocols/audit/tests/tamper/mod.rs"]
mod tamper;

const MIN: Duration = Duration::from_secs(60);

fn site(fed: &Federation, id: &str, args: &[&str]) -> Output {
    Command::new(bin("maeum-site"))
        .args(args)
        .arg("--home")
        .arg(fed.site_home(id))
        .output()
        .expect("running maeum-site")
}

fn audit_status(fed: &Federation, id: &str) -> serde_json::Value {
    let out = site(fed, id, &["audit", "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn witnessed(fed: &Federation, id: &str) -> u64 {
    audit_status(fed, id)["witnessed"]["size"].as_u64().unwrap_or(0)
}

/// Waits until every site has witnessed a checkpoint of at least `size`.
fn wait_witnessed(fed: &Federation, sites: &[&str], size: u64) {
    let until = Instant::now() + MIN;
    while sites.iter().any(|s| witnessed(fed, s) < size) {
        assert!(
            Instant::now() < until,
            "sites did not witness size {size}: {:?}\n--- coordinator log\n{}",
            sites.iter().map(|s| (s, witnessed(fed, s))).collect::<Vec<_>>(),
            fed.log_text("coordinator")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn export(fed: &Federation, to: &Path) -> Export {
    let out = fed.cli(&["audit", "export", "--out", to.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    Export::decode(&std::fs::read(to).expect("export file")).expect("export decodes")
}

fn log_key(fed: &Federation) -> [u8; 32] {
    let text = std::fs::read_to_string(fed.coordinator_home().join("signing.pub")).expect("signing.pub");
    unhex32(text.trim()).expect("signing.pub is hex")
}

#[test]
fn sites_witness_a_real_job_and_prove_their_part_and_its_export_resists_tampering() {
    let sites = ["site-1", "site-2", "site-3"];
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    for s in sites {
        fed.start_site(s);
    }
    let id = fed.submit("witnessed", 2, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");

    // The checkpoint signed when the job finished is witnessed by every site.
    let first = export(&fed, &fed.dir.path().join("first.json"));
    let finished = first
        .entries
        .iter()
        .rev()
        .find(|e| e.event.kind() == "job_finished")
        .map(|e| e.seq + 1)
        .expect("job_finished entry");
    wait_witnessed(&fed, &sites, finished);
    // Each export signs one more checkpoint; wait for two of them to be cosigned by
    // every site (whether the sites also cosigned checkpoints during the job depends on
    // timing), then export the final file.
    wait_witnessed(&fed, &sites, first.checkpoints.last().expect("checkpoint").size);
    let second = export(&fed, &fed.dir.path().join("second.json"));
    wait_witnessed(&fed, &sites, second.checkpoints.last().expect("checkpoint").size);
    let path = fed.dir.path().join("audit.json");
    let exported = export(&fed, &path);
    let key = log_key(&fed);
    let report = verify(&exported.encode(), Some(&key)).expect("the export verifies");
    assert_eq!(report.witnesses, sites);
    let cosigned_by_all = exported.checkpoints.iter().filter(|c| c.cosignatures.len() == 3).count();
    assert!(cosigned_by_all >= 2, "checkpoints cosigned by all three sites: {cosigned_by_all}\n{report:?}");
    println!(
        "real job export: {} bytes, {} entries, {} checkpoints, {} cosignatures",
        exported.encode().len(),
        report.entries,
        report.checkpoints,
        report.cosignatures
    );

    for s in sites {
        // Every site's witnessed checkpoint is one the final export extends.
        let cp = fed.dir.path().join(format!("{s}-checkpoint.json"));
        std::fs::write(&cp, run_ok(&mut site_cmd(&fed, s, &["audit", "checkpoint"])).stdout).expect("write");
        run_ok(Command::new(bin("maeum-audit")).arg("consistency").arg(&cp).arg(&path));
        // And its decisions, contributions and models are in the log, proven.
        let out = site(&fed, s, &["audit", "prove", "--json"]);
        assert!(out.status.success(), "{s} prove: {}", String::from_utf8_lossy(&out.stderr));
        let proof: serde_json::Value = serde_json::from_slice(&out.stdout).expect("prove json");
        let records = proof["records"].as_array().expect("records");
        let count = |kind: &str| records.iter().filter(|r| r["record"]["kind"] == kind).count();
        assert_eq!(count("decision"), 1, "{proof:#}");
        // One masked input per round, and one for the final evaluation (its counts).
        assert_eq!(count("contribution"), 3, "one masked input per round and the final evaluation: {proof:#}");
        // The initial model and round 1's result were trained on; the final model was evaluated.
        assert_eq!(count("model"), 3, "{proof:#}");
        assert!(records.iter().all(|r| r["entry"].is_u64()), "{proof:#}");
        assert!(proof["unrecorded_claims"].as_array().is_some_and(Vec::is_empty));
        let human = run_ok(&mut site_cmd(&fed, s, &["audit", "status"]));
        assert!(String::from_utf8_lossy(&human.stdout).contains("witnessed   checkpoint of size"));
    }

    // The exhaustive tamper test on this real job's export.
    let kinds = tamper::exhaustive(&exported, &key);
    let tried: usize = kinds.iter().map(|k| k.1).sum();
    println!("real job export: {tried} tamperings tried, all detected");
}

fn site_cmd(fed: &Federation, id: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("maeum-site"));
    c.args(args).arg("--home").arg(fed.site_home(id));
    c
}

/// The value of one series in the site's OpenMetrics text (`None` when absent).
fn metric(addr: &str, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The kinds of this site's journal lines for `job`, in order.
fn journal(fed: &Federation, id: &str, job: &str) -> Vec<String> {
    std::fs::read_to_string(fed.site_home(id).join("audit/journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["job_id"] == job)
        .map(|r| match r["kind"].as_str() {
            Some("decision") => format!("decision accepted={}", r["accepted"]),
            k => k.unwrap_or_default().to_owned(),
        })
        .collect()
}

const STOPPED: &str = "stopped: coordinator's audit log forked (see `maeum-site audit status`)";

#[test]
fn a_forked_view_shown_to_one_site_is_caught_by_its_witness_which_stops_until_cleared() {
    // Jobs here need all three sites (so that no site's policy sees a session of two);
    // the test federation's sites accept jobs on their own.
    let mut fed = Federation::new(3);
    // The coordinator shows site-3 a log whose last entry differs from everyone else's,
    // at the same size, validly signed: a dishonest operator's forked view.
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_TEST_FORK_VIEW", "site-3")]);
    let ops = maeum_e2e::ports::reserve();
    fed.start_site("site-1");
    fed.start_site("site-2");
    fed.start_site_with("site-3", &[("MAEUM_OPS_LISTEN", &ops)]);
    wait_witnessed(&fed, &["site-1", "site-2"], 1);
    let until = Instant::now() + MIN;
    let status = loop {
        let out = site(&fed, "site-3", &["audit", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["fork"].is_string() {
            assert!(!out.status.success(), "audit status exits non-zero after a fork");
            break v;
        }
        assert!(Instant::now() < until, "site-3 did not catch the fork:\n{}", fed.log_text("site-3"));
        std::thread::sleep(Duration::from_millis(200));
    };
    let why = status["fork"].as_str().unwrap_or_default();
    assert!(why.starts_with("AUD-16 FORK: two checkpoints of size"), "{why}");
    assert!(fed.log_text("site-3").contains("TWO DIFFERENT AUDIT LOGS"), "the site's log says so");
    let daemon = fed.site_status("site-3");
    assert!(daemon["audit"].as_str().unwrap_or_default().starts_with("FORK DETECTED"), "{daemon}");

    // The evidence: two checkpoints of one size, both signed by the log key. An auditor
    // checks it against the coordinator's export: the forked one does not extend it.
    let evidence: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fed.site_home("site-3").join("audit/fork-evidence.json")).expect("evidence"),
    )
    .expect("evidence is JSON");
    assert_eq!(evidence["error"].as_str(), Some(why));
    let path = fed.dir.path().join("audit.json");
    export(&fed, &path);
    let mut outcomes = Vec::new();
    for which in ["witnessed", "conflicting"] {
        let cp = fed.site_home("site-3").join(evidence[which].as_str().expect("file name"));
        let out = Command::new(bin("maeum-audit")).arg("consistency").arg(&cp).arg(&path).output().expect("run");
        outcomes.push((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    assert!(
        outcomes.iter().filter(|(ok, _)| *ok).count() == 1,
        "exactly one of the two checkpoints is the real log: {outcomes:?}"
    );
    assert!(outcomes.iter().any(|(ok, err)| !ok && err.contains("AUD-16")), "{outcomes:?}");

    // Sites that saw the real log are unaffected, and site-3 witnesses no more.
    for s in ["site-1", "site-2"] {
        assert!(site(&fed, s, &["audit", "status"]).status.success());
    }
    let frozen = std::fs::read(fed.site_home("site-3").join("audit/witnessed.jsonl")).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(std::fs::read(fed.site_home("site-3").join("audit/witnessed.jsonl")).unwrap_or_default(), frozen);

    // Site-3 stops working for the coordinator that lied to it: it says so locally, in
    // its heartbeat (the lead sees it) and in its metrics, and refuses the next job,
    // which needs all three sites and so never starts.
    let until = Instant::now() + MIN;
    while fed.site_status("site-3")["stage"] != STOPPED {
        assert!(Instant::now() < until, "site-3 did not stop: {}", fed.site_status("site-3"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = site(&fed, "site-3", &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(status["stopped"]["reason"].as_str(), Some(why), "{status:#}");
    assert!(status["stopped"]["clear"].as_str().unwrap_or_default().contains("audit clear"), "{status:#}");
    let text = String::from_utf8_lossy(&site(&fed, "site-3", &["status"]).stdout).into_owned();
    assert!(text.contains("STOPPED     this site refuses all work"), "{text}");
    assert!(fed.log_text("site-3").contains("THIS SITE HAS STOPPED WORKING FOR THE COORDINATOR"));
    assert_eq!(metric(&ops, "maeum_site_halted"), Some(1.0));
    let seen_by_lead = || {
        fed.cli_json(&["sites", "list"])
            .as_array()
            .and_then(|a| a.iter().find(|s| s["site_id"] == "site-3").map(|s| s["stage"].clone()))
    };
    assert_eq!(seen_by_lead(), Some(STOPPED.into()));
    let doctor = site(&fed, "site-3", &["doctor", "--json"]);
    assert!(!doctor.status.success());
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor json");
    let line = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "audit log")).cloned();
    let line = line.expect("audit log check");
    assert_eq!(line["level"], "fail", "{line}");
    assert!(line["fix"].as_str().unwrap_or_default().contains("maeum-site audit clear"), "{line}");

    let job = format!("{SMALL_MODEL}[train]\nepochs = 1\n");
    let refused = fed.submit("after-fork", 1, 3, &job);
    let decided = fed.wait_for(&refused, MIN, |j| j["decisions"].as_array().is_some_and(|d| d.len() == 3));
    let decisions = decided["decisions"].as_array().cloned().unwrap_or_default();
    let of = |s: &str| decisions.iter().find(|d| d["site"] == s).cloned().unwrap_or_default();
    assert_eq!(of("site-3")["accept"], false, "{decided:#}");
    assert!(of("site-3")["reason"].as_str().unwrap_or_default().contains("forked audit log"), "{decided:#}");
    assert_eq!((of("site-1")["accept"].clone(), of("site-2")["accept"].clone()), (true.into(), true.into()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fed.job(&refused)["state"], "pending", "two of three sites cannot run it");
    assert_eq!(journal(&fed, "site-3", &refused), ["decision accepted=false"]);
    assert!(fed.cli(&["jobs", "abort", &refused]).status.success());

    // A restart does not lift the stop; only the admin does, with a reason, after the
    // incident (here: the lead restarts the coordinator without the fault).
    assert!(fed.terminate_coordinator(MIN).is_some());
    let nothing = site(&fed, "site-3", &["audit", "clear", "--reason", " "]);
    assert!(!nothing.status.success(), "a reason is required");
    fed.start_coordinator();
    let before = fed.site_status("site-3")["pid"].clone();
    fed.kill_site("site-3");
    fed.start_site_with("site-3", &[("MAEUM_OPS_LISTEN", &ops)]);
    let until = Instant::now() + MIN;
    loop {
        let now = fed.site_status("site-3");
        if now["pid"] != before && now["stage"] == STOPPED && metric(&ops, "maeum_site_halted") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < until, "site-3 is not stopped after a restart: {now}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = site(&fed, "site-3", &["audit", "clear", "--reason", "evidence sent to the auditors (case 7)", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cleared: serde_json::Value = serde_json::from_slice(&out.stdout).expect("clear json");
    assert_eq!(cleared["evidence"].as_str(), Some(why));
    let kept = fed.site_home("site-3").join(cleared["moved_to"].as_str().expect("moved_to"));
    for f in ["fork-evidence.json", "fork-witnessed.checkpoint.json", "fork-conflicting.checkpoint.json"] {
        assert!(kept.join(f).is_file(), "{f} kept under {}", kept.display());
    }
    let again = site(&fed, "site-3", &["audit", "clear", "--reason", "twice"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("there is no fork evidence to clear"));

    // The running daemon resumes: it witnesses the (honest) log again and takes part.
    wait_witnessed(&fed, &["site-3"], 1);
    assert_ne!(fed.site_status("site-3")["stage"], STOPPED);
    assert_eq!(metric(&ops, "maeum_site_halted"), Some(0.0));
    let status = audit_status(&fed, "site-3");
    assert_eq!(status["cleared"][0]["reason"], "evidence sent to the auditors (case 7)", "{status:#}");
    let resumed = fed.submit("after-clear", 1, 3, &job);
    assert_eq!(fed.wait_job(&resumed, 3 * MIN)["state"], "completed");
    let mine = journal(&fed, "site-3", &resumed);
    assert!(mine.starts_with(&["decision accepted=true".to_owned()]), "{mine:?}");
    assert!(mine.contains(&"contribution".to_owned()), "{mine:?}");
}

/// Issue 22's walk: a coordinator restored from an older backup showed its witnesses a
/// log shorter than what they had cosigned, and nothing caught it until the log grew
/// past that size again (sites looped on "the log has N entries"). The coordinator now
/// answers a witness that knows a larger checkpoint with its latest signed one, and the
/// site keeps the two signed checkpoints as evidence (AUD-17) and stops. The witness's
/// request carries its checkpoint, signed by this log: the coordinator takes it as
/// proof that its state was rolled back, keeps it in the seal, stops serving, and
/// refuses to start on that state again (issue 19).
#[test]
fn a_coordinator_restored_from_an_older_backup_is_caught_as_a_rollback() {
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    wait_witnessed(&fed, &["site-1", "site-2", "site-3"], 1);
    // The backup: the coordinator's home as it is now.
    assert!(fed.terminate_coordinator(MIN).is_some_and(|s| s.success()), "the coordinator stops cleanly");
    let home = fed.coordinator_home();
    let backup = fed.dir.path().join("coordinator-backup");
    run_ok(Command::new("cp").arg("-a").arg(&home).arg(&backup));
    // The log grows past the backup, and every site witnesses that.
    fed.start_coordinator();
    std::thread::sleep(Duration::from_secs(3));
    let base = witnessed(&fed, "site-1");
    let id = fed.submit("grow", 1, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    wait_witnessed(&fed, &["site-1", "site-2", "site-3"], base + 5);
    assert!(fed.terminate_coordinator(MIN).is_some_and(|s| s.success()));
    // Restore the older home and start it: its log is shorter than what the sites saw.
    std::fs::remove_dir_all(&home).expect("removing the newer home");
    run_ok(Command::new("cp").arg("-a").arg(&backup).arg(&home));
    fed.start_coordinator();
    for s in ["site-1", "site-2", "site-3"] {
        let until = Instant::now() + MIN;
        let status = loop {
            let v = audit_status(&fed, s);
            if v["fork"].is_string() {
                break v;
            }
            assert!(Instant::now() < until, "{s} did not catch the rollback:\n{}", fed.log_text(s));
            std::thread::sleep(Duration::from_millis(200));
        };
        let why = status["fork"].as_str().unwrap_or_default();
        assert!(why.starts_with("AUD-17 checkpoint of size"), "{s}: {why}");
    }
    assert!(fed.log_text("coordinator").contains("the log was rolled back"), "the coordinator's log says so");
    // The coordinator stopped on its own (after letting the witnesses fetch the
    // evidence), with the reason, and does not start on this state again.
    let status = fed.terminate_coordinator(MIN).expect("the coordinator exits");
    assert!(!status.success(), "a rolled-back coordinator exits with an error");
    let log = fed.log_text("coordinator");
    assert!(log.contains("REFUSING TO SERVE") && log.contains("was rolled back"), "{log}");
    let stderr = fed.serve_refused();
    assert!(stderr.contains("cosigned a checkpoint of"), "{stderr}");
}
