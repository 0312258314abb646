//! IoT Hub's service REST API, for `--connection-string`: the same commands as on the
//! broker, through `https://{HostName}` authorized by the service policy's SAS token
//! (signed by `edge_proto::iothub`, renewed before it expires).
//!
//! | command | request |
//! |---|---|
//! | `call` | `POST /twins/{id}/methods` |
//! | `devices` | `POST /devices/query` (`SELECT * FROM devices`): the twins, each with its connection state and reported `methods` |
//! | `methods` | `GET /twins/{id}`: the reported property `methods` |
//! | `broadcast` | `PUT /jobs/v2/{id}` (scheduleDeviceMethod), `GET /jobs/v2/{id}` until it ends, then `devices.jobs` for each device's result |
//!
//! One [`HubClient`] serves a whole command: one HTTPS connection pool with keep-alive,
//! TLS trusting the system's roots or `--ca-file`, proxies from `HTTPS_PROXY` and
//! `NO_PROXY`. Nothing is retried: a refused key is one request and one error
//! ([`CallError::Unauthorized`]), never a loop.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_proto::iothub::{DEFAULT_TOKEN_LIFETIME, ServiceConnectionString, encode, unix_now};
use edge_proto::transport::TlsFiles;
use edge_proto::{Catalog, CatalogEntry, CatalogFailure, Presence};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::broadcast::DeviceResult;
use crate::call::{ArgumentError, CallError, CallRequest, MethodResponse, NOT_REGISTERED};
use crate::fleet::DeviceState;

/// The service API version requested, as the Azure SDKs send it.
pub const API_VERSION: &str = "2021-04-12";

/// How long a request other than a method call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for a TCP connection (and TLS) to the hub.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// What a method call's HTTP request may take beyond the call's own timeouts.
const CALL_GRACE: Duration = Duration::from_secs(15);

/// A token is signed afresh when it has less than this left.
const TOKEN_RENEW_BEFORE: u64 = 300;

/// Twins asked for per page of a query.
const QUERY_PAGE: usize = 1000;

/// How often a job's progress is asked for.
pub const JOB_POLL: Duration = Duration::from_secs(1);

/// The longest `queryCondition` sent; a job for more devices is fanned out as calls.
const MAX_CONDITION: usize = 8 * 1024;

/// A client of one hub's service API. Clones share the connection pool and the token.
#[derive(Clone)]
pub struct HubClient {
    shared: Arc<Shared>,
}

struct Shared {
    http: reqwest::Client,
    /// `https://{HostName}`.
    base: String,
    connection: ServiceConnectionString,
    /// The current token and its expiry (unix seconds).
    token: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("base", &self.shared.base)
            .field("connection", &self.shared.connection)
            .finish_non_exhaustive()
    }
}

/// An error the hub answered with: its code (six digits, or the HTTP status when the
/// body has none) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFailure {
    /// IoT Hub's error code, such as 404103.
    pub code: u32,
    /// What the hub said.
    pub message: String,
}

