//! Plain MQTT clients for tests that speak the wire protocol directly and send what
//! edge-host and edge-invoker never would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_proto::client;
use edge_proto::transport::Security;
use edge_proto::{BrokerUrl, Namespace};

use crate::free_port;

/// A plain MQTT client for tests that speak the wire protocol directly: publish any
/// topic and payload, and read what arrives on the subscribed filters.
pub struct RawClient {
    client: rumqttc::AsyncClient,
    messages: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subscribed: tokio::sync::mpsc::UnboundedReceiver<()>,
    connections: Arc<AtomicUsize>,
}

/// How a [`RawClient`] connects, beyond the broker's address.
#[derive(Debug, Clone, Default)]
pub struct RawOptions {
    /// The client id to ask for; none makes a unique one.
    pub client_id: Option<String>,
    /// TLS files and credentials.
    pub security: Security,
}

impl RawClient {
    /// Connects to `broker` and subscribes to `filters` (QoS 1), waiting for the
    /// broker's acknowledgement.
    ///
    /// # Errors
    /// When the broker cannot be reached or does not acknowledge within 10 s.
    pub async fn connect(broker: &BrokerUrl, filters: &[String]) -> anyhow::Result<Self> {
        Self::connect_as(broker, filters, None).await
    }

    /// Like [`RawClient::connect`], logged in as `login` (username, password).
    ///
    /// # Errors
    /// When the broker cannot be reached or does not acknowledge within 10 s.
    pub async fn connect_as(
        broker: &BrokerUrl,
        filters: &[String],
        login: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let security = Security {
            username: login.map(|(username, _)| username.to_owned()),
            password: login.map(|(_, password)| password.to_owned()),
            ..Security::default()
        };
        let options = RawOptions {
            client_id: None,
            security,
        };
        Self::connect_with(broker, filters, &options).await
    }

    /// Like [`RawClient::connect`], with a chosen client id, TLS and credentials.
    /// Returns once the broker accepted the connection (CONNACK) and every
    /// subscription; a connection the broker refuses (CONNACK with an error code) is
    /// an error at once, one it does not answer is retried for up to 10 s.
    ///
    /// # Errors
    /// When the broker cannot be reached, refuses the connection, or does not
    /// acknowledge within 10 s.
    pub async fn connect_with(
        broker: &BrokerUrl,
        filters: &[String],
        raw: &RawOptions,
    ) -> anyhow::Result<Self> {
        let client_id = match &raw.client_id {
            Some(id) => id.clone(),
            None => format!("testkit-raw-{}-{}", std::process::id(), free_port()?),
        };
        let mut options =
            client::options(&client_id, broker, &raw.security, Duration::from_secs(5))?;
        // Larger than the host's limit, to send it what it must refuse.
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = client::start(options, 100, client::CONNECT_TIMEOUT);
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (acked, subscribed) = tokio::sync::mpsc::unbounded_channel();
        let (connected, first) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            let mut connected = Some(connected);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        if let Some(connected) = connected.take() {
                            connected.send(Ok(())).ok();
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acked.send(()).ok();
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(error @ rumqttc::ConnectionError::ConnectionRefused(_))
                        if connected.is_some() =>
                    {
                        // Refused before ever connecting: say why, and stop trying.
                        if let Some(connected) = connected.take() {
                            connected.send(Err(error.to_string())).ok();
                        }
                        return;
                    }
                    // The broker may still be starting, or was restarted: try again.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), first).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => bail!("the broker refused the connection: {why}"),
            Ok(Err(_)) => bail!("the client's task ended before connecting"),
            Err(_) => bail!("no CONNACK within 10 s"),
        }
        let mut raw = Self {
            client,
            messages,
            subscribed,
            connections,
        };
        for filter in filters {
            raw.client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await?;
            tokio::time::timeout(Duration::from_secs(10), raw.subscribed.recv())
                .await
                .with_context(|| format!("no SUBACK for {filter}"))?;
        }
        Ok(raw)
    }

