//! How results are shown: for people, modelled on the output of Azure's
//! `CallMethodOnDevice.py` tutorial, or as exactly one JSON object per command (`--json`).
//!
//! Payloads are re-laid out from the device's own text, never parsed into numbers and
//! printed back, so a number keeps every digit the device sent.

use serde::Serialize;

use crate::call::{CallError, MethodResponse, ResponsePayload};

/// How to print results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lines for people; `pretty` indents JSON payloads (for a terminal).
    Human {
        /// Whether to indent JSON payloads over several lines.
        pretty: bool,
    },
    /// One JSON object on stdout, compact.
    Json,
}

/// The line announcing a call (human format; it goes to stderr, so that stdout holds
/// only the answer), such as
/// `Invoking method 'DeviceMethod' on device 'my-device' with payload: {"a":1}`.
pub fn invoking(device: &str, method: &str, payload: &str) -> String {
    format!(
        "Invoking method '{method}' on device '{device}' with payload: {}\n",
        relayout(payload, false)
    )
}

/// What to print on stdout for a device's answer, whatever its status.
pub fn response(format: Format, response: &MethodResponse) -> String {
    match format {
        Format::Human { pretty } => format!(
            "Response status : {}\nResponse payload: {}\n",
            response.status,
            payload_text(&response.payload, pretty)
        ),
        Format::Json => format!(
            "{{\"status\":{},\"payload\":{}}}\n",
            response.status,
            payload_text(&response.payload, false)
        ),
    }
}

/// What to print for a call that has no answer: in the human format one line for
/// stderr, such as `error: device 'x' is not online (404103 DeviceNotOnline)`; in the
/// JSON format one object for stdout, `{"errorCode":404103,"message":"..."}`, with
/// `errorCode` null when the failure has no IoT Hub code (the broker was not reached).
pub fn error(format: Format, error: &CallError) -> String {
    match format {
        Format::Human { .. } => match error.service_error() {
            Some(service) => format!("error: {error} ({} {})\n", service.code(), service.name()),
            None => format!("error: {error}\n"),
        },
        Format::Json => {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct ErrorObject {
                error_code: Option<u32>,
                message: String,
            }
            let object = ErrorObject {
                error_code: error.code(),
                message: error.to_string(),
            };
            // A struct of a number and a string always serializes.
            let json = serde_json::to_string(&object).unwrap_or_default();
            format!("{json}\n")
        }
    }
}

/// A response payload as JSON text: the device's JSON re-laid out, or, when the device
/// sent something that is not JSON, that text as a JSON string.
fn payload_text(payload: &ResponsePayload, pretty: bool) -> String {
    match payload {
        ResponsePayload::Json(json) => relayout(json, pretty),
        ResponsePayload::NotJson(text) => {
            serde_json::to_string(text).unwrap_or_else(|_| String::from("null"))
        }
    }
}

