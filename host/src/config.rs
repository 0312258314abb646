//! Configuration: the host's settings with their defaults in one place, read from an
//! optional TOML file (see `host/edge-host.example.toml`) and overridden by flags; and
//! the per-handler settings read from a sidecar `NAME.toml` beside `NAME.wasm`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use edge_proto::BrokerUrl;
use edge_proto::iothub::{ConnectionString, DeviceEndpoint, HubTransport};
use edge_proto::transport::{Secret, TlsFiles};
use serde::Deserialize;

/// Everything the host needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The device this host is; callers address it by this id.
    pub device_id: String,
    /// The folder the handler `.wasm` files (and their sidecars) are in.
    pub handlers: PathBuf,
    /// An external broker to connect to; none starts the embedded broker.
    pub broker: Option<BrokerUrl>,
    /// TLS files for the connection to an external broker or to IoT Hub: the CA to
    /// trust (unset trusts the system's roots), and a client certificate and its key.
    pub tls: TlsFiles,
    /// A device connection string: connect to Azure IoT Hub (or a gateway, or
    /// edge-hub) as that device, instead of to a broker. A secret: never logged.
    pub connection_string: Option<Secret>,
    /// A file whose first line is the device connection string.
    pub connection_string_file: Option<PathBuf>,
    /// How to reach IoT Hub: `mqtt` (TLS, port 8883) or `mqtt-ws` (WebSockets, 443).
    pub transport: HubTransport,
    /// The IoT Hub port, when not the transport's own (tests, gateways).
    pub hub_port: Option<u16>,
    /// How long the SAS tokens signed from the connection string's key live; the host
    /// reconnects with a fresh one before each expires.
    #[serde(deserialize_with = "duration")]
    pub sas_lifetime: Duration,
    /// The MQTT username, if the broker wants one.
    pub username: Option<String>,
    /// A file whose first line is the MQTT password (`EDGE_PASSWORD` wins over it).
    pub password_file: Option<PathBuf>,
    /// Where the embedded broker listens (loopback unless set otherwise).
    pub listen: SocketAddr,
    /// Whether the embedded broker runs on the host's own event loop rather than on a
    /// thread of its own: for a host on one thread, which must then call
    /// [`crate::run`] inside a `tokio::task::LocalSet`. The binary sets it with
    /// `--threads 1` (the default); not a setting of the config file.
    #[serde(skip)]
    pub broker_on_host_thread: bool,
    /// The topic namespace template; `{device-id}` stands for the device id.
    pub namespace: String,
    /// Where compiled handler code is cached; unset means the user's cache folder
    /// (`$XDG_CACHE_HOME/edge-host` or `~/.cache/edge-host`; none without either).
    pub cache_dir: Option<PathBuf>,
    /// Whether to cache compiled handler code at all.
    pub cache: bool,
    /// Whether a large new or changed handler (1 MiB or more, such as a Python or
    /// JavaScript one) whose optimised code is not cached serves at once from a build
    /// by wasmtime's baseline compiler (Winch), until the optimised build (Cranelift),
    /// compiled in the background, replaces it.
    pub baseline_compiler: bool,
    /// The threads that run the session and the calls. One (the default) runs them on
    /// one event loop, as Mosquitto runs its clients: a request is read, run and
    /// answered without waking another thread, which is what a call of microseconds
    /// costs most. More run calls in parallel, for handlers that compute for long.
    pub threads: NonZeroUsize,
    /// Limits that hold for every call.
    pub limits: Limits,
    /// Settings of handlers whose sidecar does not set them.
    pub handler_defaults: HandlerSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_id: String::new(),
            handlers: PathBuf::from("handlers"),
            broker: None,
            tls: TlsFiles::default(),
            connection_string: None,
            connection_string_file: None,
            transport: HubTransport::default(),
            hub_port: None,
            sas_lifetime: edge_proto::iothub::DEFAULT_TOKEN_LIFETIME,
            username: None,
            password_file: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            broker_on_host_thread: false,
            namespace: edge_proto::topic::DEFAULT_NAMESPACE.to_owned(),
            cache_dir: None,
            cache: true,
            baseline_compiler: true,
            threads: NonZeroUsize::MIN,
            limits: Limits::default(),
            handler_defaults: HandlerSettings::default(),
        }
    }
}

