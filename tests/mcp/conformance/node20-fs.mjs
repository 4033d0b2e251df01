// `node:fs` plus the `globSync` that Node 20 lacks (see node20.mjs).

import fs from 'node:fs';

export * from 'node:fs';
export default fs;

export function globSync(pattern) {
  throw new Error(
    `fs.globSync(${JSON.stringify(pattern)}) needs Node 22; on Node 20 Warden runs the ` +
      'conformance suite\'s `server` command only (tests/mcp/conformance/node20.mjs)',
  );
}
