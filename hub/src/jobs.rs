//! IoT Hub's jobs API for direct methods: `PUT /jobs/v2/{id}` of type
//! `scheduleDeviceMethod` calls one method on every registered device that matches
//! `queryCondition` (the `WHERE` part of [`crate::query`]), from `startTime`, for at most
//! `maxExecutionTimeInSeconds`; `GET /jobs/v2/{id}` shows its status and
//! `deviceJobStatistics`; `POST /jobs/v2/{id}/cancel` cancels it.
//!
//! Jobs live in the memory of the instance that runs them (unlike the rest of the hub,
//! they are not shared between instances) and are forgotten when it stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use edge_invoker::call::{CONNECT_TIMEOUT_SECS, DEFAULT_RESPONSE_TIMEOUT, RESPONSE_TIMEOUT_SECS};
use edge_invoker::{CallRequest, Caller};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::backend::PresenceWatch;
use crate::error::ApiError;
use crate::query::Query;

/// The longest job id, as IoT Hub's.
pub const MAX_JOB_ID: usize = 64;

/// How many calls of one job run at once.
const CONCURRENCY: usize = 16;

/// The jobs of this instance.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// One job: what was asked, and how far it got.
pub struct Job {
    request: Value,
    created: SystemTime,
    state: Mutex<State>,
    cancel: tokio::sync::watch::Sender<bool>,
    /// Each device's outcome once its call ended, as IoT Hub's `devices.jobs` lists it.
    results: Mutex<Vec<Value>>,
}

#[derive(Clone)]
struct State {
    status: &'static str,
    end: Option<SystemTime>,
    device_count: u64,
    succeeded: u64,
    failed: u64,
    running: u64,
    pending: u64,
    failure_reason: Option<String>,
}

