//! The hub's configuration, with its defaults in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use edge_proto::BrokerUrl;
use edge_proto::transport::Security;

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the registry and the local CA live.
    pub data_dir: PathBuf,
    /// The hub's name: what connection strings, usernames and tokens name, and what
    /// the local server certificate is made for.
    pub hostname: String,
    /// Where devices connect: MQTT over TLS (IoT Hub's port is 8883).
    pub mqtts_listen: SocketAddr,
    /// Where the service API listens: HTTPS (IoT Hub's port is 443).
    pub https_listen: SocketAddr,
    /// The backend broker; none starts the embedded one on [`Config::listen`].
    pub broker: Option<BrokerUrl>,
    /// Where the embedded broker listens.
    pub listen: SocketAddr,
    /// Whether the embedded broker runs on the hub's own event loop rather than on a
    /// thread of its own: for a hub on a current-thread runtime, which must then call
    /// [`crate::Hub::start`] inside a `tokio::task::LocalSet`.
    pub broker_on_hub_thread: bool,
    /// TLS files and credentials for the backend broker.
    pub backend_security: Security,
    /// A server certificate chain (PEM) to use instead of the local CA's.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
}

/// The default hostname.
pub const DEFAULT_HOSTNAME: &str = "localhost";
/// The default device endpoint: every interface, IoT Hub's MQTT port.
pub const DEFAULT_MQTTS_LISTEN: &str = "0.0.0.0:8883";
/// The default service endpoint: loopback only, since it carries the registry's keys.
pub const DEFAULT_HTTPS_LISTEN: &str = "127.0.0.1:8443";
/// The default embedded broker address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            hostname: DEFAULT_HOSTNAME.to_owned(),
            mqtts_listen: parse_default(DEFAULT_MQTTS_LISTEN),
            https_listen: parse_default(DEFAULT_HTTPS_LISTEN),
            broker: None,
            listen: parse_default(DEFAULT_LISTEN),
            broker_on_hub_thread: false,
            backend_security: Security::default(),
            cert_file: None,
            key_file: None,
        }
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The user's data folder for the hub: `$XDG_DATA_HOME/edge-hub`, else
/// `~/.local/share/edge-hub`, else `./edge-hub-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("edge-hub");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/edge-hub");
    }
    PathBuf::from("edge-hub-data")
}

impl Config {
    /// The `HostName` a service connection string names: the hostname, with the
    /// service port unless it is 443 (the SDKs then call `https://host:port`).
    pub fn service_host_name(&self) -> String {
        match self.https_listen.port() {
            443 => self.hostname.clone(),
            port => format!("{}:{port}", self.hostname),
        }
    }
}
