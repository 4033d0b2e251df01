// Streamable HTTP at http://127.0.0.1:PORT/mcp with one SDK transport per MCP session,
// for server.mjs and stdio-bridge.mjs. Each transport refuses Host and Origin headers
// that do not name this loopback listener (the SDK's DNS-rebinding protection, which a
// localhost MCP server is expected to have). Prints `listening on PORT` once bound.

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';

// `connect(transport)` wires a new session's transport to whatever serves it and may
// set `transport.onclose`; `port` 0 picks a free one.
export function serveSessions(port, connect) {
  const sessions = new Map();
  const hosts = ['127.0.0.1', 'localhost', '[::1]'];
  const server = http.createServer(async (req, res) => {
    if (new URL(req.url, 'http://x').pathname !== '/mcp') {
      res.writeHead(404).end();
      return;
    }
    const id = req.headers['mcp-session-id'];
    let transport = id && sessions.get(id);
    if (!transport) {
      if (id) {
        res.writeHead(404, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32001, message: 'Session not found' } }));
        return;
      }
      const bound = server.address().port;
      const created = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (sid) => sessions.set(sid, created),
        enableDnsRebindingProtection: true,
        allowedHosts: hosts.flatMap((h) => [h, `${h}:${bound}`]),
        allowedOrigins: hosts.flatMap((h) => [`http://${h}`, `http://${h}:${bound}`]),
      });
      await connect(created);
      const onclose = created.onclose;
      created.onclose = () => {
        if (created.sessionId) sessions.delete(created.sessionId);
        onclose?.();
      };
      transport = created;
    }
    await transport.handleRequest(req, res);
    // A first request that did not open a session (refused, or not `initialize`) leaves
    // nothing behind.
    if (!transport.sessionId) await transport.close();
  });
  server.listen(Number(port), '127.0.0.1', () => {
    process.stdout.write(`listening on ${server.address().port}\n`);
  });
}
