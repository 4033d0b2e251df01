// Latency of `tools/call` over Streamable HTTP, seen by the official TypeScript MCP client,
// to measure what Warden's HTTP gateway adds: run it against the MCP server directly and
// against `warden serve`'s /mcp/<name>; the difference is the gateway's cost.
// `MODES=ts1 scripts/bench-mcp.sh` does both (the figures of every other mode come from
// crates/warden/examples/mcp_latency.rs; this one is the official SDK's view).
//
//   node tests/mcp/http_latency.mjs --url URL [--sessions N] [--calls N] [--warmup N]
//
// SESSIONS clients each open their own MCP session, make WARMUP untimed calls, then CALLS
// timed sequential calls of the `echo` tool, all sessions at once. Each call is timed from
// the request to its result. The bearer token comes from WARDEN_TOKEN, if set.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const opts = { url: "", sessions: 1, calls: 1000, warmup: 50 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const key = argv[i].replace(/^--/, "");
  if (!(key in opts) || argv[i + 1] === undefined) {
    console.error(`unknown or incomplete argument ${argv[i]}`);
    process.exit(2);
  }
  opts[key] = key === "url" ? argv[i + 1] : Number(argv[i + 1]);
}
if (!opts.url) {
  console.error("give --url");
  process.exit(2);
}
const headers = process.env.WARDEN_TOKEN
  ? { Authorization: `Bearer ${process.env.WARDEN_TOKEN}` }
  : {};

async function session() {
  const client = new Client({ name: "http-latency", version: "1" });
  const transport = new StreamableHTTPClientTransport(new URL(opts.url), {
    requestInit: { headers },
  });
  await client.connect(transport);
  const call = async () => {
    const r = await client.callTool({ name: "echo", arguments: { message: "hi" } });
    if (r.isError) throw new Error(`the call failed: ${JSON.stringify(r.content)}`);
  };
  for (let i = 0; i < opts.warmup; i++) await call();
  const times = [];
  for (let i = 0; i < opts.calls; i++) {
    const t0 = performance.now();
    await call();
    times.push(performance.now() - t0);
  }
  await client.close();
  return times;
}

const start = performance.now();
const all = (await Promise.all(Array.from({ length: opts.sessions }, session))).flat();
const wall = (performance.now() - start) / 1000;
all.sort((a, b) => a - b);
const q = (p) => all[Math.min(all.length - 1, Math.floor(p * all.length))].toFixed(3);
// The line scripts/bench-mcp.sh reads, in the format of examples/mcp_latency.rs (which
// also reports CPU; this client does not).
console.log(
  `sessions=${opts.sessions} calls=${opts.calls} failed=0 p50=${q(0.5)}ms p90=${q(0.9)}ms ` +
    `p99=${q(0.99)}ms max=${all[all.length - 1].toFixed(3)}ms ` +
    `throughput=${(all.length / wall).toFixed(0)}/s cpu=-`,
);
