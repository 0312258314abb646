//! One method call as the caller sees it: what is asked ([`CallRequest`]), what came
//! back ([`MethodResponse`]), and why there is no answer ([`CallError`]).
//!
//! The argument rules are IoT Hub's service API's: a response timeout of 5 to 300 s, a
//! connect timeout of 0 to 300 s, a JSON payload of at most 128 KiB. Breaking one is
//! 400004 ArgumentInvalid, found before anything is sent.

use std::io::Read;
use std::ops::RangeInclusive;
use std::time::Duration;

use edge_proto::topic::{DEFAULT_NAMESPACE, check_method};
use edge_proto::{MAX_PAYLOAD, NameError, Namespace, PayloadError, ServiceError, json_payload};

/// The response timeout when none is given, as IoT Hub's.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The response timeouts accepted, in seconds (IoT Hub's range).
pub const RESPONSE_TIMEOUT_SECS: RangeInclusive<u64> = 5..=300;

/// The connect timeouts accepted, in seconds (IoT Hub's range); 0 means a device that
/// is not online fails at once.
pub const CONNECT_TIMEOUT_SECS: RangeInclusive<u64> = 0..=300;

/// A call to make: which method on which device, with what payload, and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRequest {
    /// The device id, as IoT Hub spells device ids.
    pub device: String,
    /// The method name.
    pub method: String,
    /// The payload as JSON text, sent as written; empty stands for JSON `null`.
    pub payload: String,
    /// How long to wait for the answer once the request is sent (5 to 300 s).
    pub response_timeout: Duration,
    /// How long to wait for a device that is offline to come online (0 to 300 s).
    pub connect_timeout: Duration,
    /// The namespace template, in which `{device-id}` stands for [`CallRequest::device`].
    pub namespace: String,
}

impl CallRequest {
    /// A call of `method` on `device` with `payload` (JSON text), with IoT Hub's default
    /// timeouts (30 s response, 0 s connect) and the default namespace.
    pub fn new(
        device: impl Into<String>,
        method: impl Into<String>,
        payload: impl Into<String>,
    ) -> Self {
        Self {
            device: device.into(),
            method: method.into(),
            payload: payload.into(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connect_timeout: Duration::ZERO,
            namespace: DEFAULT_NAMESPACE.to_owned(),
        }
    }

    /// Checks every argument, and returns the device's namespace and the payload to send.
    /// [`Caller::call`](crate::Caller::call) does this itself; call it earlier to refuse
    /// bad arguments before connecting.
    ///
    /// # Errors
    /// [`CallError::Argument`] naming the first argument that breaks its rule.
    pub fn check(&self) -> Result<CheckedRequest<'_>, CallError> {
        check_timeout(
            self.response_timeout,
            &RESPONSE_TIMEOUT_SECS,
            ArgumentError::ResponseTimeout,
        )?;
        check_timeout(
            self.connect_timeout,
            &CONNECT_TIMEOUT_SECS,
            ArgumentError::ConnectTimeout,
        )?;
        let namespace =
            Namespace::new(&self.namespace, &self.device).map_err(ArgumentError::Name)?;
        check_method(&self.method).map_err(ArgumentError::Name)?;
        let payload =
            json_payload(self.payload.as_bytes(), MAX_PAYLOAD).map_err(ArgumentError::Payload)?;
        Ok(CheckedRequest {
            namespace,
            payload: payload.trim(),
        })
    }
}

/// A [`CallRequest`] whose arguments passed [`CallRequest::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRequest<'r> {
    /// The device's topic namespace.
    pub namespace: Namespace,
    /// The payload to send: one JSON document, without surrounding whitespace.
    pub payload: &'r str,
}

fn check_timeout(
    timeout: Duration,
    secs: &RangeInclusive<u64>,
    error: fn(Duration) -> ArgumentError,
) -> Result<(), ArgumentError> {
    let range = Duration::from_secs(*secs.start())..=Duration::from_secs(*secs.end());
    if range.contains(&timeout) {
        Ok(())
    } else {
        Err(error(timeout))
    }
}

