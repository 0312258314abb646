//! What `devices` and `methods` print: for people, a table; with `--json`, one object
//! per device a line (`devices`) or one object (`methods`).

use edge_proto::{Catalog, CatalogEntry, CatalogFailure, Presence};
use serde::Serialize;

use super::table::{Cell, Table};
use super::{Paint, escape, style};
use crate::fleet::DeviceState;

/// The `devices` table: id, state, since when, methods served, agent.
pub fn devices_table(devices: &[DeviceState], paint: Paint) -> String {
    let mut table = Table::new(&["DEVICE", "STATE", "SINCE", "METHODS", "AGENT"]);
    for device in devices {
        let presence = device.presence.as_ref();
        let methods = match &device.catalog {
            None => Cell::plain("-"),
            Some(catalog) if catalog.failed_handlers() == 0 => {
                Cell::plain(catalog.methods_served().to_string())
            }
            Some(catalog) => Cell::styled(
                format!(
                    "{} ({} failed to load)",
                    catalog.methods_served(),
                    catalog.failed_handlers()
                ),
                style::WARN,
            ),
        };
        table.row(vec![
            device.device.as_str().into(),
            state_cell(presence),
            presence
                .and_then(|p| p.since.clone())
                .unwrap_or_else(|| "-".to_owned())
                .into(),
            methods,
            presence
                .and_then(|p| p.agent.clone())
                .unwrap_or_else(|| "-".to_owned())
                .into(),
        ]);
    }
    table.render(paint)
}

/// `online`, `offline` or `offline (reason)`, coloured.
fn state_cell(presence: Option<&Presence>) -> Cell {
    match presence {
        None => Cell::plain("unknown"),
        Some(p) if p.online => Cell::styled("online", style::GOOD),
        Some(p) => Cell::styled(
            match &p.reason {
                Some(reason) => format!("offline ({reason})"),
                None => "offline".to_owned(),
            },
            style::WARN,
        ),
    }
}

/// One device of `devices --json`, a line.
pub fn device_json(device: &DeviceState) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct DeviceObject<'a> {
        device_id: &'a str,
        online: bool,
        since: Option<&'a str>,
        reason: Option<&'a str>,
        agent: Option<&'a str>,
        methods: Option<usize>,
        failed_handlers: Option<usize>,
    }
    let presence = device.presence.as_ref();
    let object = DeviceObject {
        device_id: &device.device,
        online: device.is_online(),
        since: presence.and_then(|p| p.since.as_deref()),
        reason: presence.and_then(|p| p.reason.as_deref()),
        agent: presence.and_then(|p| p.agent.as_deref()),
        methods: device.catalog.as_ref().map(Catalog::methods_served),
        failed_handlers: device.catalog.as_ref().map(Catalog::failed_handlers),
    };
    // Strings, numbers and booleans always serialize.
    let json = serde_json::to_string(&object).unwrap_or_default();
    format!("{}\n", escape::json(&json))
}

/// The `methods` output for people: the device's state, then its catalog as a table,
/// then the handler files that failed to load. The device must have a catalog.
pub fn methods_table(device: &DeviceState, paint: Paint) -> String {
    let mut out = format!(
        "{}: ",
        paint.paint(style::HEADER, &escape::text(&device.device))
    );
    match &device.presence {
        Some(p) if p.online => {
            out.push_str(&paint.paint(style::GOOD, "online"));
            if let Some(since) = &p.since {
                out.push_str(&format!(" since {}", escape::text(since)));
            }
        }
        Some(p) => {
            out.push_str(&paint.paint(style::WARN, "offline"));
            if let Some(reason) = &p.reason {
                out.push_str(&format!(" ({})", escape::text(reason)));
            }
        }
        None => out.push_str("presence unknown"),
    }
    if let Some(agent) = device.presence.as_ref().and_then(|p| p.agent.as_ref()) {
        out.push_str(&format!(", {}", escape::text(agent)));
    }
    if !device.is_online() {
        out.push_str("; its catalog as last published");
    }
    out.push('\n');
    let (methods, failures) = device
        .catalog
        .as_ref()
        .map_or((&[][..], &[][..]), |c| (&c.methods[..], &c.failures[..]));
    if methods.is_empty() {
        out.push_str("It serves no method.\n");
    } else {
        let mut table = Table::new(&["METHOD", "HANDLER", "DIGEST", "DESCRIPTION"]);
        for method in methods {
            table.row(vec![
                method.name.as_str().into(),
                method.handler.as_str().into(),
                Cell::styled(short_digest(&method.digest), style::DIM),
                method.description.as_str().into(),
            ]);
        }
        out.push_str(&table.render(paint));
    }
    let (methods_omitted, failures_omitted) = device
        .catalog
        .as_ref()
        .map_or((0, 0), |c| (c.methods_omitted, c.failures_omitted));
    if methods_omitted > 0 {
        out.push_str(&omitted(methods_omitted, "methods", paint));
    }
    if !failures.is_empty() {
        out.push_str(&paint.paint(style::BAD, "Handler files that failed to load:"));
        out.push('\n');
        for failure in failures {
            // An error may run over several lines (a parser's snippet): they stay
            // indented under the file's name, each escaped.
            let lines: Vec<_> = failure.error.trim_end().lines().map(escape::text).collect();
            out.push_str(&format!(
                "  {}: {}\n",
                escape::text(&failure.handler),
                lines.join("\n    ")
            ));
        }
        if failures_omitted > 0 {
            out.push_str(&omitted(failures_omitted, "failed handler files", paint));
        }
    }
    out
}

