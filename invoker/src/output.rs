//! How results are shown: for people, modelled on the output of Azure's
//! `CallMethodOnDevice.py` tutorial, in colour on a terminal ([`Paint`]); or as JSON
//! (`--json`): one object for a call, one a line for lists and jobs.
//!
//! Payloads are re-laid out from the device's own text, never parsed into numbers and
//! printed back, so a number keeps every digit the device sent.
//!
//! Whatever a device supplied goes through [`escape`] before it is printed, so that a
//! device cannot drive the operator's terminal.
//!
//! - this file: [`Format`], [`Paint`], and what `call` prints;
//! - [`escape`]: device-supplied text made harmless on a terminal;
//! - [`table`]: columns for people;
//! - [`fleet`]: what `devices` and `methods` print;
//! - [`job`]: what `broadcast` prints.

pub mod escape;
pub mod fleet;
pub mod job;
pub mod table;

use anstyle::{AnsiColor, Style};
use serde::Serialize;

use crate::call::{CallError, MethodResponse, ResponsePayload};

/// Whether to colour text for people: on a terminal unless `NO_COLOR` (or `TERM=dumb`,
/// `CLICOLOR=0`) says otherwise; never in pipes, files or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paint {
    on: bool,
}

impl Paint {
    /// No colour.
    pub const NONE: Self = Self { on: false };

    /// Colour when `on`.
    pub fn new(on: bool) -> Self {
        Self { on }
    }

    /// Whether this paints at all.
    pub fn is_on(self) -> bool {
        self.on
    }

    /// `text` in `style`, or as it is when not painting.
    pub fn paint(self, style: Style, text: &str) -> String {
        if self.on && !text.is_empty() {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }
}

/// The styles of the output, in one place.
pub mod style {
    use super::{AnsiColor, Style};

    /// A success: a 2xx status, `online`, a count of successes.
    pub const GOOD: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Green)));
    /// A failure: another status, `error:`, a count of failures.
    pub const BAD: Style = Style::new()
        .fg_color(Some(anstyle::Color::Ansi(AnsiColor::Red)))
        .bold();
    /// Neither: offline, not online, timed out.
    pub const WARN: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Yellow)));
    /// Column headers and labels.
    pub const HEADER: Style = Style::new().bold();
    /// What matters less: digests, times.
    pub const DIM: Style = Style::new().dimmed();
    /// A key in a JSON object, as jq shows it.
    pub const KEY: Style = Style::new()
        .fg_color(Some(anstyle::Color::Ansi(AnsiColor::Blue)))
        .bold();
    /// A string in JSON, as jq shows it.
    pub const STRING: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Green)));
}

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
pub fn invoking(device: &str, method: &str, payload: &str, paint: Paint) -> String {
    format!(
        "Invoking method '{}' on device '{}' with payload: {}\n",
        paint.paint(style::HEADER, &escape::text(method)),
        paint.paint(style::HEADER, &escape::text(device)),
        relayout(payload, false, Paint::NONE)
    )
}

/// What to print on stdout for a device's answer, whatever its status; `paint` colours
/// the human format (the status, the payload's keys and strings).
pub fn response(format: Format, response: &MethodResponse, paint: Paint) -> String {
    match format {
        Format::Human { pretty } => format!(
            "Response status : {}\nResponse payload: {}\n",
            status_text(response.status, paint),
            payload_text(&response.payload, pretty, paint)
        ),
        Format::Json => format!(
            "{{\"status\":{},\"payload\":{}}}\n",
            response.status,
            payload_text(&response.payload, false, Paint::NONE)
        ),
    }
}

/// A status, green when it is a success and red otherwise.
fn status_text(status: u16, paint: Paint) -> String {
    let style = if (200..300).contains(&status) {
        style::GOOD
    } else {
        style::BAD
    };
    paint.paint(style, &status.to_string())
}

