//! `maeum-site doctor`: checks a site home (enrolment, certificates and their expiry,
//! local data, the policy in force, the audit state, writable directories, disk space)
//! offline, then tries the coordinator. Exit 0 when `run` would start and reach it; 1
//! when a check fails, including a coordinator that cannot be reached or is not a Maeum
//! coordinator (the daemon would retry forever, but a wrong address in enrolment.json
//! never heals), and a caught fork of the audit log (the site refuses all work). A
//! policy weaker than the defaults (plaintext allowed, a cohort floor below 3, jobs
//! accepted without the admin) is a warning, not a failure.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use maeum_pki::identity::{self, PeerId};
use maeum_protocols::wire::pb;
use maeum_runtime::doctor::Checks;

use crate::daemon::{LocalData, connect, describe_at};
use crate::enrol::Home;
use crate::policy::Policy;

/// Runs every check on the home `dir` and prints them.
pub async fn run(dir: &Path, json: bool) -> Result<()> {
    check(dir).await.finish(json)
}

/// The checks, for the CLI and the tests.
pub async fn check(dir: &Path) -> Checks {
    let home = Home::new(dir);
    let mut c = Checks::default();
    let now = crate::now_ms() / 1000;
    let Some(site) = c.require("site", home.site_id(), "run `maeum-site init --home DIR --site-id ID` first") else {
        return c;
    };
    let enrolment = home.enrolment().map(|e| format!("consortium {} via {}", e.consortium, e.coordinator_address));
    if c.require("enrolment", enrolment, "install the bundle from the consortium lead: `maeum-site enroll BUNDLE`")
        .is_none()
    {
        return c;
    }
    match crate::keys::pinned(&home, maeum_tlog::handover::Role::Release) {
        Ok(None) => c.warn(
            "release key",
            "not pinned (a bundle from before release keys): releases are checked under the log key only, which the \
             coordinator's host holds",
            "run `maeum-site enroll` with a new bundle from the lead (`sites approve`, same request) to pin the \
             consortium's release key (docs/protocols/releases.md#two-keys)",
        ),
        Ok(Some(p)) => {
            c.ok("release key", format!("pinned {} (releases must carry its signature)", crate::keys::describe(&p)))
        }
        Err(e) => {
            c.fail("release key", format!("{e:#}"), "restore enrolment.json and release-keys.json from your backup")
        }
    }
    let log_key = crate::keys::pinned(&home, maeum_tlog::handover::Role::Log)
        .and_then(|p| p.context("enrolment.json names no signing key"))
        .map(|p| format!("pinned {} (checkpoints and releases must carry its signature)", crate::keys::describe(&p)));
    c.require("log key", log_key, "restore enrolment.json and signing-keys.json from your backup");
    c.certificate("CA certificate", &home.path("ca.pem"), now, 90, "ask the consortium lead about the CA's renewal");
    if let Ok(cas) = crate::keys::trusted_cas(&home)
        && cas.len() > 1
    {
        let days = cas.last().and_then(|ca| identity::not_after_unix(ca).ok()).map_or(0, |t| (t - now) / 86_400);
        c.ok(
            "CA rollover",
            format!(
                "{} CAs trusted, oldest first (the check above is the oldest); the newest for {days} more days",
                cas.len()
            ),
        );
    }
    let renew = "a running daemon renews site.pem itself within 30 days of expiry, and up to 90 days after it \
                 (docs/protocols/certificates.md); later, the lead approves request.csr.pem again and you \
                 `maeum-site enroll` the bundle";
    if let Some(der) = c.certificate("site certificate", &home.path("site.pem"), now, 30, renew) {
        let key = home.read("site.key").map(identity::SecretPem::new);
        match key.and_then(|k| Ok(identity::key_matches_cert(&k, &der)?)) {
            Ok(true) => c.ok("site key", "site.key matches site.pem"),
            Ok(false) => c.fail("site key", "site.key does not match site.pem", renew),
            Err(e) => c.fail("site key", format!("{e:#}"), "restore site.key from your backup"),
        }
        let trusted = PeerId::site(&site)
            .map_err(anyhow::Error::from)
            .and_then(|id| Ok(identity::verify_peer_cert(&home.read("ca.pem")?, &der, &id)?));
        match trusted {
            Ok(_) => c.ok("site identity", format!("site/{site}, issued by the consortium CA")),
            Err(e) => c.fail("site identity", format!("{e:#}"), renew),
        }
    }
    match home.config() {
        Ok(cfg) => {
            match LocalData::load(&cfg) {
                Ok(d) => {
                    c.ok("local data", format!("{} training and {} held-out records", d.train.len(), d.test.len()));
                }
                Err(e) => c.fail("local data", format!("{e:#}"), "fix HOME/site.toml [data] or the file it names"),
            }
            policy(&mut c, &cfg.policy);
            encoders(&mut c, &home, &cfg.policy);
        }
        Err(e) => c.fail("site.toml", format!("{e:#}"), "fix HOME/site.toml (the message names the key)"),
    }
    match (crate::witness::fork_evidence(&home), crate::witness::witnessed(&home)) {
        (Some(why), _) => c.fail(
            "audit log",
            format!(
                "the coordinator showed this site a forked audit log ({why}); the site refuses all work until the \
                 evidence is cleared; evidence: {}",
                crate::witness::evidence_path(&home).display()
            ),
            format!(
                "send HOME/audit/fork-* to the consortium's auditors; once they have it, `{}`",
                crate::witness::clear_command(&home)
            ),
        ),
        (None, Ok(Some(f))) => c.ok("audit log", format!("witnessed a checkpoint of size {}", f.checkpoint.size)),
        (None, Ok(None)) => c.ok("audit log", "no checkpoint witnessed yet"),
        (None, Err(e)) => c.fail("audit log", format!("{e:#}"), "restore HOME/audit from your backup"),
    }
    for d in ["models", "work", "audit"] {
        c.writable(d, &home.path(d));
    }
    c.disk_space("disk space", dir, 1024, 128);
    let address = home.enrolment().map(|e| e.coordinator_address).unwrap_or_default();
    let reach = async {
        let mut client = connect(&home).await?;
        let req = pb::SiteStatus {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            stage: maeum_protocols::wire::PROBE_STAGE.into(),
            ..Default::default()
        };
        client.heartbeat(req).await.map_err(|e| anyhow::anyhow!(describe_at(&e, &address)))?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(8), reach).await {
        Ok(Ok(())) => c.ok("coordinator", "reachable; it accepted this site's certificate"),
        Ok(Err(e)) => c.fail(
            "coordinator",
            format!("{e:#}"),
            "check that coordinator_address in HOME/enrolment.json is the coordinator's site port (not its ops \
             port), that the coordinator runs, and the network path (this site dials out)",
        ),
        Err(_) => c.fail(
            "coordinator",
            format!("no answer from {address} within 8 s"),
            "check firewalls on the way to the coordinator and coordinator_address in HOME/enrolment.json",
        ),
    }
    c
}

