//! Who is connected, who subscribed to what, and the retained messages: the broker's
//! whole state, owned by its one thread (no locks), changed only by the sessions.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{Notify, mpsc};

/// How many messages may wait for one slow subscriber before more are dropped (as
/// Mosquitto's `max_queued_messages`, whose default is 1000).
pub const MAX_QUEUED: usize = 1000;

/// A connection's number, unique for the broker's life: client ids are reused, these
/// are not, so a replaced session can never act for its successor.
pub type Serial = u64;

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The topic it was published on.
    pub topic: Rc<str>,
    /// Its payload, shared by every subscriber it goes to.
    pub payload: Bytes,
    /// The QoS it goes at: the lower of the publish's and the subscription's.
    pub qos: QoS,
    /// Whether it is a retained message sent because of a new subscription.
    pub retain: bool,
}

/// A message published to the broker, or a will about to be.
#[derive(Debug, Clone)]
pub struct Message {
    /// Where it goes.
    pub topic: String,
    /// What it carries.
    pub payload: Bytes,
    /// The publisher's QoS.
    pub qos: QoS,
    /// Whether the broker keeps it for later subscribers.
    pub retain: bool,
}

/// A connected client as the router knows it.
struct Client {
    id: String,
    mailbox: mpsc::Sender<Delivery>,
    /// Wakes the session when another connection takes over its client id.
    kick: Rc<Notify>,
    filters: Vec<String>,
    will: Option<Message>,
    /// Messages dropped because the mailbox was full, not yet reported.
    dropped: u64,
}

/// The broker's state.
#[derive(Default)]
pub struct Router {
    clients: HashMap<Serial, Client>,
    by_id: HashMap<String, Serial>,
    subscriptions: Node,
    retained: HashMap<String, (Bytes, QoS)>,
}

impl Router {
    /// Registers connection `serial` as client `id`. A connection already holding the
    /// id is replaced: it is told to close, and its will (if any) is published, as its
    /// connection ends without a DISCONNECT.
    pub fn connect(
        &mut self,
        serial: Serial,
        id: &str,
        mailbox: mpsc::Sender<Delivery>,
        kick: Rc<Notify>,
        will: Option<Message>,
    ) {
        if let Some(old) = self.by_id.get(id).copied() {
            tracing::debug!(client = %id, "a new connection takes over the client id");
            if let Some((will, kick)) = self.remove(old) {
                kick.notify_one();
                if let Some(will) = will {
                    self.publish(&will);
                }
            }
        }
        self.by_id.insert(id.to_owned(), serial);
        self.clients.insert(
            serial,
            Client {
                id: id.to_owned(),
                mailbox,
                kick,
                filters: Vec::new(),
                will,
                dropped: 0,
            },
        );
    }

    /// Forgets connection `serial` (its subscriptions too) and returns its will, which
    /// the caller publishes unless the client said DISCONNECT. Nothing when the
    /// connection was already replaced.
    pub fn disconnect(&mut self, serial: Serial) -> Option<Message> {
        self.remove(serial).and_then(|(will, _)| will)
    }

    /// Removes connection `serial`: its will and its kick.
    fn remove(&mut self, serial: Serial) -> Option<(Option<Message>, Rc<Notify>)> {
        let client = self.clients.remove(&serial)?;
        if self.by_id.get(&client.id) == Some(&serial) {
            self.by_id.remove(&client.id);
        }
        for filter in &client.filters {
            self.subscriptions.remove(filter, serial);
        }
        if client.dropped > 0 {
            tracing::warn!(client = %client.id, dropped = client.dropped, "messages to a slow subscriber were dropped");
        }
        Some((client.will, client.kick))
    }

