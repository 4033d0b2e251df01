// Streamable HTTP in front of a stdio MCP server, so that the conformance suite (which
// only speaks HTTP to a URL) can test a stdio server, and `warden mcp-proxy` in front of
// one. Each HTTP session starts its own COMMAND and relays JSON-RPC messages both ways.
//
//   node stdio-bridge.mjs -- COMMAND [ARGS...]      prints `listening on PORT` when ready
//
// What the bridge itself changes is measured, not assumed: the tests run it once in front
// of the server alone and once in front of `warden mcp-proxy`, and only compare those two.
//
// stdio has no notion of which request a server's notification or request belongs to;
// Streamable HTTP sends those on the stream of the request they belong to. The bridge
// puts progress on the stream of the request that carries its token, and anything else
// the server sends while requests are open on the stream of the newest one (what the
// SDK's own servers do for a tool that logs, samples or elicits); with none open, on the
// session's GET stream.

import { spawn } from 'node:child_process';
import { serveSessions } from './http-sessions.mjs';

const dash = process.argv.indexOf('--');
const command = dash < 0 ? [] : process.argv.slice(dash + 1);
if (command.length === 0) {
  process.stderr.write('usage: stdio-bridge.mjs -- COMMAND [ARGS...]\n');
  process.exit(2);
}

const IDLE_MS = 5000;

function isRequest(m) {
  return typeof m.method === 'string' && m.id !== undefined;
}

function isResponse(m) {
  return m.method === undefined && m.id !== undefined;
}

// Wires a new session's transport to a new server process.
async function connect(transport) {
  const child = spawn(command[0], command.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
  // Requests from the client still waiting for the server's answer, oldest first.
  const open = new Map();
  // The suite's client leaves without ending its session (no DELETE); a session quiet
  // for a while with nothing open is over, so its processes do not pile up.
  let idle;
  const touch = () => {
    clearTimeout(idle);
    idle = setTimeout(() => open.size === 0 ? transport.close() : touch(), IDLE_MS);
  };
  touch();
  transport.onmessage = (message) => {
    touch();
    if (isRequest(message)) open.set(message.id, message);
    child.stdin.write(JSON.stringify(message) + '\n');
  };
  transport.onclose = () => {
    clearTimeout(idle);
    child.kill();
  };
  let buffered = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk) => {
    buffered += chunk;
    let nl;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) relay(line);
    }
  });
  const relay = (line) => {
    touch();
    let message;
    try {
      message = JSON.parse(line);
    } catch {
      process.stderr.write(`stdio-bridge: not JSON from the server: ${line.slice(0, 200)}\n`);
      return;
    }
    let related;
    if (isResponse(message)) {
      open.delete(message.id);
    } else if (message.method === 'notifications/progress') {
      const token = message.params?.progressToken;
      related = [...open.values()].find((r) => r.params?._meta?.progressToken === token)?.id;
    } else if (open.size > 0) {
      related = [...open.keys()].at(-1);
    }
    transport.send(message, related === undefined ? undefined : { relatedRequestId: related }).catch((e) => {
      process.stderr.write(`stdio-bridge: cannot deliver ${line.slice(0, 200)}: ${e.message}\n`);
    });
  };
  // A server that cannot start or has gone ends its session, never the bridge.
  child.on('error', (e) => {
    process.stderr.write(`stdio-bridge: \`${command[0]}\`: ${e.message}\n`);
    transport.close();
  });
  child.stdin.on('error', () => transport.close());
  child.on('exit', () => transport.close());
}

serveSessions(0, connect);