impl HubFailure {
    /// Reads an error answer: `{"errorCode": N, "message": ...}` as edge-hub and the
    /// documentation write it; IoT Hub's own `{"Message": "<that object as a string>"}`;
    /// or only the `iothub-errorcode` header (a name such as `DeviceNotOnline`).
    /// Without any code, the HTTP status stands in (×1000, so 401 reads as 401000).
    pub fn read(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let nested = ["Message", "message"]
            .iter()
            .filter_map(|k| value.get(*k).and_then(Value::as_str))
            .find_map(|text| serde_json::from_str::<Value>(text).ok())
            .filter(Value::is_object);
        let object = nested.as_ref().unwrap_or(&value);
        let code = object
            .get("errorCode")
            .and_then(|c| c.as_u64().or_else(|| c.as_str()?.parse().ok()))
            .and_then(|c| u32::try_from(c).ok())
            .or_else(|| {
                let name = headers.get("iothub-errorcode")?.to_str().ok()?;
                code_of_name(name)
            })
            .unwrap_or(u32::from(status.as_u16()) * 1000);
        let message = ["message", "Message", "ExceptionMessage"]
            .iter()
            .filter_map(|k| object.get(*k).and_then(Value::as_str))
            .find(|m| !m.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    format!("HTTP {status}")
                } else {
                    text.chars().take(300).collect()
                }
            });
        Self { code, message }
    }

    /// The call error this is, for a call of `request` (or a request about `device`).
    fn into_call_error(
        self,
        device: &str,
        request: Option<&CallRequest>,
        policy: &str,
    ) -> CallError {
        match self.code {
            404_103 => CallError::NotOnline {
                device: device.to_owned(),
            },
            504_101 => match request {
                Some(request) => CallError::Timeout {
                    device: device.to_owned(),
                    method: request.method.clone(),
                    after: request.response_timeout,
                },
                None => self.into_service(),
            },
            NOT_REGISTERED => CallError::NotRegistered {
                device: device.to_owned(),
            },
            code if code / 1000 == 401 => CallError::Unauthorized {
                policy: policy.to_owned(),
                reason: self.message,
            },
            code if code / 1000 == 400 => ArgumentError::Refused(self.message).into(),
            _ => self.into_service(),
        }
    }

    fn into_service(self) -> CallError {
        CallError::Service {
            code: self.code,
            message: self.message,
        }
    }
}

/// IoT Hub's code for an error name, as its `iothub-errorcode` header gives it.
fn code_of_name(name: &str) -> Option<u32> {
    Some(match name {
        "ArgumentInvalid" => 400_004,
        "IotHubUnauthorizedAccess" | "IotHubUnauthorized" => 401_002,
        "DeviceNotFound" => 404_001,
        "DeviceNotOnline" => 404_103,
        "ThrottlingException" => 429_001,
        "GatewayTimeout" => 504_101,
        _ => return None,
    })
}

/// The TLS configuration for the hub: proto's, as the broker's is built (the CA file's
/// certificates, else the system's roots), taken out of the MQTT transport it makes.
///
/// # Errors
/// [`CallError::Hub`] when the CA file cannot be used or the system has no roots.
fn tls_config(host: &str, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, CallError> {
    let files = TlsFiles {
        ca_file: ca_file.map(Path::to_owned),
        ..TlsFiles::default()
    };
    files
        .client_config()
        .map(|config| config.as_ref().clone())
        .map_err(|e| CallError::Hub {
            host: host.to_owned(),
            reason: e.to_string(),
        })
}

/// An error and its sources, on one line: reqwest's own message names only the URL.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// One request to the service API.
struct Ask<'a> {
    method: Method,
    /// The path and query, from `/`.
    path: String,
    body: Option<Value>,
    timeout: Duration,
    headers: Vec<(&'static str, String)>,
    /// The device the request is about, for its errors (404001, 404103).
    device: &'a str,
    /// The call it makes, for a 504101's details.
    call: Option<&'a CallRequest>,
}

impl Ask<'_> {
    /// `method path`, without a body, with the usual timeout.
    fn new(method: Method, path: String) -> Self {
        Self {
            method,
            path,
            body: None,
            timeout: REQUEST_TIMEOUT,
            headers: Vec::new(),
            device: "",
            call: None,
        }
    }
}

/// A job as `GET /jobs/v2/{id}` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// queued, scheduled, running, completed, failed or cancelled.
    #[serde(default)]
    pub status: String,
    /// How many devices are where.
    #[serde(default)]
    pub device_job_statistics: JobStatistics,
    /// Why the job failed, when it did.
    #[serde(default)]
    pub failure_reason: Option<String>,
}

