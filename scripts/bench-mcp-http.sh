#!/usr/bin/env bash
# What Warden's Streamable HTTP gateway adds to a tools/call: the reference `everything`
# server (Node, Streamable HTTP) called by the official TypeScript MCP client directly and
# through `warden serve`'s /mcp/everything, with durable audit, at 1 session and at
# SESSIONS concurrent sessions (tests/mcp/http_latency.mjs times each call).
#
# Environment: CARGO_TARGET_DIR (default target), CALLS (default 1000), SESSIONS (default
# 32), WARDEN (a prebuilt warden binary to measure instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
CALLS=${CALLS:-1000}
SESSIONS=${SESSIONS:-32}

if [[ -z "${WARDEN:-}" ]]; then
  cargo build --release -p warden
  WARDEN="$PWD/$TARGET/release/warden"
fi
EVERYTHING="$PWD/tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
[[ -f "$EVERYTHING" ]] || npm ci --prefix tests/mcp --no-audit --no-fund --loglevel=error
LAT=(node "$PWD/tests/mcp/http_latency.mjs")

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

UP_PORT=$(free_port)
PORT=$UP_PORT node "$EVERYTHING" streamableHttp >"$WORK/everything.log" 2>&1 &
PIDS+=($!)
wait_for_port "$UP_PORT"
UPSTREAM="http://127.0.0.1:$UP_PORT/mcp"

cp -r examples/mcp/. "$WORK/"
sed -i "s#http://127.0.0.1:3001/mcp#$UPSTREAM#" "$WORK/warden.toml"
(umask 077 && echo "wop_bench_operator_token_0123456789" >"$WORK/operator.token")
CONFIG="$WORK/warden.toml"
W_PORT=$(free_port)
"$WARDEN" --config "$CONFIG" serve --listen "127.0.0.1:$W_PORT" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
wait_for_port "$W_PORT"

echo "== machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "== warden: $WARDEN"
for s in 1 "$SESSIONS"; do
  calls=$CALLS
  [[ "$s" != 1 ]] && calls=$((CALLS / 4))
  echo "== direct, $s session(s)"
  "${LAT[@]}" --url "$UPSTREAM" --sessions "$s" --calls "$calls"
  echo "== through the gateway, $s session(s)"
  WARDEN_TOKEN=$("$WARDEN" --config "$CONFIG" agent token research-agent) \
    "${LAT[@]}" --url "http://127.0.0.1:$W_PORT/mcp/everything" --sessions "$s" --calls "$calls"
done
echo "== audit"
"$WARDEN" --config "$CONFIG" audit verify
