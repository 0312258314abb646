//! Who waits for what in a session, and where each incoming message goes: a response
//! to the call waiting for its request id (in its namespace), the echo of a sync
//! message to its barrier, a presence update to the device's watchers, and a retained
//! message to every read in progress whose filters it matches. Calls fill the routes;
//! the event-loop task empties them, and never blocks while it does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use edge_proto::{Namespace, Presence};
use rumqttc::{AsyncClient, Publish, QoS, SubscribeFilter};
use tokio::sync::{OnceCell, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::snapshot::Snapshot;
use crate::call::CallError;

/// What the caller's clones and its event-loop task share.
pub(super) struct Shared {
    /// The handle that queues requests for the event loop.
    pub(super) client: AsyncClient,
    /// The caller's private topic, for sync messages (barriers).
    pub(super) sync_topic: String,
    /// The broker's URL, for errors.
    pub(super) broker: String,
    /// Who waits for what.
    pub(super) routes: Mutex<Routes>,
    /// The event-loop task, taken by [`Caller::disconnect`](super::Caller::disconnect).
    pub(super) task: Mutex<Option<JoinHandle<()>>>,
    /// How long a device no call uses stays subscribed.
    pub(super) idle_device: Duration,
}

/// Who waits for what: filled by calls, emptied by the event-loop task.
#[derive(Default)]
pub(super) struct Routes {
    /// Calls waiting for a response, by request id.
    pub(super) pending: HashMap<String, Pending>,
    /// Barriers waiting for their echo, by token.
    pub(super) barriers: HashMap<String, oneshot::Sender<()>>,
    /// Devices subscribed to, by presence topic. Each call holds its device's entry
    /// while it runs; [`Routes::forget_idle`] drops the others once idle.
    pub(super) devices: HashMap<String, Arc<Device>>,
    /// When idle devices were last looked for.
    pub(super) swept: Option<Instant>,
    /// Reads of retained messages in progress, by token.
    pub(super) snapshots: HashMap<String, Snapshot>,
    /// Why the session ended, once it has.
    pub(super) closed: Option<String>,
}

impl Routes {
    /// Unsubscribes from the devices no call has used for `idle` (none running, the
    /// last ended that long ago), looking at most once per quarter of `idle`. Called
    /// under the routes' lock, so that a call subscribing to the same device again
    /// queues its SUBSCRIBE after this UNSUBSCRIBE. A device none of whose UNSUBSCRIBEs
    /// can be queued now (the client's queue is full) is kept, and looked at next time.
    pub(super) fn forget_idle(&mut self, client: &AsyncClient, idle: Duration) {
        let now = Instant::now();
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < idle / 4)
        {
            return;
        }
        self.swept = Some(now);
        self.devices.retain(|topic, device| {
            // The map's own reference is the only one: no call holds it.
            let unused = Arc::strong_count(device) == 1
                && now.duration_since(*lock(&device.last_used)) >= idle;
            if !unused {
                return true;
            }
            let queued = device
                .filters
                .iter()
                .filter(|filter| client.try_unsubscribe((*filter).clone()).is_ok())
                .count();
            if queued > 0 {
                // Forgotten even if only one went: a later call subscribes to both
                // again, and a presence nobody watches is ignored.
                debug!(presence = %topic, "unsubscribed from a device no call used for a while");
            }
            queued == 0
        });
    }
}

/// A call waiting for its response.
pub(super) struct Pending {
    /// The namespace prefix the response must come under.
    pub(super) prefix: String,
    /// Where the response goes.
    pub(super) answer: oneshot::Sender<Answer>,
}

/// A response routed to its call.
pub(super) struct Answer {
    /// The status in the response topic.
    pub(super) status: u16,
    /// The response itself, its payload the device's answer.
    pub(super) publish: Publish,
}

/// A device the caller subscribed to.
pub(super) struct Device {
    /// Its response and presence filters, to subscribe to again after a reconnection.
    pub(super) filters: [String; 2],
    /// The last presence seen; `None` while the device has published none.
    pub(super) presence: watch::Sender<Option<Presence>>,
    /// Set once the subscriptions took effect (the sync echo came back).
    pub(super) subscribed: OnceCell<()>,
    /// When the last call to it ended (or began, while none has ended).
    pub(super) last_used: Mutex<Instant>,
}

