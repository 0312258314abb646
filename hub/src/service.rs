//! The service API: IoT Hub's REST endpoints for direct methods, the registry and
//! twins, over HTTPS, authorized by a service policy's SAS token.
//!
//! | route | right | what |
//! |---|---|---|
//! | `POST /twins/{id}/methods` | ServiceConnect | call a method, through the backend as edge-invoker does |
//! | `GET /twins/{id}` | RegistryRead or ServiceConnect | the device's twin |
//! | `PUT /devices/{id}` | RegistryWrite | create (or, with `If-Match`, update) a device |
//! | `GET /devices/{id}`, `GET /devices` | RegistryRead | devices, with `connectionState` |
//! | `DELETE /devices/{id}` | RegistryWrite | remove a device |
//! | `POST /devices/query` | RegistryRead or ServiceConnect | `SELECT * FROM devices [WHERE ...]` |
//! | `PUT /jobs/v2/{id}`, `GET ...`, `POST .../cancel` | ServiceConnect | jobs that call a method on many devices ([`crate::jobs`]) |
//!
//! A device is called when it is registered here or has a presence on the backend (an
//! edge-host on the broker is called although it is not registered).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edge_invoker::call::{CONNECT_TIMEOUT_SECS, DEFAULT_RESPONSE_TIMEOUT, RESPONSE_TIMEOUT_SECS};
use edge_invoker::{CallRequest, Caller, ResponsePayload};
use edge_proto::MAX_PAYLOAD;
use edge_proto::iothub::{SasError, SasToken, unix_now};
use serde_json::{Map, Value};

use crate::backend::PresenceWatch;
use crate::device::same_host;
use crate::error::ApiError;
use crate::jobs::Jobs;
use crate::query;
use crate::registry::{Device, DeviceChange, Registry, RegistryError, Right};

/// The largest request body read: a 128 KiB payload with its JSON around it, escaped.
const MAX_BODY: usize = 4 * MAX_PAYLOAD;

/// What the service API's handlers share.
pub struct Service {
    /// The hub's name, as service tokens name it.
    pub hostname: String,
    /// The identity registry.
    pub registry: Registry,
    /// The backend session calls go through.
    pub caller: Caller,
    /// Every device's presence on the backend.
    pub presence: PresenceWatch,
    /// The jobs this instance runs.
    pub jobs: Jobs,
    /// Service tokens whose signature was checked ([`Authorized`]).
    pub authorized: Mutex<HashMap<String, Authorized>>,
}

/// A service token whose signature checked out: until it expires, and as long as the
/// registry has not changed (its policies' keys may have), the same `Authorization`
/// header is not parsed and its HMAC not computed again.
pub struct Authorized {
    /// The registry's generation when it was checked.
    generation: u64,
    /// When the token expires, unix seconds.
    expiry: u64,
    /// The rights of its policy.
    rights: Vec<Right>,
    /// Its policy's name, for messages.
    policy: String,
}

/// How many checked tokens are kept; past it, the cache starts over.
const AUTHORIZED_CACHE: usize = 1024;

/// The service API's routes.
pub fn router(service: Arc<Service>) -> axum::Router {
    axum::Router::new()
        .route("/twins/:id/methods", post(invoke))
        .route("/twins/:id", get(get_twin))
        .route(
            "/devices/:id",
            get(get_device).put(put_device).delete(delete_device),
        )
        .route("/devices", get(list_devices))
        .route("/devices/query", post(query_devices))
        .route("/jobs/v2/:id", get(get_job).put(put_job))
        .route("/jobs/v2/:id/cancel", post(cancel_job))
        .fallback(|| async { ApiError::new(404_000, "no such route in IoT Hub's service API") })
        .with_state(service)
}