/// What a job calls, checked.
#[derive(Clone)]
pub struct MethodJob {
    method: String,
    payload: String,
    response_timeout: Duration,
    connect_timeout: Duration,
    query: Query,
    start: SystemTime,
    max_execution: Duration,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Jobs {
    /// Checks a `PUT /jobs/v2/{id}` body.
    ///
    /// # Errors
    /// 400004 when the id, the type or the method call is not acceptable; 409 when a
    /// job of that id exists.
    pub fn check(&self, id: &str, body: &Value) -> Result<MethodJob, ApiError> {
        if id.is_empty() || id.len() > MAX_JOB_ID {
            return Err(ApiError::argument(format!(
                "job id must be 1 to {MAX_JOB_ID} characters"
            )));
        }
        if body["jobId"].as_str().is_some_and(|named| named != id) {
            return Err(ApiError::argument("the body's jobId is not the path's"));
        }
        match body["type"].as_str() {
            Some("scheduleDeviceMethod") => {}
            other => {
                return Err(ApiError::argument(format!(
                    "job type {other:?} is not supported by edge-hub (only scheduleDeviceMethod)"
                )));
            }
        }
        if self.lock().contains_key(id) {
            return Err(ApiError::new(409_000, format!("job '{id}' exists already")));
        }
        let method = &body["cloudToDeviceMethod"];
        let name = method["methodName"]
            .as_str()
            .ok_or_else(|| ApiError::argument("cloudToDeviceMethod.methodName is missing"))?;
        let secs =
            |field: &str, range: &std::ops::RangeInclusive<u64>, default: Duration| match &method
                [field]
            {
                Value::Null => Ok(default),
                value => value
                    .as_u64()
                    .filter(|s| range.contains(s))
                    .map(Duration::from_secs)
                    .ok_or_else(|| ApiError::argument(format!("{field} is out of range"))),
            };
        let condition = body["queryCondition"].as_str().unwrap_or("").trim();
        let text = if condition.is_empty() {
            "SELECT * FROM devices".to_owned()
        } else {
            format!("SELECT * FROM devices WHERE {condition}")
        };
        let query = Query::parse(&text).map_err(|e| ApiError::argument(e.to_string()))?;
        let start = match body["startTime"].as_str() {
            None => SystemTime::now(),
            Some(text) => humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
                .or_else(|_| humantime::parse_rfc3339(text))
                .map_err(|e| ApiError::argument(format!("startTime '{text}': {e}")))?,
        };
        let max_execution = Duration::from_secs(
            body["maxExecutionTimeInSeconds"]
                .as_u64()
                .unwrap_or(3600)
                .max(1),
        );
        Ok(MethodJob {
            method: name.to_owned(),
            payload: serde_json::to_string(&method["payload"]).unwrap_or_default(),
            response_timeout: secs(
                "responseTimeoutInSeconds",
                &RESPONSE_TIMEOUT_SECS,
                DEFAULT_RESPONSE_TIMEOUT,
            )?,
            connect_timeout: secs(
                "connectTimeoutInSeconds",
                &CONNECT_TIMEOUT_SECS,
                Duration::ZERO,
            )?,
            query,
            start,
            max_execution,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a checked job over `devices` (ids and twins) and returns it.
    pub fn start(
        &self,
        id: &str,
        body: Value,
        job: MethodJob,
        devices: Vec<(String, Value)>,
        caller: Caller,
        presence: PresenceWatch,
    ) -> Arc<Job> {
        let targets: Vec<String> = devices
            .into_iter()
            .filter(|(_, twin)| job.query.matches(twin))
            .map(|(id, _)| id)
            .collect();
        let count = targets.len() as u64;
        let this = Arc::new(Job {
            request: body,
            created: SystemTime::now(),
            state: Mutex::new(State {
                status: "scheduled",
                end: None,
                device_count: count,
                succeeded: 0,
                failed: 0,
                running: 0,
                pending: count,
                failure_reason: None,
            }),
            cancel: tokio::sync::watch::Sender::new(false),
            results: Mutex::new(Vec::new()),
        });
        self.lock().insert(id.to_owned(), Arc::clone(&this));
        tokio::spawn(run(
            id.to_owned(),
            Arc::clone(&this),
            job,
            targets,
            caller,
            presence,
        ));
        this
    }

    /// A job by id.
    ///
    /// # Errors
    /// 404 when there is none.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, ApiError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::new(404_000, format!("job '{id}' not found")))
    }
}

/// Calls as the service API does: a device that never published presence (registered,
/// never connected) is not online, unless it comes online within the connect timeout;
/// else the caller would wait the whole response timeout for no one.
async fn call_when_online(
    caller: &Caller,
    presence: &PresenceWatch,
    mut request: CallRequest,
) -> Result<edge_invoker::MethodResponse, edge_invoker::CallError> {
    if presence.get(&request.device).is_none() && !presence.wait_online_for(&mut request).await {
        return Err(edge_invoker::CallError::NotOnline {
            device: request.device,
        });
    }
    caller.call(&request).await
}

/// One device's outcome of job `id`, as an item of IoT Hub's `devices.jobs`: the
/// method's answer under `outcome.deviceMethodResponse`, or the error's IoT Hub name
/// and text under `error`.
fn device_result(
    id: &str,
    device: &str,
    started: SystemTime,
    outcome: &Result<edge_invoker::MethodResponse, edge_invoker::CallError>,
) -> Value {
    let (status, outcome, error) = match outcome {
        Ok(answer) => (
            "completed",
            serde_json::json!({"deviceMethodResponse": {
                "status": answer.status,
                "payload": answer.payload.to_value(),
            }}),
            Value::Null,
        ),
        Err(error) => (
            "failed",
            serde_json::json!({"deviceMethodResponse": null}),
            serde_json::json!({
                "code": error.code_and_name().map_or("InternalServerError", |(_, name)| name),
                "description": error.to_string(),
            }),
        ),
    };
    let now = rfc3339(SystemTime::now());
    let mut item = serde_json::json!({
        "deviceId": device,
        "jobId": id,
        "jobType": "scheduleDeviceMethod",
        "status": status,
        "startTimeUtc": rfc3339(started),
        "endTimeUtc": now,
        "createdDateTimeUtc": rfc3339(started),
        "lastUpdatedDateTimeUtc": now,
        "outcome": outcome,
    });
    if !error.is_null() {
        item["error"] = error;
    }
    item
}

impl Job {
    /// Each device's outcome so far, as `devices.jobs` lists them.
    pub fn device_results(&self) -> Vec<Value> {
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels the job: calls not yet made are not made.
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
        let mut state = self.state();
        if !matches!(state.status, "completed" | "failed") {
            state.status = "cancelled";
            state.end = Some(SystemTime::now());
        }
    }

    /// The job as IoT Hub's `JobResponse`.
    pub fn to_json(&self, id: &str) -> Value {
        let state = self.state().clone();
        let mut out = json!({
            "jobId": id,
            "type": "scheduleDeviceMethod",
            "queryCondition": self.request["queryCondition"],
            "cloudToDeviceMethod": self.request["cloudToDeviceMethod"],
            "maxExecutionTimeInSeconds": self.request["maxExecutionTimeInSeconds"],
            "createdTime": rfc3339(self.created),
            "startTime": self.request.get("startTime").cloned().unwrap_or_else(|| rfc3339(self.created).into()),
            "status": state.status,
            "deviceJobStatistics": {
                "deviceCount": state.device_count,
                "failedCount": state.failed,
                "succeededCount": state.succeeded,
                "runningCount": state.running,
                "pendingCount": state.pending,
            },
        });
        if let Some(end) = state.end {
            out["endTime"] = rfc3339(end).into();
        }
        if let Some(reason) = state.failure_reason {
            out["failureReason"] = reason.into();
        }
        out
    }
}

async fn run(
    id: String,
    job: Arc<Job>,
    method: MethodJob,
    targets: Vec<String>,
    caller: Caller,
    presence: PresenceWatch,
) {
    let mut cancelled = job.cancel.subscribe();
    let wait = method
        .start
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = cancelled.wait_for(|c| *c) => return,
    }
    job.state().status = "running";
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let mut calls = tokio::task::JoinSet::new();
    let all = async {
        for device in targets {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            if *job.cancel.borrow() {
                break;
            }
            {
                let mut state = job.state();
                state.pending -= 1;
                state.running += 1;
            }
            let mut request =
                CallRequest::new(device, method.method.clone(), method.payload.clone());
            request.response_timeout = method.response_timeout;
            request.connect_timeout = method.connect_timeout;
            let caller = caller.clone();
            let job = Arc::clone(&job);
            let id = id.clone();
            let presence = presence.clone();
            calls.spawn(async move {
                let started = SystemTime::now();
                let outcome = call_when_online(&caller, &presence, request.clone()).await;
                let item = device_result(&id, &request.device, started, &outcome);
                job.results
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(item);
                let mut state = job.state();
                state.running -= 1;
                match outcome {
                    Ok(_) => state.succeeded += 1,
                    Err(_) => state.failed += 1,
                }
                drop(permit);
            });
        }
        while calls.join_next().await.is_some() {}
    };
    let finished = tokio::select! {
        () = all => true,
        () = tokio::time::sleep(method.max_execution) => false,
        _ = cancelled.wait_for(|c| *c) => return,
    };
    calls.abort_all();
    let mut state = job.state();
    if state.status == "cancelled" {
        return;
    }
    state.end = Some(SystemTime::now());
    state.failed += state.running + state.pending;
    state.running = 0;
    state.pending = 0;
    if finished {
        state.status = "completed";
    } else {
        state.status = "failed";
        state.failure_reason = Some("the job ran past maxExecutionTimeInSeconds".into());
    }
}