impl Device {
    /// Notes that a call used it now.
    pub(super) fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }
}

impl Shared {
    /// Runs `f` on the routes while the session is open.
    pub(super) fn routes<T>(&self, f: impl FnOnce(&mut Routes) -> T) -> Result<T, CallError> {
        let mut routes = lock(&self.routes);
        match &routes.closed {
            Some(why) => Err(CallError::Broker(why.clone())),
            None => Ok(f(&mut routes)),
        }
    }

    /// The error for a call that found the session ended.
    pub(super) fn closed_error(&self) -> CallError {
        let why = lock(&self.routes).closed.clone();
        CallError::Broker(
            why.unwrap_or_else(|| format!("the session with the broker at {} ended", self.broker)),
        )
    }

    /// The error for a request the event loop did not take.
    pub(super) fn broker_error(&self, error: rumqttc::ClientError) -> CallError {
        debug!(%error, "request not queued");
        self.closed_error()
    }

    /// Ends the session: every waiting call and barrier is woken (their senders drop)
    /// and later calls fail with `why`.
    pub(super) fn close(&self, why: String) {
        let mut routes = lock(&self.routes);
        routes.closed.get_or_insert(why);
        routes.pending.clear();
        routes.barriers.clear();
        routes.devices.clear();
        routes.snapshots.clear();
    }

    /// Subscribes again, after a reconnection, to everything the session had: the sync
    /// topic and every watched device's responses and presence (whose retained value
    /// then arrives again).
    pub(super) fn resubscribe(&self) {
        let mut filters = vec![SubscribeFilter::new(
            self.sync_topic.clone(),
            QoS::AtLeastOnce,
        )];
        let routes = lock(&self.routes);
        for device in routes.devices.values() {
            filters.extend(
                device
                    .filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            );
        }
        for snapshot in routes.snapshots.values() {
            filters.extend(
                snapshot
                    .filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce)),
            );
        }
        drop(routes);
        if let Err(error) = self.client.try_subscribe_many(filters) {
            warn!(%error, "could not subscribe again after reconnecting");
        }
    }

    /// Routes one incoming message to whoever waits for it; others are ignored.
    pub(super) fn route(&self, publish: Publish) {
        if publish.topic == self.sync_topic {
            let token = String::from_utf8_lossy(&publish.payload);
            let echo = lock(&self.routes).barriers.remove(token.as_ref());
            if let Some(echo) = echo {
                let _ = echo.send(());
            }
            return;
        }
        if let Some((prefix, response)) = Namespace::parse_any_response(&publish.topic) {
            let status = response.status;
            let pending = {
                let mut routes = lock(&self.routes);
                match routes.pending.get(response.request_id) {
                    Some(p) if p.prefix == prefix => routes.pending.remove(response.request_id),
                    _ => None,
                }
            };
            match pending {
                Some(pending) => {
                    let _ = pending.answer.send(Answer { status, publish });
                }
                None => debug!(topic = %publish.topic, "a response to another call"),
            }
            return;
        }
        let device = {
            let mut routes = lock(&self.routes);
            for snapshot in routes.snapshots.values_mut() {
                snapshot.offer(&publish);
            }
            routes.devices.get(&publish.topic).cloned()
        };
        match device {
            Some(device) => {
                let presence = if publish.payload.is_empty() {
                    None // the retained presence was cleared
                } else {
                    match serde_json::from_slice::<Presence>(&publish.payload) {
                        Ok(presence) => Some(presence),
                        Err(e) => {
                            warn!(topic = %publish.topic, error = %e, "ignoring a presence that is not valid");
                            None
                        }
                    }
                };
                debug!(topic = %publish.topic, ?presence, "presence");
                device.presence.send_replace(presence);
            }
            None => debug!(topic = %publish.topic, "unexpected message"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Removes a call's entry from the routes when the call ends, however it ends.
pub(super) struct PendingGuard<'a> {
    /// The session.
    pub(super) shared: &'a Shared,
    /// The call's request id.
    pub(super) request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.routes).pending.remove(self.request_id);
    }
}

/// Locks a mutex; a panic elsewhere while it was held leaves plain maps behind, which
/// stay usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
