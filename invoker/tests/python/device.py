"""An Azure IoT device on the official Python SDK (azure-iot-device), unchanged but for
its connection string and CA trust (SSL_CERT_FILE), for edge-invoker's tests against
edge-hub: it reports the twin properties in EDGE_REPORTED (JSON, such as a `methods`
catalog the way edge-host reports one), answers direct methods, and prints READY.

Methods: "fail" answers 500; "silent" never answers; anything else answers 200 with
{"method": <name>, "payload": <payload>}. One line per call: CALL <method> <payload>.
It stops when stdin closes.
"""
import json
import os
import sys

from azure.iot.device import IoTHubDeviceClient, MethodResponse


def main():
    client = IoTHubDeviceClient.create_from_connection_string(
        os.environ["EDGE_DEVICE_CONNECTION_STRING"]
    )

    def on_method(request):
        print(f"CALL {request.name} {json.dumps(request.payload)}", flush=True)
        if request.name == "silent":
            return
        if request.name == "fail":
            status, payload = 500, {"error": "asked to fail"}
        else:
            status, payload = 200, {"method": request.name, "payload": request.payload}
        client.send_method_response(
            MethodResponse.create_from_method_request(request, status, payload)
        )

    client.connect()
    reported = os.environ.get("EDGE_REPORTED")
    if reported:
        client.patch_twin_reported_properties(json.loads(reported))
    client.on_method_request_received = on_method
    print("READY", flush=True)
    sys.stdin.read()
    client.shutdown()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
