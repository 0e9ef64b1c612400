//! Maeum site agent library: the glue the `maeum-site` binary runs.
#![forbid(unsafe_code)]

pub mod consent;
pub mod daemon;
pub mod doctor;
pub mod encoders;
pub mod enrol;
pub mod finetune;
pub mod keys;
pub mod ledger;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod predict;
mod redact;
pub mod releases;
pub mod report;
pub mod roster;
pub mod secure;
pub mod witness;

pub use maeum_runtime::runtime::now_ms;
