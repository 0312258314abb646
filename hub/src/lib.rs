//! edge-hub: a local Azure IoT Hub for direct methods. It speaks IoT Hub's device
//! protocol (MQTT over TLS, SAS tokens, bare `$iothub/...` topics) and its service REST
//! API, and relays both to the namespaced backend protocol of `docs/protocol.md`, so
//! that a device on an Azure SDK, an edge-host on the broker, edge-invoker and a
//! service app on an Azure SDK all meet on one backend.
//!
//! Layout:
//! - [`config`]: [`Config`], with the defaults in one place.
//! - [`registry`]: devices (keys, twins) and service policies, in a JSON file written
//!   atomically.
//! - [`pki`]: the local CA and server certificate made on first start, as rustls
//!   configuration.
//! - [`device`]: the device endpoint: CONNECT and its SAS token, the bare topics mapped
//!   to and from the device's backend session, twins served from the registry.
//! - [`service`]: the service API (axum): method calls through edge-invoker's
//!   [`Caller`](edge_invoker::Caller), registry and twin routes, SAS with policies.
//! - [`websocket`]: MQTT over WebSockets at `/$iothub/websocket` on the HTTPS listener,
//!   unwrapped into an ordinary device connection.
//! - [`jobs`]: `scheduleDeviceMethod` jobs, run by the instance that took them.
//! - [`query`]: the slice of IoT Hub's query language `POST /devices/query` takes.
//! - [`error`]: IoT Hub's error bodies and codes (404103, 504101, ...).
//! - [`backend`]: how the hub reaches the backend broker, the presence documents, and
//!   [`PresenceWatch`](backend::PresenceWatch), every device's presence.
//! - [`cli`]: the command line: run the hub, `device add|list|remove`,
//!   `connection-string`.
//!
//! [`Hub::start`] starts everything and returns the bound addresses; [`run`] runs
//! until an injected shutdown future completes.

pub mod backend;
pub mod cli;
pub mod config;
pub mod device;
pub mod error;
pub mod jobs;
pub mod pki;
pub mod query;
pub mod registry;
pub mod service;
pub mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edge_proto::BrokerUrl;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

pub use config::Config;
pub use registry::Registry;

/// How long a client may take for its TLS handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

/// How long connected devices get to close their sessions on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running hub.
pub struct Hub {
    /// Where devices connect (MQTT over TLS).
    pub mqtts_addr: SocketAddr,
    /// Where the service API listens (HTTPS).
    pub https_addr: SocketAddr,
    /// The backend broker.
    pub broker: BrokerUrl,
    /// The registry it serves.
    pub registry: Registry,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    caller: edge_invoker::Caller,
}

impl Hub {
    /// Opens the registry, makes or loads the TLS identity, starts the embedded broker
    /// unless one is given, binds both listeners and connects to the backend.
    ///
    /// # Errors
    /// When the data folder, the certificates or a listener cannot be set up, or the
    /// backend broker cannot be reached.
    ///
    /// # Panics
    /// With [`Config::broker_on_hub_thread`] and no broker given, when not called
    /// inside a `tokio::task::LocalSet`.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let registry = Registry::open(&config.data_dir)?;
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => pki::Identity::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None) => pki::Identity::Local {
                dir: config.data_dir.clone(),
                names: pki::local_names(&config.hostname),
            },
            _ => anyhow::bail!("--cert-file and --key-file go together"),
        };
        let mqtt_tls = TlsAcceptor::from(pki::server_config(&identity, &[], true)?);
        let https_tls = TlsAcceptor::from(pki::server_config(&identity, &[b"http/1.1"], false)?);
        // The hub's own sessions reach an embedded broker in memory; everyone else,
        // at its address.
        let (broker, in_process) = match &config.broker {
            Some(url) => (url.clone(), None),
            None => {
                let running = edge_broker::embed(config.listen, config.broker_on_hub_thread)?;
                (running.url, Some(running.link.connector()))
            }
        };
        let backend = backend::Backend {
            broker: broker.clone(),
            security: config.backend_security.clone(),
            in_process: in_process.clone(),
        };
        let mqtts = TcpListener::bind(config.mqtts_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for devices on {} (--mqtts-listen)",
                    config.mqtts_listen
                )
            })?;
        let https = TcpListener::bind(config.https_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for the service API on {} (--https-listen)",
                    config.https_listen
                )
            })?;
        let presence = backend::PresenceWatch::start(&backend)?;
        let mut options = edge_invoker::ConnectOptions::new(broker.clone());
        options.security = config.backend_security.clone();
        options.in_process = in_process;
        let caller = edge_invoker::Caller::connect(options)
            .await
            .with_context(|| format!("cannot reach the backend broker {broker}"))?;
        if !presence.ready(Duration::from_secs(5)).await {
            warn!("the backend's retained presences did not arrive within 5 s");
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let devices = device::Devices::new(
            config.hostname.clone(),
            registry.clone(),
            backend,
            shutdown_rx.clone(),
        );
        let service = Arc::new(service::Service {
            hostname: config.hostname.clone(),
            registry: registry.clone(),
            caller: caller.clone(),
            presence,
            jobs: jobs::Jobs::default(),
            authorized: std::sync::Mutex::default(),
        });
        let mqtts_addr = mqtts.local_addr()?;
        let https_addr = https.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_devices(
            mqtts,
            mqtt_tls,
            Arc::clone(&devices),
            shutdown_rx.clone(),
        ));
        tasks.spawn(accept_service(
            https,
            https_tls,
            websocket::router(Arc::clone(&devices)).merge(service::router(service)),
            shutdown_rx,
        ));
        info!(
            hostname = %config.hostname,
            devices = %mqtts_addr,
            service = %https_addr,
            %broker,
            data = %config.data_dir.display(),
            "edge-hub running"
        );
        Ok(Self {
            mqtts_addr,
            https_addr,
            broker,
            registry,
            shutdown,
            tasks,
            caller,
        })
    }

    /// Stops taking connections, lets connected devices close their sessions (marking
    /// them offline on the backend), and disconnects from the backend.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE * 2, drain)
            .await
            .is_err()
        {
            warn!("connections did not close in time");
            self.tasks.abort_all();
        }
        self.caller.disconnect().await;
        info!("edge-hub stopped");
    }
}

/// Runs the hub until `shutdown` completes, then stops it cleanly.
///
/// # Errors
/// As [`Hub::start`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let hub = Hub::start(config).await?;
    shutdown.await;
    hub.stop().await;
    Ok(())
}

/// Completes once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, not across an await.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Accepts device connections until shutdown, then waits for their sessions to close.
async fn accept_devices(
    listener: TcpListener,
    tls: TlsAcceptor,
    devices: Arc<device::Devices>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "device listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tls = tls.clone();
                let devices = Arc::clone(&devices);
                connections.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_WAIT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let chain = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                                .unwrap_or_default();
                            device::serve(stream, devices, peer.to_string(), chain).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "device TLS handshake failed"),
                        Err(_) => debug!(%peer, "device TLS handshake timed out"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopping(&mut shutdown) => break,
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        connections.abort_all();
    }
}

/// Serves the service API over HTTPS until shutdown.
async fn accept_service(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "service listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tls = tls.clone();
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_WAIT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "service TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "service TLS handshake timed out");
                            return;
                        }
                    };
                    let served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                    if let Err(e) = served {
                        debug!(%peer, error = %e, "service connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopping(&mut shutdown) => break,
        }
    }
    connections.abort_all();
}
