//! `maeum-coordinator`: the consortium lead's server and operator CLI.
//!
//! The federation runtime (enrolment, mTLS gRPC server, rounds, the demo) is being
//! built under the issue "Federation over mTLS"; until it lands this binary only
//! reports its version, so that packaging and CI already cover it.
#![forbid(unsafe_code)]

use clap::Parser;

/// Maeum coordinator (run by the consortium lead). The federation server is not
/// available in this build yet.
#[derive(Debug, Parser)]
#[command(name = "maeum-coordinator", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!(
        "maeum-coordinator {}: the federation server is not in this build yet; see docs/ROADMAP.md",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(1);
}