impl Service {
    /// Checks the `Authorization` SAS token: a registry policy (`skn`) with one of
    /// `rights`, signed with one of its keys, for this hub, not expired.
    fn authorize(&self, headers: &HeaderMap, rights: &[Right]) -> Result<(), ApiError> {
        let header = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("no Authorization header with a SAS token"))?;
        let generation = self
            .registry
            .generation()
            .map_err(|e| ApiError::server(format!("registry: {e:#}")))?;
        let now = unix_now();
        let mut cache = lock(&self.authorized);
        let fresh = |seen: &Authorized| seen.generation == generation && now < seen.expiry;
        if !cache.get(header).is_some_and(fresh) {
            // Checked without the lock: an HMAC, and perhaps a read of the registry.
            drop(cache);
            let checked = self.check_token(header, now)?;
            cache = lock(&self.authorized);
            if cache.len() >= AUTHORIZED_CACHE {
                cache.clear();
            }
            cache.insert(
                header.to_owned(),
                Authorized {
                    generation,
                    ..checked
                },
            );
        }
        let seen = &cache[header];
        if !rights.iter().any(|r| seen.rights.contains(r)) {
            return Err(ApiError::unauthorized(format!(
                "policy '{}' does not have the right {rights:?}",
                seen.policy
            )));
        }
        Ok(())
    }

    /// Parses and checks a service token: a registry policy (`skn`), for this hub,
    /// signed with one of the policy's keys, not expired at `now`.
    fn check_token(&self, header: &str, now: u64) -> Result<Authorized, ApiError> {
        let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let name = token
            .key_name
            .as_deref()
            .ok_or_else(|| ApiError::unauthorized("the token names no policy (skn)"))?;
        if !same_host(&token.resource, &self.hostname) {
            return Err(ApiError::unauthorized(format!(
                "the token is for '{}', this hub is '{}'",
                token.resource, self.hostname
            )));
        }
        let policy = self
            .registry
            .policy(name)
            .map_err(|e| ApiError::server(format!("registry: {e:#}")))?
            .ok_or_else(|| ApiError::unauthorized(format!("no policy '{name}'")))?;
        match token.verify(&policy.primary_key, now) {
            Err(SasError::BadSignature) => token.verify(&policy.secondary_key, now),
            other => other,
        }
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        Ok(Authorized {
            generation: 0,
            expiry: token.expiry,
            rights: policy.rights,
            policy: policy.name,
        })
    }

    /// Whether the broker holds a presence for `id` now: the presence watch may not
    /// have seen a device that came online an instant ago.
    async fn has_retained_presence(&self, id: &str) -> Result<bool, ApiError> {
        let namespace =
            edge_proto::Namespace::for_device(id).map_err(|e| ApiError::argument(e.to_string()))?;
        let retained = self.caller.retained(&[namespace.presence_topic()]).await?;
        Ok(!retained.is_empty())
    }

    fn device(&self, id: &str) -> Result<Option<Device>, ApiError> {
        self.registry
            .device(id)
            .map_err(|e| ApiError::server(format!("registry: {e:#}")))
    }

    fn connection_state(&self, id: &str) -> &'static str {
        if self.presence.is_online(id) {
            "Connected"
        } else {
            "Disconnected"
        }
    }

    /// A device as IoT Hub's registry shows it.
    fn device_json(&self, id: &str, device: &Device) -> Value {
        serde_json::json!({
            "deviceId": id,
            "generationId": device.generation_id,
            "etag": device.etag,
            "connectionState": self.connection_state(id),
            "status": device.status,
            "statusReason": null,
            "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
            "statusUpdatedTime": "0001-01-01T00:00:00Z",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {
                    "primaryKey": device.primary_key,
                    "secondaryKey": device.secondary_key,
                },
                "x509Thumbprint": {
                    "primaryThumbprint": device.x509_thumbprints.first(),
                    "secondaryThumbprint": device.x509_thumbprints.get(1),
                },
                "type": if device.x509_ca {
                    "certificateAuthority"
                } else if device.x509_thumbprints.is_empty() {
                    "sas"
                } else {
                    "selfSigned"
                },
            },
            "capabilities": {"iotEdge": false},
        })
    }

    /// A device's twin as IoT Hub's service API shows it.
    fn twin_json(&self, id: &str, device: &Device) -> Value {
        let twin = &device.twin;
        let with_version = |map: &Map<String, Value>, version: u64| {
            let mut map = map.clone();
            map.insert("$metadata".into(), serde_json::json!({}));
            map.insert("$version".into(), version.into());
            Value::Object(map)
        };
        serde_json::json!({
            "deviceId": id,
            "etag": device.etag,
            "deviceEtag": device.etag,
            "status": device.status,
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": self.connection_state(id),
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 0,
            "authenticationType": "sas",
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "version": twin.desired_version + twin.reported_version,
            "properties": {
                "desired": with_version(&twin.desired, twin.desired_version),
                "reported": with_version(&twin.reported, twin.reported_version),
            },
            "capabilities": {"iotEdge": false},
        })
    }
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::too_large(format!("the request body is over {MAX_BODY} bytes")))
}

