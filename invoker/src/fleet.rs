//! What the broker knows of devices without calling them: each device's retained
//! presence and method catalog, for one device ([`device`]) or for every device under
//! the namespace ([`list`]).

use std::collections::BTreeMap;

use edge_proto::topic::check_device_id;
use edge_proto::{Catalog, Namespace, Presence};
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::call::{ArgumentError, CallError};
use crate::caller::Caller;

/// A device as the broker knows it: what its retained documents say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device id.
    pub device: String,
    /// Its retained presence, when it publishes one.
    pub presence: Option<Presence>,
    /// Its retained method catalog, when it publishes one.
    pub catalog: Option<Catalog>,
}

impl DeviceState {
    /// Whether the device's presence says it is online.
    pub fn is_online(&self) -> bool {
        self.presence.as_ref().is_some_and(|p| p.online)
    }
}

/// Every device whose presence the broker holds under the namespace `template`, online
/// or not, sorted by device id, with its catalog when it has one. Nothing is sent to
/// the devices.
///
/// # Errors
/// [`CallError::Argument`] when the template has no `{device-id}` level for a wildcard
/// to stand in; [`CallError::Broker`] when the session ends.
pub async fn list(caller: &Caller, template: &str) -> Result<Vec<DeviceState>, CallError> {
    let any = Namespace::any_device(template).map_err(ArgumentError::Name)?;
    let level = Namespace::device_level(template).ok_or_else(|| {
        ArgumentError::Name(edge_proto::NameError::NoDeviceLevel(template.to_owned()))
    })?;
    let filters = [
        format!("{any}$edge/presence"),
        format!("{any}$edge/methods"),
    ];
    let held = caller.retained(&filters).await?;

    let mut devices: BTreeMap<String, DeviceState> = BTreeMap::new();
    for (topic, payload) in &held {
        let Some(device) = topic.split('/').nth(level) else {
            continue;
        };
        if check_device_id(device).is_err() {
            continue;
        }
        let namespace = Namespace::new(template, device).map_err(ArgumentError::Name)?;
        let state = devices
            .entry(device.to_owned())
            .or_insert_with(|| DeviceState {
                device: device.to_owned(),
                presence: None,
                catalog: None,
            });
        if *topic == namespace.presence_topic() {
            state.presence = document(topic, payload);
        } else if *topic == namespace.catalog_topic() {
            state.catalog = document(topic, payload);
        }
    }
    Ok(devices
        .into_values()
        .filter(|state| state.presence.is_some())
        .collect())
}

/// One device's presence and catalog, each `None` when the broker holds none.
///
/// # Errors
/// [`CallError::Argument`] when the device id or namespace is invalid;
/// [`CallError::Broker`] when the session ends.
pub async fn device(
    caller: &Caller,
    template: &str,
    device: &str,
) -> Result<DeviceState, CallError> {
    let namespace = Namespace::new(template, device).map_err(ArgumentError::Name)?;
    let (presence_topic, catalog_topic) = (namespace.presence_topic(), namespace.catalog_topic());
    let held = caller
        .retained(&[presence_topic.clone(), catalog_topic.clone()])
        .await?;
    Ok(DeviceState {
        device: device.to_owned(),
        presence: held
            .get(&presence_topic)
            .and_then(|p| document(&presence_topic, p)),
        catalog: held
            .get(&catalog_topic)
            .and_then(|c| document(&catalog_topic, c)),
    })
}

/// A retained document, or `None` (with a warning) when it is not valid.
fn document<T: DeserializeOwned>(topic: &str, payload: &[u8]) -> Option<T> {
    match serde_json::from_slice(payload) {
        Ok(document) => Some(document),
        Err(error) => {
            warn!(%topic, %error, "ignoring a retained document that is not valid");
            None
        }
    }
}
