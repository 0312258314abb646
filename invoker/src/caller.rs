//! [`Caller`]: one MQTT session to the broker, shared by any number of concurrent calls.
//!
//! Before the first call to a device the caller subscribes to the device's responses
//! and presence, then publishes a token to its own private topic and waits for the echo.
//! It unsubscribes once no call has used the device for
//! [`ConnectOptions::idle_device`] (10 minutes by default), so that a long-lived session
//! calling a fleet (edge-hub's) holds only the devices it calls.
//! The broker handles one connection's packets in order, so once the echo is back the
//! SUBSCRIBE took effect and a retained presence, if any, has been delivered: the
//! caller knows whether the device is online, offline, or publishes no presence. The
//! echo goes at QoS 1, as the presence is delivered: a broker that has QoS 1 messages
//! queued behind its in-flight window still sends QoS 0 ones at once, so a QoS 0 echo
//! could overtake the presence.
//!
//! A lost connection does not end the session: the event-loop task reconnects with
//! backoff and subscribes again; calls in flight keep waiting for their answer or
//! their response timeout (504101), as a call through IoT Hub would.
//!
//! Layout:
//! - this module: [`Caller`], the calls, the presence they wait on and the barrier
//!   (sync) they rest on;
//! - `session`: how to reach the broker ([`ConnectOptions`]), connecting, and the
//!   event-loop task;
//! - `routes`: who waits for what (calls by request id, barriers, watched devices,
//!   reads in progress) and where each incoming message goes; the task never blocks
//!   and never holds a lock across an `.await`, and calls hold none either;
//! - `snapshot`: reads of what the broker retains ([`Caller::retained`]), on the
//!   same barrier.

mod routes;
mod session;
mod snapshot;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_proto::{ErrorCode, Namespace, Presence};
use rumqttc::{QoS, SubscribeFilter};
use tokio::sync::{OnceCell, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use self::routes::{Answer, Device, Pending, PendingGuard, Routes, Shared, lock};
pub use self::session::{CONNECT_WAIT, ConnectOptions};
use crate::call::{CallError, CallRequest, MethodResponse};

/// The time left for a device's answer to reach the caller: the device is asked to end
/// the handler this long before the response timeout (at most a tenth of it).
const ANSWER_TRANSIT: Duration = Duration::from_millis(250);

/// How long the broker may take to echo a sync message before the session is deemed
/// broken (for example an ACL that forbids the caller's private topic).
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// The first pause before a request that was not delivered is sent again to a device
/// whose presence still says online; it doubles up to [`RESEND_PAUSE_MAX`].
const RESEND_PAUSE: Duration = Duration::from_millis(20);

/// The longest pause between sends of a request that was not delivered.
const RESEND_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Whether a device with this presence is called: online, or publishing none.
fn takes_calls(presence: &Option<Presence>) -> bool {
    presence.as_ref().is_none_or(|p| p.online)
}

/// A device a call is using: while this lives, its subscriptions stay; when it drops,
/// the device's idle time starts.
struct InUse {
    device: Arc<Device>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.device.touch();
    }
}

/// An MQTT session that calls methods. Clones share the session; calls on it may run
/// concurrently. The session ends with [`Caller::disconnect`], or when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Caller {
    shared: Arc<Shared>,
}

