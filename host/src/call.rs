//! What a call is, for every module on its path: why it can fail ([`CallError`], each
//! case one status), what goes back ([`Answer`]), and what a handler version runs with
//! ([`HandlerContext`]). It depends on nothing in the host but [`crate::config`], so the
//! modules of the call path import it and each other one way.

use std::collections::BTreeMap;
use std::time::Duration;

use edge_proto::{ErrorBody, ErrorCode, PayloadError};

use crate::config::Grants;

/// Why a call did not get a handler's answer. Each case maps to one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The method name breaks the protocol's naming rules.
    #[error("{0}")]
    InvalidMethod(String),
    /// The payload is not UTF-8 JSON.
    #[error("{0}")]
    InvalidPayload(PayloadError),
    /// The payload is over the limit.
    #[error("{0}")]
    PayloadTooLarge(PayloadError),
    /// No loaded handler serves the method.
    #[error("no handler serves method '{0}'")]
    MethodNotFound(String),
    /// A bound on calls in flight is reached: the host's, or the handler's own.
    #[error("too many calls in flight ({scope} limit {limit}); try again later")]
    TooManyCalls {
        /// Whose bound: `host`, or the handler file.
        scope: String,
        /// The bound.
        limit: usize,
    },
    /// The handler ran past its deadline.
    #[error("the handler ran past its deadline of {} ms", .0.as_millis())]
    Deadline(Duration),
    /// The handler's linear memory hit its cap.
    #[error("the handler exhausted its memory (limit {} MiB)", limit / (1024 * 1024))]
    MemoryExhausted {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The handler trapped (a panic, an unreachable, a failed instantiation).
    #[error("the handler failed: {0}")]
    Trapped(String),
    /// The handler answered something that is not JSON, or too large.
    #[error("the handler's answer is invalid: {0}")]
    InvalidResponse(PayloadError),
    /// The host is shutting down and takes no new calls.
    #[error("the device is shutting down and takes no new calls")]
    ShuttingDown,
}

impl CallError {
    /// The protocol's error code (and so the status) for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidMethod(_) => ErrorCode::InvalidMethod,
            Self::InvalidPayload(_) => ErrorCode::InvalidJson,
            Self::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::MethodNotFound(_) => ErrorCode::MethodNotFound,
            Self::TooManyCalls { .. } => ErrorCode::TooManyCalls,
            Self::Deadline(_) => ErrorCode::DeadlineExceeded,
            Self::MemoryExhausted { .. } | Self::Trapped(_) => ErrorCode::HandlerFailed,
            Self::InvalidResponse(_) => ErrorCode::InvalidResponse,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }

    /// The status the caller sees.
    pub fn status(&self) -> u16 {
        self.code().status()
    }

    /// The answer the host publishes for this failure.
    pub fn answer(&self) -> Answer {
        Answer {
            status: self.status(),
            payload: ErrorBody::new(self.code(), self.to_string()).to_json(),
        }
    }
}

/// What goes back to the caller: a status and a JSON payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status, in the response topic.
    pub status: u16,
    /// The JSON payload.
    pub payload: Vec<u8>,
}

/// What a handler version knows about itself, shared by all its calls.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The handler's file name, such as `echo.wasm`, for logs.
    pub file: String,
    /// The device id the host serves.
    pub device_id: String,
    /// The handler's own configuration values (its sidecar's `[config]` table).
    pub config: BTreeMap<String, String>,
    /// The linear-memory cap of one instance, in bytes.
    pub max_memory: usize,
    /// What WASI gives the handler beyond nothing.
    pub grants: Grants,
    /// Whether warm instances are reused across calls (the handler declares it keeps
    /// no state between them), and how many calls one instance serves at most.
    pub reuse: Option<u32>,
}