    /// Subscribes connection `serial` to `filter` (already checked valid) at `qos`,
    /// replacing an earlier subscription to the same filter, and returns the retained
    /// messages it matches.
    pub fn subscribe(&mut self, serial: Serial, filter: &str, qos: QoS) -> Vec<Delivery> {
        let Some(client) = self.clients.get_mut(&serial) else {
            return Vec::new();
        };
        if !client.filters.iter().any(|f| f == filter) {
            client.filters.push(filter.to_owned());
        }
        self.subscriptions.insert(filter, serial, qos);
        self.retained
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(topic, (payload, stored))| Delivery {
                topic: topic.as_str().into(),
                payload: payload.clone(),
                qos: lower(*stored, qos),
                retain: true,
            })
            .collect()
    }

    /// Removes connection `serial`'s subscription to `filter`, if it has one.
    pub fn unsubscribe(&mut self, serial: Serial, filter: &str) {
        if let Some(client) = self.clients.get_mut(&serial) {
            client.filters.retain(|f| f != filter);
            self.subscriptions.remove(filter, serial);
        }
    }

    /// Routes `message` to every matching subscription (once per client, at the highest
    /// QoS among its matching filters) and keeps or clears it as the retained message of
    /// its topic. Returns how many subscribers it was handed to.
    pub fn publish(&mut self, message: &Message) -> usize {
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(&message.topic);
            } else {
                self.retained.insert(
                    message.topic.clone(),
                    (message.payload.clone(), message.qos),
                );
            }
        }
        let mut targets: Vec<(Serial, QoS)> = Vec::new();
        let levels: Vec<&str> = message.topic.split('/').collect();
        self.subscriptions
            .collect(&levels, message.topic.starts_with('$'), &mut targets);
        if targets.is_empty() {
            return 0;
        }
        targets.sort_unstable_by_key(|(serial, qos)| (*serial, std::cmp::Reverse(*qos as u8)));
        targets.dedup_by_key(|(serial, _)| *serial);
        let topic: Rc<str> = message.topic.as_str().into();
        let mut handed = 0;
        for (serial, granted) in targets {
            let Some(client) = self.clients.get_mut(&serial) else {
                continue;
            };
            let delivery = Delivery {
                topic: Rc::clone(&topic),
                payload: message.payload.clone(),
                qos: lower(message.qos, granted),
                // MQTT 3.1.1 3.3.1.3: a message routed to current subscribers goes
                // with RETAIN 0, whatever the publisher set.
                retain: false,
            };
            match client.mailbox.try_send(delivery) {
                Ok(()) => handed += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if client.dropped == 0 {
                        tracing::warn!(client = %client.id, queued = MAX_QUEUED, "a subscriber is not reading: dropping what more it is sent");
                    }
                    client.dropped += 1;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        handed
    }
}

/// The lower of two QoS levels.
fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

/// Whether `topic` matches the valid `filter`, with MQTT's rule that a filter starting
/// with a wildcard does not match a topic starting with `$`.
pub fn matches(topic: &str, filter: &str) -> bool {
    let mut levels = topic.split('/');
    for (i, f) in filter.split('/').enumerate() {
        if i == 0 && topic.starts_with('$') && (f == "+" || f == "#") {
            return false;
        }
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether `filter` is a valid MQTT topic filter: not empty, `#` only as a whole last
/// level, `+` only as a whole level, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let count = filter.split('/').count();
    filter.split('/').enumerate().all(|(i, level)| match level {
        "#" => i + 1 == count,
        "+" => true,
        _ => !level.contains(['#', '+']),
    })
}

/// Whether `topic` may be published to: not empty, no wildcard, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['#', '+', '\0'])
}

/// One level of the subscription tree: the subscribers whose filter ends here, and the
/// next levels (`+` and `#` are children like any other level). Empty branches are
/// pruned on removal, so the tree holds only live subscriptions.
#[derive(Default)]
struct Node {
    subscribers: HashMap<Serial, QoS>,
    children: HashMap<String, Node>,
}

impl Node {
    fn insert(&mut self, filter: &str, serial: Serial, qos: QoS) {
        let mut node = self;
        for level in filter.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        node.subscribers.insert(serial, qos);
    }

    fn remove(&mut self, filter: &str, serial: Serial) {
        let levels: Vec<&str> = filter.split('/').collect();
        self.remove_at(&levels, serial);
    }

    /// Removes `serial` below this node along `levels`; true when this node is left
    /// empty and can go.
    fn remove_at(&mut self, levels: &[&str], serial: Serial) -> bool {
        match levels.split_first() {
            None => {
                self.subscribers.remove(&serial);
            }
            Some((level, rest)) => {
                if let Some(child) = self.children.get_mut(*level)
                    && child.remove_at(rest, serial)
                {
                    self.children.remove(*level);
                }
            }
        }
        self.subscribers.is_empty() && self.children.is_empty()
    }