impl Config {
    /// Reads a config file.
    ///
    /// # Errors
    /// When the file cannot be read, is not TOML, or holds an unknown key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// The folder compiled code is cached in, or none when caching is off, or when no
    /// folder is configured and neither `XDG_CACHE_HOME` nor `HOME` is set (a warning
    /// says so: the cache never falls back to a folder other users share).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache {
            return None;
        }
        let dir = self.cache_dir.clone().or_else(crate::cache::default_dir);
        if dir.is_none() {
            tracing::warn!(
                "neither XDG_CACHE_HOME nor HOME is set: compiled code is not cached \
                 (give --cache-dir to cache it)"
            );
        }
        dir
    }

    /// TLS and credentials for the broker connection; the password comes from
    /// `EDGE_PASSWORD`, else from `password_file`.
    ///
    /// # Errors
    /// When the password file cannot be read.
    pub fn security(&self) -> anyhow::Result<edge_proto::transport::Security> {
        let password =
            edge_proto::transport::password("EDGE_PASSWORD", self.password_file.as_deref())?;
        Ok(edge_proto::transport::Security {
            tls: self.tls.clone(),
            username: self.username.clone(),
            password,
        })
    }

    /// The IoT Hub this host connects to as a device, when a device connection string
    /// is configured (`connection_string`, else the first line of
    /// `connection_string_file`).
    ///
    /// # Errors
    /// When the file cannot be read, the string is not a device connection string, or
    /// it contradicts other settings (a broker, MQTT credentials, another device id).
    pub fn iothub(&self) -> anyhow::Result<Option<DeviceEndpoint>> {
        let text = match (&self.connection_string, &self.connection_string_file) {
            (Some(secret), _) => secret.expose().to_owned(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read connection string file {}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        let connection = match text.trim().parse::<ConnectionString>() {
            Ok(ConnectionString::Device(device)) => device,
            Ok(ConnectionString::Service(_)) => anyhow::bail!(
                "the connection string is a service policy's (SharedAccessKeyName): edge-host \
                 needs a device's (HostName=..;DeviceId=..;SharedAccessKey=..); edge-invoker \
                 takes the service one"
            ),
            Err(error) => anyhow::bail!("invalid device connection string: {error}"),
        };
        if self.broker.is_some() {
            anyhow::bail!(
                "a connection string connects to IoT Hub; --broker connects to an MQTT broker: give one of them"
            );
        }
        if self.username.is_some() || self.password_file.is_some() {
            anyhow::bail!(
                "MQTT credentials are for a broker: with a connection string, the host signs its own tokens"
            );
        }
        if self.namespace != edge_proto::topic::DEFAULT_NAMESPACE {
            anyhow::bail!("IoT Hub has no topic namespace: --namespace goes with --broker");
        }
        if !self.device_id.is_empty() && self.device_id != connection.device_id {
            anyhow::bail!(
                "the device id {:?} differs from the connection string's DeviceId {:?}: leave --device-id out",
                self.device_id,
                connection.device_id
            );
        }
        if self.sas_lifetime < Duration::from_secs(2) {
            anyhow::bail!("the SAS token lifetime must be at least 2 s");
        }
        Ok(Some(DeviceEndpoint {
            connection,
            transport: self.transport,
            port: self.hub_port,
            tls: self.tls.clone(),
            token_lifetime: self.sas_lifetime,
        }))
    }

    /// The longest a call may run when a handler's sidecar does not say.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.call_timeout_ms)
    }

    /// The handler defaults the loader applies: `handler_defaults`, with a bound on each
    /// handler's calls in flight where it sets none: [`HANDLER_SHARE`] of the host's, so
    /// that a handler whose calls are all stuck leaves room for the others.
    pub fn handler_defaults_with_share(&self) -> HandlerSettings {
        let mut defaults = self.handler_defaults.clone();
        defaults
            .max_in_flight
            .get_or_insert((self.limits.max_in_flight * HANDLER_SHARE.0 / HANDLER_SHARE.1).max(1));
        defaults
    }

    /// The dispatch limits these settings give.
    pub fn dispatch_limits(&self) -> DispatchLimits {
        DispatchLimits {
            max_payload: self.limits.max_payload,
            max_in_flight: self.limits.max_in_flight,
        }
    }
}

