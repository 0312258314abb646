//! The edge-methods wire protocol, shared by the host and the invoker so that neither
//! restates it (and so that the invoker does not depend on wasmtime).
//!
//! Layout:
//! - [`backoff`]: how long to wait before reconnecting to a broker.
//! - [`broker`]: the broker address, `mqtt://host:port`.
//! - [`client`]: the one place an MQTT client is made (limits, `TCP_NODELAY`, timeouts).
//! - [`topic`]: the per-device namespace and Azure IoT Hub's direct-method topics under
//!   it: building them and parsing them back, with the names checked.
//! - [`transport`]: TLS and credentials, applied to the MQTT client's options.
//! - [`status`]: the statuses and error bodies the host answers with itself, and the
//!   service-side error codes a caller sees (404103, 504101, 400004).
//! - [`iothub`]: Azure IoT Hub's own dialect: connection strings, SAS tokens signed and
//!   verified, and a device's connection to a hub (MQTT or MQTT over WebSockets).
//! - [`message`]: the retained presence and method-catalog documents, and the payload
//!   rules (size, JSON).
//!
//! `docs/protocol.md` is the same contract in prose, with a worked example.

pub mod backoff;
pub mod broker;
pub mod client;
pub mod iothub;
pub mod message;
pub mod status;
pub mod topic;
pub mod transport;

pub use broker::BrokerUrl;
pub use message::{
    Catalog, CatalogEntry, CatalogFailure, MAX_PAYLOAD, PayloadError, Presence, json_payload,
};
pub use status::{ErrorBody, ErrorCode, ServiceError};
pub use topic::{NameError, Namespace, RequestTopic, RequestTopicError, ResponseTopic};
