//! Daemon glue shared by the role binaries (`maeum-coordinator`, `maeum-site`): log
//! setup and the shutdown signal (`runtime`), the plaintext ops endpoint with metrics
//! and health probes (`ops`, tokio + axum + tonic-health), and the checks both doctors
//! run (`doctor`).
//!
//! This is process glue, not protocol: it may use tokio, axum and the file system, and
//! no protocol core (maeum-secagg, maeum-tlog) may ever depend on it. It must never
//! depend on burn or the models either; the role crates wire it to their state.
#![forbid(unsafe_code)]

pub mod doctor;
pub mod ops;
pub mod runtime;
pub mod table;