/// A duration as people write it: `"1h"`, `"90s"`.
fn duration<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Per-call limits that hold for the whole host.
#[derive(Debug, Clone)]
pub struct DispatchLimits {
    /// The largest request and response payload, in bytes.
    pub max_payload: usize,
    /// Calls that may run at once; past it, 503.
    pub max_in_flight: usize,
}

/// Limits that hold for every call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The largest request or response payload, in bytes (IoT Hub's 128 KiB).
    pub max_payload: usize,
    /// How long one call may run before it is ended with 504, in milliseconds.
    pub call_timeout_ms: u64,
    /// Calls that may run at once; past it, calls are answered 503 at once.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: edge_proto::MAX_PAYLOAD,
            call_timeout_ms: 30_000,
            max_in_flight: 64,
        }
    }
}

/// One handler's settings: from its sidecar `NAME.toml`, else the host's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerSettings {
    /// The cap on one instance's linear memory, in bytes.
    pub max_memory: usize,
    /// The longest one call may run, in milliseconds; unset takes the host's
    /// `limits.call_timeout_ms`. A caller's shorter timeout shortens it further.
    pub timeout_ms: Option<u64>,
    /// Calls of this handler that may run at once; unset, [`HANDLER_SHARE`] of the
    /// host's `limits.max_in_flight`.
    pub max_in_flight: Option<usize>,
    /// Values the handler reads with `config-get`.
    pub config: BTreeMap<String, String>,
    /// What WASI gives the handler; nothing by default.
    pub grants: Grants,
    /// The handler declares it keeps no state between calls: serve it from warm
    /// instances instead of a fresh one per call.
    pub reuse: bool,
    /// Calls one warm instance serves before it is replaced.
    pub reuse_max_calls: u32,
}

/// The share of the host's calls in flight one handler may hold unless its sidecar
/// says otherwise (numerator, denominator): three quarters, so that however one
/// handler's calls are stuck, the others keep a quarter of the host to answer in.
pub const HANDLER_SHARE: (usize, usize) = (3, 4);

/// The default linear-memory cap of one instance: 64 MiB.
pub const DEFAULT_MAX_MEMORY: usize = 64 * 1024 * 1024;

impl Default for HandlerSettings {
    fn default() -> Self {
        Self {
            max_memory: DEFAULT_MAX_MEMORY,
            timeout_ms: None,
            max_in_flight: None,
            config: BTreeMap::new(),
            grants: Grants::default(),
            reuse: false,
            reuse_max_calls: 1000,
        }
    }
}

impl HandlerSettings {
    /// Reads a sidecar's text over `defaults`: what it sets wins, key by key.
    ///
    /// # Errors
    /// When the text is not TOML or holds an unknown key.
    pub fn parse_sidecar(text: &str, defaults: &HandlerSettings) -> anyhow::Result<Self> {
        let sidecar: Sidecar = toml::from_str(text)?;
        let mut config = defaults.config.clone();
        config.extend(sidecar.config);
        if sidecar.max_in_flight == Some(0) {
            anyhow::bail!("max_in_flight must be at least 1");
        }
        if sidecar.reuse_max_calls == Some(0) {
            anyhow::bail!("reuse_max_calls must be at least 1");
        }
        Ok(Self {
            max_memory: sidecar.max_memory.unwrap_or(defaults.max_memory),
            timeout_ms: sidecar.timeout_ms.or(defaults.timeout_ms),
            max_in_flight: sidecar.max_in_flight.or(defaults.max_in_flight),
            config,
            grants: sidecar.grants.unwrap_or_else(|| defaults.grants.clone()),
            reuse: sidecar.reuse.unwrap_or(defaults.reuse),
            reuse_max_calls: sidecar.reuse_max_calls.unwrap_or(defaults.reuse_max_calls),
        })
    }
}

