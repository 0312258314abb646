"""An Azure IoT device on the official Python SDK (azure-iot-device 2.14), unchanged but
for its connection string and its CA trust (SSL_CERT_FILE): it answers direct methods.

Usage: device.py [--websockets]
The connection string comes from EDGE_DEVICE_CONNECTION_STRING; with x509=true in it,
the client certificate and key come from EDGE_DEVICE_CERT_FILE and EDGE_DEVICE_KEY_FILE.
The device connects,
reads its twin, reports a property, starts answering methods and prints READY; it
prints one line per call (CALL <method> <payload>) and stops when stdin closes.

Methods: "fail" answers 500; "silent" never answers; anything else answers 200 with
{"method": <name>, "payload": <payload>}.
"""
import json
import os
import sys

from azure.iot.device import X509, IoTHubDeviceClient, MethodResponse


def main():
    connection_string = os.environ["EDGE_DEVICE_CONNECTION_STRING"]
    websockets = "--websockets" in sys.argv
    if "EDGE_DEVICE_CERT_FILE" in os.environ:
        # The SDK's X.509 path takes the hub and the device id, not a connection string.
        fields = dict(part.split("=", 1) for part in connection_string.split(";") if part)
        client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(
                cert_file=os.environ["EDGE_DEVICE_CERT_FILE"],
                key_file=os.environ["EDGE_DEVICE_KEY_FILE"],
            ),
            hostname=fields["HostName"],
            device_id=fields["DeviceId"],
            websockets=websockets,
        )
    else:
        client = IoTHubDeviceClient.create_from_connection_string(
            connection_string, websockets=websockets
        )

    def on_method(request):
        print(f"CALL {request.name} {json.dumps(request.payload)}", flush=True)
        if request.name == "silent":
            return
        if request.name == "fail":
            status, payload = 500, {"error": "asked to fail"}
        else:
            status, payload = 200, {"method": request.name, "payload": request.payload}
        response = MethodResponse.create_from_method_request(request, status, payload)
        client.send_method_response(response)

    client.connect()
    twin = client.get_twin()
    client.patch_twin_reported_properties({"sdk": "azure-iot-device"})
    print("TWIN " + json.dumps(twin), flush=True)
    client.on_method_request_received = on_method
    print("READY", flush=True)
    sys.stdin.read()
    client.shutdown()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
