"""The Azure IoT service SDK for Python (azure-iot-hub 2.7), unchanged but for its
connection string and its CA trust (REQUESTS_CA_BUNDLE), calling edge-hub.

Usage:
  service.py invoke DEVICE METHOD PAYLOAD_JSON [RESPONSE_TIMEOUT [CONNECT_TIMEOUT]]
  service.py create DEVICE | get DEVICE | twin DEVICE | delete DEVICE | list
  service.py query QUERY
  service.py job-create JOB METHOD PAYLOAD_JSON QUERY_CONDITION | job-get JOB | job-cancel JOB
The service connection string comes from EDGE_SERVICE_CONNECTION_STRING. Prints one
JSON line: what the SDK returned, or {"httpStatus": N, "error": <body>} when the SDK
raised an HTTP error.
"""
import json
import os
import sys

import datetime

from azure.iot.hub import IoTHubJobManager, IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, JobRequest, QuerySpecification
from msrest.exceptions import HttpOperationError


def device_json(device):
    return {
        "deviceId": device.device_id,
        "status": device.status,
        "connectionState": device.connection_state,
        "primaryKey": device.authentication.symmetric_key.primary_key,
    }


def run(manager, command, args):
    if command == "invoke":
        device, method, payload = args[0], args[1], json.loads(args[2])
        request = CloudToDeviceMethod(method_name=method, payload=payload)
        if len(args) > 3:
            request.response_timeout_in_seconds = int(args[3])
        if len(args) > 4:
            request.connect_timeout_in_seconds = int(args[4])
        result = manager.invoke_device_method(device, request)
        return {"status": result.status, "payload": result.payload}
    if command == "create":
        return device_json(manager.create_device_with_sas(args[0], None, None, "enabled"))
    if command == "get":
        return device_json(manager.get_device(args[0]))
    if command == "list":
        return [device_json(d) for d in manager.get_devices()]
    if command == "twin":
        twin = manager.get_twin(args[0])
        return {
            "deviceId": twin.device_id,
            "connectionState": twin.connection_state,
            "reported": twin.properties.reported,
        }
    if command == "delete":
        manager.delete_device(args[0])
        return {"deleted": args[0]}
    if command == "query":
        result = manager.query_iot_hub(QuerySpecification(query=args[0]))
        return [
            {"deviceId": t.device_id, "connectionState": t.connection_state}
            for t in result.items
        ]
    if command.startswith("job-"):
        jobs = IoTHubJobManager.from_connection_string(
            os.environ["EDGE_SERVICE_CONNECTION_STRING"]
        )
        if command == "job-create":
            request = JobRequest(
                job_id=args[0],
                type="scheduleDeviceMethod",
                cloud_to_device_method=CloudToDeviceMethod(
                    method_name=args[1],
                    payload=json.loads(args[2]),
                    response_timeout_in_seconds=5,
                ),
                query_condition=args[3],
                start_time=datetime.datetime.now(datetime.timezone.utc),
                max_execution_time_in_seconds=60,
            )
            job = jobs.create_scheduled_job(args[0], request)
        elif command == "job-get":
            job = jobs.get_scheduled_job(args[0])
        else:
            job = jobs.cancel_scheduled_job(args[0])
        stats = job.device_job_statistics
        return {
            "jobId": job.job_id,
            "status": job.status,
            "deviceCount": stats.device_count,
            "succeededCount": stats.succeeded_count,
            "failedCount": stats.failed_count,
        }
    raise SystemExit(f"unknown command {command}")


def main():
    manager = IoTHubRegistryManager.from_connection_string(
        os.environ["EDGE_SERVICE_CONNECTION_STRING"]
    )
    try:
        out = run(manager, sys.argv[1], sys.argv[2:])
    except HttpOperationError as e:
        try:
            body = e.response.json()
        except ValueError:
            body = e.response.text
        out = {"httpStatus": e.response.status_code, "error": body}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
