//! Dispatch: one request in, one answer out. Checks the payload, finds the handler
//! version that serves the method, bounds the calls in flight (the host's and the
//! handler's own), awaits the call in the sandbox, and turns every failure into the
//! status and error body the protocol documents.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_proto::PayloadError;
use edge_proto::message::json_payload;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::call::{Answer, CallError};
use crate::config::DispatchLimits;
use crate::registry::{HandlerVersion, Registry};
use crate::sandbox::{Request, Spent};

/// What a served call still holds once its answer is ready: its fresh instance and its
/// places in the in-flight bounds. Drop it once the answer is queued: tearing the
/// instance down then costs the caller nothing, and the bounds count instances, not
/// answers.
#[derive(Default)]
pub struct CallGuard {
    _spent: Option<Spent>,
    _permits: Vec<OwnedSemaphorePermit>,
}

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

    /// Serves one call and returns the answer to publish, whatever happened, with what
    /// the call still holds (drop it after publishing). `caller_timeout` is how long
    /// the caller waits, when it said: the handler is ended in time to answer before
    /// then.
    pub async fn dispatch(
        &self,
        method: &str,
        request_id: &str,
        caller_timeout: Option<Duration>,
        payload: &[u8],
    ) -> (Answer, CallGuard) {
        let started = Instant::now();
        let outcome = self.run(method, request_id, caller_timeout, payload).await;
        let answered = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
        let elapsed_us = started.elapsed().as_micros();
        // In the macros' fields: evaluated only when the line is logged.
        let shown = || String::from_utf8_lossy(&payload[..payload.len().min(256)]);
        match outcome {
            Ok((answer, version, guard)) => {
                tracing::info!(
                    method, rid = request_id, payload = %shown(), status = answer.status,
                    handler = %version.label(), code = %version.code.tier(), elapsed_us,
                    calls_confirmed = answered, "method called"
                );
                (answer, guard)
            }
            Err(error) => {
                tracing::warn!(
                    method, rid = request_id, payload = %shown(), status = error.status(),
                    elapsed_us, calls_confirmed = answered, %error,
                    "method failed"
                );
                (error.answer(), CallGuard::default())
            }
        }
    }

    async fn run(
        &self,
        method: &str,
        request_id: &str,
        caller_timeout: Option<Duration>,
        payload: &[u8],
    ) -> Result<(Answer, Arc<HandlerVersion>, CallGuard), CallError> {
        let payload = json_payload(payload, self.limits.max_payload).map_err(|e| match e {
            PayloadError::TooLarge { .. } => CallError::PayloadTooLarge(e),
            _ => CallError::InvalidPayload(e),
        })?;
        let version = self
            .registry
            .lookup(method)
            .ok_or_else(|| CallError::MethodNotFound(method.to_owned()))?;
        let mut permits = Vec::with_capacity(2);
        permits.push(
            Arc::clone(&self.in_flight)
                .try_acquire_owned()
                .map_err(|_| CallError::TooManyCalls {
                    scope: "host".to_owned(),
                    limit: self.limits.max_in_flight,
                })?,
        );
        if let Some(bound) = &version.in_flight {
            permits.push(Arc::clone(bound).try_acquire_owned().map_err(|_| {
                CallError::TooManyCalls {
                    scope: version.file.clone(),
                    limit: version.max_in_flight.unwrap_or_default(),
                }
            })?);
        }
        let deadline = caller_timeout.map_or(version.timeout, |t| t.min(version.timeout));
        let request = Request {
            method: method.to_owned(),
            payload: payload.to_owned(),
            request_id: request_id.to_owned(),
            time_left_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
        };
        let (response, spent) = version.code.call(&request, deadline).await?;
        let guard = CallGuard {
            _spent: Some(spent),
            _permits: permits,
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
            version,
            guard,
        ))
    }
}
