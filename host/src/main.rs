//! The `edge-host` binary: parses flags, sets up logging, runs [`edge_host::run`] until
//! SIGINT or SIGTERM, and maps failure to a non-zero exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edge_host::Config;
use edge_proto::BrokerUrl;
use edge_proto::iothub::HubTransport;

/// Serves direct methods (Azure IoT Hub style) from WebAssembly handlers over MQTT.
#[derive(Debug, Parser)]
#[command(
    name = "edge-host",
    version,
    after_help = "Examples:\n  \
        edge-host --device-id my-device --handlers ./handlers\n      \
        runs the embedded broker on 127.0.0.1:1883 and serves every *.wasm in ./handlers\n  \
        edge-host --device-id pump-7 --handlers /opt/handlers --broker mqtt://broker.site:1883\n      \
        connects to an existing broker instead\n  \
        EDGE_CONNECTION_STRING='HostName=my-hub.azure-devices.net;DeviceId=pump-7;SharedAccessKey=...' \\\n    \
        edge-host --handlers /opt/handlers\n      \
        answers Azure IoT Hub's direct methods as device pump-7 (add --transport mqtt-ws for port 443)\n\n\
        Logging: RUST_LOG (default info; RUST_LOG=info,edge_broker=debug also logs the embedded\n        broker's connections and why each ended)"
)]
struct Args {
    /// The device this host is; callers address it by this id.
    #[arg(long, env = "EDGE_DEVICE_ID")]
    device_id: Option<String>,

    /// The folder of handler components (*.wasm, each with an optional NAME.toml).
    #[arg(long, env = "EDGE_HANDLERS", value_name = "DIR")]
    handlers: Option<PathBuf>,

    /// An existing MQTT broker to connect to; without it the host runs its own.
    #[arg(long, env = "EDGE_BROKER", value_name = "mqtt[s]://HOST:PORT")]
    broker: Option<BrokerUrl>,

