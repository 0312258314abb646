// {{name}}: an edge-methods handler in JavaScript.
//
// Serves the method `{{name}}`: answers a greeting built from the `greeting` value of
// its configuration (the sidecar {{name}}.toml, "Hello" when not set) and the device
// id, with the payload it was sent.

import { log, deviceId, configGet } from 'edge:methods/host@0.1.0';

const METHOD = '{{name}}';

/** The handler interface the component exports (`edge:methods/handler`). */
export const handler = {
  methods() {
    return [
      { name: METHOD, description: 'Answers a greeting from the device, with the payload it was sent' },
    ];
  },

  handle(request) {
    // The host checked that the payload is JSON before calling.
    const received = JSON.parse(request.payload);
    const greeting = configGet('greeting') ?? 'Hello';
    const device = deviceId();
    log('info', `${METHOD} called on ${device}`);
    const body = { message: `${greeting} from ${device}`, received, requestId: request.requestId };
    return { status: 200, payload: JSON.stringify(body) };
  },
};