/// What to print for a call that has no answer: in the human format one line for
/// stderr, such as `error: device 'x' is not online (404103 DeviceNotOnline)`; in the
/// JSON format one object for stdout, `{"errorCode":404103,"message":"..."}`, with
/// `errorCode` null when the failure has no IoT Hub code (the broker was not reached).
/// `paint` colours the human format's `error:`.
pub fn error(format: Format, error: &CallError, paint: Paint) -> String {
    match format {
        Format::Human { .. } => match error.code_and_name() {
            // A hub's other codes are in the message already.
            Some((_, "")) | None => failure(&error.to_string(), paint),
            Some((code, name)) => failure(&format!("{error} ({code} {name})"), paint),
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
            format!("{}\n", escape::json(&json))
        }
    }
}

/// One line for stderr saying what failed: `error: <what>`, with `what` escaped (it
/// may name what a device supplied).
pub fn failure(what: &str, paint: Paint) -> String {
    format!(
        "{} {}\n",
        paint.paint(style::BAD, "error:"),
        escape::text(what)
    )
}

/// A response payload as JSON text: the device's JSON re-laid out, or, when the device
/// sent something that is not JSON, that text as a JSON string; escaped either way.
pub fn payload_text(payload: &ResponsePayload, pretty: bool, paint: Paint) -> String {
    match payload {
        ResponsePayload::Json(json) => relayout(json, pretty, paint),
        ResponsePayload::NotJson(text) => json_string(text),
    }
}

/// A string as a JSON string, escaped.
pub fn json_string(text: &str) -> String {
    let json = serde_json::to_string(text).unwrap_or_else(|_| String::from("null"));
    escape::json(&json).into_owned()
}

