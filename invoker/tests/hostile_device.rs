//! A device cannot drive the operator's terminal: whatever it supplies (presence agent,
//! reason and time, method names, descriptions, handler names, digests, failures,
//! answers) reaches edge-invoker's output with every control character escaped. The
//! device is a plain MQTT client publishing what edge-host never would; the invoker is
//! the real binary.

use std::process::Stdio;
use std::time::Duration;

use edge_proto::{BrokerUrl, Namespace};
use serde_json::{Value, json};
use testkit::{Mosquitto, RawClient};

/// Clears the screen, retitles the window (OSC ... BEL), a C1 CSI, DEL, and a
/// right-to-left override: each one drives a terminal when printed raw.
const EVIL: &str = "\u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}31m\u{7f}\u{202e}";

/// Whether `text` holds anything a terminal would act on, besides line ends.
fn has_raw_controls(text: &str) -> bool {
    text.chars().any(|c| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

/// One run of the binary: exit code, stdout, stderr.
async fn invoker(broker: &BrokerUrl, args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-invoker"));
    for var in [
        "EDGE_BROKER",
        "EDGE_NAMESPACE",
        "EDGE_INVOKER_CONFIG",
        "CLICOLOR_FORCE",
    ] {
        command.env_remove(var);
    }
    let out = command
        .arg("--broker")
        .arg(broker.to_string())
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("edge-invoker runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
    (
        out.status.code().expect("an exit code"),
        text(out.stdout),
        text(out.stderr),
    )
}

/// A hostile device `device` on `broker`: retains an evil presence and catalog, then
/// answers every request with an evil JSON payload, or with evil text that is not
/// JSON when the method is `not-json`.
async fn hostile_device(broker: &BrokerUrl, device: &str, online: bool) -> RawClient {
    let ns = Namespace::for_device(device).expect("valid id");
    let mut raw = RawClient::connect(
        broker,
        &[ns.request_filter(), format!("devices/{device}/$edge/#")],
    )
    .await
    .expect("the device connects");
    let presence = json!({
        "online": online,
        "since": format!("2026-01-01T00:00:00Z{EVIL}"),
        "reason": format!("gone{EVIL}"),
        "agent": format!("edge-host{EVIL}"),
    });
    let catalog = json!({
        "methods": [{
            "name": format!("m{EVIL}"),
            "description": format!("clears your screen{EVIL}\nand a second line"),
            "handler": format!("h{EVIL}.wasm"),
            "digest": format!("sha256:{EVIL}0123456789abcdef"),
        }],
        "failures": [{
            "handler": format!("f{EVIL}.wasm"),
            "error": format!("broken{EVIL}\n  --> {EVIL}"),
        }],
    });
    for (topic, document) in [
        (ns.presence_topic(), presence),
        (ns.catalog_topic(), catalog),
    ] {
        raw.publish_retained(&topic, document.to_string())
            .await
            .expect("published");
        // Back through its own subscription: the broker holds it now.
        raw.next_where(Duration::from_secs(10), |t| t == topic)
            .await
            .expect("the broker took it");
    }
    raw
}

/// Answers the requests `raw` receives, `count` of them.
async fn answer_requests(mut raw: RawClient, device: &str, count: usize) {
    let ns = Namespace::for_device(device).expect("valid id");
    for _ in 0..count {
        let (topic, _) = raw
            .next_where(Duration::from_secs(30), |t| t.contains("/POST/"))
            .await
            .expect("a request");
        let rid = topic
            .split_once("?$rid=")
            .map(|(_, rest)| rest.split('&').next().unwrap_or_default().to_owned())
            .expect("a request id");
        // serde_json escapes C0 in strings; DEL, C1 and U+202E stay raw, as JSON allows.
        let body = if topic.contains("/not-json/") {
            format!("not JSON {EVIL}")
        } else {
            json!({ "msg": EVIL }).to_string()
        };
        raw.publish(&ns.response_topic(200, &rid), body)
            .await
            .expect("answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_device_supplies_reaches_the_terminal_with_its_control_characters_escaped() {
    testkit::init_logging();
    let mosquitto = Mosquitto::start().expect("mosquitto");
    let broker = mosquitto.url();
    let device = hostile_device(&broker, "evil-device", true).await;
    let _offline = hostile_device(&broker, "evil-offline", false).await;
    let answering = tokio::spawn(answer_requests(device, "evil-device", 6));

    let runs: Vec<(&[&str], bool)> = vec![
        (&["devices"], false),
        (&["--json", "devices"], true),
        (&["methods", "evil-device"], false),
        (&["methods", "evil-offline"], false),
        (&["--json", "methods", "evil-device"], true),
        (&["call", "evil-device", "echo"], false),
        (&["--json", "call", "evil-device", "echo"], true),
        (&["call", "evil-device", "not-json"], false),
        (&["--json", "call", "evil-device", "not-json"], true),
        (&["broadcast", "echo", "--devices", "evil-device"], false),
        (
            &["--json", "broadcast", "echo", "--devices", "evil-device"],
            true,
        ),
    ];
    for (args, is_json) in runs {
        let (code, stdout, stderr) = invoker(&broker, args).await;
        assert!(code == 0 || code == 1, "{args:?} exit {code}: {stderr}");
        assert!(
            !has_raw_controls(&stdout) && !has_raw_controls(&stderr),
            "{args:?} printed raw control characters:\n{stdout:?}\n{stderr:?}"
        );
        if is_json {
            // Escaped, JSON keeps every value as the device sent it.
            for line in stdout.lines() {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line:?}"));
                assert!(
                    value.to_string().contains('\u{9b}') || line.contains("\\u001b"),
                    "{args:?}: the device's text is kept: {line}"
                );
            }
        } else {
            // For people, each control character shows as an escape.
            assert!(
                stdout.contains("\\u{1b}[2J") || stdout.contains("\\u009b"),
                "{args:?}: the device's text shows, escaped:\n{stdout}"
            );
        }
    }
    answering.await.expect("the device answered every call");
}
