//! {{name}}: an edge-methods handler in Rust.
//!
//! Serves the method `{{name}}`: answers a greeting built from the `greeting` value of
//! its configuration (the sidecar `{{name}}.toml`, "Hello" when not set) and the device
//! id, with the payload it was sent.

/// The bindings of the `device-handler` world in `wit/handler.wit`, and the exports.
mod bindings {
    use super::Handler;

    wit_bindgen::generate!({ path: "wit", world: "device-handler" });

    export!(Handler);
}

use bindings::edge::methods::host::{self, Level};
use bindings::exports::edge::methods::handler::{Guest, MethodInfo, Request, Response};
use serde_json::{Value, json};

/// The method this handler serves.
const METHOD: &str = "{{name}}";

/// The handler; its `Guest` implementation is what the component exports.
struct Handler;

impl Guest for Handler {
    fn methods() -> Vec<MethodInfo> {
        vec![MethodInfo {
            name: METHOD.to_owned(),
            description: "Answers a greeting from the device, with the payload it was sent"
                .to_owned(),
        }]
    }

    fn handle(request: Request) -> Response {
        // The host checked that the payload is JSON before calling.
        let received: Value = serde_json::from_str(&request.payload).unwrap_or(Value::Null);
        let greeting = host::config_get("greeting").unwrap_or_else(|| "Hello".to_owned());
        let device = host::device_id();
        host::log(Level::Info, &format!("{METHOD} called on {device}"));
        let body = json!({
            "message": format!("{greeting} from {device}"),
            "received": received,
            "requestId": request.request_id,
        });
        Response {
            status: 200,
            payload: body.to_string(),
        }
    }
}
