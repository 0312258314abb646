//! What `broadcast` prints: for people, a table of every device's result and the
//! totals; with `--json`, one object per device a line.

use std::time::Duration;

use serde::Serialize;

use super::table::{Cell, Table};
use super::{Paint, escape, payload_text, style};
use crate::broadcast::{DeviceResult, Outcome, Totals};
use crate::call::CallError;

/// The line announcing a job (stderr, human format), such as
/// `Invoking method 'reboot' on 20 devices with payload: {"delaySeconds":30}`.
/// A payload over [`SHOWN_PAYLOAD`] characters is cut short, with its size.
pub fn invoking(method: &str, devices: usize, payload: &str, paint: Paint) -> String {
    let mut payload = super::relayout(payload, false, Paint::NONE);
    if let Some((cut, _)) = payload.char_indices().nth(SHOWN_PAYLOAD) {
        payload = format!("{}… ({} bytes)", &payload[..cut], payload.len());
    }
    format!(
        "Invoking method '{}' on {} with payload: {payload}\n",
        paint.paint(style::HEADER, &escape::text(method)),
        count(devices, "device", "devices"),
    )
}

/// How much of a job's payload its announcement shows, in characters.
pub const SHOWN_PAYLOAD: usize = 80;

/// The table of results, a row per device: its status (or IoT Hub error code), how
/// long its call took, and its answer (compact JSON) or error.
pub fn results_table(results: &[DeviceResult], paint: Paint) -> String {
    let mut table = Table::new(&["DEVICE", "STATUS", "TIME", "RESULT"]);
    for result in results {
        let outcome = Outcome::of(result);
        let style = outcome_style(outcome);
        let (status, answer) = match &result.outcome {
            Ok(response) => (
                response.status.to_string(),
                payload_text(&response.payload, false, Paint::NONE),
            ),
            Err(error) => (
                error
                    .code()
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                error_summary(error),
            ),
        };
        table.row(vec![
            result.device.as_str().into(),
            Cell::styled(status, style),
            Cell::styled(elapsed(result.elapsed), style::DIM),
            answer.into(),
        ]);
    }
    table.render(paint)
}

/// An error in a row of the results, where the device is named already.
fn error_summary(error: &CallError) -> String {
    match error {
        CallError::NotOnline { .. } => "not online (DeviceNotOnline)".to_owned(),
        CallError::Timeout { after, .. } => {
            format!("no answer within {after:?} (GatewayTimeout)")
        }
        other => other.to_string(),
    }
}

fn outcome_style(outcome: Outcome) -> anstyle::Style {
    match outcome {
        Outcome::Succeeded => style::GOOD,
        Outcome::Failed => style::BAD,
        Outcome::NotOnline | Outcome::TimedOut => style::WARN,
    }
}

/// The totals line: `20 devices: 17 succeeded, 1 failed, 1 not online, 1 timed out`.
pub fn totals(totals: &Totals, paint: Paint) -> String {
    let part = |n: usize, what: &str, style| {
        let text = format!("{n} {what}");
        if n == 0 {
            text
        } else {
            paint.paint(style, &text)
        }
    };
    format!(
        "{}: {}, {}, {}, {}\n",
        count(totals.devices(), "device", "devices"),
        part(totals.succeeded, "succeeded", style::GOOD),
        part(totals.failed, "failed", style::BAD),
        part(totals.not_online, "not online", style::WARN),
        part(totals.timed_out, "timed out", style::WARN),
    )
}

