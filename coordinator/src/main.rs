//! `maeum-coordinator`: the consortium lead's server and operator CLI.
//!
//! Exit codes: 0 success; 1 error (the message says what and where); 2 usage error
//! (from clap).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;

use maeum_coordinator::{client, demo, home, models, server};
use maeum_protocols::wire::pb;

/// Maeum coordinator, run by the consortium lead: creates the consortium, approves
/// sites, serves the federation and drives training jobs.
#[derive(Debug, Parser)]
#[command(name = "maeum-coordinator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct HomeArg {
    /// The coordinator's home directory (keys, state, model blobs).
    #[arg(long, value_name = "DIR", env = "MAEUM_COORDINATOR_HOME")]
    home: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a consortium: CA, the coordinator's TLS identity, the Ed25519 signing key
    /// (the audit log's), the Ed25519 release key and an operator certificate, in a new
    /// home directory.
    Init {
        #[command(flatten)]
        home: HomeArg,
        /// Consortium name ([a-z0-9-]).
        #[arg(long)]
        name: String,
        /// HOST:PORT that sites and operators will dial; HOST goes into the server certificate.
        #[arg(long)]
        address: String,
        /// The state database's engine (sled, the default; or redb). Fixed at init.
        #[arg(long, value_enum, default_value = "sled")]
        store: maeum_coordinator::storage::Engine,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run the coordinator: gRPC over mTLS for sites and operators, and the rounds.
    Serve {
        #[command(flatten)]
        home: HomeArg,
        /// Address to listen on (default: 0.0.0.0 and the port of the consortium address).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Seconds without a heartbeat after which a site counts as offline.
        #[arg(long, default_value_t = 10)]
        heartbeat_timeout: u64,
        /// Also serve plaintext `/metrics`, `/healthz`, `/readyz` and gRPC health on
        /// this address (a private network or loopback; see deploy/README.md).
        #[arg(long, value_name = "ADDR", env = "MAEUM_OPS_LISTEN")]
        ops_listen: Option<SocketAddr>,
        /// Also serve the read-only web console on this address (off by default). On
        /// loopback it is plain HTTP for this machine only; on any other address it is
        /// HTTPS that requires an operator certificate of the consortium CA.
        #[arg(long, value_name = "ADDR", env = "MAEUM_CONSOLE_LISTEN")]
        console: Option<SocketAddr>,
        /// Serve the console over HTTPS with operator certificates even on loopback.
        #[arg(long, requires = "console")]
        console_tls: bool,
    },
    /// Check this home offline (keys, certificates and their expiry, writable state,
    /// disk space, approved sites) and say what to fix. Exit 1 if a check fails.
    Doctor {
        #[command(flatten)]
        home: HomeArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Approve, list and revoke sites.
    #[command(subcommand)]
    Sites(SitesCommand),
    /// Submit, watch and abort training jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// The transparency audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Signed model releases: list, show, promote, roll back, export.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The consortium's release key: show it, rotate it (where the key is).
    #[command(subcommand)]
    ReleaseKey(ReleaseKeyCommand),
    /// The log's signing key (signing.key): show it, rotate it.
    #[command(subcommand)]
    SigningKey(SigningKeyCommand),
    /// The consortium CA (ca.pem, ca.key): show it, roll it over to a successor.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The operator certificate of this home (`operator.pem`).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Run a whole local federation: consortium, sites as separate processes over mTLS,
    /// a training job, and a comparison with centralized and local-only training.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Renew HOME/operator.pem for its key, valid 397 days from now. Works offline with
    /// the CA key in HOME; every CLI call reads the certificate afresh, so nothing
    /// restarts. (Site and server certificates renew themselves: see
    /// docs/protocols/certificates.md.)
    Renew {
        #[command(flatten)]
        home: HomeArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SitesCommand {
    /// Sign a site's certificate request (from `maeum-site init`) into an enrolment
    /// bundle for `maeum-site enroll`. Works offline: needs only the CA key in HOME.
    /// Approving the same request again only rewrites the bundle; a request with
    /// another key for an approved site id is refused without `--replace`.
    Approve {
        #[command(flatten)]
        home: HomeArg,
        /// The site's request file (request.csr.pem).
        request: PathBuf,
        /// Refuse unless the request is for this site id.
        #[arg(long)]
        site_id: Option<String>,
        /// Where to write the bundle (default: bundle-SITE.json in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The site id is approved with another key, and this request is its new key:
        /// the old certificate is revoked (a running coordinator cuts it within a
        /// second) and the change is logged as `site_key_replaced`.
        #[arg(long)]
        replace: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List sites: online, last seen, rounds contributed.
    List {
        #[command(flatten)]
        home: HomeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a site now: its open connections are cut and new handshakes refused.
    Revoke {
        #[command(flatten)]
        home: HomeArg,
        /// The site id.
        site_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Write the whole log, its checkpoints and cosignatures, and the certificates an
    /// auditor needs, as one file for `maeum-audit verify`.
    Export {
        #[command(flatten)]
        home: HomeArg,
        /// The file to write; `-` writes the export to standard output (e.g. out of a
        /// container with `kubectl exec … --out - > audit.json`).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// HOME and `--json`, for the commands that take nothing else.
#[derive(Debug, clap::Args)]
struct HomeJson {
    #[command(flatten)]
    home: HomeArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SigningKeyCommand {
    /// Make a new log signing key beside the current one and a handover signed by both
    /// (HOME/signing.next.key, HOME/signing.handover.json). The coordinator applies it
    /// when it next starts: it logs log_key_rotated and signs with the new key from
    /// then on; sites follow the handover. Safe to run while the coordinator serves.
    Rotate(HomeJson),
    /// The signing key in use, every rotation and one waiting to be applied (offline).
    Show(HomeJson),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a successor CA beside the current one and a handover signed by both CA
    /// keys (HOME/ca.next.pem, ca.next.key, ca.handover.json). The coordinator applies
    /// it when it next starts: it logs ca_rotated, trusts both CAs, issues from the new
    /// one, and asks each site to renew onto it; sites trust the new CA once the log
    /// proves the rollover. Safe to run while the coordinator serves.
    Rotate(HomeJson),
    /// The CA in use, every rollover, how many sites hold a certificate of the current
    /// CA, and a rollover waiting to be applied (offline).
    Show(HomeJson),
}

#[derive(Debug, Subcommand)]
enum ReleaseKeyCommand {
    /// Hand the release key over to a new one, where the old key is: both keys sign
    /// the handover, the coordinator logs it (release_key_rotated), sites follow it with
    /// the next release they install, and the current release is signed again with
    /// the new key. NEW is made (mode 0600) unless it exists.
    Rotate {
        #[command(flatten)]
        home: HomeArg,
        /// The current release key (Ed25519 PKCS#8).
        #[arg(long, value_name = "OLD")]
        key: PathBuf,
        /// Where the new release key goes (or is, for a retried rotation).
        #[arg(long, value_name = "NEW")]
        new_key: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The current release key, the first one and every rotation (from HOME, offline).
    Show(HomeJson),
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Sign a release with the consortium's release key, where the key is (the lead's
    /// workstation, not the serving host): only the signature is sent, and checked
    /// against the current release key (`release-key show`). A consortium with a release key promotes only signed
    /// releases; sites enrolled with it install nothing without the signature.
    Sign {
        #[command(flatten)]
        home: HomeArg,
        /// The release: 3, v3, or 8+ hex digits of its model digest.
        version: String,
        /// The release key (Ed25519 PKCS#8, `release.key` from `init`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List releases: version, model, origin, federated metrics, site installs; `*`
    /// marks the current one.
    List {
        #[command(flatten)]
        home: HomeArg,
        /// Print one JSON object (releases and the promotion history).
        #[arg(long)]
        json: bool,
    },
    /// Show a release: its model card, audit-log entry and what each site reported.
    Show {
        #[command(flatten)]
        home: HomeArg,
        /// The release: 3, v3, or 8+ hex digits of its model digest.
        version: String,
        /// Print one JSON object (with the full model card).
        #[arg(long)]
        json: bool,
    },
    /// Make a release the consortium's current one (logged); sites verify and install
    /// it next.
    Promote {
        #[command(flatten)]
        home: HomeArg,
        /// The release: 3, v3, or 8+ hex digits of its model digest.
        version: String,
        /// Promote even though the release fails a release gate of the consortium
        /// (`release_gates` in consortium.json, e.g. minimum crisis-class recall); needs
        /// --reason. The override is logged in the audit log and shown with the release.
        #[arg(long, requires = "reason")]
        override_gate: bool,
        /// Why the gate is overridden (one line; published in the audit log).
        #[arg(long, value_name = "WHY", requires = "override_gate")]
        reason: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make the release that was current before the current one current again (logged).
    Rollback {
        #[command(flatten)]
        home: HomeArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Verify a release and write its model (safetensors), model card (JSON as signed,
    /// and Markdown), release manifest with signature, and a training-curve chart (SVG).
    Export {
        #[command(flatten)]
        home: HomeArg,
        /// The release: 3, v3, or 8+ hex digits of its model digest.
        version: String,
        /// The directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// `torch` also writes model-vN.torch.safetensors with PyTorch's layout (linear
        /// weights (out, in); tensor names, shapes and forward pass in docs/models.md).
        #[arg(long, value_enum, default_value = "burn")]
        layout: models::ExportLayout,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Submit a job file (TOML; see docs/jobs.md).
    Submit {
        #[command(flatten)]
        home: HomeArg,
        /// The job file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    List {
        #[command(flatten)]
        home: HomeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a job's progress and per-round metrics.
    Status {
        #[command(flatten)]
        home: HomeArg,
        /// The job id (from `jobs submit` or `jobs list`).
        job_id: String,
        /// Follow the job live until it ends.
        #[arg(long)]
        watch: bool,
        /// Show the latest N rounds (the coordinator's default: 100; at most 1000).
        #[arg(long, value_name = "N")]
        last: Option<u32>,
        /// Show only rounds before round R (page back through a long job: pass the first
        /// round shown).
        #[arg(long, value_name = "R")]
        before: Option<u32>,
        /// Print JSON (with --watch: one object per change).
        #[arg(long)]
        json: bool,
    },
    /// Abort a job.
    Abort {
        #[command(flatten)]
        home: HomeArg,
        /// The job id.
        job_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { home, name, address, store, json } => {
            let r = home::init(&home.home, &name, &address, store)?;
            if json {
                return print_json(&r);
            }
            println!("consortium {} created in {}", r.consortium, r.home.display());
            println!("  address           {}", r.address);
            println!("  CA fingerprint    {}", r.ca_fingerprint);
            println!("  signing key       {}", r.signing_public_key);
            println!(
                "  release key       {} (move HOME/release.key off this host in production)",
                r.release_public_key
            );
            println!("next: `maeum-coordinator serve --home {}`", r.home.display());
        }
        Command::Serve { home, listen, heartbeat_timeout, ops_listen, console, console_tls } => {
            let console = console.map(|listen| maeum_coordinator::ConsoleOptions { listen, tls: console_tls });
            let settings = server::Settings { heartbeat_timeout: Duration::from_secs(heartbeat_timeout.max(1)) };
            let stop = maeum_runtime::runtime::shutdown_signal();
            maeum_coordinator::serve(&home.home, listen, ops_listen, console, settings, stop).await?;
        }
        Command::Doctor { home, json } => maeum_coordinator::doctor::run(&home.home, json)?,
        Command::Operator(OperatorCommand::Renew { home, json }) => {
            let (name, not_after) = home::renew_operator(&home::Home::new(&home.home))?;
            let days = (not_after - home::now_ms() / 1000) / 86_400;
            if json {
                return print_json(&serde_json::json!({ "operator": name, "not_after": not_after, "days_left": days }));
            }
            println!("renewed the operator certificate of {name}: valid for {days} more days (same key)");
        }
        Command::Sites(SitesCommand::Approve { home, request, site_id, out, replace, json }) => {
            let csr = std::fs::read_to_string(&request).with_context(|| format!("reading {}", request.display()))?;
            let (bundle, approval) =
                home::approve_with(&home::Home::new(&home.home), &csr, site_id.as_deref(), replace)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("bundle-{}.json", bundle.site_id)));
            home::write_file(&out, serde_json::to_string_pretty(&bundle)?.as_bytes(), false)?;
            let (outcome, replaced) = match &approval {
                home::Approval::New => ("approved", None),
                home::Approval::AlreadyApproved => ("already_approved", None),
                home::Approval::Renewed => ("renewed", None),
                home::Approval::Replaced { old_fingerprint } => ("replaced", Some(old_fingerprint.as_str())),
            };
            if json {
                return print_json(&serde_json::json!({
                    "site_id": bundle.site_id, "bundle": out, "outcome": outcome, "replaced_cert_fingerprint": replaced,
                }));
            }
            let (site, out) = (&bundle.site_id, out.display());
            match replaced {
                None if outcome == "approved" => {
                    println!("approved site {site}; give {out} to its admin for `maeum-site enroll`");
                }
                None if outcome == "renewed" => println!(
                    "renewed the certificate of site {site} (it expired within {} days); give {out} to its admin for \
                     `maeum-site enroll`",
                    home::RENEW_DAYS
                ),
                None => println!(
                    "site {site} is already approved with this key; nothing changed (bundle rewritten to {out})"
                ),
                Some(old) => println!(
                    "replaced the key of site {site}: certificate {}… is revoked as soon as the coordinator sees the \
                     change (logged as site_key_replaced); give {out} to its admin for `maeum-site enroll`",
                    old.get(..16).unwrap_or(old)
                ),
            }
        }
        Command::Sites(SitesCommand::List { home, json }) => {
            let sites = client::connect(&home.home).await?.list_sites(pb::ListSitesRequest {}).await?.into_inner();
            if json {
                return print_json(&sites.sites.iter().map(client::site_json).collect::<Vec<_>>());
            }
            client::print_sites(&sites.sites);
        }
        Command::Sites(SitesCommand::Revoke { home, site_id, json }) => {
            let s = client::connect(&home.home).await?.revoke_site(pb::SiteRef { site_id }).await?.into_inner();
            if json {
                return print_json(&client::site_json(&s));
            }
            println!("site {} revoked", s.site_id);
        }
        Command::Jobs(JobsCommand::Submit { home, file, json }) => {
            let toml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let source_name = file.display().to_string();
            // The privacy a job buys, before it is submitted (the coordinator checks it too).
            let spec = maeum_protocols::job::JobSpec::from_toml(&source_name, &toml)?;
            if let (Some(p), false) = (spec.privacy_plan()?, json) {
                println!(
                    "differential privacy: expected ε = {:.3} per record per site at δ = {:e} over {} rounds; {}",
                    p.epsilon,
                    p.delta,
                    p.rounds,
                    p.describe()
                );
            }
            let j = client::connect(&home.home).await?.submit_job(pb::SubmitJobRequest { toml, source_name }).await?;
            let j = j.into_inner();
            if json {
                return print_json(&client::job_json(&j));
            }
            println!("submitted job {}", j.job_id);
        }
        Command::Jobs(JobsCommand::List { home, json }) => {
            let jobs = client::connect(&home.home).await?.list_jobs(pb::ListJobsRequest {}).await?.into_inner();
            if json {
                return print_json(&jobs.jobs.iter().map(client::job_json).collect::<Vec<_>>());
            }
            if jobs.jobs.is_empty() {
                println!("no jobs yet: `maeum-coordinator jobs submit FILE`");
            } else {
                println!("{}", client::jobs_table(&jobs.jobs));
            }
        }
        Command::Jobs(JobsCommand::Status { home, job_id, watch, last, before, json }) => {
            let mut c = client::connect(&home.home).await?;
            // 0 asks for the coordinator's default.
            let rounds_limit = last.map_or(0, |n| n.max(1));
            let job = pb::JobRef { job_id, rounds_limit, rounds_before: before.unwrap_or(0) };
            if !watch {
                let j = c.get_job(job).await?.into_inner();
                if json {
                    return print_json(&client::job_json(&j));
                }
                client::print_job(&j);
                return Ok(());
            }
            let mut stream = c.watch_job(job).await?.into_inner();
            while let Some(j) = stream.next().await {
                let j = j?;
                if json {
                    print_json(&client::job_json(&j))?;
                } else {
                    client::print_job(&j);
                }
            }
        }
        Command::Jobs(JobsCommand::Abort { home, job_id, json }) => {
            let j = client::connect(&home.home)
                .await?
                .abort_job(pb::JobRef { job_id, ..Default::default() })
                .await?
                .into_inner();
            if json {
                return print_json(&client::job_json(&j));
            }
            println!("job {} aborted", j.job_id);
        }
        Command::Audit(AuditCommand::Export { home, out }) => {
            let bytes = client::export_audit(&home.home).await?;
            // The note goes to stderr so that stdout carries only the export when it is
            // the destination (`-` or /dev/stdout).
            let (written, check) = if out.as_os_str() == "-" {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&bytes).and_then(|()| stdout.flush()).context("writing the export to stdout")?;
                ("the export to stdout".to_string(), "FILE".to_string())
            } else {
                std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
                (out.display().to_string(), out.display().to_string())
            };
            eprintln!(
                "wrote {written} ({} bytes); check it with: maeum-audit verify --trust {} {check}",
                bytes.len(),
                home.home.join("signing.pub").display(),
            );
        }
        Command::Models(ModelsCommand::List { home, json }) => models::list(&home.home, json).await?,
        Command::Models(ModelsCommand::Show { home, version, json }) => {
            models::show(&home.home, &version, json).await?
        }
        Command::Models(ModelsCommand::Promote { home, version, override_gate, reason, json }) => {
            models::promote(&home.home, &version, reason.as_deref().filter(|_| override_gate), json).await?;
        }
        Command::Models(ModelsCommand::Rollback { home, json }) => models::rollback(&home.home, json).await?,
        Command::Models(ModelsCommand::Sign { home, version, key, json }) => {
            models::sign(&home.home, &version, &key, json).await?;
        }
        Command::Models(ModelsCommand::Export { home, version, out, layout, json }) => {
            models::export(&home.home, &version, &out, layout, json).await?;
        }
        Command::ReleaseKey(ReleaseKeyCommand::Rotate { home, key, new_key, json }) => {
            maeum_coordinator::release_key::rotate_cli(&home.home, &key, &new_key, json).await?;
        }
        Command::SigningKey(SigningKeyCommand::Rotate(HomeJson { home, json })) => {
            maeum_coordinator::signing_key::rotate_cli(&home.home, json)?;
        }
        Command::Ca(CaCommand::Rotate(HomeJson { home, json })) => {
            maeum_coordinator::ca_rollover::rotate_cli(&home.home, json)?;
        }
        Command::Ca(CaCommand::Show(HomeJson { home, json })) => {
            maeum_coordinator::ca_rollover::show(&home.home, json)?;
        }
        Command::SigningKey(SigningKeyCommand::Show(HomeJson { home, json })) => {
            maeum_coordinator::signing_key::show(&home.home, json)?;
        }
        Command::ReleaseKey(ReleaseKeyCommand::Show(HomeJson { home, json })) => {
            maeum_coordinator::release_key::show(&home.home, json)?;
        }
        Command::Demo(a) => demo::run(a).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    maeum_runtime::runtime::exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Serve { .. });
    maeum_runtime::runtime::init_tracing(if daemon { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: the coordinator refused: {} ({:?})", s.message(), s.code()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}
