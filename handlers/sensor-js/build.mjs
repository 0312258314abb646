// Builds a handler component from a JavaScript module with componentize-js:
//
//   node build.mjs SOURCE WIT OUT      (npm run build does this with this folder's paths)
//
// SOURCE is the ES module that exports `handler`, WIT the folder (or file) holding
// wit/handler.wit, OUT the .wasm to write. The first run installs the pinned
// componentize-js (package-lock.json) with `npm ci` when it is missing.
//
// Features: componentize-js links fetch() and an HTTP server by default, which import
// wasi:http, which edge-host does not give: such a component fails to load. Disabled
// here; stdio (console.log goes to the host's log), clocks and random stay.

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeFile, rename } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const [source, wit, out] = process.argv.slice(2);
if (!source || !wit || !out) {
  console.error('usage: node build.mjs SOURCE WIT OUT');
  process.exit(2);
}

if (!existsSync(resolve(here, 'node_modules/@bytecodealliance/componentize-js'))) {
  console.error('componentize-js is not installed here; running `npm ci` (once)');
  const npm = spawnSync('npm', ['ci', '--no-audit', '--no-fund'], { cwd: here, stdio: 'inherit' });
  if (npm.status !== 0) {
    console.error('npm ci failed: install Node.js 18+ with npm, and reach the npm registry');
    process.exit(1);
  }
}
const { componentize } = await import('@bytecodealliance/componentize-js');

const started = Date.now();
const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: resolve(wit),
  worldName: 'device-handler',
  disableFeatures: ['http', 'fetch-event'],
});
// Written aside, then renamed: a host watching OUT's folder never loads half a file.
const partial = `${resolve(out)}.partial-${process.pid}`;
await writeFile(partial, component);
await rename(partial, resolve(out));
console.error(`built ${out} (${(component.length / 1e6).toFixed(1)} MB) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
