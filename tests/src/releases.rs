//! Helpers for the tests of signed releases and key rotation: a site's CLI, the release
//! it has in service, and a one-round job released, promoted and installed everywhere.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::{Federation, SMALL_MODEL, bin};

/// A one-epoch, one-round job: enough for a release.
pub fn one_round_job() -> String {
    format!("{SMALL_MODEL}[train]\nepochs = 1\n")
}

/// The arguments that promote a one-round model past the release gates.
pub const OVERRIDE: [&str; 3] = ["--override-gate", "--reason", "e2e: a one-round model"];

/// `maeum-site ARGS --home SITE_HOME`.
pub fn site_cli(fed: &Federation, site: &str, args: &[&str]) -> Output {
    Command::new(bin("maeum-site")).args(args).arg("--home").arg(fed.site_home(site)).output().expect("maeum-site")
}

/// The release `site` has in service (`models list --json`'s `current`; null: none).
pub fn current_at(fed: &Federation, site: &str) -> serde_json::Value {
    let out = site_cli(fed, site, &["models", "list", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()["current"].clone()
}

/// Polls `done` every 250 ms; panics naming `what` if it does not hold within `limit`.
pub fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs a one-round job named `name` on `sites`, promotes its release `version` and
/// waits until every site has it in service.
pub fn release_everywhere(fed: &Federation, name: &str, version: u32, sites: &[&str]) {
    let min = Duration::from_secs(60);
    let id = fed.submit(name, 1, sites.len(), &one_round_job());
    assert_eq!(fed.wait_job(&id, 3 * min)["state"], "completed");
    fed.cli_json(&[&["models", "promote", &format!("v{version}")][..], &OVERRIDE[..]].concat());
    for s in sites {
        wait(&format!("{s} installs v{version}"), min, || current_at(fed, s) == version);
    }
}
