//! The consortium PKI: the CA, the `maeum://` identities its certificates carry, and
//! (feature `tls`) the rustls configurations and the accept loop that turn verified
//! certificates into peer identities for the gRPC services.
//!
//! - `identity`: CA, site requests, identities in SAN URIs, certificate checks. Pure:
//!   rcgen, ring, x509-parser and rustls' PEM/DER types; no IO but the caller's bytes.
//! - `renewal`: new certificates for keys that already hold one (site renewal requests,
//!   the coordinator's reissued server certificate). Pure, like `identity`.
//! - `rollover`: a CA's successor and the handover signed by both CA keys that sites and
//!   auditors follow. Pure, like `identity`.
//! - `tls` (feature `tls`): server and client mTLS configurations, revocation, and the
//!   tokio accept loop for tonic, and the server certificate that can be replaced while
//!   serving — the only part that depends on tokio and tonic.
//!
//! The sans-IO crates (maeum-tlog and through it maeum-auditor) use this crate without
//! `tls`, so they never link tokio or tonic; the daemons turn it on. `identity` must
//! never depend on tokio, tonic, burn or the models; `tls` must never depend on burn or
//! the models.
#![forbid(unsafe_code)]

pub mod identity;
pub mod renewal;
pub mod rollover;
#[cfg(feature = "tls")]
pub mod tls;
