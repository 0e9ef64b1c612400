//! Maeum protocols: the wire format, identities and mTLS, the job contract that sites
//! and the coordinator share, secure aggregation and the audit log.
//!
//! - `wire`: generated gRPC code (`wire::pb`) and the domain types it converts to.
//! - `identity`: the consortium PKI (CA, site requests, identities in SAN URIs).
//! - `tls`: rustls configurations, revocation, and the accept loop that turns verified
//!   certificates into peer identities for the gRPC services (the one IO-facing module).
//! - `job` and `strategy`: the job file (TOML) a lead submits and sites check before
//!   joining, with its aggregation-strategy table.
//! - `secagg`: secure aggregation (Bonawitz et al. 2017, optional SecAgg+ graph): the
//!   five-stage client and server state machines and their primitives.
//! - `audit`: the transparency log (RFC 9162 Merkle tree, entries, signed checkpoints,
//!   witnesses, the export file `maeum-audit` verifies).
//! - `runtime`: log setup and the shutdown signal for the binaries.
//! - `doctor`: the checks `maeum-coordinator doctor` and `maeum-site doctor` report.
//! - `release`: signed model releases (manifest, model card) and the checks a site
//!   runs before it installs one.
//! - `ops`: the daemons' metrics registry and their plaintext ops endpoint (`/metrics`,
//!   `/healthz`, `/readyz`, gRPC health) for Prometheus and Kubernetes probes.
//!
//! The protocol cores are sans-IO: no sockets, clocks or ambient randomness.
#![forbid(unsafe_code)]

pub mod job;
pub mod strategy;
pub mod wire;