    /// Adds the subscribers of every filter matching the topic `levels` to `out`.
    /// `dollar`: the topic starts with `$`, so wildcards at the first level do not match.
    fn collect(&self, levels: &[&str], dollar: bool, out: &mut Vec<(Serial, QoS)>) {
        if !dollar {
            // `a/#` matches `a` itself as well as everything below it.
            if let Some(all) = self.children.get("#") {
                out.extend(all.subscribers.iter().map(|(s, q)| (*s, *q)));
            }
        }
        let Some((level, rest)) = levels.split_first() else {
            out.extend(self.subscribers.iter().map(|(s, q)| (*s, *q)));
            return;
        };
        if let Some(exact) = self.children.get(*level) {
            exact.collect(rest, false, out);
        }
        if !dollar && let Some(any) = self.children.get("+") {
            any.collect(rest, false, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Node {
        fn count(&self) -> usize {
            1 + self.children.values().map(Node::count).sum::<usize>()
        }
    }

    /// rumqttd cached every topic it routed, and every call's topics are new (they carry
    /// `$rid`): an embedded broker grew ~1 KiB per call. Routing here keeps nothing.
    #[test]
    fn routing_a_stream_of_new_topics_keeps_nothing() {
        let mut router = Router::default();
        let (mailbox, mut inbox) = mpsc::channel(MAX_QUEUED);
        router.connect(1, "device", mailbox, Rc::new(Notify::new()), None);
        router.subscribe(1, "devices/d/$iothub/methods/POST/#", QoS::AtMostOnce);
        let nodes = router.subscriptions.count();
        for rid in 0..10_000 {
            let handed = router.publish(&Message {
                topic: format!("devices/d/$iothub/methods/POST/echo/?$rid={rid}"),
                payload: Bytes::from_static(b"{}"),
                qos: QoS::AtMostOnce,
                retain: false,
            });
            assert_eq!(handed, 1);
            assert!(inbox.try_recv().is_ok());
        }
        assert_eq!(router.subscriptions.count(), nodes);
        assert!(router.retained.is_empty());
        router.disconnect(1);
        assert_eq!(router.subscriptions.count(), 1, "only the root is left");
        assert!(router.clients.is_empty() && router.by_id.is_empty());
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("a/b/c", "a/b/c"));
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/b", "#"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert!(matches(
            "d/$iothub/methods/POST/m/?$rid=1",
            "d/$iothub/methods/POST/#"
        ));
    }

    #[test]
    fn only_valid_filters_and_topics_pass() {
        for good in ["a", "a/+/c", "#", "a/#", "+", "/", "$iothub/methods/POST/#"] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in ["", "a/#/c", "a#", "a+/b", "a/b#", "a\0b"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic(""));
    }

    #[test]
    fn the_tree_finds_what_the_matcher_finds_and_prunes_what_is_removed() {
        let filters = ["a/b/c", "a/+/c", "a/#", "#", "+/b/+", "$x/#", "a/b"];
        let topics = ["a/b/c", "a/b", "a", "x/b/y", "$x/b", "a/c/c"];
        let mut root = Node::default();
        for (serial, filter) in filters.iter().enumerate() {
            root.insert(filter, serial as Serial, QoS::AtLeastOnce);
        }
        for topic in topics {
            let levels: Vec<&str> = topic.split('/').collect();
            let mut found = Vec::new();
            root.collect(&levels, topic.starts_with('$'), &mut found);
            let mut found: Vec<Serial> = found.into_iter().map(|(s, _)| s).collect();
            found.sort_unstable();
            let expected: Vec<Serial> = (0..filters.len() as Serial)
                .filter(|s| matches(topic, filters[*s as usize]))
                .collect();
            assert_eq!(found, expected, "{topic}");
        }
        for (serial, filter) in filters.iter().enumerate() {
            root.remove(filter, serial as Serial);
        }
        assert!(root.children.is_empty() && root.subscribers.is_empty());
    }
}
