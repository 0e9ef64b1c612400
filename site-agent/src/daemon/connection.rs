//! The connection to the coordinator: dialling it with this site's certificate, and
//! saying in words what went wrong when a call fails.

use std::time::Duration;

use anyhow::Result;
use tonic::transport::Endpoint;
use tonic::{Code, Status as RpcStatus};

use maeum_pki::tls;
use maeum_protocols::wire::{self, CHUNK_SIZE, pb};

use super::Client;
use crate::enrol::Home;

/// An error the coordinator answered with (the text is [`describe`]'s): the work item
/// ended on the coordinator's side (an aborted attempt, a stale message), not because
/// this site failed, so it is not reported back as a failure.
#[derive(Debug)]
pub(crate) struct CoordinatorSaid(pub(crate) String);

impl std::fmt::Display for CoordinatorSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CoordinatorSaid {}

/// A status for humans, with the transport's cause chain (a TLS alert from the
/// coordinator means it refused this site's certificate).
pub(crate) fn describe(e: &RpcStatus) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let msg = e.message();
    // hyper and tonic repeat a cause at several levels ("tcp connect error" three times).
    causes.dedup();
    causes.retain(|c| c != msg);
    let chain = if causes.is_empty() { String::new() } else { format!(" ({})", causes.join(": ")) };
    // Something answered on that port, but not with TLS: an HTTP server such as the
    // coordinator's ops endpoint, or another service.
    let not_tls = ["InvalidContentType", "corrupt message", "not a TLS", "InvalidMessage"];
    // The cause may be the status message itself (tonic puts the TLS error there).
    if causes.iter().chain(std::iter::once(&msg.to_string())).any(|c| not_tls.iter().any(|n| c.contains(n))) {
        return format!(
            "the peer does not speak TLS: this address is not the coordinator's site port (the ops port or \
             another service?){chain}"
        );
    }
    if causes.iter().any(|c| c.contains("fatal alert")) {
        return format!(
            "the coordinator refused this site's certificate (revoked, expired or from another consortium){chain}"
        );
    }
    // TCP connected but the peer hung up in or right after the TLS handshake: that is how
    // a coordinator refuses a certificate under TLS 1.3 (the reason is in its log).
    let hung_up = ["close_notify", "connection reset", "connection closed"];
    if causes.iter().any(|c| hung_up.iter().any(|h| c.contains(h))) {
        return format!(
            "the coordinator closed the connection{chain}; if this persists, this site's certificate may be \
             revoked, expired or from another consortium (the coordinator's log names the reason)"
        );
    }
    match e.code() {
        Code::Unavailable => format!("coordinator unreachable: {msg}{chain}"),
        Code::PermissionDenied => format!("coordinator refused this site: {msg}"),
        _ => format!("{:?}: {msg}{chain}", e.code()),
    }
}

/// [`describe`], naming the coordinator address from enrolment.json where the address
/// itself may be what is wrong (nothing listening, or not the coordinator's site port).
pub(crate) fn describe_at(e: &RpcStatus, address: &str) -> String {
    let what = describe(e);
    if what.starts_with("the peer does not speak TLS") || what.starts_with("coordinator unreachable") {
        format!("{what}; coordinator address {address} (from enrolment.json)")
    } else {
        what
    }
}

pub(crate) fn is_refusal(e: &RpcStatus) -> bool {
    e.code() == Code::PermissionDenied || describe(e).starts_with("the coordinator refused")
}

pub async fn connect(home: &Home) -> Result<Client> {
    let enrolment = home.enrolment()?;
    // After a CA rollover, the coordinator's certificate only from the newest CA it was
    // seen serving (`crate::keys::SERVER_CA`).
    let cas = crate::keys::server_cas_pem(home)?;
    let tls = tls::client_tls(&cas, &home.identity()?, &enrolment.coordinator_name);
    let channel = Endpoint::from_shared(format!("https://{}", enrolment.coordinator_address))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(wire::H2_SITE_STREAM_WINDOW)
        .initial_connection_window_size(wire::H2_SITE_CONNECTION_WINDOW)
        .max_frame_size(wire::H2_MAX_FRAME)
        .connect_lazy();
    Ok(pb::fleet_client::FleetClient::new(channel).max_decoding_message_size(4 * CHUNK_SIZE))
}
