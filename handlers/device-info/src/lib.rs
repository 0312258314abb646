//! `device-info`: what a device tells about itself, and a reboot it only pretends to do.
//!
//! - `getInfo` answers the device id (from the host), the `model` and `firmware` values
//!   of the handler's configuration (`"unknown"` when not set), the device's wall clock
//!   in unix seconds, and the request id.
//! - `reboot` takes `{"delaySeconds": N}` (0 to 3600, optional, default 0), logs the
//!   reboot it would schedule and answers when it would happen. It reboots nothing: it
//!   is an example of a method with a checked payload.
//!
//! A payload that does not fit answers 400 with the wire contract's error body
//! (`{"error":{"code":"invalidPayload","message":...}}`); a handler never traps on it.

/// The bindings of the `device-handler` world, and the component's exports.
// `export!` writes the component's entry points with `#[unsafe(export_name)]`.
#[allow(unsafe_code)]
mod bindings {
    use super::DeviceInfo;

    wit_bindgen::generate!({ path: "../../wit", world: "device-handler" });

    export!(DeviceInfo);
}

use std::time::{SystemTime, UNIX_EPOCH};

use bindings::edge::methods::host::{self, Level};
use bindings::exports::edge::methods::handler::{Guest, MethodInfo, Request, Response};
use serde_json::{Value, json};

/// The method that answers what the device is.
const GET_INFO: &str = "getInfo";
/// The method that pretends to schedule a reboot.
const REBOOT: &str = "reboot";
/// The longest reboot delay a caller may ask for, in seconds (an hour).
const MAX_DELAY_SECONDS: u64 = 3600;
/// What `getInfo` says for a configuration value that is not set.
const UNKNOWN: &str = "unknown";

/// The handler; its `Guest` implementation is what the component exports.
struct DeviceInfo;

impl Guest for DeviceInfo {
    fn methods() -> Vec<MethodInfo> {
        vec![
            MethodInfo {
                name: GET_INFO.to_owned(),
                description: "Answers the device id, model and firmware (from config), \
                              the device's clock in unix seconds and the request id; \
                              no payload"
                    .to_owned(),
            },
            MethodInfo {
                name: REBOOT.to_owned(),
                description: "Pretends to schedule a reboot and answers when it would \
                              happen; reboots nothing. Payload {\"delaySeconds\": 0-3600}, \
                              optional, default 0"
                    .to_owned(),
            },
        ]
    }

    fn handle(request: Request) -> Response {
        match request.method.as_str() {
            GET_INFO => get_info(&request),
            REBOOT => reboot(&request),
            other => error(
                404,
                "methodNotFound",
                &format!("device-info does not serve `{other}`"),
            ),
        }
    }
}

/// Serves `getInfo`; it ignores the payload.
fn get_info(request: &Request) -> Response {
    let config = |key: &str| host::config_get(key).unwrap_or_else(|| UNKNOWN.to_owned());
    ok(&json!({
        "deviceId": host::device_id(),
        "model": config("model"),
        "firmware": config("firmware"),
        "unixTime": unix_now(),
        "requestId": request.request_id,
    }))
}

/// Serves `reboot`: checks the delay, logs what a real device would do, answers when.
fn reboot(request: &Request) -> Response {
    let delay = match reboot_delay(&request.payload) {
        Ok(delay) => delay,
        Err(message) => {
            host::log(Level::Warn, &format!("reboot refused: {message}"));
            return error(400, "invalidPayload", &message);
        }
    };
    let at = unix_now().saturating_add(delay);
    host::log(
        Level::Info,
        &format!(
            "a real device would reboot in {delay} s, at unix time {at}; \
             this example reboots nothing"
        ),
    );
    ok(&json!({ "scheduled": true, "delaySeconds": delay, "at": at }))
}

/// Reads the delay from a `reboot` payload: `null`, `{}` or `{"delaySeconds": N}`.
///
/// # Errors
///
/// A message for the caller when the payload is none of these: not an object, a field
/// other than `delaySeconds` (a misspelt delay must not become a reboot at once), or a
/// delay that is not an integer from 0 to [`MAX_DELAY_SECONDS`].
fn reboot_delay(payload: &str) -> Result<u64, String> {
    let fields = match serde_json::from_str(payload) {
        Ok(Value::Null) => return Ok(0),
        Ok(Value::Object(fields)) => fields,
        Ok(_) => {
            return Err(
                "the payload must be an object such as {\"delaySeconds\": 30}, or null".to_owned(),
            );
        }
        Err(err) => return Err(format!("the payload is not JSON: {err}")),
    };
    if let Some(unknown) = fields.keys().find(|key| *key != "delaySeconds") {
        return Err(format!(
            "unknown field `{unknown}`: the only field is `delaySeconds`"
        ));
    }
    match fields.get("delaySeconds") {
        None => Ok(0),
        Some(value) => value
            .as_u64()
            .filter(|delay| *delay <= MAX_DELAY_SECONDS)
            .ok_or_else(|| {
                format!(
                    "`delaySeconds` must be an integer from 0 to {MAX_DELAY_SECONDS}, not {value}"
                )
            }),
    }
}

/// The wall clock (WASI's `wall-clock`) in whole seconds since 1970; a clock set before
/// 1970 reads as 0.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// A 200 answer with `body`.
fn ok(body: &Value) -> Response {
    Response {
        status: 200,
        payload: body.to_string(),
    }
}

/// An answer with `status` and the wire contract's error body.
fn error(status: u16, code: &str, message: &str) -> Response {
    Response {
        status,
        payload: json!({ "error": { "code": code, "message": message } }).to_string(),
    }
}
