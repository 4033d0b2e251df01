// Module resolution hook for node20.mjs: `fs` imported by the conformance package
// resolves to node20-fs.mjs.

const fsShim = new URL('./node20-fs.mjs', import.meta.url).href;

export async function resolve(specifier, context, next) {
  const fromSuite = context.parentURL?.includes('/node_modules/@modelcontextprotocol/conformance/');
  if (fromSuite && (specifier === 'fs' || specifier === 'node:fs')) {
    return { url: fsShim, shortCircuit: true };
  }
  return next(specifier, context);
}
