"""greeter-py: an edge-methods handler in Python (componentize-py).

- `greet` takes `{"name": "Ada"}` (optional; null or {} greets "world") and answers
  `{"message": "Hello, Ada! This is my-device.", "deviceId": ..., "requestId": ...}`.
  The greeting word comes from the handler's configuration (`greeting` in the sidecar
  greeter-py.toml), "Hello" when it is not set; the device id comes from the host.

A payload that does not fit answers 400 with the wire contract's error body; the
handler never raises on it (an uncaught exception would trap the call: 500).

Build: `cargo xtask handlers` (or componentize-py directly, see docs/handlers.md).
"""

import json

from wit_world import exports
from wit_world.exports.handler import MethodInfo, Request, Response
from wit_world.imports import host
from wit_world.imports.host import Level

GREET = "greet"
"""The method this handler serves."""

MAX_NAME = 64
"""The longest name `greet` accepts, in characters."""


class Handler(exports.Handler):
    """What the component exports: componentize-py looks for this class by name."""

    def methods(self) -> list[MethodInfo]:
        return [
            MethodInfo(
                GREET,
                "Greets someone by name, with the greeting word from config and the "
                'device id. Payload {"name": "Ada"}, optional, default "world"',
            )
        ]

    def handle(self, request: Request) -> Response:
        if request.method != GREET:
            return error(404, "methodNotFound", f"greeter-py does not serve `{request.method}`")
        try:
            name = greeted_name(request.payload)
        except ValueError as reason:
            host.log(Level.WARN, f"greet refused: {reason}")
            return error(400, "invalidPayload", str(reason))
        greeting = host.config_get("greeting") or "Hello"
        device = host.device_id()
        host.log(Level.INFO, f"greeting {name} on behalf of {device}")
        return ok(
            {
                "message": f"{greeting}, {name}! This is {device}.",
                "deviceId": device,
                "requestId": request.request_id,
            }
        )


def greeted_name(payload: str) -> str:
    """The name in a `greet` payload: null, {} or {"name": "..."}.

    Raises ValueError with a message for the caller when the payload is none of these.
    """
    fields = json.loads(payload)
    if fields is None:
        return "world"
    if not isinstance(fields, dict):
        raise ValueError('the payload must be an object such as {"name": "Ada"}, or null')
    unknown = [key for key in fields if key != "name"]
    if unknown:
        raise ValueError(f"unknown field `{unknown[0]}`: the only field is `name`")
    name = fields.get("name", "world")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"`name` must be a string of 1 to {MAX_NAME} characters")
    return name


def ok(body: object) -> Response:
    """A 200 answer with `body`."""
    return Response(200, json.dumps(body))


def error(status: int, code: str, message: str) -> Response:
    """An answer with `status` and the wire contract's error body."""
    return Response(status, json.dumps({"error": {"code": code, "message": message}}))
