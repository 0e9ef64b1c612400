//! Daemon glue for the role binaries.
#![forbid(unsafe_code)]

pub mod doctor;
pub mod ops;
pub mod runtime;