async fn read_json(body: Body) -> Result<Value, ApiError> {
    let bytes = read_body(body).await?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::argument(format!("the request body is not JSON: {e}")))
}

/// A timeout field in seconds, within `range`, or `default`.
fn seconds(
    value: Option<&Value>,
    field: &str,
    range: &std::ops::RangeInclusive<u64>,
    default: Duration,
) -> Result<Duration, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(value) => match value.as_u64() {
            Some(secs) if range.contains(&secs) => Ok(Duration::from_secs(secs)),
            _ => Err(ApiError::argument(format!(
                "{field} is {value}; it must be {} to {} seconds",
                range.start(),
                range.end()
            ))),
        },
    }
}

/// The body of `POST /twins/{id}/methods`. The payload stays the JSON text it came
/// as, borrowed from the body: it goes to the device as it is, never built into a tree
/// and written out again.
#[derive(serde::Deserialize)]
struct MethodCall<'a> {
    #[serde(rename = "methodName", borrow)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(rename = "responseTimeoutInSeconds")]
    response_timeout: Option<Value>,
    #[serde(rename = "connectTimeoutInSeconds")]
    connect_timeout: Option<Value>,
}

/// The payload to send for `payload` (absent is `null`), within IoT Hub's limit. The
/// limit counts the payload as IoT Hub does, without insignificant whitespace: text
/// sent spaced out is compacted only when its spaces alone take it over the limit.
fn payload_text(payload: Option<&serde_json::value::RawValue>) -> Result<String, ApiError> {
    let Some(raw) = payload else {
        return Ok("null".to_owned());
    };
    let mut text = raw.get().to_owned();
    if text.len() > MAX_PAYLOAD {
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ApiError::argument(format!("the payload is not JSON: {e}")))?;
        text = value.to_string();
    }
    if text.len() > MAX_PAYLOAD {
        return Err(ApiError::too_large(format!(
            "the payload is {} bytes; the limit is {MAX_PAYLOAD}",
            text.len()
        )));
    }
    Ok(text)
}

/// `POST /twins/{id}/methods`: IoT Hub's direct method call.
async fn invoke(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    service.authorize(&headers, &[Right::ServiceConnect])?;
    let body = read_body(body).await?;
    let call: MethodCall<'_> = match serde_json::from_slice(&body) {
        Ok(call) => call,
        Err(e) if e.is_data() => {
            return Err(ApiError::argument(format!(
                "the request body is not a method call (a JSON object with methodName, \
                 payload, responseTimeoutInSeconds, connectTimeoutInSeconds): {e}"
            )));
        }
        Err(e) => {
            return Err(ApiError::argument(format!(
                "the request body is not JSON: {e}"
            )));
        }
    };
    let method = call
        .method
        .ok_or_else(|| ApiError::argument("methodName is missing or not a string"))?;
    let payload = payload_text(call.payload)?;
    let mut request = CallRequest::new(id.clone(), method, payload);
    request.response_timeout = seconds(
        call.response_timeout.as_ref(),
        "responseTimeoutInSeconds",
        &RESPONSE_TIMEOUT_SECS,
        DEFAULT_RESPONSE_TIMEOUT,
    )?;
    request.connect_timeout = seconds(
        call.connect_timeout.as_ref(),
        "connectTimeoutInSeconds",
        &CONNECT_TIMEOUT_SECS,
        Duration::ZERO,
    )?;
    request.check()?;
    // A device with presence is online or was: the registry is read (a stat of its
    // file) only for one that never was.
    if service.presence.get(&id).is_none() && !service.has_retained_presence(&id).await? {
        let registered = service
            .registry
            .contains_device(&id)
            .map_err(|e| ApiError::server(format!("registry: {e:#}")))?;
        if !registered {
            return Err(ApiError::device_not_found(&id));
        }
        // Registered, and never connected (a device through the hub, or an edge-host,
        // always publishes presence): offline, unless it comes online in time.
        if !service.presence.wait_online_for(&mut request).await {
            return Err(ApiError::not_online(&id));
        }
    }
    let response = service.caller.call(&request).await?;
    // The device's payload is JSON already (checked by the Caller): spliced in as it
    // came, rather than parsed into a tree and written out again.
    let status = response.status;
    let body = match &response.payload {
        ResponsePayload::Json(text) => format!(r#"{{"status":{status},"payload":{text}}}"#),
        ResponsePayload::NotJson(text) => {
            let text = serde_json::to_string(text).unwrap_or_default();
            format!(r#"{{"status":{status},"payload":{text}}}"#)
        }
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The request's `If-Match` header (an etag, or `*`), if it has a readable one.
fn if_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `GET /twins/{id}`.
async fn get_twin(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::RegistryRead, Right::ServiceConnect])?;
    let device = service
        .device(&id)?
        .ok_or_else(|| ApiError::device_not_found(&id))?;
    Ok(Json(service.twin_json(&id, &device)))
}

/// `GET /devices/{id}`.
async fn get_device(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::RegistryRead])?;
    let device = service
        .device(&id)?
        .ok_or_else(|| ApiError::device_not_found(&id))?;
    Ok(Json(service.device_json(&id, &device)))
}