impl JobStatus {
    /// Whether the job has ended, one way or another.
    pub fn is_over(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// `deviceJobStatistics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatistics {
    /// Devices the job covers.
    #[serde(default)]
    pub device_count: u64,
    /// Devices whose call failed.
    #[serde(default)]
    pub failed_count: u64,
    /// Devices whose call succeeded.
    #[serde(default)]
    pub succeeded_count: u64,
    /// Devices being called.
    #[serde(default)]
    pub running_count: u64,
    /// Devices not called yet.
    #[serde(default)]
    pub pending_count: u64,
}

/// How `PUT /jobs/v2/{id}` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStart {
    /// The hub took the job.
    Started(JobStatus),
    /// The hub has no jobs API (it answered 404 without a device error, 405 or 501):
    /// the caller fans out calls instead.
    NoJobs,
}

impl HubClient {
    /// A client for the hub of `connection`, trusting `ca_file` (else the system's
    /// roots). Nothing is sent yet.
    ///
    /// # Errors
    /// [`CallError::Hub`] when TLS cannot be set up, [`CallError::Unauthorized`] when
    /// the key is not base64.
    pub fn new(
        connection: ServiceConnectionString,
        ca_file: Option<&Path>,
    ) -> Result<Self, CallError> {
        let host = connection.host_name.clone();
        let tls = tls_config(&host, ca_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_WAIT)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("edge-invoker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CallError::Hub {
                host: host.clone(),
                reason: chain(&e),
            })?;
        let client = Self {
            shared: Arc::new(Shared {
                http,
                base: format!("https://{host}"),
                connection,
                token: Mutex::new(None),
            }),
        };
        client.authorization()?;
        Ok(client)
    }

    /// The hub's `HostName`.
    pub fn host(&self) -> &str {
        &self.shared.connection.host_name
    }

    /// The SAS token to send: the current one, or a fresh one when it has less than
    /// five minutes left.
    fn authorization(&self) -> Result<String, CallError> {
        let mut token = self
            .shared
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = unix_now();
        if let Some((current, expiry)) = token.as_ref()
            && *expiry > now + TOKEN_RENEW_BEFORE
        {
            return Ok(current.clone());
        }
        let expiry = now + DEFAULT_TOKEN_LIFETIME.as_secs();
        let fresh = self
            .shared
            .connection
            .token(expiry)
            .map_err(|e| CallError::Unauthorized {
                policy: self.shared.connection.key_name.clone(),
                reason: e.to_string(),
            })?;
        *token = Some((fresh.clone(), expiry));
        Ok(fresh)
    }

    /// Sends one request and returns the answer's JSON, or the hub's error.
    async fn send(&self, ask: Ask<'_>) -> Result<(Value, HeaderMap), CallError> {
        let Ask {
            method,
            path: path_and_query,
            body,
            timeout,
            headers,
            device,
            call,
        } = ask;
        let url = format!("{}{path_and_query}", self.shared.base);
        let mut builder = self
            .shared
            .http
            .request(method, &url)
            .timeout(timeout)
            .header("authorization", self.authorization()?)
            .header("accept", "application/json");
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = body {
            builder = builder
                .header("content-type", "application/json; charset=utf-8")
                .body(body.to_string());
        }
        let unreachable = |e: reqwest::Error| {
            if e.is_timeout() {
                CallError::Hub {
                    host: self.host().to_owned(),
                    reason: format!("no answer within {timeout:?}"),
                }
            } else {
                CallError::Hub {
                    host: self.host().to_owned(),
                    reason: chain(&e),
                }
            }
        };
        let response = builder.send().await.map_err(unreachable)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let failure = HubFailure::read(status, &headers, &bytes);
            return Err(failure.into_call_error(device, call, &self.shared.connection.key_name));
        }
        if bytes.is_empty() {
            return Ok((Value::Null, headers));
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| CallError::Hub {
            host: self.host().to_owned(),
            reason: format!("the answer to {path_and_query} is not JSON: {e}"),
        })?;
        Ok((value, headers))
    }

    /// Calls a method: `POST /twins/{id}/methods`. The arguments are checked first, as
    /// on the broker.
    ///
    /// # Errors
    /// As on the broker ([`CallError::Argument`], [`CallError::NotOnline`],
    /// [`CallError::Timeout`]), plus [`CallError::NotRegistered`],
    /// [`CallError::Unauthorized`], [`CallError::Service`] and [`CallError::Hub`].
    pub async fn call(&self, request: &CallRequest) -> Result<MethodResponse, CallError> {
        let checked = request.check()?;
        let payload: Value = serde_json::from_str(checked.payload)
            .map_err(|e| ArgumentError::Refused(format!("the payload is not JSON: {e}")))?;
        let body = json!({
            "methodName": request.method,
            "payload": payload,
            "responseTimeoutInSeconds": request.response_timeout.as_secs(),
            "connectTimeoutInSeconds": request.connect_timeout.as_secs(),
        });
        let path = format!(
            "/twins/{}/methods?api-version={API_VERSION}",
            encode(&request.device)
        );
        let wait = request.response_timeout + request.connect_timeout + CALL_GRACE;
        let ask = Ask {
            body: Some(body),
            timeout: wait,
            device: &request.device,
            call: Some(request),
            ..Ask::new(Method::POST, path)
        };
        let (answer, _) = self.send(ask).await?;
        let status = answer
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .ok_or_else(|| CallError::Hub {
                host: self.host().to_owned(),
                reason: format!("the answer has no status: {answer}"),
            })?;
        let payload = answer.get("payload").cloned().unwrap_or(Value::Null);
        Ok(MethodResponse::from_wire(
            status,
            payload.to_string().as_bytes(),
        ))
    }

    /// Every device in the registry, as twins: connection state, and the methods it
    /// reports. Sorted by device id.
    ///
    /// # Errors
    /// [`CallError::Unauthorized`], [`CallError::Service`], [`CallError::Hub`].
    pub async fn devices(&self) -> Result<Vec<DeviceState>, CallError> {
        let twins = self.query("SELECT * FROM devices").await?;
        let mut devices: Vec<DeviceState> = twins.iter().filter_map(device_state).collect();
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(devices)
    }

    /// One device's twin: its connection state and the methods it reports.
    ///
    /// # Errors
    /// [`CallError::NotRegistered`], and as [`HubClient::devices`].
    pub async fn device(&self, id: &str) -> Result<DeviceState, CallError> {
        let path = format!("/twins/{}?api-version={API_VERSION}", encode(id));
        let ask = Ask {
            device: id,
            ..Ask::new(Method::GET, path)
        };
        let (twin, _) = self.send(ask).await?;
        device_state(&twin).ok_or_else(|| CallError::Hub {
            host: self.host().to_owned(),
            reason: format!("the twin of '{id}' has no deviceId"),
        })
    }

    /// Every item a query selects, page after page (`x-ms-continuation`).
    async fn query(&self, text: &str) -> Result<Vec<Value>, CallError> {
        let path = format!("/devices/query?api-version={API_VERSION}");
        let body = json!({ "query": text });
        let page = QUERY_PAGE.to_string();
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", page.clone())];
            if let Some(token) = continuation.take() {
                headers.push(("x-ms-continuation", token));
            }
            let ask = Ask {
                body: Some(body.clone()),
                headers,
                ..Ask::new(Method::POST, path.clone())
            };
            let (answer, response_headers) = self.send(ask).await?;
            match answer {
                Value::Array(more) => items.extend(more),
                other => {
                    return Err(CallError::Hub {
                        host: self.host().to_owned(),
                        reason: format!("the query's answer is not a list: {other}"),
                    });
                }
            }
            continuation = response_headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned);
            if continuation.is_none() {
                return Ok(items);
            }
        }
    }

    /// Starts a `scheduleDeviceMethod` job `job_id` calling `request`'s method on
    /// `devices`, now.
    ///
    /// # Errors
    /// [`CallError::Argument`] when the hub refuses the job, and as
    /// [`HubClient::devices`].
    pub async fn start_job(
        &self,
        job_id: &str,
        request: &CallRequest,
        devices: &[String],
    ) -> Result<JobStart, CallError> {
        let Some(condition) = query_condition(devices) else {
            return Ok(JobStart::NoJobs);
        };
        let payload: Value = serde_json::from_str(&request.payload).unwrap_or(Value::Null);
        let body = json!({
            "jobId": job_id,
            "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {
                "methodName": request.method,
                "payload": payload,
                "responseTimeoutInSeconds": request.response_timeout.as_secs(),
                "connectTimeoutInSeconds": request.connect_timeout.as_secs(),
            },
            "queryCondition": condition,
            "startTime": rfc3339(SystemTime::now()),
            "maxExecutionTimeInSeconds": max_execution(request, devices.len()).as_secs(),
        });
        let path = format!("/jobs/v2/{}?api-version={API_VERSION}", encode(job_id));
        let ask = Ask {
            body: Some(body),
            ..Ask::new(Method::PUT, path)
        };
        match self.send(ask).await {
            Ok((answer, _)) => Ok(JobStart::Started(
                serde_json::from_value(answer).unwrap_or_default(),
            )),
            Err(CallError::Service { code, .. })
                if code == 404_000 || code / 1000 == 405 || code / 1000 == 501 =>
            {
                Ok(JobStart::NoJobs)
            }
            Err(error) => Err(error),
        }
    }

    /// A job's status and statistics.
    ///
    /// # Errors
    /// As [`HubClient::devices`].
    pub async fn job(&self, job_id: &str) -> Result<JobStatus, CallError> {
        let path = format!("/jobs/v2/{}?api-version={API_VERSION}", encode(job_id));
        let (answer, _) = self.send(Ask::new(Method::GET, path)).await?;
        serde_json::from_value(answer).map_err(|e| CallError::Hub {
            host: self.host().to_owned(),
            reason: format!("job '{job_id}': {e}"),
        })
    }

    /// Each device's result of a job, from `SELECT * FROM devices.jobs`; `None` when
    /// the hub does not answer that query, so that only the job's statistics are known.
    ///
    /// # Errors
    /// As [`HubClient::devices`], but for a refused query.
    pub async fn job_results(&self, job_id: &str) -> Result<Option<Vec<DeviceResult>>, CallError> {
        let text = format!(
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{}'",
            job_id.replace('\'', "")
        );
        match self.query(&text).await {
            Ok(items) => Ok(Some(items.iter().filter_map(job_result).collect())),
            Err(CallError::Argument(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// The job's `queryCondition` naming exactly `devices`, or `None` when it cannot (an
/// id with a quote, or too many ids for one condition).
fn query_condition(devices: &[String]) -> Option<String> {
    if devices.is_empty() || devices.iter().any(|d| d.contains('\'')) {
        return None;
    }
    let condition = devices
        .iter()
        .map(|d| format!("deviceId = '{d}'"))
        .collect::<Vec<_>>()
        .join(" OR ");
    (condition.len() <= MAX_CONDITION).then_some(condition)
}

/// How long the hub may run a job: every call one after another, at the most, with a
/// floor of a minute.
pub fn max_execution(request: &CallRequest, devices: usize) -> Duration {
    let per_call = request.response_timeout + request.connect_timeout;
    let all = per_call.saturating_mul(u32::try_from(devices).unwrap_or(u32::MAX));
    all.clamp(Duration::from_secs(60), Duration::from_secs(24 * 3600))
}

/// A twin as a [`DeviceState`]: online when `connectionState` is `Connected`, and its
/// catalog from the reported property `methods` (a list of {name, description,
/// handler, digest}, or a catalog object with `methods` and `failures`).
pub fn device_state(twin: &Value) -> Option<DeviceState> {
    let device = twin.get("deviceId")?.as_str()?.to_owned();
    let online = twin.get("connectionState").and_then(Value::as_str) == Some("Connected");
    let reported = twin.pointer("/properties/reported/methods");
    let catalog = reported.and_then(|methods| match methods {
        Value::Array(_) => serde_json::from_value::<Vec<CatalogEntry>>(methods.clone())
            .ok()
            .map(|methods| Catalog {
                methods,
                failures: Vec::<CatalogFailure>::new(),
                methods_omitted: 0,
                failures_omitted: 0,
            }),
        Value::Object(_) => serde_json::from_value::<Catalog>(methods.clone()).ok(),
        _ => None,
    });
    Some(DeviceState {
        device,
        presence: Some(Presence {
            online,
            since: None,
            reason: None,
            agent: None,
        }),
        catalog,
    })
}

/// One item of `devices.jobs` as a device's result.
fn job_result(item: &Value) -> Option<DeviceResult> {
    let device = item.get("deviceId")?.as_str()?.to_owned();
    let response = item.pointer("/outcome/deviceMethodResponse");
    let outcome = match response.filter(|r| !r.is_null()) {
        Some(response) => {
            let status = response
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0);
            let payload = response.get("payload").cloned().unwrap_or(Value::Null);
            Ok(MethodResponse::from_wire(
                status,
                payload.to_string().as_bytes(),
            ))
        }
        None => {
            let code = item
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("");
            let message = item
                .pointer("/error/description")
                .and_then(Value::as_str)
                .unwrap_or("the job reports no answer")
                .to_owned();
            Err(match code_of_name(code) {
                Some(404_103) => CallError::NotOnline {
                    device: device.clone(),
                },
                Some(NOT_REGISTERED) => CallError::NotRegistered {
                    device: device.clone(),
                },
                Some(code) => CallError::Service { code, message },
                None => CallError::Service {
                    code: 500_000,
                    message: format!("{code} {message}").trim().to_owned(),
                },
            })
        }
    };
    let time = |field| {
        item.get(field)
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
    };
    let elapsed = match (time("startTimeUtc"), time("endTimeUtc")) {
        (Some(start), Some(end)) => end.duration_since(start).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    Some(DeviceResult {
        device,
        outcome,
        elapsed,
    })
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `time` as RFC 3339 in UTC, to the second: `2026-11-26T13:22:47Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // The inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Reads `YYYY-MM-DDTHH:MM:SS[.fraction][Z]` (UTC), as IoT Hub writes times.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim().trim_end_matches('Z');
    let (date, time) = text.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut time = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (time.next()??, time.next()??, time.next()??);
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let digits: String = fraction
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse::<u32>().ok()?
    };
    UNIX_EPOCH.checked_add(Duration::new(u64::try_from(secs).ok()?, nanos))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn errors_are_read_in_each_of_iot_hubs_shapes() {
        let none = HeaderMap::new();
        let flat = br#"{"errorCode":404103,"trackingId":"t","message":"device 'd' is not online","info":{},"timestampUtc":"x"}"#;
        assert_eq!(
            HubFailure::read(StatusCode::NOT_FOUND, &none, flat),
            HubFailure {
                code: 404_103,
                message: "device 'd' is not online".into()
            }
        );
        // IoT Hub's own: the error object as a string in Message.
        let nested = br#"{"Message":"{\"errorCode\":504101,\"trackingId\":\"t\",\"message\":\"Timed out waiting for the response from device.\",\"info\":{}}","ExceptionMessage":""}"#;
        assert_eq!(
            HubFailure::read(StatusCode::GATEWAY_TIMEOUT, &none, nested),
            HubFailure {
                code: 504_101,
                message: "Timed out waiting for the response from device.".into()
            }
        );
        let mut named = HeaderMap::new();
        named.insert(
            "iothub-errorcode",
            HeaderValue::from_static("DeviceNotFound"),
        );
        let failure = HubFailure::read(StatusCode::NOT_FOUND, &named, b"");
        assert_eq!(failure.code, 404_001);
        assert_eq!(failure.message, "HTTP 404 Not Found");
        let bare = HubFailure::read(StatusCode::UNAUTHORIZED, &none, b"<html>no</html>");
        assert_eq!(
            (bare.code, bare.message.as_str()),
            (401_000, "<html>no</html>")
        );
    }

    #[test]
    fn hub_codes_become_the_call_errors_of_the_broker_path() {
        let request = CallRequest::new("d", "m", "null");
        let error = |code: u32| {
            HubFailure {
                code,
                message: "said the hub".into(),
            }
            .into_call_error("d", Some(&request), "service")
        };
        assert_eq!(error(404_103), CallError::NotOnline { device: "d".into() });
        assert!(
            matches!(error(504_101), CallError::Timeout { after, .. } if after == Duration::from_secs(30))
        );
        assert_eq!(
            error(404_001),
            CallError::NotRegistered { device: "d".into() }
        );
        assert_eq!(
            error(401_002),
            CallError::Unauthorized {
                policy: "service".into(),
                reason: "said the hub".into()
            }
        );
        assert_eq!(error(400_004).code(), Some(400_004));
        assert_eq!(
            error(429_001),
            CallError::Service {
                code: 429_001,
                message: "said the hub".into()
            }
        );
    }

    #[test]
    fn twins_become_device_states_with_their_reported_methods() {
        let twin = json!({
            "deviceId": "pump-1",
            "connectionState": "Connected",
            "properties": {"reported": {"methods": [
                {"name": "echo", "description": "Echoes", "handler": "echo.wasm", "digest": "sha256:ab"}
            ]}}
        });
        let state = device_state(&twin).expect("a device");
        assert_eq!(state.device, "pump-1");
        assert!(state.is_online());
        let catalog = state.catalog.expect("a catalog");
        assert_eq!(catalog.methods[0].name, "echo");
        assert_eq!(catalog.methods[0].handler, "echo.wasm");

        let bare = device_state(&json!({"deviceId": "d", "connectionState": "Disconnected"}))
            .expect("a device");
        assert!(!bare.is_online());
        assert_eq!(bare.catalog, None);
        assert_eq!(device_state(&json!({"etag": "x"})), None);
    }

    #[test]
    fn job_conditions_name_each_device_or_give_way_to_calls() {
        let ids = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            query_condition(&ids(&["a", "b"])).as_deref(),
            Some("deviceId = 'a' OR deviceId = 'b'")
        );
        assert_eq!(query_condition(&ids(&["o'brien"])), None);
        assert_eq!(query_condition(&[]), None);
        let many: Vec<String> = (0..1000).map(|i| format!("device-{i}")).collect();
        assert_eq!(query_condition(&many), None);
    }

    #[test]
    fn job_results_read_answers_and_errors() {
        let answered = job_result(&json!({
            "deviceId": "d1", "status": "completed",
            "startTimeUtc": "2026-11-26T13:22:47.100Z", "endTimeUtc": "2026-11-26T13:22:47.350Z",
            "outcome": {"deviceMethodResponse": {"status": 200, "payload": {"ok": true}}}
        }))
        .expect("a result");
        assert_eq!(answered.device, "d1");
        assert_eq!(answered.elapsed, Duration::from_millis(250));
        let response = answered.outcome.expect("an answer");
        assert_eq!(
            (response.status, response.payload.to_value()),
            (200, json!({"ok": true}))
        );
        let offline = job_result(&json!({
            "deviceId": "d2", "status": "failed",
            "error": {"code": "DeviceNotOnline", "description": "Timed out waiting for device to connect."}
        }))
        .expect("a result");
        assert_eq!(
            offline.outcome,
            Err(CallError::NotOnline {
                device: "d2".into()
            })
        );
    }

    #[test]
    fn times_are_rfc3339_utc_both_ways() {
        let time = UNIX_EPOCH + Duration::from_secs(1_795_696_730);
        assert_eq!(rfc3339(time), "2026-11-26T12:38:50Z");
        assert_eq!(parse_rfc3339("2026-11-26T12:38:50Z"), Some(time));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00.5"),
            Some(UNIX_EPOCH + Duration::from_millis(951_782_400_500))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