/// What the progress bar says besides its count: the failures so far.
pub fn progress(totals: &Totals) -> String {
    let parts: Vec<String> = [
        (totals.failed, "failed"),
        (totals.not_online, "not online"),
        (totals.timed_out, "timed out"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    parts.join(", ")
}

/// One device's result for `broadcast --json`, a line:
/// `{"deviceId":"pump-1","status":200,"payload":{...},"elapsedMs":12}` or
/// `{"deviceId":"pump-2","errorCode":404103,"message":"...","elapsedMs":0}`.
pub fn result_json(result: &DeviceResult) -> String {
    let device = super::json_string(&result.device);
    let elapsed_ms = result.elapsed.as_millis();
    match &result.outcome {
        Ok(response) => format!(
            "{{\"deviceId\":{device},\"status\":{},\"payload\":{},\"elapsedMs\":{elapsed_ms}}}\n",
            response.status,
            payload_text(&response.payload, false, Paint::NONE)
        ),
        Err(error) => {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct ErrorObject<'a> {
                device_id: &'a str,
                error_code: Option<u32>,
                message: String,
                elapsed_ms: u128,
            }
            let object = ErrorObject {
                device_id: &result.device,
                error_code: error.code(),
                message: error.to_string(),
                elapsed_ms,
            };
            let json = serde_json::to_string(&object).unwrap_or_default();
            format!("{}\n", escape::json(&json))
        }
    }
}

/// A call's duration for people: `12 ms`, `1.25 s`.
pub fn elapsed(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.2} s", duration.as_secs_f64())
    }
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::MethodResponse;

    fn results() -> Vec<DeviceResult> {
        let result = |device: &str, outcome, ms| DeviceResult {
            device: device.into(),
            outcome,
            elapsed: Duration::from_millis(ms),
        };
        vec![
            result(
                "pump-1",
                Ok(MethodResponse::from_wire(200, b"{ \"ok\": true }")),
                12,
            ),
            result(
                "pump-2",
                Ok(MethodResponse::from_wire(
                    500,
                    br#"{"error":{"code":"handlerFailed","message":"trap"}}"#,
                )),
                3,
            ),
            result(
                "pump-3",
                Err(CallError::NotOnline {
                    device: "pump-3".into(),
                }),
                0,
            ),
            result(
                "pump-4",
                Err(CallError::Timeout {
                    device: "pump-4".into(),
                    method: "m".into(),
                    after: Duration::from_secs(5),
                }),
                5_004,
            ),
            result(
                "pump-5",
                Err(CallError::Broker("the session ended".into())),
                1,
            ),
        ]
    }

    #[test]
    fn the_table_has_a_row_per_device_and_the_totals_add_up() {
        let results = results();
        assert_eq!(
            results_table(&results, Paint::NONE),
            "DEVICE  STATUS  TIME    RESULT\n\
             pump-1  200     12 ms   {\"ok\":true}\n\
             pump-2  500     3 ms    {\"error\":{\"code\":\"handlerFailed\",\"message\":\"trap\"}}\n\
             pump-3  404103  0 ms    not online (DeviceNotOnline)\n\
             pump-4  504101  5.00 s  no answer within 5s (GatewayTimeout)\n\
             pump-5  -       1 ms    the session ended\n"
        );
        assert_eq!(
            totals(&Totals::of(&results), Paint::NONE),
            "5 devices: 1 succeeded, 2 failed, 1 not online, 1 timed out\n"
        );
        assert_eq!(
            progress(&Totals::of(&results)),
            "2 failed, 1 not online, 1 timed out"
        );
        assert_eq!(progress(&Totals::default()), "");
    }

    #[test]
    fn each_result_is_one_json_line() {
        let lines: Vec<serde_json::Value> = results()
            .iter()
            .map(|r| {
                let line = result_json(r);
                assert_eq!(line.matches('\n').count(), 1, "{line}");
                serde_json::from_str(&line).expect("one JSON object")
            })
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"deviceId": "pump-1", "status": 200, "payload": {"ok": true}, "elapsedMs": 12})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"deviceId": "pump-3", "errorCode": 404103,
                               "message": "device 'pump-3' is not online", "elapsedMs": 0})
        );
        assert_eq!(lines[4]["errorCode"], serde_json::Value::Null);
    }

    #[test]
    fn the_announcement_counts_devices() {
        assert_eq!(
            invoking("reboot", 20, "{ \"a\": 1 }", Paint::NONE),
            "Invoking method 'reboot' on 20 devices with payload: {\"a\":1}\n"
        );
        assert_eq!(
            invoking("reboot", 1, "null", Paint::NONE),
            "Invoking method 'reboot' on 1 device with payload: null\n"
        );
        let long = format!("\"{}\"", "é".repeat(100));
        assert_eq!(
            invoking("m", 2, &long, Paint::NONE),
            format!(
                "Invoking method 'm' on 2 devices with payload: \"{}… (202 bytes)\n",
                "é".repeat(79)
            )
        );
    }
}