/// The policy in force (one line), and a warning for each rule set below the defaults'
/// protection.
/// The pretrained encoders installed here: each must verify against its known digests.
fn encoders(c: &mut Checks, home: &Home, p: &Policy) {
    let list = match crate::encoders::list(home) {
        Ok(l) => l,
        Err(e) => return c.fail("encoders", format!("{e:#}"), "fix HOME/site.toml [encoders] dir"),
    };
    let fix = "reinstall it: `python3 scripts/fetch_encoder.py --encoder NAME`, then \
               `maeum-site encoders add DIR --name NAME`";
    let mut ok = Vec::new();
    for e in &list {
        match e.status.as_str() {
            "ok" => ok.push(e.name.clone()),
            "not installed" => {}
            why => c.fail(&format!("encoder {}", e.name), format!("{}: {why}", e.path.display()), fix),
        }
    }
    if !ok.is_empty() {
        c.ok("encoders", format!("{} installed and verified", ok.join(", ")));
    } else if p.allowed_models.iter().any(|m| m.starts_with("encoder-")) {
        c.ok("encoders", "none installed: this site refuses encoder jobs (`maeum-site encoders add DIR`)");
    }
}

fn policy(c: &mut Checks, p: &Policy) {
    let rules: Vec<String> = p.summary().into_iter().map(|(rule, value)| format!("{rule} {value}")).collect();
    c.ok("policy", rules.join("; "));
    let fix = |what: &str| format!("{what} in [policy] of HOME/site.toml, then restart the daemon");
    if p.allow_plaintext {
        c.warn(
            "policy allow_plaintext",
            "true: this site takes jobs that turn secure aggregation off, which show the coordinator this site's \
             own update and record count",
            fix("unless you are debugging with test data, set allow_plaintext = false"),
        );
    }
    if p.min_cohort < 3 {
        c.warn(
            "policy min_cohort",
            format!(
                "{}: with two sites in a sum, the other one (or a site the lead enrolled for the purpose) can work \
                 out this site's update",
                p.min_cohort
            ),
            fix("set min_cohort = 3 or more"),
        );
    }
    if p.auto_accept {
        c.warn(
            "policy auto_accept",
            "true: this site accepts every job its policy allows without asking you",
            fix("to consent to each job yourself, set auto_accept = false"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_runtime::doctor::Level;

    fn check(p: Policy, expected: &[(&str, Level)]) {
        let mut c = Checks::default();
        policy(&mut c, &p);
        let got: Vec<(&str, Level)> = c.checks.iter().map(|c| (c.name.as_str(), c.level)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn installed_encoders_must_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        let levels = |home: &Home| {
            let mut c = Checks::default();
            encoders(&mut c, home, &Policy::default());
            c.checks.iter().map(|c| (c.name.clone(), c.level, c.detail.clone())).collect::<Vec<_>>()
        };
        let none = levels(&home);
        assert_eq!(none.len(), 1);
        assert_eq!((none[0].0.as_str(), none[0].1), ("encoders", Level::Ok));
        assert!(none[0].2.starts_with("none installed: this site refuses encoder jobs"), "{none:?}");
        // Files under the encoder's name that are not the encoder fail, naming the file.
        let enc = dir.path().join("encoders/all-minilm-l6-v2");
        std::fs::create_dir_all(&enc).expect("mkdir");
        for f in ["model.safetensors", "tokenizer.json", "config.json"] {
            std::fs::write(enc.join(f), b"not an encoder").expect("write");
        }
        let bad = levels(&home);
        assert_eq!((bad[0].0.as_str(), bad[0].1), ("encoder all-minilm-l6-v2", Level::Fail), "{bad:?}");
        assert!(bad[0].2.contains("model.safetensors: SHA-256 is"), "{bad:?}");
    }

    #[test]
    fn the_default_policy_passes_and_weakened_rules_warn() {
        check(Policy::default(), &[("policy", Level::Ok)]);
        check(
            Policy { allow_plaintext: true, ..Policy::default() },
            &[("policy", Level::Ok), ("policy allow_plaintext", Level::Warn)],
        );
        check(
            Policy { min_cohort: 2, ..Policy::default() },
            &[("policy", Level::Ok), ("policy min_cohort", Level::Warn)],
        );
        check(
            Policy { auto_accept: true, ..Policy::default() },
            &[("policy", Level::Ok), ("policy auto_accept", Level::Warn)],
        );
        check(
            Policy { auto_accept: true, allow_plaintext: true, min_cohort: 2, ..Policy::default() },
            &[
                ("policy", Level::Ok),
                ("policy allow_plaintext", Level::Warn),
                ("policy min_cohort", Level::Warn),
                ("policy auto_accept", Level::Warn),
            ],
        );
    }

    #[test]
    fn the_policy_line_names_every_rule() {
        let mut c = Checks::default();
        policy(&mut c, &Policy::default());
        assert_eq!(
            c.checks[0].detail,
            "auto_accept no; allow_plaintext no; min_cohort 3; allowed_models text-classifier, encoder-head, encoder-lora; max_params 67108864; \
             max_rounds 1000; allowed_strategies fedavg, fedprox, fedadam, fedyogi; members any approved site; \
             privacy.allow_non_dp yes; privacy.max_epsilon 10 at δ ≤ 1e-5; privacy.allow_distributed yes; \
             privacy.min_colluders 0; privacy.budget no total"
        );
    }
}