/// Lays out JSON text, which must be one valid JSON document, without parsing it:
/// whitespace between tokens is dropped, and with `pretty` put back as two-space
/// indentation (as `serde_json::to_string_pretty` does). Strings are copied as they are.
fn relayout(json: &str, pretty: bool) -> String {
    let bytes = json.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        out.resize(out.len() + 2 * depth, b' ');
    };
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        i += 1;
        if in_string {
            // Multi-byte UTF-8 sequences hold no ASCII bytes, so they pass through here.
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                in_string = true;
                out.push(byte);
            }
            b'{' | b'[' => {
                out.push(byte);
                // An empty object or array stays on one line: `{}`, `[]`.
                let next = bytes[i..]
                    .iter()
                    .position(|b| !b.is_ascii_whitespace())
                    .map(|at| i + at);
                if let Some(close @ (b'}' | b']')) = next.map(|at| bytes[at]) {
                    out.push(close);
                    i = next.map_or(i, |at| at + 1);
                } else {
                    depth += 1;
                    if pretty {
                        newline(&mut out, depth);
                    }
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if pretty {
                    newline(&mut out, depth);
                }
                out.push(byte);
            }
            b',' => {
                out.push(byte);
                if pretty {
                    newline(&mut out, depth);
                }
            }
            b':' => {
                out.push(byte);
                if pretty {
                    out.push(b' ');
                }
            }
            _ => out.push(byte),
        }
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::call::ArgumentError;

    const HUMAN: Format = Format::Human { pretty: false };
    const PRETTY: Format = Format::Human { pretty: true };

    fn answer(status: u16, body: &str) -> MethodResponse {
        MethodResponse::from_wire(status, body.as_bytes())
    }

    #[test]
    fn the_human_format_follows_azures_tutorial() {
        assert_eq!(
            invoking("my-device", "DeviceMethod", "{ \"method_number\": \"42\" }"),
            "Invoking method 'DeviceMethod' on device 'my-device' with payload: {\"method_number\":\"42\"}\n"
        );
        let ok = answer(
            200,
            "{\"Response\": \"This is the response from the device\"}",
        );
        assert_eq!(
            response(HUMAN, &ok),
            "Response status : 200\n\
             Response payload: {\"Response\":\"This is the response from the device\"}\n"
        );
    }

    #[test]
    fn a_device_error_status_is_shown_like_any_answer() {
        let not_found = answer(
            404,
            r#"{"error":{"code":"methodNotFound","message":"no handler serves 'x'"}}"#,
        );
        assert_eq!(
            response(HUMAN, &not_found),
            "Response status : 404\n\
             Response payload: {\"error\":{\"code\":\"methodNotFound\",\"message\":\"no handler serves 'x'\"}}\n"
        );
        assert_eq!(
            response(Format::Json, &not_found),
            "{\"status\":404,\"payload\":{\"error\":{\"code\":\"methodNotFound\",\"message\":\"no handler serves 'x'\"}}}\n"
        );
    }

    #[test]
    fn the_json_format_is_one_object_with_the_payload_as_json() {
        let ok = answer(
            200,
            "{\n  \"n\": 123456789012345678901234567890,\n  \"s\": \"a b\"\n}\n",
        );
        let out = response(Format::Json, &ok);
        assert_eq!(
            out,
            "{\"status\":200,\"payload\":{\"n\":123456789012345678901234567890,\"s\":\"a b\"}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        assert_eq!(parsed["payload"]["s"], "a b");
        assert_eq!(
            response(Format::Json, &answer(200, "")),
            "{\"status\":200,\"payload\":null}\n"
        );
    }

    #[test]
    fn a_payload_that_is_not_json_is_shown_as_a_json_string() {
        let broken = answer(200, "not \"json\"");
        assert_eq!(
            response(Format::Json, &broken),
            "{\"status\":200,\"payload\":\"not \\\"json\\\"\"}\n"
        );
        assert_eq!(
            response(HUMAN, &broken),
            "Response status : 200\nResponse payload: \"not \\\"json\\\"\"\n"
        );
        let binary = MethodResponse::from_wire(200, &[0xff, b'x']);
        let out = response(Format::Json, &binary);
        serde_json::from_str::<serde_json::Value>(&out).expect("still one JSON object");
    }

    #[test]
    fn pretty_output_indents_like_serde_json() {
        let body = r#"{"a":[1,2,{}],"b":{"c":"x: [y, z]","d":[]},"e":"\"q\\"}"#;
        let value: serde_json::Value = serde_json::from_str(body).expect("valid");
        let expected = serde_json::to_string_pretty(&value).expect("serializes");
        assert_eq!(relayout(body, true), expected);
        assert_eq!(
            response(PRETTY, &answer(200, body)),
            format!("Response status : 200\nResponse payload: {expected}\n")
        );
        assert_eq!(relayout(" [ ] ", true), "[]");
        assert_eq!(relayout("\"caf\u{e9} {,}\"", true), "\"caf\u{e9} {,}\"");
        assert_eq!(relayout(" 42 ", false), "42");
    }

    fn errors() -> Vec<(CallError, u32, &'static str)> {
        vec![
            (
                CallError::NotOnline { device: "x".into() },
                404_103,
                "device 'x' is not online",
            ),
            (
                CallError::Timeout {
                    device: "x".into(),
                    method: "m".into(),
                    after: Duration::from_secs(5),
                },
                504_101,
                "device 'x' did not answer method 'm' within 5s",
            ),
            (
                CallError::Argument(ArgumentError::ResponseTimeout(Duration::from_secs(3))),
                400_004,
                "response timeout 3s is out of range: it must be 5 to 300 seconds",
            ),
        ]
    }

    #[test]
    fn each_service_error_is_one_line_with_its_code_and_name() {
        let names = ["DeviceNotOnline", "GatewayTimeout", "ArgumentInvalid"];
        for ((error, code, message), name) in errors().into_iter().zip(names) {
            assert_eq!(
                super::error(HUMAN, &error),
                format!("error: {message} ({code} {name})\n")
            );
        }
    }

    #[test]
    fn each_service_error_is_one_json_object_with_its_code() {
        for (error, code, message) in errors() {
            let out = super::error(Format::Json, &error);
            let parsed: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
            assert_eq!(
                parsed,
                serde_json::json!({"errorCode": code, "message": message})
            );
            assert!(out.starts_with("{\"errorCode\":"), "{out}");
        }
    }

    #[test]
    fn a_broker_failure_has_no_iot_hub_code() {
        let error = CallError::Connect {
            broker: "mqtt://127.0.0.1:1".into(),
            reason: "I/O: Connection refused (os error 111)".into(),
        };
        let line = "could not reach the broker at mqtt://127.0.0.1:1: I/O: Connection refused (os error 111)";
        assert_eq!(super::error(HUMAN, &error), format!("error: {line}\n"));
        let parsed: serde_json::Value =
            serde_json::from_str(&super::error(Format::Json, &error)).expect("one JSON object");
        assert_eq!(
            parsed,
            serde_json::json!({"errorCode": null, "message": line})
        );
    }
}
