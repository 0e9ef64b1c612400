//! Maeum protocols: the wire format (the `.proto` files and the one module that names
//! their generated types), and the job contract that sites and the coordinator share.
//!
//! - `wire`: generated gRPC code (`wire::pb`) and the domain types it converts to
//!   (`TryFrom`, parse don't validate), including those of the protocol cores.
//! - `job` and `strategy`: the job file (TOML) a lead submits and sites check before
//!   joining, with its aggregation-strategy table.
//!
//! The protocol cores live in their own crates, which this one converts to and from:
//! `maeum-secagg` (secure aggregation), `maeum-tlog` (audit log, checkpoints, releases)
//! and `maeum-pki` (identities); daemon glue is in `maeum-runtime`. This crate depends on
//! tonic and prost for the wire and on `maeum-models` for the job contract (a job names
//! its model, features and training settings); it must never depend on tokio's runtime
//! beyond what tonic brings, on the daemon glue, or on the role crates.
#![forbid(unsafe_code)]

pub mod job;
pub mod strategy;
pub mod wire;
