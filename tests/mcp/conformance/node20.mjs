// Runs `@modelcontextprotocol/conformance` on Node 20. The package declares Node >= 22,
// and the one Node 22 API it uses is `fs.globSync`, imported by name at load time (so
// on Node 20 even `--help` fails), and called only by its `tier-check` command, which
// grades an SDK's GitHub repository and which Warden does not run. This hook gives that
// package alone an `fs` with a `globSync` that refuses clearly; every other module, and
// every other `fs` function, is untouched. On Node 22 and later it does nothing.
//
//   node --import ./node20.mjs node_modules/@modelcontextprotocol/conformance/dist/index.js ...

import fs from 'node:fs';
import { register } from 'node:module';

if (typeof fs.globSync !== 'function') {
  register('./node20-hooks.mjs', import.meta.url);
}
