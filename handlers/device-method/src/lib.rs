//! `device-method`: the device of Azure IoT Hub's direct-methods tutorial, as a handler.
//!
//! The tutorial's simulated device serves one method, `DeviceMethod`: it logs that it
//! was called and answers 200 with a fixed message, whatever the payload. This handler
//! does the same, so the tutorial's service side can call an edge host unchanged.

/// The bindings of the `device-handler` world, and the component's exports.
// `export!` writes the component's entry points with `#[unsafe(export_name)]`.
#[allow(unsafe_code)]
mod bindings {
    use super::DeviceMethod;

    wit_bindgen::generate!({ path: "../../wit", world: "device-handler" });

    export!(DeviceMethod);
}

use bindings::edge::methods::host::{self, Level};
use bindings::exports::edge::methods::handler::{Guest, MethodInfo, Request, Response};

/// The tutorial's answer, byte for byte.
const ANSWER: &str = r#"{"Response":"This is the response from the device"}"#;

/// The handler; its `Guest` implementation is what the component exports.
struct DeviceMethod;

impl Guest for DeviceMethod {
    fn methods() -> Vec<MethodInfo> {
        vec![MethodInfo {
            name: "DeviceMethod".to_owned(),
            description: "The tutorial's method: logs the call and answers with a fixed \
                          message; any payload"
                .to_owned(),
        }]
    }

    fn handle(_request: Request) -> Response {
        host::log(Level::Info, "Direct method called.");
        Response {
            status: 200,
            payload: ANSWER.to_owned(),
        }
    }
}
