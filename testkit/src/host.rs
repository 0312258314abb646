//! An edge-host running in the test's process, and what a caller sees of a device:
//! its retained presence and catalog.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edge_proto::client;
use edge_proto::transport::Security;
use edge_proto::{BrokerUrl, Namespace, Presence};

use crate::free_port;
use crate::wire::RawClient;

/// An edge-host running in this process, stopped through its injected shutdown.
pub struct TestHost {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<edge_host::RunReport>>,
    /// The device id it serves.
    pub device_id: String,
    /// The broker it is connected to.
    pub broker: BrokerUrl,
}

/// A host configuration for tests: `device_id` serving `handlers` through `broker`.
pub fn host_config(device_id: &str, handlers: &Path, broker: BrokerUrl) -> edge_host::Config {
    edge_host::Config {
        device_id: device_id.to_owned(),
        handlers: handlers.to_owned(),
        broker: Some(broker),
        // Tests compile afresh unless they test the cache, with a folder of their own.
        cache: false,
        ..edge_host::Config::default()
    }
}

impl TestHost {
    /// Starts a host and waits until it is online (subscribed, presence published).
    /// With no broker in `config`, the host starts its embedded broker.
    ///
    /// # Errors
    /// When the host fails to start or is not online within 30 s.
    pub async fn start(config: edge_host::Config) -> anyhow::Result<Self> {
        Self::start_within(config, Duration::from_secs(30)).await
    }

    /// Like [`TestHost::start`], waiting up to `timeout`: for handlers that take long
    /// to compile (a 12-18 MB Python or JavaScript component takes seconds, more on a
    /// busy machine).
    ///
    /// # Errors
    /// When the host fails to start or is not online within `timeout`.
    pub async fn start_within(
        config: edge_host::Config,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let broker = match &config.broker {
            Some(url) => url.clone(),
            None => BrokerUrl::tcp(config.listen.ip().to_string(), config.listen.port()),
        };
        let device_id = config.device_id.clone();
        // Presence is read with the host's own TLS files and credentials, so that a host
        // on a TLS-only or ACL-guarded broker is seen coming online too.
        let security = config.security()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(edge_host::run(config, async {
            rx.await.ok();
        }));
        let online = tokio::select! {
            online = presence_with(&broker, &security, &device_id, true, timeout) => online,
            ended = wait_task(&task) => Err(anyhow::anyhow!("the host stopped while starting: {ended:?}")),
        };
        let host = Self {
            shutdown: Some(tx),
            task,
            device_id,
            broker,
        };
        online?;
        Ok(host)
    }

    /// Shuts the host down cleanly, waits until it has, and returns its report.
    ///
    /// # Errors
    /// When the host ended with an error.
    pub async fn stop(mut self) -> anyhow::Result<edge_host::RunReport> {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        (&mut self.task).await.context("the host task panicked")?
    }
}

async fn wait_task<T>(task: &tokio::task::JoinHandle<T>) -> &'static str {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    "ended"
}

/// Waits until `device_id`'s retained presence says `online`, as a caller would see it.
///
/// # Errors
/// When the broker cannot be reached or the presence does not match within `timeout`.
pub async fn presence(
    broker: &BrokerUrl,
    device_id: &str,
    online: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    presence_with(broker, &Security::default(), device_id, online, timeout).await
}

/// Like [`presence`], connecting with `security` (TLS files, credentials).
///
/// # Errors
/// When the broker cannot be reached or the presence does not match within `timeout`.
pub async fn presence_with(
    broker: &BrokerUrl,
    security: &Security,
    device_id: &str,
    online: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let topic = Namespace::for_device(device_id)?.presence_topic();
    let client_id = format!("testkit-presence-{}-{}", std::process::id(), free_port()?);
    let options = client::options(&client_id, broker, security, Duration::from_secs(5))?;
    let (client, mut eventloop) = client::start(options, 10, client::CONNECT_TIMEOUT);
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await?;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == topic => {
                    let seen: Presence = serde_json::from_slice(&p.payload)?;
                    if seen.online == online {
                        return anyhow::Ok(());
                    }
                }
                Ok(_) => {}
                // The broker or host may still be starting: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let result = tokio::time::timeout(timeout, wait).await.with_context(|| {
        format!(
            "{device_id} not {} within {timeout:?}",
            if online { "online" } else { "offline" }
        )
    })?;
    client.disconnect().await.ok();
    result
}

/// `device_id`'s method catalog as the broker holds it now (retained).
///
/// # Errors
/// When the broker cannot be reached or holds no catalog for the device.
pub async fn catalog(broker: &BrokerUrl, device_id: &str) -> anyhow::Result<edge_proto::Catalog> {
    let topic = Namespace::for_device(device_id)?.catalog_topic();
    let mut watcher = RawClient::connect(broker, std::slice::from_ref(&topic)).await?;
    let (_, body) = watcher.next_where(Duration::from_secs(5), |_| true).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Polls `device_id`'s catalog until `check` holds for it, for at most 20 s.
///
/// # Errors
/// When it does not hold in time; the error shows the last catalog.
pub async fn catalog_until(
    broker: &BrokerUrl,
    device_id: &str,
    check: impl Fn(&edge_proto::Catalog) -> bool,
) -> anyhow::Result<edge_proto::Catalog> {
    let started = Instant::now();
    loop {
        let catalog = catalog(broker, device_id).await?;
        if check(&catalog) {
            return Ok(catalog);
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the catalog never got there; last: {catalog:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