    /// How many times the broker accepted this client's connection: more than one
    /// means it lost a connection and made another.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Publishes `payload` on `topic` at QoS 0, as callers send requests.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
            .await?;
        Ok(())
    }

    /// Publishes `payload` on `topic` at QoS 1, retained, as devices publish presence.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn publish_retained(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
            .await?;
        Ok(())
    }

    /// The next message whose topic satisfies `wanted`, skipping others, within
    /// `timeout`.
    ///
    /// # Errors
    /// When none arrives in time.
    pub async fn next_where(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, async {
            while let Some((topic, payload)) = self.messages.recv().await {
                if wanted(&topic) {
                    return Some((topic, payload));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .with_context(|| format!("no matching message within {timeout:?}"))
    }
}

/// What became of a message [`publish_once`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged it (PUBACK).
    Acknowledged,
    /// The broker closed the connection instead, for this reason.
    Disconnected(String),
}

/// Connects to `broker` with `security`, publishes one message at QoS 1 (packets of up
/// to 4 MiB allowed), and says whether the broker acknowledged it or cut the
/// connection; then disconnects.
///
/// # Errors
/// When the broker cannot be reached or refuses the connection, or nothing happens
/// within 10 s.
pub async fn publish_once(
    broker: &BrokerUrl,
    security: &Security,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> anyhow::Result<Delivery> {
    let client_id = format!("testkit-once-{}-{}", std::process::id(), free_port()?);
    let mut options = client::options(&client_id, broker, security, Duration::from_secs(5))?;
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = client::start(options, 10, client::CONNECT_TIMEOUT);
    let run = async {
        let mut published = false;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if !published => {
                    published = true;
                    client
                        .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.clone())
                        .await?;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    return anyhow::Ok(Delivery::Acknowledged);
                }
                Ok(_) => {}
                Err(error) if published => return Ok(Delivery::Disconnected(error.to_string())),
                Err(error) => bail!("could not connect: {error}"),
            }
        }
    };
    let delivery = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .context("neither acknowledged nor disconnected within 10 s")??;
    client.disconnect().await.ok();
    Ok(delivery)
}

/// A caller that speaks the wire protocol with a plain MQTT client, for tests that
/// send what edge-invoker never would (bad topics, non-JSON payloads, raw properties).
pub struct WireCaller {
    client: RawClient,
    namespace: Namespace,
    next_id: u64,
}

impl WireCaller {
    /// Connects to `broker` and subscribes to `device_id`'s responses.
    ///
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn connect(broker: &BrokerUrl, device_id: &str) -> anyhow::Result<Self> {
        let namespace = Namespace::for_device(device_id)?;
        let client = RawClient::connect(broker, &[namespace.response_filter()]).await?;
        Ok(Self {
            client,
            namespace,
            next_id: 0,
        })
    }

    /// The device's namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// A request id not used before by this caller.
    pub fn request_id(&mut self) -> String {
        self.next_id += 1;
        format!("w{}", self.next_id)
    }

    /// Calls `method` with `payload` and returns the status and JSON body answered.
    ///
    /// # Errors
    /// When no answer comes within 30 s, or the answer is not JSON.
    pub async fn call(
        &mut self,
        method: &str,
        payload: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let request_id = self.request_id();
        let topic = self.namespace.request_topic(method, &request_id);
        self.call_on(&topic, &request_id, payload).await
    }

    /// Publishes `payload` on `topic` (which must carry `request_id`) and returns the
    /// status and JSON body answered to `request_id`.
    ///
    /// # Errors
    /// When no answer comes within 30 s, or the answer is not JSON.
    pub async fn call_on(
        &mut self,
        topic: &str,
        request_id: &str,
        payload: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.client.publish(topic, payload).await?;
        self.answer(request_id).await
    }

    /// Publishes a request without waiting for its answer.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn send(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.client.publish(topic, payload).await
    }

    /// The status and JSON body answered to `request_id`, within 30 s.
    ///
    /// # Errors
    /// When no answer comes in time, or the answer is not JSON.
    pub async fn answer(&mut self, request_id: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let namespace = self.namespace.clone();
        let (topic, body) = self
            .client
            .next_where(Duration::from_secs(30), |t| {
                namespace
                    .parse_response(t)
                    .is_some_and(|r| r.request_id == request_id)
            })
            .await
            .with_context(|| format!("no answer to request {request_id}"))?;
        let status = self
            .namespace
            .parse_response(&topic)
            .context("response topic")?
            .status;
        let body = serde_json::from_slice(&body).with_context(|| {
            format!(
                "the answer to {request_id} is not JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok((status, body))
    }

    /// The next answer to any request: its request id, status and JSON body.
    ///
    /// # Errors
    /// When none comes within `timeout`, or it is not JSON.
    pub async fn any_answer(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(String, u16, serde_json::Value)> {
        let namespace = self.namespace.clone();
        let (topic, body) = self
            .client
            .next_where(timeout, |t| namespace.parse_response(t).is_some())
            .await?;
        let response = self
            .namespace
            .parse_response(&topic)
            .context("response topic")?;
        Ok((
            response.request_id.to_owned(),
            response.status,
            serde_json::from_slice(&body)?,
        ))
    }
}
