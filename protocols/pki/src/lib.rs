//! The consortium PKI (`identity`) and mTLS (`tls`, feature `tls`).
#![forbid(unsafe_code)]

pub mod identity;
#[cfg(feature = "tls")]
pub mod tls;