/// Whether a count is zero, to leave it out of a document (serde passes a reference).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The line that says how many `what` the device's catalog left out.
fn omitted(count: usize, what: &str, paint: Paint) -> String {
    let line = format!("…and {count} more {what}, left out of the catalog to bound its size");
    format!("{}\n", paint.paint(style::WARN, &line))
}

/// `sha256:` and the first 12 hex digits, as the host's log names a version.
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) if hex.len() > 12 => format!("{algorithm}:{}", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// `methods --json`: one object with the device's presence and full catalog.
pub fn methods_json(device: &DeviceState) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct MethodsObject<'a> {
        device_id: &'a str,
        presence: Option<&'a Presence>,
        methods: &'a [CatalogEntry],
        failures: &'a [CatalogFailure],
        #[serde(skip_serializing_if = "is_zero")]
        methods_omitted: usize,
        #[serde(skip_serializing_if = "is_zero")]
        failures_omitted: usize,
    }
    let (methods, failures) = device
        .catalog
        .as_ref()
        .map_or((&[][..], &[][..]), |c| (&c.methods[..], &c.failures[..]));
    let object = MethodsObject {
        device_id: &device.device,
        presence: device.presence.as_ref(),
        methods,
        failures,
        methods_omitted: device.catalog.as_ref().map_or(0, |c| c.methods_omitted),
        failures_omitted: device.catalog.as_ref().map_or(0, |c| c.failures_omitted),
    };
    let json = serde_json::to_string(&object).unwrap_or_default();
    format!("{}\n", escape::json(&json))
}

#[cfg(test)]
mod tests {
    use edge_proto::Catalog;

    use super::*;

    fn presence(online: bool, since: Option<&str>, reason: Option<&str>) -> Option<Presence> {
        Some(Presence {
            online,
            since: since.map(str::to_owned),
            reason: reason.map(str::to_owned),
            agent: Some("edge-host 0.1.0".into()),
        })
    }

    fn entry(name: &str) -> CatalogEntry {
        CatalogEntry {
            name: name.into(),
            description: format!("What {name} does"),
            handler: "echo.wasm".into(),
            digest: "sha256:0123456789abcdef0123".into(),
        }
    }

    fn fleet() -> Vec<DeviceState> {
        vec![
            DeviceState {
                device: "pump-1".into(),
                presence: presence(true, Some("2026-11-26T12:30:36Z"), None),
                catalog: Some(Catalog {
                    methods: vec![entry("echo"), entry("reboot")],
                    ..Catalog::default()
                }),
            },
            DeviceState {
                device: "pump-2".into(),
                presence: presence(false, None, Some("shutdown")),
                catalog: Some(Catalog {
                    methods: vec![entry("echo")],
                    failures: vec![CatalogFailure {
                        handler: "broken.wasm".into(),
                        error: "not a component:\n  --> 1:1\n".into(),
                    }],
                    ..Catalog::default()
                }),
            },
            DeviceState {
                device: "sdk-device".into(),
                presence: Some(Presence {
                    online: true,
                    since: None,
                    reason: None,
                    agent: None,
                }),
                catalog: None,
            },
        ]
    }

