//! The hub's side of the backend broker: how it connects there, the presence
//! documents it publishes for devices connected through it, and [`PresenceWatch`],
//! which follows every device's retained presence (whoever publishes it: this hub,
//! another hub instance, or an edge-host connected to the broker directly).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use edge_proto::backoff::Backoff;
use edge_proto::transport::Security;
use edge_proto::{BrokerUrl, Namespace, Presence};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::watch;

/// The agent named in presence documents the hub publishes.
pub const AGENT: &str = concat!("edge-hub ", env!("CARGO_PKG_VERSION"));

/// How long the broker may take to accept a connection.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How to reach the backend broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The broker.
    pub broker: BrokerUrl,
    /// TLS files and credentials for it.
    pub security: Security,
    /// How to reach it without a socket when it runs in this process (the embedded
    /// broker's `Link`): then `broker` only names it.
    pub in_process: Option<rumqttc::Connector>,
}

impl Backend {
    /// A client for `client_id` (clean session, TCP_NODELAY, 30 s keep-alive), with
    /// `will` if given.
    ///
    /// # Errors
    /// When the TLS files or credentials cannot be applied.
    pub fn client(
        &self,
        client_id: &str,
        will: Option<rumqttc::LastWill>,
        queue: usize,
    ) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let mut options = edge_proto::client::options(
            client_id,
            &self.broker,
            &self.security,
            Duration::from_secs(30),
        )?;
        if let Some(will) = will {
            options.set_last_will(will);
        }
        if let Some(connector) = &self.in_process {
            options.set_transport(rumqttc::Transport::Custom(connector.clone()));
        }
        Ok(edge_proto::client::start(options, queue, CONNECT_WAIT))
    }
}

/// A presence document as JSON: online, or offline with a reason.
pub fn presence_json(online: bool, reason: Option<&str>) -> Vec<u8> {
    let presence = Presence {
        online,
        // The will is written at connect time: it cannot know when the device dropped.
        since: (reason != Some("connection-lost"))
            .then(|| humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        reason: reason.map(str::to_owned),
        agent: Some(AGENT.to_owned()),
    };
    serde_json::to_vec(&presence).unwrap_or_default()
}

/// Every device's last retained presence on the backend, kept up to date by a task.
/// Clones share it.
#[derive(Clone)]
pub struct PresenceWatch {
    devices: Arc<Mutex<HashMap<String, Presence>>>,
    changed: watch::Sender<u64>,
    ready: watch::Receiver<bool>,
    /// The follow task, aborted when the last clone is dropped.
    _task: Arc<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PresenceWatch {
    /// Connects to the backend and follows `devices/+/$edge/presence`; reconnects with
    /// backoff for as long as a clone lives.
    ///
    /// # Errors
    /// When the client cannot be made (TLS files, credentials).
    pub fn start(backend: &Backend) -> anyhow::Result<Self> {
        let client_id = format!("edge-hub-presence-{:08x}", rand::random::<u32>());
        let (client, eventloop) = backend.client(&client_id, None, 16)?;
        let (ready_tx, ready) = watch::channel(false);
        let devices: Arc<Mutex<HashMap<String, Presence>>> = Arc::default();
        let changed = watch::Sender::new(0);
        let task = tokio::spawn(follow(
            client,
            eventloop,
            Arc::clone(&devices),
            changed.clone(),
            ready_tx,
        ));
        Ok(Self {
            devices,
            changed,
            ready,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Waits (up to `wait`) until the first subscription took effect and the retained
    /// presences arrived.
    pub async fn ready(&self, wait: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(wait, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The device's last presence, if it ever published one.
    pub fn get(&self, device: &str) -> Option<Presence> {
        self.lock().get(device).cloned()
    }

    /// Whether the device is online now.
    pub fn is_online(&self, device: &str) -> bool {
        self.get(device).is_some_and(|p| p.online)
    }

    /// Waits up to `wait` for the device to be online; true if it is.
    pub async fn wait_online(&self, device: &str, wait: Duration) -> bool {
        let mut changed = self.changed.subscribe();
        let until = tokio::time::Instant::now() + wait;
        loop {
            if self.is_online(device) {
                return true;
            }
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.is_online(device),
            }
        }
    }

    /// For a call to a device that never published presence (registered, never
    /// connected): waits up to the call's connect timeout for it to come online, and
    /// takes the wait off that timeout; false when it did not come online.
    pub async fn wait_online_for(&self, request: &mut edge_invoker::CallRequest) -> bool {
        let started = tokio::time::Instant::now();
        if !self
            .wait_online(&request.device, request.connect_timeout)
            .await
        {
            return false;
        }
        request.connect_timeout = request.connect_timeout.saturating_sub(started.elapsed());
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Presence>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn follow(
    client: AsyncClient,
    mut eventloop: EventLoop,
    devices: Arc<Mutex<HashMap<String, Presence>>>,
    changed: watch::Sender<u64>,
    ready: watch::Sender<bool>,
) {
    let filter = format!(
        "{}$edge/presence",
        Namespace::any_device(edge_proto::topic::DEFAULT_NAMESPACE)
            .unwrap_or_else(|_| "devices/+/".to_owned())
    );
    let mut backoff = Backoff::default();
    // The end of the retained burst: a QoS 1 echo on a private topic, subscribed with
    // the filter, comes back after everything the broker held for the filter.
    let sync_topic = format!("edge-hub/presence-sync/{:016x}", rand::random::<u64>());
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                let subscribe = client
                    .subscribe_many([
                        rumqttc::SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce),
                        rumqttc::SubscribeFilter::new(sync_topic.clone(), QoS::AtLeastOnce),
                    ])
                    .await;
                let echo = client
                    .publish(sync_topic.clone(), QoS::AtLeastOnce, false, Vec::new())
                    .await;
                if let Err(e) = subscribe.and(echo) {
                    tracing::warn!(error = %e, "presence watch: cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.topic == sync_topic {
                    ready.send_replace(true);
                    continue;
                }
                let Some(device) = device_of(&publish.topic) else {
                    continue;
                };
                let mut devices = devices.lock().unwrap_or_else(PoisonError::into_inner);
                if publish.payload.is_empty() {
                    devices.remove(device);
                } else if let Ok(presence) = serde_json::from_slice::<Presence>(&publish.payload) {
                    devices.insert(device.to_owned(), presence);
                }
                drop(devices);
                changed.send_modify(|n| *n += 1);
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "presence watch: backend connection lost");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The device id in `devices/{id}/$edge/presence`.
fn device_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("devices/")?
        .strip_suffix("/$edge/presence")
        .filter(|id| !id.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_topics_name_their_device() {
        assert_eq!(device_of("devices/d1/$edge/presence"), Some("d1"));
        assert_eq!(device_of("devices/a/b/$edge/presence"), None);
        assert_eq!(device_of("other/d1/$edge/presence"), None);
    }
}
