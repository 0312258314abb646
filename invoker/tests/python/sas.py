"""Prints the SAS tokens the Azure IoT SDKs for Python sign for the same inputs, one JSON
object a line, for edge-invoker's test that edge-proto signs the same tokens.

Usage: sas.py RESOURCE KEY EXPIRY [POLICY]
Prints {"device": <azure-iot-device's token>, "hub": <azure-iot-hub's token>}; each
SDK takes its expiry from the clock, so the expiry is set and the token built again.
"""
import json
import sys

from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
from azure.iot.hub.sastoken import SasToken


def main():
    resource, key, expiry = sys.argv[1], sys.argv[2], int(sys.argv[3])
    policy = sys.argv[4] if len(sys.argv) > 4 else None

    device = RenewableSasToken(resource, SymmetricKeySigningMechanism(key), key_name=policy)
    device._expiry_time = expiry
    device._token = device._build_token()

    hub = SasToken(resource, key, key_name=policy)
    hub.expiry_time = expiry
    hub._token = hub._build_token()

    print(json.dumps({"device": str(device), "hub": str(hub)}))


if __name__ == "__main__":
    main()
