//! The crate boundaries that keep the protocol cores sans-IO and the auditor's verifier
//! small, in the test suite: `scripts/check-boundaries.sh` (`cargo tree -e normal` of
//! maeum-secagg, maeum-tlog and maeum-auditor) must find none of tokio, tonic, axum,
//! hyper, burn or the Maeum crates that bring them. The script holds the one list; CI
//! also runs it directly, before anything compiles.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

#[test]
fn protocol_cores_and_the_auditor_link_nothing_that_serves_or_trains() {
    let out = Command::new("bash")
        .arg(maeum_e2e::root().join("scripts/check-boundaries.sh"))
        .env("CARGO", std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).matches(" ok (").count(), 3, "{}", text(&out.stdout));
}
