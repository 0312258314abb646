//! Dispatch: one request in, one answer out. Checks the payload, finds the handler
//! version that serves the method, bounds the calls in flight, runs the call on a
//! blocking thread (never on the MQTT poll loop), and turns every failure into the
//! status and error body the protocol documents.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_proto::message::json_payload;
use edge_proto::{ErrorBody, ErrorCode, PayloadError};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::Semaphore;

use crate::registry::Registry;
use crate::sandbox::Request;

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

/// Per-call limits that hold for the whole host.
#[derive(Debug, Clone)]
pub struct DispatchLimits {
    /// The largest request and response payload, in bytes.
    pub max_payload: usize,
    /// Calls that may run at once; past it, 503.
    pub max_in_flight: usize,
}

/// On a current-thread runtime, how long past a call's deadline the host waits for the
/// handler's thread before it answers 504 anyway. Epoch interruption ends running wasm
/// well within it; the wait covers a handler blocked in a host call (a WASI sleep),
/// whose thread is then left to finish on its own while the caller has its answer.
const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// Runs calls against the handlers in the registry.
pub struct Dispatcher {
    registry: Arc<Registry>,
    limits: DispatchLimits,
    in_flight: Arc<Semaphore>,
    answered: AtomicU64,
}

impl Dispatcher {
    /// A dispatcher over `registry` with `limits`.
    pub fn new(registry: Arc<Registry>, limits: DispatchLimits) -> Self {
        Self {
            registry,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            limits,
            answered: AtomicU64::new(0),
        }
    }

    /// Serves one call and returns the answer to publish, whatever happened.
    /// `caller_timeout` is how long the caller waits, when it said: the handler is ended
    /// in time to answer before then.
    pub async fn dispatch(
        &self,
        method: &str,
        request_id: &str,
        caller_timeout: Option<Duration>,
        payload: &[u8],
    ) -> Answer {
        let started = Instant::now();
        let outcome = self.run(method, request_id, caller_timeout, payload).await;
        let answered = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
        let elapsed_us = started.elapsed().as_micros();
        let shown = String::from_utf8_lossy(&payload[..payload.len().min(256)]);
        match outcome {
            Ok((answer, digest)) => {
                tracing::info!(
                    method, rid = request_id, payload = %shown, status = answer.status,
                    handler = %digest, elapsed_us, calls_confirmed = answered,
                    "method called"
                );
                answer
            }
            Err(error) => {
                tracing::warn!(
                    method, rid = request_id, payload = %shown, status = error.status(),
                    elapsed_us, calls_confirmed = answered, %error,
                    "method failed"
                );
                error.answer()
            }
        }
    }

    /// After the answer to a call of `method` went out: tears down what its handler's
    /// fresh instances left, off the caller's path.
    pub fn recycle(&self, method: &str) {
        if let Some(version) = self.registry.lookup(method) {
            version.code.recycle();
        }
    }

    async fn run(
        &self,
        method: &str,
        request_id: &str,
        caller_timeout: Option<Duration>,
        payload: &[u8],
    ) -> Result<(Answer, String), CallError> {
        let payload = json_payload(payload, self.limits.max_payload).map_err(|e| match e {
            PayloadError::TooLarge { .. } => CallError::PayloadTooLarge(e),
            _ => CallError::InvalidPayload(e),
        })?;
        let version = self
            .registry
            .lookup(method)
            .ok_or_else(|| CallError::MethodNotFound(method.to_owned()))?;
        let host_permit = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| CallError::TooManyCalls {
                scope: "host".to_owned(),
                limit: self.limits.max_in_flight,
            })?;
        let handler_permit = match &version.in_flight {
            Some(bound) => Some(Arc::clone(bound).try_acquire_owned().map_err(|_| {
                CallError::TooManyCalls {
                    scope: version.file.clone(),
                    limit: version.max_in_flight.unwrap_or_default(),
                }
            })?),
            None => None,
        };
        let deadline = caller_timeout.map_or(version.timeout, |t| t.min(version.timeout));
        let request = Request {
            method: method.to_owned(),
            payload: payload.to_owned(),
            request_id: request_id.to_owned(),
            time_left_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
        };
        let label = version.label();
        let run = move || {
            // Held until the handler's thread is really done, even if the caller was
            // answered 504 before: the bounds count threads, not answers.
            let _permits = (host_permit, handler_permit);
            version.code.call(&request, deadline)
        };
        let response = match Handle::current().runtime_flavor() {
            // On the multi-thread runtime the handler runs right here, on this worker
            // thread, and tokio hands the worker's other tasks to another thread: no
            // round trip to a blocking thread and back, which cost more than the sandbox
            // itself (see the README's performance section). Epoch interruption ends wasm
            // that runs past the deadline; a handler blocked in a host call (a WASI sleep)
            // is answered 504 when that call returns.
            RuntimeFlavor::MultiThread => tokio::task::block_in_place(run)?,
            // Elsewhere (a current-thread runtime cannot block in place), a blocking
            // thread, with a timer that answers 504 even while the handler is blocked.
            _ => tokio::time::timeout(deadline + DEADLINE_GRACE, tokio::task::spawn_blocking(run))
                .await
                .map_err(|_| CallError::Deadline(deadline))?
                .map_err(|e| CallError::Trapped(format!("the call's thread failed: {e}")))??,
        };
        json_payload(response.payload.as_bytes(), self.limits.max_payload)
            .map_err(CallError::InvalidResponse)?;
        let payload = if response.payload.is_empty() {
            b"null".to_vec()
        } else {
            response.payload.into_bytes()
        };
        Ok((
            Answer {
                status: response.status,
                payload,
            },
            label,
        ))
    }
}
