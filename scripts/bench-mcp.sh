#!/usr/bin/env bash
# What `warden mcp-proxy` adds to a tools/call: the same MCP server (the reference
# `everything` server's `echo` tool, over stdio) measured directly and through the proxy,
# with durable audit, at 1 session x 1000 sequential calls and at 32 concurrent sessions.
# Both proxy modes: embedded (each proxy runs the pipeline on the shared SQLite file) and
# remote (each proxy asks one `warden serve`, whose group commit batches the audit).
#
# Environment: CARGO_TARGET_DIR (default target), CALLS (default 1000), SESSIONS (default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
CALLS=${CALLS:-1000}
SESSIONS=${SESSIONS:-32}

cargo build --release -p warden
cargo build --release -p warden --example mcp_latency
WARDEN="$PWD/$TARGET/release/warden"
LAT="$PWD/$TARGET/release/examples/mcp_latency"
SERVER=(node "$PWD/tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js" stdio)
[[ -f "${SERVER[1]}" ]] || npm ci --prefix tests/mcp --no-audit --no-fund --loglevel=error

WORK=$(mktemp -d)
SERVE_PID=""
cleanup() { [[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
cp -r examples/mcp/. "$WORK/"
(umask 077 && echo "wop_bench_operator_token_0123456789" > "$WORK/operator.token")
CONFIG="$WORK/warden.toml"
export WARDEN_TOKEN=$("$WARDEN" --config "$CONFIG" agent token research-agent)
PROXY=("$WARDEN" --config "$CONFIG" mcp-proxy --name everything)

echo "== machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
for s in 1 "$SESSIONS"; do
  calls=$CALLS
  [[ "$s" != 1 ]] && calls=$((CALLS / 4))
  echo "== direct, $s session(s)";           "$LAT" --sessions "$s" --calls "$calls" -- "${SERVER[@]}"
  echo "== proxy embedded, $s session(s)";   "$LAT" --sessions "$s" --calls "$calls" -- "${PROXY[@]}" --embedded -- "${SERVER[@]}"
done

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$WARDEN" --config "$CONFIG" serve --listen "127.0.0.1:$PORT" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
for s in 1 "$SESSIONS"; do
  calls=$CALLS
  [[ "$s" != 1 ]] && calls=$((CALLS / 4))
  echo "== proxy remote, $s session(s)"
  "$LAT" --sessions "$s" --calls "$calls" -- "${PROXY[@]}" --server "http://127.0.0.1:$PORT" -- "${SERVER[@]}"
done
echo "== audit"
kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""
"$WARDEN" --config "$CONFIG" audit verify