impl Caller {
    /// Connects to the broker and starts the session: returns once the broker accepted
    /// it (CONNACK).
    ///
    /// # Errors
    /// [`CallError::Connect`] naming the broker when it cannot be reached within
    /// [`CONNECT_WAIT`] or refuses the connection; the first failure ends the attempt.
    pub async fn connect(options: ConnectOptions) -> Result<Self, CallError> {
        let connected = session::connect(&options).await?;
        let sync_topic = format!("edge-invoker/{}/sync", connected.client_id);
        let shared = Arc::new(Shared {
            client: connected.client,
            sync_topic,
            broker: connected.broker,
            routes: Mutex::new(Routes::default()),
            task: Mutex::new(None),
            idle_device: options.idle_device,
        });
        // The task holds only a weak reference, so that dropping the last Caller ends it.
        let task = tokio::spawn(session::run_eventloop(
            connected.eventloop,
            Arc::downgrade(&shared),
        ));
        *lock(&shared.task) = Some(task);
        shared
            .client
            .subscribe(shared.sync_topic.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| CallError::Connect {
                broker: shared.broker.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self { shared })
    }

    /// Calls a method and waits for the device's answer, as IoT Hub's service API does:
    /// a device whose presence says offline fails at once with 404103 unless it comes
    /// online within the connect timeout; a device that publishes no presence is called
    /// anyway. The request goes at QoS 0, so it is never held for a device that
    /// reconnects later. An answer `503 notDelivered` (edge-hub's, for a device that was
    /// not taking calls; no handler saw the request) is not the device's: the request is
    /// sent again once the device is online, within the connect timeout, or the call
    /// fails with 404103.
    ///
    /// # Errors
    /// [`CallError::Argument`] (nothing sent), [`CallError::NotOnline`],
    /// [`CallError::Timeout`], or [`CallError::Broker`] when the session ended.
    pub async fn call(&self, request: &CallRequest) -> Result<MethodResponse, CallError> {
        let checked = request.check()?;
        let namespace = checked.namespace;
        let in_use = self.watch_device(&namespace).await?;
        let mut presence = in_use.device.presence.subscribe();
        let connect_by = Instant::now() + request.connect_timeout;
        let mut pause = RESEND_PAUSE;
        loop {
            self.wait_online(&mut presence, request, connect_by).await?;
            let answer = self.send(&namespace, request, checked.payload).await?;
            if !ErrorCode::NotDelivered.answered(answer.status, &answer.publish.payload) {
                return Ok(MethodResponse::from_wire(
                    answer.status,
                    &answer.publish.payload,
                ));
            }
            // No handler saw it (a device through edge-hub between unsubscribing and
            // reconnecting): sent again once the device is back, within the connect
            // timeout, as a call to an offline device would be.
            debug!(device = %request.device, "not delivered; waiting for the device to take calls");
            if Instant::now() >= connect_by {
                return Err(CallError::NotOnline {
                    device: request.device.clone(),
                });
            }
            // Its offline presence came before this answer; a presence that still says
            // online after a sync is the device back already, or a relay that keeps
            // refusing: a pause, growing, keeps the latter from becoming a busy loop.
            self.sync().await?;
            if takes_calls(&presence.borrow_and_update()) {
                tokio::time::sleep_until(connect_by.min(Instant::now() + pause)).await;
                pause = (pause * 2).min(RESEND_PAUSE_MAX);
            }
        }
    }

    /// Sends the request once and waits for its answer, for up to the response timeout.
    async fn send(
        &self,
        namespace: &Namespace,
        request: &CallRequest,
        payload: &str,
    ) -> Result<Answer, CallError> {
        let request_id = format!("{:016x}", rand::random::<u64>());
        let (answer_tx, answer_rx) = oneshot::channel();
        self.shared.routes(|routes| {
            routes.pending.insert(
                request_id.clone(),
                Pending {
                    prefix: namespace.prefix().to_owned(),
                    answer: answer_tx,
                },
            );
        })?;
        // Removes the entry however this call ends: answered, timed out or cancelled.
        let _pending = PendingGuard {
            shared: &self.shared,
            request_id: &request_id,
        };
        // The device ends the handler in time to answer before this call gives up,
        // leaving the answer this long to travel back.
        let budget = request.response_timeout - ANSWER_TRANSIT.min(request.response_timeout / 10);
        let topic = namespace.request_topic_with_timeout(&request.method, &request_id, budget);
        debug!(%topic, "request");
        self.shared
            .client
            .publish(topic, QoS::AtMostOnce, false, payload.as_bytes().to_vec())
            .await
            .map_err(|e| self.shared.broker_error(e))?;

        match tokio::time::timeout(request.response_timeout, answer_rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(CallError::Timeout {
                device: request.device.clone(),
                method: request.method.clone(),
                after: request.response_timeout,
            }),
        }
    }

    /// Ends the session cleanly (MQTT DISCONNECT) and waits, briefly, for the event loop
    /// to send it. Calls still in flight on clones fail with [`CallError::Broker`].
    pub async fn disconnect(&self) {
        if let Err(e) = self.shared.client.disconnect().await {
            debug!(error = %e, "disconnect: event loop already gone");
        }
        let Some(task) = lock(&self.shared.task).take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            warn!("the broker did not take the DISCONNECT within 2s");
        }
    }

