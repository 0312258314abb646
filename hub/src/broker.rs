//! The embedded backend broker: rumqttd on a thread of its own, so that one command runs the
//! whole thing on one machine. Fleets point the hub at their own broker instead.
//!
//! The same as edge-host's (host/src/broker.rs), restated here so that the hub does not
//! link wasmtime by depending on edge-host.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::Context as _;
use edge_proto::BrokerUrl;
use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings};

/// The largest packet the embedded broker takes: room for a 128 KiB payload (and for a
/// larger one, so that the host can answer it 413 instead of losing it).
const MAX_PACKET: usize = 1024 * 1024;

/// Starts the embedded broker listening on `listen` and returns the URL to reach it.
///
/// # Errors
/// When `listen` cannot be bound (another broker may already be there), or the broker
/// refuses its configuration.
pub fn start(listen: SocketAddr) -> anyhow::Result<BrokerUrl> {
    // rumqttd binds on its own thread and only logs a failure there: bind once here
    // first, so that a busy port is a clear error instead of a hub talking to
    // whatever already listens on it.
    std::net::TcpListener::bind(listen).with_context(|| {
        format!(
            "cannot start the embedded broker on {listen}: is another broker running there? \
             Use --broker mqtt://HOST:PORT to connect to it, or --listen to pick another address"
        )
    })?;
    let server = ServerSettings {
        name: "edge-hub".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PACKET,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * MAX_PACKET,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("edge-hub".to_owned(), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded broker stopped");
            }
        })
        .context("cannot start the embedded broker's thread")?;
    edge_proto::client::wait_listening(listen, std::time::Duration::from_secs(5))
        .context("the embedded broker did not start listening")?;
    tracing::info!(%listen, "embedded broker listening");
    let host = match listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    Ok(BrokerUrl::tcp(host, listen.port()))
}