/// `PUT /devices/{id}`: create, or update with `If-Match`; keys generated when absent.
async fn put_device(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::RegistryWrite])?;
    let body = read_json(body).await?;
    if let Some(named) = body.get("deviceId").and_then(Value::as_str)
        && named != id
    {
        return Err(ApiError::argument(format!(
            "the body names device '{named}', the path '{id}'"
        )));
    }
    let auth = &body["authentication"];
    let auth_type = auth["type"].as_str();
    let thumbprints: Option<Vec<String>> = match auth_type {
        None | Some("sas" | "certificateAuthority") => None,
        Some("selfSigned") => Some(
            ["primaryThumbprint", "secondaryThumbprint"]
                .iter()
                .filter_map(|name| auth["x509Thumbprint"][name].as_str())
                .map(str::to_owned)
                .collect(),
        ),
        Some(other) => {
            return Err(ApiError::argument(format!(
                "authentication type '{other}' is not supported by edge-hub (sas, selfSigned \
                 or certificateAuthority)"
            )));
        }
    };
    let key = |name: &str| auth["symmetricKey"][name].as_str().map(str::to_owned);
    let status = match body["status"].as_str() {
        None => None,
        Some(s @ ("enabled" | "disabled")) => Some(s.to_owned()),
        Some(other) => {
            return Err(ApiError::argument(format!(
                "status '{other}' is not enabled or disabled"
            )));
        }
    };
    let change = DeviceChange {
        keys: (key("primaryKey"), key("secondaryKey")),
        status,
        thumbprints,
        // Only a request that names an authentication type changes it.
        x509_ca: auth_type.map(|t| t == "certificateAuthority"),
    };
    let if_match = if_match(&headers);
    let device = service
        .registry
        .off_loop({
            let id = id.clone();
            move |registry| registry.put_device(&id, change, if_match.as_deref())
        })
        .await
        .map_err(registry_error)?;
    Ok(Json(service.device_json(&id, &device)))
}