/// Reads the payload argument of the command line: JSON text, `-` for stdin, `@FILE`
/// for a file, or nothing for JSON `null`. Reads at most one byte more than
/// [`MAX_PAYLOAD`] from stdin or the file, so that a huge input is refused without
/// reading all of it. (No JSON document starts with `@`, so `@` is never ambiguous.)
///
/// # Errors
/// [`CallError::Argument`] when stdin or the file cannot be read, or holds more than
/// the limit, or the payload is not one JSON document.
pub fn read_payload(arg: Option<&str>, stdin: &mut dyn Read) -> Result<String, CallError> {
    let text = match arg {
        None => return Ok("null".to_owned()),
        Some(file) if file.starts_with('@') => {
            let path = &file[1..];
            let file_error = |reason: String| ArgumentError::File {
                path: path.to_owned(),
                reason,
            };
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_PAYLOAD as u64 + 1).read_to_end(&mut bytes))
                .map_err(|e| file_error(e.to_string()))?;
            if bytes.len() > MAX_PAYLOAD {
                return Err(file_error(format!(
                    "it is larger than {MAX_PAYLOAD} bytes, the limit"
                ))
                .into());
            }
            json_payload(&bytes, MAX_PAYLOAD).map_err(|e| file_error(e.to_string()))?;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Some("-") => {
            let mut bytes = Vec::new();
            stdin
                .take(MAX_PAYLOAD as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| ArgumentError::Stdin(e.to_string()))?;
            if bytes.len() > MAX_PAYLOAD {
                return Err(ArgumentError::StdinTooLarge { max: MAX_PAYLOAD }.into());
            }
            json_payload(&bytes, MAX_PAYLOAD).map_err(ArgumentError::Payload)?;
            // Checked to be UTF-8 just above.
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Some(text) => {
            json_payload(text.as_bytes(), MAX_PAYLOAD).map_err(ArgumentError::Payload)?;
            text.to_owned()
        }
    };
    let trimmed = text.trim();
    Ok(if trimmed.is_empty() { "null" } else { trimmed }.to_owned())
}

/// What the device answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResponse {
    /// The status the device chose: 200 for success, as in IoT Hub.
    pub status: u16,
    /// The payload the device sent.
    pub payload: ResponsePayload,
}

impl MethodResponse {
    /// The answer to a response with `status` and body `bytes`, which the device should
    /// have made JSON; anything else is kept as text rather than refused.
    pub fn from_wire(status: u16, bytes: &[u8]) -> Self {
        let payload = match json_payload(bytes, usize::MAX) {
            Ok(json) => ResponsePayload::Json(json.trim().to_owned()),
            Err(_) => ResponsePayload::NotJson(String::from_utf8_lossy(bytes).into_owned()),
        };
        Self { status, payload }
    }

    /// Whether the status is a success (2xx).
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The payload of a [`MethodResponse`], kept as the text the device sent, so that no
/// number loses digits on its way to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponsePayload {
    /// One JSON document (an empty body reads as `null`).
    Json(String),
    /// Not JSON, against the contract: the body, decoded as UTF-8 with replacements.
    NotJson(String),
}

impl ResponsePayload {
    /// The payload as a JSON value: parsed when it is JSON, a JSON string when it is not.
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            Self::Json(text) => serde_json::from_str(text)
                .unwrap_or_else(|_| serde_json::Value::String(text.clone())),
            Self::NotJson(text) => serde_json::Value::String(text.clone()),
        }
    }
}

