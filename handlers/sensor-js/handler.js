// sensor-js: an edge-methods handler in JavaScript (componentize-js).
//
// - `readSensor` answers the reading of the device's (simulated) sensor:
//   `{"deviceId", "sensor", "value", "unit", "requestId"}`. The sensor's name and its
//   calibration offset come from the handler's configuration (`sensor`, `offset` in the
//   sidecar sensor-js.toml); the payload `{"unit": "C" | "F"}` is optional (default
//   the configured `unit`, else "C"). The device id comes from the host.
//
// A payload that does not fit answers 400 with the wire contract's error body; the
// handler never throws on it (an uncaught exception traps the call: 500).
//
// Build: `cargo xtask handlers`, or `npm run build` in this folder (docs/handlers.md).

import { log, deviceId, configGet } from 'edge:methods/host@0.1.0';

/** The method this handler serves. */
const READ_SENSOR = 'readSensor';

/** What the simulated sensor measures, in degrees Celsius, before calibration. */
const RAW_CELSIUS = 21.5;

/** The handler interface the component exports (`edge:methods/handler`). */
export const handler = {
  methods() {
    return [
      {
        name: READ_SENSOR,
        description:
          'Reads the (simulated) sensor named in config, calibrated by its offset. ' +
          'Payload {"unit": "C" | "F"}, optional, default from config',
      },
    ];
  },

  handle(request) {
    if (request.method !== READ_SENSOR) {
      return error(404, 'methodNotFound', `sensor-js does not serve \`${request.method}\``);
    }
    let unit;
    try {
      unit = requestedUnit(request.payload);
    } catch (reason) {
      log('warn', `readSensor refused: ${reason.message}`);
      return error(400, 'invalidPayload', reason.message);
    }
    const sensor = configGet('sensor') ?? 'temperature';
    const offset = Number(configGet('offset') ?? '0');
    if (!Number.isFinite(offset)) {
      log('error', 'the configured offset is not a number');
      return error(500, 'badConfig', 'the configured `offset` is not a number');
    }
    const celsius = RAW_CELSIUS + offset;
    const value = unit === 'F' ? celsius * 9 / 5 + 32 : celsius;
    log('info', `read ${sensor}: ${value.toFixed(2)} ${unit}`);
    return ok({
      deviceId: deviceId(),
      sensor,
      value: Math.round(value * 100) / 100,
      unit,
      requestId: request.requestId,
    });
  },
};

/** The unit a `readSensor` payload asks for: null, {} or {"unit": "C" | "F"}. */
function requestedUnit(payload) {
  const fields = JSON.parse(payload);
  const configured = configGet('unit') ?? 'C';
  if (fields === null) {
    return configured;
  }
  if (typeof fields !== 'object' || Array.isArray(fields)) {
    throw new Error('the payload must be an object such as {"unit": "F"}, or null');
  }
  const unknown = Object.keys(fields).find((key) => key !== 'unit');
  if (unknown !== undefined) {
    throw new Error(`unknown field \`${unknown}\`: the only field is \`unit\``);
  }
  const unit = fields.unit ?? configured;
  if (unit !== 'C' && unit !== 'F') {
    throw new Error('`unit` must be "C" or "F"');
  }
  return unit;
}

/** A 200 answer with `body`. */
function ok(body) {
  return { status: 200, payload: JSON.stringify(body) };
}

/** An answer with `status` and the wire contract's error body. */
function error(status, code, message) {
  return { status, payload: JSON.stringify({ error: { code, message } }) };
}
