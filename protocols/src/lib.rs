//! Maeum protocols: wire format, secure aggregation, audit log, identities.
//!
//! Sans-IO by design: no sockets, clocks or ambient randomness in here. The modules
//! arrive with the federation, secure-aggregation and audit-log issues.
#![forbid(unsafe_code)]