/// The sidecar file as written: every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    max_memory: Option<usize>,
    timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    grants: Option<Grants>,
    reuse: Option<bool>,
    reuse_max_calls: Option<u32>,
}

/// What WASI gives a handler beyond nothing: environment values and folders. Network
/// access and inherited stdio are never granted; stdout and stderr go to the host log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Environment variables the handler sees, by name and value.
    pub env: BTreeMap<String, String>,
    /// Host folders the handler may open, each under a path of its own.
    pub dirs: Vec<DirGrant>,
}

/// One host folder granted to a handler.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The folder on the host.
    pub host: PathBuf,
    /// Where the handler sees it, such as `/data`.
    pub guest: String,
    /// Whether the handler may write there; read-only unless set.
    #[serde(default)]
    pub writable: bool,
}

impl Grants {
    /// Checks that every granted folder exists and is a folder.
    ///
    /// # Errors
    /// Names the first folder that is not there.
    pub fn check(&self) -> anyhow::Result<()> {
        for dir in &self.dirs {
            if !dir.host.is_dir() {
                anyhow::bail!(
                    "granted folder {} is not a folder on this host",
                    dir.host.display()
                );
            }
        }
        Ok(())
    }

    /// Gives the grants to one call's WASI context.
    ///
    /// # Errors
    /// When a granted folder cannot be opened (it was removed since the handler loaded).
    pub fn apply(&self, wasi: &mut wasmtime_wasi::WasiCtxBuilder) -> anyhow::Result<()> {
        for (name, value) in &self.env {
            wasi.env(name, value);
        }
        for dir in &self.dirs {
            let perms = if dir.writable {
                wasmtime_wasi::FsPerms::ReadWrite
            } else {
                wasmtime_wasi::FsPerms::ReadOnly
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "granted folder {} cannot be opened: {e}",
                        dir.host.display()
                    )
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config: Config = toml::from_str("").expect("empty config parses");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 1883)));
        assert_eq!(config.limits.max_payload, 128 * 1024);
        assert!(config.broker.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_urls_are_refused() {
        assert!(toml::from_str::<Config>("devise_id = \"x\"").is_err());
        assert!(toml::from_str::<Config>("[limits]\nmax_payloads = 1").is_err());
        let err = toml::from_str::<Config>("broker = \"tcp://x\"").expect_err("bad scheme");
        assert!(err.to_string().contains("mqtt://"), "{err}");
    }

    #[test]
    fn the_example_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("edge-host.example.toml");
        let config = Config::from_file(&path).expect("example config is valid");
        assert_eq!(config.device_id, "my-device");
        assert_eq!(config.threads.get(), 1);
    }

    #[test]
    fn threads_default_to_one_event_loop_and_zero_is_refused() {
        assert_eq!(Config::default().threads.get(), 1);
        let four = toml::from_str::<Config>("threads = 4").expect("four threads");
        assert_eq!(four.threads.get(), 4);
        let err = toml::from_str::<Config>("threads = 0").expect_err("zero threads");
        assert!(err.to_string().contains("nonzero"), "{err}");
    }

    #[test]
    fn a_sidecar_overrides_the_defaults_key_by_key() {
        let mut defaults = HandlerSettings::default();
        defaults.config.insert("site".into(), "s".into());
        let text = "max_memory = 1048576\n[config]\nmodel = \"x1\"\n";
        let settings = HandlerSettings::parse_sidecar(text, &defaults).expect("sidecar parses");
        assert_eq!(settings.max_memory, 1 << 20);
        assert_eq!(settings.config.get("model").map(String::as_str), Some("x1"));
        assert_eq!(settings.config.get("site").map(String::as_str), Some("s"));
        assert!(HandlerSettings::parse_sidecar("max_memroy = 1", &defaults).is_err());
        let empty = HandlerSettings::parse_sidecar("", &defaults).expect("empty sidecar");
        assert_eq!(empty.max_memory, DEFAULT_MAX_MEMORY);
    }
}