    /// PEM file of the CA certificates to trust for TLS to the broker (or use mqtts://).
    #[arg(long, env = "EDGE_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// PEM file of this host's client certificate, for mutual TLS.
    #[arg(
        long,
        env = "EDGE_CERT_FILE",
        value_name = "FILE",
        requires = "key_file"
    )]
    cert_file: Option<PathBuf>,

    /// PEM file of the client certificate's private key.
    #[arg(
        long,
        env = "EDGE_KEY_FILE",
        value_name = "FILE",
        requires = "cert_file"
    )]
    key_file: Option<PathBuf>,

    /// The MQTT username. The password comes from EDGE_PASSWORD or --password-file,
    /// never from a flag (it would show in `ps`).
    #[arg(long, env = "EDGE_USERNAME")]
    username: Option<String>,

    /// A file whose first line is the MQTT password.
    #[arg(long, env = "EDGE_PASSWORD_FILE", value_name = "FILE")]
    password_file: Option<PathBuf>,

    /// Connect to Azure IoT Hub (or a gateway, or edge-hub) as the device this device
    /// connection string names (HostName=..;DeviceId=..;SharedAccessKey=.., or
    /// SharedAccessSignature=.., or x509=true with --cert-file/--key-file), instead of
    /// to a broker. Prefer EDGE_CONNECTION_STRING or --connection-string-file: a flag
    /// shows in `ps`.
    #[arg(
        long,
        env = "EDGE_CONNECTION_STRING",
        value_name = "CS",
        hide_env_values = true,
        conflicts_with_all = ["broker", "listen", "username", "password_file", "namespace"]
    )]
    connection_string: Option<String>,

    /// A file whose first line is the device connection string.
    #[arg(
        long,
        env = "EDGE_CONNECTION_STRING_FILE",
        value_name = "FILE",
        conflicts_with_all = ["connection_string", "broker", "listen", "username", "password_file", "namespace"]
    )]
    connection_string_file: Option<PathBuf>,

    /// How to reach IoT Hub: mqtt (MQTT over TLS, port 8883) or mqtt-ws (MQTT over
    /// WebSockets, port 443, path /$iothub/websocket) [default: mqtt].
    #[arg(long, env = "EDGE_TRANSPORT", value_name = "mqtt|mqtt-ws")]
    transport: Option<HubTransport>,

    /// The IoT Hub port, when not the transport's own (8883 or 443).
    #[arg(long, env = "EDGE_HUB_PORT", value_name = "PORT")]
    hub_port: Option<u16>,

    /// How long the SAS tokens signed from the connection string's key live; the host
    /// reconnects with a fresh one before each expires [default: 1h].
    #[arg(long, env = "EDGE_SAS_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    sas_lifetime: Option<std::time::Duration>,

    /// Where the embedded broker listens. Anything but loopback exposes the broker,
    /// unauthenticated, to that network.
    #[arg(
        long,
        env = "EDGE_LISTEN",
        value_name = "ADDR",
        conflicts_with = "broker"
    )]
    listen: Option<SocketAddr>,

    /// The topic namespace; {device-id} stands for the device id.
    #[arg(long, env = "EDGE_NAMESPACE", value_name = "TEMPLATE")]
    namespace: Option<String>,

    /// Where compiled handler code is cached [default: ~/.cache/edge-host].
    #[arg(long, env = "EDGE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile every handler on every start instead of caching compiled code.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,

    /// Compile new handlers only with the optimised compiler (Cranelift): a large one
    /// (a Python or JavaScript handler) then serves only once that is done, seconds
    /// later, rather than at once from a baseline (Winch) build.
    #[arg(long)]
    no_baseline_compiler: bool,

    /// Threads that run the session and the calls [default: 1]. One event loop answers
    /// short calls with the least CPU; more run calls in parallel, for handlers that
    /// compute for long. Compiling runs on threads of its own either way.
    #[arg(long, env = "EDGE_HOST_THREADS", value_name = "N")]
    threads: Option<std::num::NonZeroUsize>,

    /// A TOML config file (see edge-host.example.toml); flags override it.
    #[arg(long, env = "EDGE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(device_id) = self.device_id {
            config.device_id = device_id;
        }
        if let Some(handlers) = self.handlers {
            config.handlers = handlers;
        }
        if let Some(broker) = self.broker {
            config.broker = Some(broker);
        }
        if let Some(ca_file) = self.ca_file {
            config.tls.ca_file = Some(ca_file);
        }
        if let Some(cert_file) = self.cert_file {
            config.tls.cert_file = Some(cert_file);
        }
        if let Some(key_file) = self.key_file {
            config.tls.key_file = Some(key_file);
        }
        if let Some(username) = self.username {
            config.username = Some(username);
        }
        if let Some(password_file) = self.password_file {
            config.password_file = Some(password_file);
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(cache_dir) = self.cache_dir {
            config.cache_dir = Some(cache_dir);
        }
        if self.no_cache {
            config.cache = false;
        }
        if self.no_baseline_compiler {
            config.baseline_compiler = false;
        }
        if let Some(threads) = self.threads {
            config.threads = threads;
        }
        if let Some(namespace) = self.namespace {
            config.namespace = namespace;
        }
        if let Some(connection_string) = self.connection_string {
            config.connection_string = Some(connection_string.into());
        }
        if let Some(file) = self.connection_string_file {
            config.connection_string_file = Some(file);
        }
        if let Some(transport) = self.transport {
            config.transport = transport;
        }
        if let Some(port) = self.hub_port {
            config.hub_port = Some(port);
        }
        if let Some(lifetime) = self.sas_lifetime {
            config.sas_lifetime = lifetime;
        }
        let on_hub = config.connection_string.is_some() || config.connection_string_file.is_some();
        if config.device_id.is_empty() && !on_hub {
            anyhow::bail!(
                "no device id: pass --device-id ID (or set EDGE_DEVICE_ID, or device_id in --config), \
             or a device connection string (--connection-string-file FILE, EDGE_CONNECTION_STRING)"
            );
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = args.into_config().and_then(|mut config| {
        let one_thread = config.threads.get() == 1;
        // On one thread the embedded broker runs on the host's event loop: a call then
        // crosses from the caller to the host and back, waking no thread in between.
        config.broker_on_host_thread = one_thread;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime(config.threads)?, async {
            let run = edge_host::run(config, shutdown_signal());
            if one_thread {
                return run.await.map(|_report| ());
            }
            // On a pool, the host runs as a task on a worker thread, not on the main
            // thread that block_on polls: that one would be woken through the worker
            // that took the socket event, an extra thread hop on every call.
            tokio::spawn(run)
                .await
                .map_err(|e| anyhow::anyhow!("the host task failed: {e}"))?
                .map(|_report| ())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("edge-host: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime the session and the calls run on: one event loop on the main thread, or
/// a pool of `threads` workers.
fn runtime(threads: std::num::NonZeroUsize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads.get());
        builder
    };
    builder.enable_all().build()
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives while the host
/// is still loading its handlers then stops it cleanly instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let wait = |listener: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match listener {
                Ok(mut listener) => {
                    listener.recv().await;
                    tracing::info!("{name} received");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(interrupt, "SIGINT") => {}
            () = wait(terminate, "SIGTERM") => {}
        }
    }
}