/// Lays out JSON text, which must be one valid JSON document, without parsing it:
/// whitespace between tokens is dropped, and with `pretty` put back as two-space
/// indentation (as `serde_json::to_string_pretty` does). Strings are copied as they are,
/// but for the characters [`escape::json`] escapes; `paint` colours keys and string
/// values as jq does.
fn relayout(json: &str, pretty: bool, paint: Paint) -> String {
    let json = escape::json(json);
    let bytes = json.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // Where in `out` the string being copied began.
    let mut string_start = 0;
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
                if paint.is_on() {
                    let is_key =
                        bytes[i..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
                    let string = out.split_off(string_start);
                    let style = if is_key { style::KEY } else { style::STRING };
                    out.extend_from_slice(
                        paint
                            .paint(style, &String::from_utf8_lossy(&string))
                            .as_bytes(),
                    );
                }
            }
            continue;
        }
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                in_string = true;
                string_start = out.len();
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
            invoking(
                "my-device",
                "DeviceMethod",
                "{ \"method_number\": \"42\" }",
                Paint::NONE
            ),
            "Invoking method 'DeviceMethod' on device 'my-device' with payload: {\"method_number\":\"42\"}\n"
        );
        let ok = answer(
            200,
            "{\"Response\": \"This is the response from the device\"}",
        );
        assert_eq!(
            response(HUMAN, &ok, Paint::NONE),
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
            response(HUMAN, &not_found, Paint::NONE),
            "Response status : 404\n\
             Response payload: {\"error\":{\"code\":\"methodNotFound\",\"message\":\"no handler serves 'x'\"}}\n"
        );
        assert_eq!(
            response(Format::Json, &not_found, Paint::NONE),
            "{\"status\":404,\"payload\":{\"error\":{\"code\":\"methodNotFound\",\"message\":\"no handler serves 'x'\"}}}\n"
        );
    }

    #[test]
    fn the_json_format_is_one_object_with_the_payload_as_json() {
        let ok = answer(
            200,
            "{\n  \"n\": 123456789012345678901234567890,\n  \"s\": \"a b\"\n}\n",
        );
        let out = response(Format::Json, &ok, Paint::NONE);
        assert_eq!(
            out,
            "{\"status\":200,\"payload\":{\"n\":123456789012345678901234567890,\"s\":\"a b\"}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        assert_eq!(parsed["payload"]["s"], "a b");
        assert_eq!(
            response(Format::Json, &answer(200, ""), Paint::NONE),
            "{\"status\":200,\"payload\":null}\n"
        );
    }

    #[test]
    fn a_payload_that_is_not_json_is_shown_as_a_json_string() {
        let broken = answer(200, "not \"json\"");
        assert_eq!(
            response(Format::Json, &broken, Paint::NONE),
            "{\"status\":200,\"payload\":\"not \\\"json\\\"\"}\n"
        );
        assert_eq!(
            response(HUMAN, &broken, Paint::NONE),
            "Response status : 200\nResponse payload: \"not \\\"json\\\"\"\n"
        );
        let binary = MethodResponse::from_wire(200, &[0xff, b'x']);
        let out = response(Format::Json, &binary, Paint::NONE);
        serde_json::from_str::<serde_json::Value>(&out).expect("still one JSON object");
    }

    #[test]
    fn pretty_output_indents_like_serde_json() {
        let body = r#"{"a":[1,2,{}],"b":{"c":"x: [y, z]","d":[]},"e":"\"q\\"}"#;
        let value: serde_json::Value = serde_json::from_str(body).expect("valid");
        let expected = serde_json::to_string_pretty(&value).expect("serializes");
        assert_eq!(relayout(body, true, Paint::NONE), expected);
        assert_eq!(
            response(PRETTY, &answer(200, body), Paint::NONE),
            format!("Response status : 200\nResponse payload: {expected}\n")
        );
        assert_eq!(relayout(" [ ] ", true, Paint::NONE), "[]");
        assert_eq!(
            relayout("\"caf\u{e9} {,}\"", true, Paint::NONE),
            "\"caf\u{e9} {,}\""
        );
        assert_eq!(relayout(" 42 ", false, Paint::NONE), "42");
    }

    #[test]
    fn on_a_terminal_statuses_keys_and_strings_are_coloured() {
        let paint = Paint::new(true);
        let ok = answer(200, r#"{"a":"x: y","n":[1]}"#);
        let out = response(PRETTY, &ok, paint);
        let (green, blue, reset) = ("\u{1b}[32m", "\u{1b}[1m\u{1b}[34m", "\u{1b}[0m");
        assert!(
            out.contains(&format!("Response status : {green}200{reset}\n")),
            "{out:?}"
        );
        assert!(
            out.contains(&format!("{blue}\"a\"{reset}: {green}\"x: y\"{reset}")),
            "{out:?}"
        );
        assert!(out.contains(&format!("{blue}\"n\"{reset}: [")), "{out:?}");
        let failed = response(HUMAN, &answer(500, "{}"), paint);
        assert!(failed.contains("\u{1b}[1m\u{1b}[31m500"), "{failed:?}");
        // Without colour, the text is the same but for the escapes.
        let plain = response(PRETTY, &ok, Paint::NONE);
        assert_eq!(strip_escapes(&out), plain);
        assert!(!plain.contains('\u{1b}'));
        // JSON is never coloured.
        assert!(!response(Format::Json, &ok, paint).contains('\u{1b}'));
        assert_eq!(
            super::error(HUMAN, &CallError::Broker("lost".into()), paint),
            "\u{1b}[1m\u{1b}[31merror:\u{1b}[0m lost\n"
        );
    }

    /// `text` without its ANSI escape sequences.
    pub(crate) fn strip_escapes(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
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
                super::error(HUMAN, &error, Paint::NONE),
                format!("error: {message} ({code} {name})\n")
            );
        }
    }

    #[test]
    fn each_service_error_is_one_json_object_with_its_code() {
        for (error, code, message) in errors() {
            let out = super::error(Format::Json, &error, Paint::NONE);
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
        assert_eq!(
            super::error(HUMAN, &error, Paint::NONE),
            format!("error: {line}\n")
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&super::error(Format::Json, &error, Paint::NONE))
                .expect("one JSON object");
        assert_eq!(
            parsed,
            serde_json::json!({"errorCode": null, "message": line})
        );
    }
}