/// Why a call has no answer from the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// An argument breaks its rule (400004 ArgumentInvalid); nothing was sent.
    #[error(transparent)]
    Argument(#[from] ArgumentError),
    /// The device is not online and did not come online within the connect timeout
    /// (404103 DeviceNotOnline); the request was not sent.
    #[error("device '{device}' is not online")]
    NotOnline {
        /// The device called.
        device: String,
    },
    /// The request was sent and no answer came within the response timeout (504101
    /// GatewayTimeout).
    #[error("device '{device}' did not answer method '{method}' within {after:?}")]
    Timeout {
        /// The device called.
        device: String,
        /// The method called.
        method: String,
        /// The response timeout.
        after: Duration,
    },
    /// The broker could not be reached, or refused the connection.
    #[error("could not reach the broker at {broker}: {reason}")]
    Connect {
        /// The broker's URL.
        broker: String,
        /// What failed.
        reason: String,
    },
    /// The connection to the broker was lost or closed, or the broker misbehaved, after
    /// connecting.
    #[error("{0}")]
    Broker(String),
    /// IoT Hub does not know the device (404001 DeviceNotFound); nothing was sent.
    #[error("device '{device}' is not registered in the hub")]
    NotRegistered {
        /// The device called.
        device: String,
    },
    /// IoT Hub refused the service connection string's credentials (401002
    /// IotHubUnauthorizedAccess): a wrong key, an expired token, or a policy without
    /// the right.
    #[error("the hub refused the credentials of policy '{policy}': {reason}")]
    Unauthorized {
        /// The policy the token was signed for (`SharedAccessKeyName`).
        policy: String,
        /// What the hub said.
        reason: String,
    },
    /// IoT Hub answered with another error code, such as 429 throttling or 500.
    #[error("the hub answered {code}: {message}")]
    Service {
        /// IoT Hub's error code (six digits when it gave one, else the HTTP status).
        code: u32,
        /// What the hub said.
        message: String,
    },
    /// IoT Hub could not be reached over HTTPS (name, connection, TLS), or answered
    /// something that is not its API.
    #[error("could not reach the hub at {host}: {reason}")]
    Hub {
        /// The hub's `HostName`.
        host: String,
        /// What failed.
        reason: String,
    },
    /// A job ran the call, but the hub gives no per-device results (it does not answer
    /// queries on `devices.jobs`), so this device's outcome is unknown.
    #[error("the hub gave no result for this device (job '{job}')")]
    Unreported {
        /// The job's id.
        job: String,
    },
}

impl CallError {
    /// The IoT Hub service error this is, where there is one; connection failures have
    /// none.
    pub fn service_error(&self) -> Option<ServiceError> {
        match self {
            Self::Argument(_) => Some(ServiceError::ArgumentInvalid),
            Self::NotOnline { .. } => Some(ServiceError::DeviceNotOnline),
            Self::Timeout { .. } => Some(ServiceError::GatewayTimeout),
            _ => None,
        }
    }

    /// The six-digit IoT Hub error code, such as 404103, where there is one.
    pub fn code(&self) -> Option<u32> {
        self.code_and_name().map(|(code, _)| code)
    }

    /// IoT Hub's code and name for the error, such as (404001, `DeviceNotFound`),
    /// where there is one.
    pub fn code_and_name(&self) -> Option<(u32, &'static str)> {
        match self {
            Self::NotRegistered { .. } => Some((NOT_REGISTERED, "DeviceNotFound")),
            Self::Unauthorized { .. } => Some((UNAUTHORIZED, "IotHubUnauthorizedAccess")),
            Self::Service { code, .. } => Some((*code, "")),
            _ => self.service_error().map(|e| (e.code(), e.name())),
        }
    }
}

/// IoT Hub's 404001 DeviceNotFound: the device is not in the registry.
pub const NOT_REGISTERED: u32 = 404_001;

/// IoT Hub's 401002 IotHubUnauthorizedAccess: the credentials were refused.
pub const UNAUTHORIZED: u32 = 401_002;

