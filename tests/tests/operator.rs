//! Operator mistakes that must not break the consortium (issue 22): a second key
//! approved under an existing site id, two daemons on one site home, a wrong
//! coordinator address, a mistyped `--home`, and `status` while the coordinator is away.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, bin, init_site, run_ok};
use maeum_tlog::export::{Export, verify};

const MIN: Duration = Duration::from_secs(60);

fn site(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("maeum-site")).args(args).arg("--home").arg(home).output().expect("running maeum-site")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Polls `cond` every 200 ms; panics with `what` and `context()` after a minute.
fn wait(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let until = Instant::now() + MIN;
    while !cond() {
        assert!(Instant::now() < until, "{what} did not happen in a minute\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn witnessed(home: &Path) -> u64 {
    let out = site(home, &["audit", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["witnessed"]["size"].as_u64().unwrap_or(0)
}

fn approve(fed: &Federation, request: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(bin("maeum-coordinator"))
        .args(["sites", "approve", "--site-id", "site-1", "--home"])
        .arg(fed.coordinator_home())
        .arg(request)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("running sites approve")
}

fn export(fed: &Federation, name: &str) -> (PathBuf, Export) {
    let to = fed.dir.path().join(name);
    let out = fed.cli(&["audit", "export", "--out", to.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "export: {}\n{}", text(&out), fed.log_text("coordinator"));
    (to.clone(), Export::decode(&std::fs::read(&to).expect("export file")).expect("export decodes"))
}

fn kinds(export: &Export, kind: &str) -> usize {
    export.entries.iter().filter(|e| e.event.kind() == kind).count()
}

/// A second home for site-1 with a new key (a reinstalled host, or a mistake).
fn new_key_home(fed: &Federation, name: &str) -> PathBuf {
    let home = fed.site_home(name);
    init_site(&home, "site-1", &fed.dir.path().join("data/site-1"));
    home
}

/// Exports (which signs a checkpoint), waits until the home witnessed it, then exports
/// again; the final export must verify, also with `maeum-audit verify`.
fn witnessed_export(fed: &Federation, home: &Path, name: &str) -> Export {
    let (_, first) = export(fed, &format!("first-{name}"));
    let size = first.checkpoints.last().map_or(0, |c| c.size);
    wait("witnessing", || witnessed(home) >= size, || fed.log_text("coordinator"));
    let (path, exported) = export(fed, name);
    verify(&exported.encode(), None).expect("the export verifies");
    run_ok(Command::new(bin("maeum-audit")).arg("verify").arg(&path));
    exported
}

#[test]
fn a_new_key_for_an_approved_site_needs_replace_which_revokes_the_old_one_and_keeps_the_log_verifiable() {
    let mut fed = Federation::new(1);
    fed.start_coordinator();
    fed.start_site("site-1");
    let old_home = fed.site_home("site-1");
    wait("site-1 witnessing", || witnessed(&old_home) > 0, || fed.log_text("coordinator"));
    let record = fed.coordinator_home().join("sites/site-1.pem");
    let approved = std::fs::read(&record).expect("site-1.pem");

    // The same request again: nothing changes, and it says so.
    let out = approve(&fed, &old_home.join("request.csr.pem"), &fed.dir.path().join("again.json"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already approved with this key"), "{}", text(&out));
    assert_eq!(std::fs::read(&record).expect("site-1.pem"), approved);

    // Another key under the same id: refused without --replace.
    let new_home = new_key_home(&fed, "site-1-new");
    let bundle = fed.dir.path().join("new.json");
    let out = approve(&fed, &new_home.join("request.csr.pem"), &bundle, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("already approved with another key") && text(&out).contains("--replace"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(&record).expect("site-1.pem"), approved);

    // With --replace: the running coordinator revokes the old key (its connection is cut
    // and its handshakes refused) and logs the replacement, without a restart.
    let out = approve(&fed, &new_home.join("request.csr.pem"), &bundle, &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("replaced the key of site site-1"), "{}", text(&out));
    wait(
        "the old key's refusal",
        || fed.log_text("coordinator").contains("was replaced by a new key and is revoked"),
        || fed.log_text("coordinator"),
    );
    wait(
        "the old daemon noticing",
        || fed.site_status("site-1")["connection"] != "connected",
        || fed.site_status("site-1").to_string(),
    );
    fed.kill_site("site-1");
    run_ok(Command::new(bin("maeum-site")).args(["enroll", "--home"]).arg(&new_home).arg(&bundle));
    fed.start_site("site-1-new");

    // The old key cosigned checkpoints before the replacement, the new one after it:
    // the export holds both certificates and verifies.
    let exported = witnessed_export(&fed, &new_home, "replaced.json");
    assert_eq!(kinds(&exported, "site_key_replaced"), 1);
    let replaced = exported.entries.iter().find(|e| e.event.kind() == "site_key_replaced").expect("entry");
    let line = format!("{:?}", replaced.event);
    assert!(line.contains("operator: \"lead\""), "{line}");
    assert_eq!(exported.witnesses.iter().filter(|w| w.site == "site-1").count(), 2);
    let timeline = run_ok(Command::new(bin("maeum-audit")).arg("show").arg(fed.dir.path().join("replaced.json")));
    assert!(String::from_utf8_lossy(&timeline.stdout).contains("site_key_replaced site=site-1"));

    // Approving the new request again is idempotent: no error, no new entry.
    let out = approve(&fed, &new_home.join("request.csr.pem"), &fed.dir.path().join("again2.json"), &[]);
    assert!(out.status.success() && text(&out).contains("already approved"), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(1500));
    let (_, again) = export(&fed, "again.json");
    assert_eq!((kinds(&again, "site_key_replaced"), kinds(&again, "site_approved")), (1, 1));
}

#[test]
fn a_home_with_two_keys_under_one_site_id_recovers_with_replace() {
    let mut fed = Federation::new(1);
    fed.start_coordinator();
    fed.start_site("site-1");
    let real = fed.site_home("site-1");
    wait("site-1 witnessing", || witnessed(&real) > 0, || fed.log_text("coordinator"));

    // The broken state as older versions made it: a second key's certificate written
    // over HOME/sites/site-1.pem (here by approving it in a copy of the lead's home).
    let copy = fed.dir.path().join("copy");
    std::fs::create_dir_all(&copy).expect("copy");
    for f in ["consortium.json", "ca.pem", "ca.key", "signing.pub", "operator.pem"] {
        std::fs::copy(fed.coordinator_home().join(f), copy.join(f)).expect("copy");
    }
    let stray = new_key_home(&fed, "stray");
    let bundle = fed.dir.path().join("stray.json");
    run_ok(
        Command::new(bin("maeum-coordinator"))
            .args(["sites", "approve", "--home"])
            .arg(&copy)
            .arg(stray.join("request.csr.pem"))
            .arg("--out")
            .arg(&bundle),
    );
    std::fs::copy(copy.join("sites/site-1.pem"), fed.coordinator_home().join("sites/site-1.pem")).expect("overwrite");
    run_ok(Command::new(bin("maeum-site")).args(["enroll", "--home"]).arg(&stray).arg(&bundle));
    fed.start_site("stray");
    wait(
        "the second key's approval",
        || fed.log_text("coordinator").contains("a second key approved by an older version"),
        || fed.log_text("coordinator"),
    );
    // Both keys witness as site-1; the export still verifies (it used to fail forever
    // with AUD-14 once the first key's certificate file was overwritten).
    let exported = witnessed_export(&fed, &stray, "broken.json");
    assert_eq!(kinds(&exported, "site_approved"), 2);

    // The recovery in the consortium-lead guide: approve the real site's request with
    // --replace; both old certificates are revoked, the real site re-enrols.
    let fresh = fed.dir.path().join("fresh.json");
    let out = approve(&fed, &real.join("request.csr.pem"), &fresh, &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    wait(
        "both old certificates' refusal",
        || {
            fed.site_status("stray")["connection"] != "connected"
                && fed.site_status("site-1")["connection"] != "connected"
        },
        || format!("{}\n{}", fed.site_status("stray"), fed.site_status("site-1")),
    );
    fed.kill_site("stray");
    fed.kill_site("site-1");
    run_ok(Command::new(bin("maeum-site")).args(["enroll", "--home"]).arg(&real).arg(&fresh));
    fed.start_site("site-1");
    let exported = witnessed_export(&fed, &real, "recovered.json");
    assert_eq!(kinds(&exported, "site_key_replaced"), 2, "one per replaced certificate");
    assert_eq!(exported.witnesses.iter().filter(|w| w.site == "site-1").count(), 3);
}

#[test]
fn a_second_daemon_on_one_home_exits_without_touching_it() {
    let mut fed = Federation::new(1);
    fed.start_coordinator();
    fed.start_site("site-1");
    wait("connection", || fed.site_status("site-1")["connection"] == "connected", || fed.log_text("site-1"));
    let first = fed.site_status("site-1")["pid"].as_u64().expect("pid");
    let home = fed.site_home("site-1");
    let out = Command::new(bin("maeum-site")).args(["run", "--home"]).arg(&home).output().expect("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running on the site home") && err.contains(&home.display().to_string()), "{err}");
    assert!(err.contains(&format!("pid {first}")), "{err}");
    assert_eq!(fed.site_status("site-1")["pid"].as_u64(), Some(first), "status.json is the first daemon's");
    assert_eq!(fed.site_status("site-1")["connection"], "connected");
}

/// A coordinator started by the test with its ops endpoint, killed on drop.
struct Coordinator(std::process::Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> String {
    maeum_e2e::ports::reserve()
}

fn point_at(home: &Path, address: &str) {
    let path = home.join("enrolment.json");
    let mut e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    e["coordinator_address"] = address.into();
    std::fs::write(&path, e.to_string()).expect("write");
}

fn doctor_coordinator_line(home: &Path) -> (bool, serde_json::Value) {
    let out = site(home, &["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor json");
    let line = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "coordinator").cloned());
    (out.status.success(), line.unwrap_or_default())
}

#[test]
fn a_wrong_coordinator_address_is_named_and_fails_the_doctor() {
    let fed = Federation::new(1);
    let ops = free_address();
    let _coordinator = Coordinator(
        Command::new(bin("maeum-coordinator"))
            .args(["serve", "--listen", &fed.address, "--ops-listen", &ops, "--home"])
            .arg(fed.coordinator_home())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("coordinator"),
    );
    let home = fed.site_home("site-1");
    wait("the coordinator", || doctor_coordinator_line(&home).0, || text(&site(&home, &["doctor"])));

    // The ops port answers HTTP, not TLS.
    point_at(&home, &ops);
    let (ok, line) = doctor_coordinator_line(&home);
    assert!(!ok, "{line}");
    assert_eq!(line["level"], "fail", "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("does not speak TLS") && detail.contains(&ops), "{line}");
    assert!(line["fix"].as_str().unwrap_or_default().contains("enrolment.json"), "{line}");
    let mut daemon = Coordinator(
        Command::new(bin("maeum-site"))
            .args(["run", "--home"])
            .arg(&home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("site"),
    );
    wait(
        "the site's status",
        || fed.site_status("site-1")["last_error"].as_str().unwrap_or_default().contains("does not speak TLS"),
        || fed.site_status("site-1").to_string(),
    );
    assert!(fed.site_status("site-1")["last_error"].as_str().unwrap_or_default().contains(&ops));
    let _ = daemon.0.kill();

    // Nothing listens there.
    let closed = free_address();
    point_at(&home, &closed);
    let (ok, line) = doctor_coordinator_line(&home);
    assert!(!ok && line["level"] == "fail", "{line}");
    assert!(line["detail"].as_str().unwrap_or_default().contains(&closed), "{line}");
}

#[test]
fn commands_refuse_a_folder_that_is_not_a_site_home() {
    for args in [&["models", "verify"][..], &["models", "list"], &["status"], &["audit", "status"], &["doctor"]] {
        let out = site(Path::new("/no/such/dir"), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("/no/such/dir is not a site home (does not exist)"), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("no release installed"), "{}", text(&out));
    }
}

#[test]
fn status_keeps_the_last_known_job_while_the_coordinator_is_away() {
    // Two sites: a secure-aggregation session needs at least two parties (SA-01), and
    // the sites' policy must allow a cohort that small (the default floor is 3).
    let mut fed = Federation::new(2);
    fed.set_policy("site-1", "min_cohort", "2");
    fed.set_policy("site-2", "min_cohort", "2");
    fed.start_coordinator();
    fed.start_site("site-1");
    fed.start_site("site-2");
    let id = fed.submit("known", 1, 2, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job}\n--- coordinator log\n{}", fed.log_text("coordinator"));
    let home = fed.site_home("site-1");
    wait("the job in status.json", || fed.site_status("site-1")["job_id"] == id.as_str(), || fed.log_text("site-1"));
    // The coordinator goes away, the daemon restarts (a reboot) and cannot reach it.
    fed.kill_coordinator();
    fed.kill_site("site-1");
    fed.start_site("site-1");
    wait(
        "the restarted daemon retrying",
        || fed.site_status("site-1")["connection"] == "retrying",
        || fed.site_status("site-1").to_string(),
    );
    let out = run_ok(Command::new(bin("maeum-site")).args(["status", "--home"]).arg(&home));
    let shown = String::from_utf8_lossy(&out.stdout);
    let job = shown.lines().find(|l| l.starts_with("job ")).unwrap_or_default();
    assert!(job.contains(&id) && job.contains("(last known; coordinator last reached"), "{shown}");
}
