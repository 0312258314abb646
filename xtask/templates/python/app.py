"""{{name}}: an edge-methods handler in Python.

Serves the method `{{name}}`: answers a greeting built from the `greeting` value of its
configuration (the sidecar {{name}}.toml, "Hello" when not set) and the device id, with
the payload it was sent.
"""

import json

from wit_world import exports
from wit_world.exports.handler import MethodInfo, Request, Response
from wit_world.imports import host
from wit_world.imports.host import Level

METHOD = "{{name}}"


class Handler(exports.Handler):
    """What the component exports: componentize-py looks for this class by name."""

    def methods(self) -> list[MethodInfo]:
        return [MethodInfo(METHOD, "Answers a greeting from the device, with the payload it was sent")]

    def handle(self, request: Request) -> Response:
        # The host checked that the payload is JSON before calling.
        received = json.loads(request.payload)
        greeting = host.config_get("greeting") or "Hello"
        device = host.device_id()
        host.log(Level.INFO, f"{METHOD} called on {device}")
        body = {
            "message": f"{greeting} from {device}",
            "received": received,
            "requestId": request.request_id,
        }
        return Response(200, json.dumps(body))