/// Which argument broke which rule (all 400004 ArgumentInvalid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentError {
    /// The response timeout is outside [`RESPONSE_TIMEOUT_SECS`].
    #[error("response timeout {0:?} is out of range: it must be 5 to 300 seconds")]
    ResponseTimeout(Duration),
    /// The connect timeout is outside [`CONNECT_TIMEOUT_SECS`].
    #[error("connect timeout {0:?} is out of range: it must be 0 to 300 seconds")]
    ConnectTimeout(Duration),
    /// The device id, method name or namespace breaks the naming rules.
    #[error(transparent)]
    Name(NameError),
    /// The payload is not one JSON document, or is too large.
    #[error(transparent)]
    Payload(PayloadError),
    /// Stdin holds more than the payload limit.
    #[error("the payload on stdin is larger than {max} bytes, the limit")]
    StdinTooLarge {
        /// The limit in bytes.
        max: usize,
    },
    /// Stdin could not be read.
    #[error("could not read the payload from stdin: {0}")]
    Stdin(String),
    /// IoT Hub refused an argument (400004) for a reason of its own.
    #[error("{0}")]
    Refused(String),
    /// The payload file could not be read, or holds no valid payload.
    #[error("payload file {path}: {reason}")]
    File {
        /// The file, as the command line named it.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argument_error(request: &CallRequest) -> ArgumentError {
        match request.check() {
            Err(CallError::Argument(e)) => e,
            other => panic!("expected an argument error, got {other:?}"),
        }
    }

    #[test]
    fn timeouts_outside_iot_hubs_ranges_are_400004() {
        let mut request = CallRequest::new("d", "m", "null");
        for secs in [0, 4, 301, 10_000] {
            request.response_timeout = Duration::from_secs(secs);
            assert_eq!(
                argument_error(&request),
                ArgumentError::ResponseTimeout(Duration::from_secs(secs))
            );
        }
        request.response_timeout = Duration::from_millis(4_999);
        assert!(matches!(
            argument_error(&request),
            ArgumentError::ResponseTimeout(_)
        ));
        for secs in [5, 30, 300] {
            request.response_timeout = Duration::from_secs(secs);
            assert!(request.check().is_ok(), "{secs} s is in range");
        }
        request.connect_timeout = Duration::from_secs(301);
        let error = CallError::from(argument_error(&request));
        assert_eq!(error.code(), Some(400_004));
        for secs in [0, 1, 300] {
            request.connect_timeout = Duration::from_secs(secs);
            assert!(request.check().is_ok(), "{secs} s is in range");
        }
    }

    #[test]
    fn names_and_payloads_are_checked_before_sending() {
        let bad_device = CallRequest::new("a/b", "m", "1");
        assert!(matches!(
            argument_error(&bad_device),
            ArgumentError::Name(_)
        ));
        let bad_method = CallRequest::new("d", "a b", "1");
        assert!(matches!(
            argument_error(&bad_method),
            ArgumentError::Name(_)
        ));
        let mut bad_namespace = CallRequest::new("d", "m", "1");
        bad_namespace.namespace = "site/{device-id}".into();
        assert!(matches!(
            argument_error(&bad_namespace),
            ArgumentError::Name(_)
        ));
        let not_json = CallRequest::new("d", "m", "{oops");
        assert!(matches!(
            argument_error(&not_json),
            ArgumentError::Payload(PayloadError::NotJson(_))
        ));
        let huge = CallRequest::new("d", "m", format!("\"{}\"", "x".repeat(MAX_PAYLOAD)));
        assert!(matches!(
            argument_error(&huge),
            ArgumentError::Payload(PayloadError::TooLarge { .. })
        ));

        let good = CallRequest::new("my-device", "DeviceMethod", " {\"a\":1}\n");
        let checked = good.check().expect("valid request");
        assert_eq!(checked.payload, "{\"a\":1}");
        assert_eq!(checked.namespace.prefix(), "devices/my-device/");
        assert_eq!(
            CallRequest::new("d", "m", "")
                .check()
                .expect("empty is null")
                .payload,
            "null"
        );
    }

    #[test]
    fn the_payload_argument_is_text_stdin_or_null() {
        let mut no_stdin: &[u8] = b"unused";
        assert_eq!(
            read_payload(None, &mut no_stdin).expect("no payload"),
            "null"
        );
        assert_eq!(
            read_payload(Some(r#"{"method_number":"42"}"#), &mut no_stdin).expect("inline"),
            r#"{"method_number":"42"}"#
        );
        let mut stdin: &[u8] = b"{\"from\": \"stdin\"}\n";
        assert_eq!(
            read_payload(Some("-"), &mut stdin).expect("stdin"),
            "{\"from\": \"stdin\"}"
        );
        let mut empty: &[u8] = b"";
        assert_eq!(
            read_payload(Some("-"), &mut empty).expect("empty stdin"),
            "null"
        );
    }

    #[test]
    fn a_bad_payload_argument_names_the_problem() {
        let mut no_stdin: &[u8] = b"";
        let error = read_payload(Some("{\"a\":"), &mut no_stdin).expect_err("truncated JSON");
        assert_eq!(error.code(), Some(400_004));
        assert!(
            error.to_string().starts_with("payload is not JSON: "),
            "{error}"
        );

        let mut bad_stdin: &[u8] = b"[1, 2";
        let error = read_payload(Some("-"), &mut bad_stdin).expect_err("truncated stdin");
        assert!(
            error.to_string().starts_with("payload is not JSON: "),
            "{error}"
        );

        let big = vec![b' '; MAX_PAYLOAD * 2];
        let error = read_payload(Some("-"), &mut big.as_slice()).expect_err("too large");
        assert_eq!(
            error,
            CallError::from(ArgumentError::StdinTooLarge { max: MAX_PAYLOAD })
        );

        let big_inline = format!("\"{}\"", "x".repeat(MAX_PAYLOAD));
        let error = read_payload(Some(&big_inline), &mut no_stdin).expect_err("too large");
        assert!(error.to_string().contains("the limit is 131072"), "{error}");

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("payload.json");
        let at = format!("@{}", path.display());
        std::fs::write(&path, " {\"from\": \"a file\"}\n").expect("write");
        assert_eq!(
            read_payload(Some(&at), &mut no_stdin).expect("file"),
            "{\"from\": \"a file\"}"
        );
        std::fs::write(&path, "{oops").expect("write");
        let error = read_payload(Some(&at), &mut no_stdin).expect_err("not JSON");
        assert!(
            error.to_string().starts_with(&format!(
                "payload file {}: payload is not JSON: ",
                path.display()
            )),
            "{error}"
        );
        assert_eq!(error.code(), Some(400_004));
        std::fs::write(&path, vec![b' '; MAX_PAYLOAD + 1]).expect("write");
        let error = read_payload(Some(&at), &mut no_stdin).expect_err("too large");
        assert_eq!(
            error.to_string(),
            format!(
                "payload file {}: it is larger than 131072 bytes, the limit",
                path.display()
            )
        );
        let error = read_payload(Some("@/nonexistent/p.json"), &mut no_stdin).expect_err("none");
        assert_eq!(
            error.to_string(),
            "payload file /nonexistent/p.json: No such file or directory (os error 2)"
        );

        let mut not_utf8: &[u8] = &[b'"', 0xff, b'"'];
        let error = read_payload(Some("-"), &mut not_utf8).expect_err("not UTF-8");
        assert!(error.to_string().contains("not UTF-8"), "{error}");
    }

    #[test]
    fn responses_keep_the_devices_text_and_survive_non_json() {
        let big = MethodResponse::from_wire(200, b" {\"n\":123456789012345678901234567890} ");
        assert_eq!(
            big.payload,
            ResponsePayload::Json("{\"n\":123456789012345678901234567890}".into())
        );
        assert!(big.is_success());
        let empty = MethodResponse::from_wire(200, b"");
        assert_eq!(empty.payload, ResponsePayload::Json("null".into()));
        let text = MethodResponse::from_wire(500, b"oops");
        assert_eq!(text.payload, ResponsePayload::NotJson("oops".into()));
        assert_eq!(text.payload.to_value(), serde_json::json!("oops"));
        assert!(!text.is_success());
        assert!(!MethodResponse::from_wire(199, b"1").is_success());
        assert!(MethodResponse::from_wire(299, b"1").is_success());
    }

    #[test]
    fn each_failure_has_its_iot_hub_code_or_none() {
        let not_online = CallError::NotOnline { device: "d".into() };
        assert_eq!(
            not_online.service_error(),
            Some(ServiceError::DeviceNotOnline)
        );
        let timeout = CallError::Timeout {
            device: "d".into(),
            method: "m".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(timeout.code(), Some(504_101));
        let connect = CallError::Connect {
            broker: "mqtt://h:1883".into(),
            reason: "refused".into(),
        };
        assert_eq!(connect.code(), None);
        assert_eq!(CallError::Broker("lost".into()).code(), None);
    }
}