    /// The device, its presence subscribed to with its responses: subscribes and syncs
    /// the first time (or the first time after it was idle and forgotten), and waits
    /// for a concurrent first time to finish. Its presence receivers fail once the
    /// session ends.
    async fn watch_device(&self, namespace: &Namespace) -> Result<InUse, CallError> {
        let presence_topic = namespace.presence_topic();
        let device = self.shared.routes(|routes| {
            routes.forget_idle(&self.shared.client, self.shared.idle_device);
            Arc::clone(
                routes
                    .devices
                    .entry(presence_topic.clone())
                    .or_insert_with(|| {
                        Arc::new(Device {
                            filters: [namespace.response_filter(), presence_topic.clone()],
                            presence: watch::Sender::new(None),
                            subscribed: OnceCell::new(),
                            last_used: Mutex::new(std::time::Instant::now()),
                        })
                    }),
            )
        })?;
        device
            .subscribed
            .get_or_try_init(|| async {
                let filters = device
                    .filters
                    .clone()
                    .map(|filter| SubscribeFilter::new(filter, QoS::AtLeastOnce));
                self.shared
                    .client
                    .subscribe_many(filters)
                    .await
                    .map_err(|e| self.shared.broker_error(e))?;
                self.sync().await
            })
            .await?;
        Ok(InUse { device })
    }

    /// How many devices the session is subscribed to (their responses and presence):
    /// those called in the last [`ConnectOptions::idle_device`], or being called.
    pub fn watched_devices(&self) -> usize {
        self.shared
            .routes(|routes| routes.devices.len())
            .unwrap_or(0)
    }

    /// Waits until the device is not known to be offline, until `connect_by` (the call's
    /// connect timeout).
    async fn wait_online(
        &self,
        presence: &mut watch::Receiver<Option<Presence>>,
        request: &CallRequest,
        connect_by: Instant,
    ) -> Result<(), CallError> {
        if takes_calls(&presence.borrow_and_update()) {
            return Ok(());
        }
        // The offline state may be stale: a device that just came back has published
        // `online`, and the broker may have sent it without it being routed yet. A sync
        // routes everything sent before it, so "offline" after it is the broker's word.
        self.sync().await?;
        if takes_calls(&presence.borrow_and_update()) {
            return Ok(());
        }
        let not_online = || CallError::NotOnline {
            device: request.device.clone(),
        };
        if Instant::now() >= connect_by {
            return Err(not_online());
        }
        debug!(device = %request.device, "offline; waiting for it to come online");
        match tokio::time::timeout_at(connect_by, presence.wait_for(takes_calls)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(not_online()),
        }
    }

    /// Publishes a unique token to the caller's private topic and waits for the echo:
    /// everything the broker sent before it has been routed.
    async fn sync(&self) -> Result<(), CallError> {
        let token = format!("{:016x}", rand::random::<u64>());
        let (echo_tx, echo_rx) = oneshot::channel();
        self.shared.routes(|routes| {
            routes.barriers.insert(token.clone(), echo_tx);
        })?;
        let publish = self
            .shared
            .client
            .publish(
                self.shared.sync_topic.clone(),
                QoS::AtLeastOnce,
                false,
                token.clone().into_bytes(),
            )
            .await;
        let outcome = match publish {
            Err(e) => Err(self.shared.broker_error(e)),
            Ok(()) => match tokio::time::timeout(SYNC_WAIT, echo_rx).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(self.shared.closed_error()),
                Err(_) => Err(CallError::Broker(format!(
                    "the broker at {} did not echo a message on {} within {}s \
                     (is the client allowed to publish and subscribe there?)",
                    self.shared.broker,
                    self.shared.sync_topic,
                    SYNC_WAIT.as_secs()
                ))),
            },
        };
        if outcome.is_err() {
            let _ = self.shared.routes(|routes| routes.barriers.remove(&token));
        }
        outcome
    }
}
