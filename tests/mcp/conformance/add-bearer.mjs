// Relays HTTP to UPSTREAM with `Authorization: Bearer $WARDEN_TOKEN` added, because the
// conformance suite connects to a bare URL and has no way to send a credential, while
// Warden's `/mcp/{name}` gateway needs the agent's. Everything else (method, path, the
// client's own Host and Origin, body, status, headers, streamed SSE) passes as it came.
//
//   WARDEN_TOKEN=... node add-bearer.mjs UPSTREAM_ORIGIN   prints `listening on PORT`

import http from 'node:http';

const upstream = new URL(process.argv[2] ?? '');
const token = process.env.WARDEN_TOKEN;
if (!token) {
  process.stderr.write('add-bearer: WARDEN_TOKEN is not set\n');
  process.exit(2);
}

const server = http.createServer((req, res) => {
  const headers = { ...req.headers, authorization: `Bearer ${token}` };
  const out = http.request(
    { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers },
    (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      res.flushHeaders();
      answer.pipe(res);
    },
  );
  out.on('error', (e) => {
    if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
    res.end(`add-bearer: upstream failed: ${e.message}`);
  });
  // The client going away ends the upstream request too (a closed SSE stream, a DELETE).
  res.on('close', () => out.destroy());
  req.pipe(out);
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening on ${server.address().port}\n`);
});