/// `DELETE /devices/{id}`.
async fn delete_device(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    service.authorize(&headers, &[Right::RegistryWrite])?;
    let if_match = if_match(&headers);
    service
        .registry
        .off_loop(move |registry| registry.remove_device(&id, if_match.as_deref()))
        .await
        .map_err(registry_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices[?top=N]`.
async fn list_devices(
    State(service): State<Arc<Service>>,
    Query(params): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::RegistryRead])?;
    let top = match params.get("top") {
        Some(top) => top
            .parse::<usize>()
            .map_err(|_| ApiError::argument(format!("top '{top}' is not a number")))?,
        None => 1000,
    };
    let devices = service
        .registry
        .devices()
        .map_err(|e| ApiError::server(format!("registry: {e:#}")))?;
    Ok(Json(Value::Array(
        devices
            .iter()
            .take(top)
            .map(|(id, device)| service.device_json(id, device))
            .collect(),
    )))
}

/// `POST /devices/query` with `{"query": "SELECT * FROM devices [WHERE ...]"}`.
async fn query_devices(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    service.authorize(&headers, &[Right::RegistryRead, Right::ServiceConnect])?;
    let body = read_json(body).await?;
    let text = body["query"]
        .as_str()
        .ok_or_else(|| ApiError::argument("the body has no query"))?;
    if let Some(job) = job_of_devices_jobs_query(text) {
        // A job this instance does not hold has no results here, as a query matching
        // nothing.
        let results = service
            .jobs
            .get(&job)
            .map(|job| job.device_results())
            .unwrap_or_default();
        let mut response = Json(Value::Array(results)).into_response();
        response
            .headers_mut()
            .insert("x-ms-item-type", HeaderValue::from_static("deviceJob"));
        return Ok(response);
    }
    let query = query::Query::parse(text).map_err(|e| ApiError::argument(e.to_string()))?;
    let devices = service
        .registry
        .devices()
        .map_err(|e| ApiError::server(format!("registry: {e:#}")))?;
    let twins: Vec<Value> = devices
        .iter()
        .map(|(id, device)| service.twin_json(id, device))
        .filter(|twin| query.matches(twin))
        .collect();
    let mut response = Json(Value::Array(twins)).into_response();
    response
        .headers_mut()
        .insert("x-ms-item-type", HeaderValue::from_static("twin"));
    Ok(response)
}

/// The job id of `SELECT * FROM devices.jobs WHERE [devices.jobs.]jobId = 'ID'`, the
/// one `devices.jobs` query edge-hub answers: each device's outcome of a job.
fn job_of_devices_jobs_query(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [select, star, from, table, r#where, condition @ ..] = words.as_slice() else {
        return None;
    };
    let keywords = select.eq_ignore_ascii_case("select")
        && *star == "*"
        && from.eq_ignore_ascii_case("from")
        && table.eq_ignore_ascii_case("devices.jobs")
        && r#where.eq_ignore_ascii_case("where");
    let condition = condition.concat();
    let value = condition
        .strip_prefix("devices.jobs.jobId=")
        .or_else(|| condition.strip_prefix("jobId="))?;
    let id = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))?;
    (keywords && !id.is_empty()).then(|| id.to_owned())
}

/// `PUT /jobs/v2/{id}`: a `scheduleDeviceMethod` job.
async fn put_job(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::ServiceConnect])?;
    let body = read_json(body).await?;
    let job = service.jobs.check(&id, &body)?;
    let devices = service
        .registry
        .devices()
        .map_err(|e| ApiError::server(format!("registry: {e:#}")))?
        .iter()
        .map(|(id, device)| (id.clone(), service.twin_json(id, device)))
        .collect();
    let started = service.jobs.start(
        &id,
        body,
        job,
        devices,
        service.caller.clone(),
        service.presence.clone(),
    );
    Ok(Json(started.to_json(&id)))
}

/// `GET /jobs/v2/{id}`.
async fn get_job(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::ServiceConnect, Right::RegistryRead])?;
    Ok(Json(service.jobs.get(&id)?.to_json(&id)))
}

/// `POST /jobs/v2/{id}/cancel`.
async fn cancel_job(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    service.authorize(&headers, &[Right::ServiceConnect])?;
    let job = service.jobs.get(&id)?;
    job.cancel();
    Ok(Json(job.to_json(&id)))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::InvalidId { .. }
        | RegistryError::BadKey(_)
        | RegistryError::BadThumbprint(_)
        | RegistryError::BadCertificate(_) => ApiError::argument(error.to_string()),
        RegistryError::CertificateExists(_) | RegistryError::CertificateNotFound(_) => {
            ApiError::argument(error.to_string())
        }
        RegistryError::NotFound(id) => ApiError::device_not_found(&id),
        RegistryError::Exists(id) => ApiError::exists(&id),
        RegistryError::EtagMismatch(_) => ApiError::precondition(error.to_string()),
        RegistryError::Io(e) => ApiError::server(format!("registry: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::{MAX_PAYLOAD, payload_text};

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("JSON")
    }

    #[test]
    fn the_payload_goes_as_it_came_and_counts_without_its_spaces() {
        assert_eq!(payload_text(None).expect("null"), "null");
        let spaced = r#"{ "a" : [1, 2] }"#;
        assert_eq!(payload_text(Some(&raw(spaced))).expect("sent"), spaced);
        // Over the limit only by its spaces: compacted, and sent.
        let inner = "x".repeat(MAX_PAYLOAD - 2);
        let padded = format!("{}\"{inner}\"", " ".repeat(12));
        assert_eq!(
            payload_text(Some(&raw(&padded))).expect("compacted"),
            format!("\"{inner}\"")
        );
        // Over the limit however it is written: 413.
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD));
        assert_eq!(
            payload_text(Some(&raw(&big))).expect_err("too large").code,
            413_001
        );
    }
}
