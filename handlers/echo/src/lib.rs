//! `echo`: answers every call with the caller's payload, unchanged.
//!
//! The benchmark handler: it does as little as a handler can (no parsing, no host
//! calls), so that a benchmark of it measures the host and the sandbox, not the guest.

/// The bindings of the `device-handler` world, and the component's exports.
// `export!` writes the component's entry points with `#[unsafe(export_name)]`.
#[allow(unsafe_code)]
mod bindings {
    use super::Echo;

    wit_bindgen::generate!({ path: "../../wit", world: "device-handler" });

    export!(Echo);
}

use bindings::exports::edge::methods::handler::{Guest, MethodInfo, Request, Response};

/// The handler; its `Guest` implementation is what the component exports.
struct Echo;

impl Guest for Echo {
    fn methods() -> Vec<MethodInfo> {
        vec![MethodInfo {
            name: "echo".to_owned(),
            description: "Answers 200 with the request payload, unchanged".to_owned(),
        }]
    }

    fn handle(request: Request) -> Response {
        // The host has already checked that the payload is JSON, so it can go back as is.
        Response {
            status: 200,
            payload: request.payload,
        }
    }
}
