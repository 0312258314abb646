//! edge-host: serves Azure IoT Hub-style direct methods from sandboxed WebAssembly
//! handler components, over one MQTT session per device.
//!
//! The path of a call, and where each step lives:
//! - [`mqtt`]: the session. Receives `NS$iothub/methods/POST/{method}/?$rid={rid}`,
//!   spawns the call, publishes the answer on `NS$iothub/methods/res/{status}/?$rid=`;
//!   keeps presence and the method catalog retained; or, given a device connection
//!   string, speaks IoT Hub's own topics with SAS tokens it renews, and reports the
//!   catalog in the device twin.
//! - [`dispatch`]: checks the payload, finds the handler, bounds calls in flight (the
//!   host's and each handler's), awaits the call and maps every failure to a status
//!   ([`CallError`]).
//! - [`registry`]: which handler version serves which method; an immutable table
//!   swapped whole, so a call keeps the version it started on.
//! - [`sandbox`]: wasmtime. Compiles and pre-instantiates each version once; every call
//!   gets a fresh Store with a deadline (kept in host calls too: calls are futures) and
//!   a memory cap. A large new component serves first from a baseline (Winch) build;
//!   [`optimiser`] compiles the optimised (Cranelift) build in the background and
//!   swaps it in through the registry.
//! - [`guest_io`]: what a handler prints or logs, to the host's log, capped per call.
//! - [`loader`]: files to versions: reads the handlers folder, compiles what changed,
//!   applies the folder's state to the registry; [`watcher`] runs it on file events.
//! - [`config`]: settings and their defaults; per-handler sidecars.
//! - [`call`]: what every step above shares about a call: its errors (one status
//!   each), its answer, and the context a handler version runs with. The modules
//!   import one another one way: mqtt → dispatch → registry → sandbox → guest_io →
//!   call → config.
//!
//! [`run`] ties them together; the `edge-host` binary is a thin wrapper around it.

pub mod cache;
pub mod call;
pub mod config;
pub mod dispatch;
pub mod guest_io;
pub mod loader;
pub mod mqtt;
pub mod optimiser;
pub mod registry;
pub mod sandbox;
pub mod watcher;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use edge_proto::Namespace;

pub use call::CallError;
pub use config::Config;

use crate::dispatch::Dispatcher;
use crate::loader::Loader;
use crate::mqtt::{Link, Session, SessionConfig};
use crate::optimiser::Optimiser;
use crate::registry::Registry;
use crate::sandbox::{Sandbox, SandboxConfig};

/// Instances the pool holds beyond the calls in flight: for loading handlers, for
/// the warm instances of handlers that opted in to reuse, and for the fresh instances
/// made ahead of large handlers' calls.
const SPARE_INSTANCES: u32 = 80;

/// Requests the session holds per call that may run: the ones running, and those whose
/// answers wait for a slow broker to take them. Past it, new requests get 503 at once.
const PENDING_PER_CALL: usize = 4;

/// What a host did, reported when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Components compiled (not taken from the compiled-code cache), reloads included.
    pub compilations: u64,
}

/// Runs the host until `shutdown` completes: loads the handlers, watches their folder
/// for changes, starts the embedded broker unless an external one is configured, and
/// serves calls.
///
/// # Errors
/// When the configuration is invalid (device id, namespace, connection string), the
/// handlers folder cannot be read, the sandbox cannot be set up, the embedded broker
/// cannot start, or IoT Hub refuses the device's credentials.
/// A handler file that fails to load is not an error: it is logged and listed in the
/// catalog's failures, and the others serve.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<RunReport> {
    let hub = config.iothub()?;
    let device_id = match &hub {
        Some(endpoint) => endpoint.connection.device_id.clone(),
        None => config.device_id.clone(),
    };
    let link = hub.map(Link::IotHub);
    let namespace = Namespace::new(&config.namespace, &device_id).with_context(|| {
        format!(
            "invalid device id {device_id:?} or namespace {:?}",
            config.namespace
        )
    })?;
    let security = config.security()?;
    if link.is_none()
        && config.broker.is_none()
        && (security.tls.is_set() || security.username.is_some())
    {
        anyhow::bail!(
            "TLS files and credentials are for an external broker: give --broker mqtts://HOST:PORT \
             (the embedded broker speaks plain MQTT, on loopback by default)"
        );
    }
    let max_in_flight = u32::try_from(config.limits.max_in_flight).unwrap_or(u32::MAX);
    let sandbox = Arc::new(Sandbox::new(&SandboxConfig {
        max_instances: max_in_flight.saturating_add(SPARE_INSTANCES),
        max_memory: config
            .handler_defaults
            .max_memory
            .max(config::DEFAULT_MAX_MEMORY),
        cache_dir: config.cache_dir(),
        keep_resident: true,
        baseline: config.baseline_compiler,
    })?);
    let registry = Arc::new(Registry::new());
    let loader = Loader {
        sandbox: Arc::clone(&sandbox),
        dir: config.handlers.clone(),
        device_id: device_id.clone(),
        defaults: config.handler_defaults_with_share(),
        call_timeout: config.call_timeout(),
        optimiser: Optimiser::start(Arc::clone(&sandbox), Arc::clone(&registry)),
    };
    let loader = {
        let registry = Arc::clone(&registry);
        tokio::task::spawn_blocking(move || loader.sync(&registry).map(|()| loader)).await??
    };
    if registry.files().is_empty() {
        tracing::warn!(folder = %config.handlers.display(), "no *.wasm handlers yet; calls answer 404 until some are added");
    }
    let _watch = match watcher::watch(loader, Arc::clone(&registry)) {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "handlers will not be reloaded while the host runs");
            None
        }
    };

    let link = match link {
        Some(link) => link,
        None => {
            // The session reaches an embedded broker in memory; everyone else, at its
            // address.
            let (broker, in_process) = match &config.broker {
                Some(url) => (url.clone(), None),
                None => {
                    let running = edge_broker::embed(config.listen, config.broker_on_host_thread)?;
                    (running.url, Some(running.link.connector()))
                }
            };
            Link::Broker {
                broker,
                device_id: device_id.clone(),
                namespace,
                security,
                in_process,
            }
        }
    };
    let threads = config.threads;
    match &link {
        Link::Broker { broker, .. } => {
            tracing::info!(%device_id, %broker, threads, "serving direct methods");
        }
        Link::IotHub(endpoint) => tracing::info!(
            %device_id,
            threads,
            hub = %endpoint.connection.connect_host(),
            port = endpoint.port(),
            transport = %endpoint.transport,
            auth = ?endpoint.connection.auth,
            "serving direct methods on IoT Hub"
        ),
    }
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&registry),
        config.dispatch_limits(),
    ));
    let session = Session::new(
        SessionConfig {
            link,
            max_pending: config.limits.max_in_flight.saturating_mul(PENDING_PER_CALL),
        },
        dispatcher,
        registry,
    )?;
    session.run(shutdown).await?;
    Ok(RunReport {
        compilations: sandbox.compilations(),
    })
}
