//! The one place an MQTT client is made: every part of edge-methods (host, invoker, the
//! hub's backend sessions, tests and benchmarks) connects with the same packet limit,
//! `TCP_NODELAY`, connection timeout and address handling.
//!
//! Two steps: [`options`] for a broker URL with [`Security`] (the backend protocol), or
//! the IoT Hub options of [`crate::iothub::DeviceEndpoint::options`]; then [`start`]
//! makes the client and its event loop.

use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions};

use crate::BrokerUrl;
use crate::transport::{Security, TransportError};

/// The largest MQTT packet taken or sent: a 128 KiB payload and its topic fit with room
/// to spare, so that an oversized request still arrives and is answered 413.
pub const MAX_PACKET: usize = 1024 * 1024;

/// How long a connection attempt (TCP, TLS and CONNACK) may take by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Options for client `id` on `broker`: clean session, `keep_alive`, the packet limit,
/// and `security` (TLS and credentials) applied.
///
/// # Errors
/// As [`Security::apply`]: a TLS file that cannot be read or holds nothing usable, half
/// a client certificate, or a password without a username.
pub fn options(
    id: &str,
    broker: &BrokerUrl,
    security: &Security,
    keep_alive: Duration,
) -> Result<MqttOptions, TransportError> {
    // rumqttc joins host and port as `host:port`, so an IPv6 address needs brackets;
    // TLS takes the same string as the server name, which must stay bare.
    let host = if broker.host.contains(':') && !security.uses_tls(broker) {
        format!("[{}]", broker.host)
    } else {
        broker.host.clone()
    };
    let mut options = MqttOptions::new(id, host, broker.port);
    options
        .set_clean_session(true)
        .set_keep_alive(keep_alive.max(Duration::from_secs(1)))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    security.apply(broker, &mut options)?;
    Ok(options)
}

/// The client and its event loop for `options`, with `queue` requests buffered between
/// them, `TCP_NODELAY` on (without it each answer can stall ~40 ms on a delayed ACK)
/// and `connect_timeout` for each connection attempt.
pub fn start(
    options: MqttOptions,
    queue: usize,
    connect_timeout: Duration,
) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, queue);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Waits (blocking, polling every 5 ms) until something accepts TCP connections at
/// `addr` (an unspecified address is reached on loopback): a broker just started on a
/// thread or in a process, so that the first connection does not fail for nothing.
///
/// # Errors
/// When nothing accepts within `timeout`.
pub fn wait_listening(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let reach = match addr.ip() {
        ip if ip.is_unspecified() => std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())),
        _ => addr,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect(reach) {
            Ok(_) => return Ok(()),
            Err(error) if std::time::Instant::now() > deadline => {
                return Err(std::io::Error::new(
                    error.kind(),
                    format!("nothing listens on {reach} after {timeout:?}: {error}"),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_broker_is_bracketed_for_plain_tcp_only() {
        let plain: BrokerUrl = "mqtt://[::1]:1884".parse().expect("valid URL");
        let bracketed =
            options("c", &plain, &Security::default(), Duration::from_secs(5)).expect("options");
        assert_eq!(bracketed.broker_address(), ("[::1]".to_owned(), 1884));
        // TLS names the server by the bare address.
        let tls: BrokerUrl = "mqtts://[::1]:8883".parse().expect("valid URL");
        let named =
            options("c", &tls, &Security::default(), Duration::from_secs(5)).expect("options");
        assert_eq!(named.broker_address(), ("::1".to_owned(), 8883));
        let v4: BrokerUrl = "mqtt://127.0.0.1:1884".parse().expect("valid URL");
        let bare =
            options("c", &v4, &Security::default(), Duration::from_secs(5)).expect("options");
        assert_eq!(bare.broker_address(), ("127.0.0.1".to_owned(), 1884));
        assert_eq!(bare.max_packet_size(), MAX_PACKET);
    }
}
