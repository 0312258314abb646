//! Which way a command reaches the devices: the broker (MQTT, [`Caller`]), or IoT Hub's
//! service REST API when a service connection string is given ([`HubClient`]). Both
//! answer the same questions with the same types, so the commands and their output do
//! not care which.

use crate::call::{CallError, CallRequest, MethodResponse};
use crate::caller::Caller;
use crate::cli::Settings;
use crate::fleet::{self, DeviceState};
use crate::iothub::HubClient;

/// A connected way to the devices; clones share it.
#[derive(Clone)]
pub enum Via {
    /// One MQTT session on the broker.
    Broker(Caller),
    /// IoT Hub's service API (one HTTPS connection pool).
    Hub(HubClient),
}

impl Via {
    /// Connects the way `settings` say: the hub when a connection string is set, else
    /// the broker.
    ///
    /// # Errors
    /// [`CallError::Connect`] when the broker cannot be reached; [`CallError::Hub`] when
    /// the hub's TLS cannot be set up (nothing is sent to the hub yet).
    pub async fn connect(settings: &Settings) -> Result<Self, CallError> {
        match &settings.hub {
            Some(hub) => Ok(Self::Hub(HubClient::new(
                hub.connection.clone(),
                hub.ca_file.as_deref(),
            )?)),
            None => Ok(Self::Broker(
                Caller::connect(settings.connect.clone()).await?,
            )),
        }
    }

    /// Calls a method on a device (see [`Caller::call`] and [`HubClient::call`]).
    ///
    /// # Errors
    /// Why there is no answer.
    pub async fn call(&self, request: &CallRequest) -> Result<MethodResponse, CallError> {
        match self {
            Self::Broker(caller) => caller.call(request).await,
            Self::Hub(hub) => hub.call(request).await,
        }
    }

    /// Every device known: on the broker those with a retained presence under the
    /// namespace `template`, on the hub those in its registry.
    ///
    /// # Errors
    /// When the broker or the hub fails, or the template has no device level.
    pub async fn devices(&self, template: &str) -> Result<Vec<DeviceState>, CallError> {
        match self {
            Self::Broker(caller) => fleet::list(caller, template).await,
            Self::Hub(hub) => hub.devices().await,
        }
    }

    /// One device's state and catalog.
    ///
    /// # Errors
    /// When the broker or the hub fails; on the hub, also when the device is not
    /// registered.
    pub async fn device(&self, template: &str, id: &str) -> Result<DeviceState, CallError> {
        match self {
            Self::Broker(caller) => fleet::device(caller, template, id).await,
            Self::Hub(hub) => hub.device(id).await,
        }
    }

    /// Where the devices are known, for messages: `the broker` or `the hub's registry`.
    pub fn known_by(&self) -> &'static str {
        match self {
            Self::Broker(_) => "the broker",
            Self::Hub(_) => "the hub's registry",
        }
    }

    /// Ends the broker session cleanly; the hub's connections just close.
    pub async fn close(&self) {
        if let Self::Broker(caller) = self {
            caller.disconnect().await;
        }
    }
}
