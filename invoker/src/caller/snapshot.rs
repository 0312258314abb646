//! Reads of what the broker retains ([`Caller::retained`]): presence and catalogs, of
//! one device or of every device under a wildcard. A read rests on the caller's
//! barrier: subscribe, sync, and what has arrived by then is everything the broker
//! held. Its subscriptions are QoS 0, so that a broker never queues (and, past its
//! queue limit, drops) a large fleet's retained messages behind its QoS 1 in-flight
//! window; the QoS 1 echo comes after them all the same, since a broker sends one
//! connection's packets in order.

use std::collections::BTreeMap;

use rumqttc::{Publish, QoS, SubscribeFilter};
use tracing::debug;

use super::Caller;
use super::routes::{Shared, lock};
use crate::call::CallError;

/// A read of what the broker holds on some filters, in progress.
pub(super) struct Snapshot {
    /// The filters subscribed to.
    pub(super) filters: Vec<String>,
    /// The last payload seen on each topic.
    messages: BTreeMap<String, Vec<u8>>,
}

impl Snapshot {
    /// Keeps `publish` if one of the filters matches its topic; an empty payload (a
    /// retained message cleared) forgets the topic.
    pub(super) fn offer(&mut self, publish: &Publish) {
        if !self
            .filters
            .iter()
            .any(|filter| topic_matches(filter, &publish.topic))
        {
            return;
        }
        if publish.payload.is_empty() {
            self.messages.remove(&publish.topic);
        } else {
            self.messages
                .insert(publish.topic.clone(), publish.payload.to_vec());
        }
    }
}

impl Caller {
    /// What the broker holds on `filters` (MQTT filters, `+` and `#` allowed): the
    /// retained message of every matching topic, by topic, as the broker holds it now
    /// (a message published meanwhile may replace one). Subscribes at QoS 0, syncs, and
    /// unsubscribes again.
    ///
    /// # Errors
    /// [`CallError::Broker`] when the session ended or the broker did not echo the sync.
    pub async fn retained(
        &self,
        filters: &[String],
    ) -> Result<BTreeMap<String, Vec<u8>>, CallError> {
        let token = format!("{:016x}", rand::random::<u64>());
        self.shared.routes(|routes| {
            routes.snapshots.insert(
                token.clone(),
                Snapshot {
                    filters: filters.to_vec(),
                    messages: BTreeMap::new(),
                },
            )
        })?;
        // Removes the entry however this read ends, cancelled included.
        let _snapshot = SnapshotGuard {
            shared: &self.shared,
            token: &token,
        };
        let read = async {
            let subscriptions = filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce));
            self.shared
                .client
                .subscribe_many(subscriptions)
                .await
                .map_err(|e| self.shared.broker_error(e))?;
            self.sync().await
        };
        let outcome = read.await;
        let (snapshot, still_wanted) = {
            let mut routes = lock(&self.shared.routes);
            let snapshot = routes.snapshots.remove(&token);
            let still_wanted: Vec<String> = routes
                .snapshots
                .values()
                .flat_map(|s| s.filters.iter())
                .chain(routes.devices.values().flat_map(|d| d.filters.iter()))
                .cloned()
                .collect();
            (snapshot, still_wanted)
        };
        outcome?;
        for filter in filters.iter().filter(|f| !still_wanted.contains(f)) {
            if let Err(e) = self.shared.client.unsubscribe(filter.clone()).await {
                debug!(error = %e, %filter, "unsubscribe");
            }
        }
        snapshot
            .map(|s| s.messages)
            .ok_or_else(|| self.shared.closed_error())
    }
}

/// Removes a read of retained messages from the routes when it ends, however it ends.
struct SnapshotGuard<'a> {
    shared: &'a Shared,
    token: &'a str,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.routes).snapshots.remove(self.token);
    }
}

/// Whether `topic` matches the MQTT subscription `filter` (`+` one level, `#` the rest).
/// As brokers do, a wildcard at the first level does not match a topic that begins
/// with `$`.
fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let (mut filter, mut topic) = (filter.split('/'), topic.split('/'));
    loop {
        match (filter.next(), topic.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters_match_topics_as_mqtt_brokers_match_them() {
        let presence = "devices/pump-1/$edge/presence";
        assert!(topic_matches("devices/+/$edge/presence", presence));
        assert!(topic_matches("devices/#", presence));
        assert!(topic_matches(presence, presence));
        assert!(topic_matches("devices/pump-1/#", "devices/pump-1"));
        assert!(!topic_matches("devices/+/$edge/methods", presence));
        assert!(!topic_matches("devices/+", presence));
        assert!(!topic_matches("devices/+/$edge/presence/x", presence));
        assert!(!topic_matches("devices/pump-2/$edge/presence", presence));
        assert!(topic_matches("+/$edge/presence", "pump-1/$edge/presence"));
        assert!(!topic_matches("+/$edge/presence", "$SYS/$edge/presence"));
        assert!(!topic_matches("#", "$SYS/broker"));
    }
}