    #[test]
    fn the_devices_table_shows_state_since_and_methods() {
        assert_eq!(
            devices_table(&fleet(), Paint::NONE),
            "DEVICE      STATE               SINCE                 METHODS               AGENT\n\
             pump-1      online              2026-11-26T12:30:36Z  2                     edge-host 0.1.0\n\
             pump-2      offline (shutdown)  -                     1 (1 failed to load)  edge-host 0.1.0\n\
             sdk-device  online              -                     -                     -\n"
        );
    }

    #[test]
    fn each_device_is_one_json_line_with_every_key() {
        let lines: Vec<String> = fleet().iter().map(device_json).collect();
        assert_eq!(
            lines[0],
            "{\"deviceId\":\"pump-1\",\"online\":true,\"since\":\"2026-11-26T12:30:36Z\",\
             \"reason\":null,\"agent\":\"edge-host 0.1.0\",\"methods\":2,\"failedHandlers\":0}\n"
        );
        assert_eq!(
            lines[1],
            "{\"deviceId\":\"pump-2\",\"online\":false,\"since\":null,\"reason\":\"shutdown\",\
             \"agent\":\"edge-host 0.1.0\",\"methods\":1,\"failedHandlers\":1}\n"
        );
        assert_eq!(
            lines[2],
            "{\"deviceId\":\"sdk-device\",\"online\":true,\"since\":null,\"reason\":null,\
             \"agent\":null,\"methods\":null,\"failedHandlers\":null}\n"
        );
    }

    #[test]
    fn the_methods_table_shows_the_catalog_and_its_failures() {
        let fleet = fleet();
        assert_eq!(
            methods_table(&fleet[0], Paint::NONE),
            "pump-1: online since 2026-11-26T12:30:36Z, edge-host 0.1.0\n\
             METHOD  HANDLER    DIGEST               DESCRIPTION\n\
             echo    echo.wasm  sha256:0123456789ab  What echo does\n\
             reboot  echo.wasm  sha256:0123456789ab  What reboot does\n"
        );
        assert_eq!(
            methods_table(&fleet[1], Paint::NONE),
            "pump-2: offline (shutdown), edge-host 0.1.0; its catalog as last published\n\
             METHOD  HANDLER    DIGEST               DESCRIPTION\n\
             echo    echo.wasm  sha256:0123456789ab  What echo does\n\
             Handler files that failed to load:\n  broken.wasm: not a component:\n      --> 1:1\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&methods_json(&fleet[1])).expect("one JSON object");
        assert_eq!(
            json,
            serde_json::json!({
                "deviceId": "pump-2",
                "presence": {"online": false, "reason": "shutdown", "agent": "edge-host 0.1.0"},
                "methods": [{"name": "echo", "description": "What echo does",
                             "handler": "echo.wasm", "digest": "sha256:0123456789abcdef0123"}],
                "failures": [{"handler": "broken.wasm", "error": "not a component:\n  --> 1:1\n"}]
            })
        );
    }

    #[test]
    fn what_a_bounded_catalog_left_out_is_counted_and_said() {
        let device = DeviceState {
            device: "big".into(),
            presence: presence(true, None, None),
            catalog: Some(Catalog {
                methods: vec![entry("echo")],
                failures: vec![CatalogFailure {
                    handler: "a.wasm".into(),
                    error: "bad".into(),
                }],
                methods_omitted: 999,
                failures_omitted: 4,
            }),
        };
        assert!(
            devices_table(std::slice::from_ref(&device), Paint::NONE)
                .contains("1000 (5 failed to load)")
        );
        assert!(device_json(&device).contains("\"methods\":1000,\"failedHandlers\":5"));
        let table = methods_table(&device, Paint::NONE);
        assert!(
            table.contains("…and 999 more methods, left out of the catalog to bound its size\n"),
            "{table}"
        );
        assert!(
            table.ends_with(
                "  a.wasm: bad\n…and 4 more failed handler files, left out of the catalog to bound its size\n"
            ),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&methods_json(&device)).expect("one JSON object");
        assert_eq!(json["methodsOmitted"], 999);
        assert_eq!(json["failuresOmitted"], 4);
        let fleet = fleet();
        assert!(
            !methods_json(&fleet[0]).contains("Omitted"),
            "left out when zero"
        );
    }
}
