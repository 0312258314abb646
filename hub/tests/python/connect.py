"""Tries to connect an Azure IoT device on the official Python SDK (azure-iot-device
2.14) and says how it went: CONNECTED, or REFUSED <exception class>: <message>.

Usage: connect.py
The connection string comes from EDGE_DEVICE_CONNECTION_STRING; the CA from
SSL_CERT_FILE. The SDK's own retries are off, so a refusal is reported at once. (The
SDK itself refuses a connection string whose token has expired, before connecting.)
"""
import os

from azure.iot.device import IoTHubDeviceClient


def main():
    client = None
    try:
        client = IoTHubDeviceClient.create_from_connection_string(
            os.environ["EDGE_DEVICE_CONNECTION_STRING"], connection_retry=False
        )
        client.connect()
    except Exception as e:  # the test reads which exception the SDK raised
        print(f"REFUSED {type(e).__name__}: {e}", flush=True)
    else:
        print("CONNECTED", flush=True)
    finally:
        if client is not None:
            client.shutdown()


if __name__ == "__main__":
    main()
