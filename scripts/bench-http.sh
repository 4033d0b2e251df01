#!/usr/bin/env bash
# End-to-end benchmark of the decision API: a release `warden serve` with the example
# setup (SQLite audit, synchronous=FULL, group commit) on a free loopback port, loaded by
# crates/warden-server/examples/loadgen.rs. Prints the load generator's figures, the CPU
# time the server and the load generator each used, and ends with `warden audit verify`
# to show that every answered call is in the audit chain.
#
# The caller is `fraud-analyst` calling `get_claim`: no rate limit or budget in the
# example config covers it, so every call is a full permit (policy, audit, fsync).
#
# Environment:
#   CARGO_TARGET_DIR   where to build (default: target)
#   CONCURRENCY        clients in the concurrent pass (default 64)
#   DURATION           measured seconds per pass (default 15; sequential pass: 10)
#   WARMUP             warm-up seconds before each pass (default 3)
#   LOADGEN_THREADS    tokio workers in the load generator (default 1)
#   KEEP=1             keep the temporary setup and server log
set -euo pipefail
cd "$(dirname "$0")/.."

CONCURRENCY=${CONCURRENCY:-64}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
TARGET=${CARGO_TARGET_DIR:-target}

echo "== building (release, target dir $TARGET)"
cargo build --release -p warden
cargo build --release -p warden-server --example loadgen
WARDEN="$TARGET/release/warden"
LOADGEN="$TARGET/release/examples/loadgen"

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

"$WARDEN" init "$WORK" >/dev/null
CONFIG="$WORK/warden.toml"

echo "== machine"
echo "cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "kernel: $(uname -r)"

echo "== starting warden serve"
# Port 0: the kernel picks a free port; the server logs the address it bound.
NO_COLOR=1 RUST_LOG=${RUST_LOG:-warn,warden_server=info} \
  "$WARDEN" serve --config "$CONFIG" --listen 127.0.0.1:0 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
ADDR=""
for _ in $(seq 100); do
  ADDR=$(grep -o 'addr=127\.0\.0\.1:[0-9]*' "$WORK/server.log" | head -n1 | cut -d= -f2 || true)
  [[ -n "$ADDR" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 0.1
done
[[ -n "$ADDR" ]] || { echo "server did not report its address" >&2; cat "$WORK/server.log"; exit 1; }
URL="http://$ADDR"
for _ in $(seq 100); do
  curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$URL/readyz" >/dev/null || { echo "server not ready" >&2; cat "$WORK/server.log"; exit 1; }
echo "serving on $URL (pid $SERVER_PID)"

WARDEN_TOKEN=$("$WARDEN" agent token fraud-analyst --config "$CONFIG")
export WARDEN_TOKEN

TICK=$(getconf CLK_TCK)
server_cpu_ticks() {
  # utime + stime of the server process (all threads), in clock ticks.
  awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"
}
machine_cpu_ticks() {
  # Busy time of the whole machine (user, nice, system, irq, softirq, steal), in ticks.
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
audit_entries() {
  "$WARDEN" audit verify --config "$CONFIG" | sed -n 's/^audit verified: \([0-9]*\) entries.*/\1/p'
}

ANSWERED=0
pass() {
  local name=$1 concurrency=$2 duration=$3
  echo
  echo "== $name: $concurrency concurrent, ${WARMUP} s warm-up, ${duration} s measured"
  local before mbefore t0 out idle0
  idle0=$(machine_cpu_ticks); sleep 1
  echo "before: $(awk -v a="$(machine_cpu_ticks)" -v b="$idle0" -v t="$TICK" \
    'BEGIN { printf "%.2f", (a - b) / t }') cores busy with the server idle (other load skews the figures)"
  before=$(server_cpu_ticks)
  mbefore=$(machine_cpu_ticks)
  t0=$(date +%s.%N)
  TIMEFORMAT="loadgen cpu   %U s user, %S s sys"
  { time "$LOADGEN" --url "$URL" --concurrency "$concurrency" --warmup "$WARMUP" \
      --duration "$duration" --threads "$LOADGEN_THREADS" >"$WORK/pass.out"; } 2>"$WORK/pass.err" \
    || { cat "$WORK/pass.out" "$WORK/pass.err"; echo "loadgen reported errors" >&2; exit 1; }
  out=$(cat "$WORK/pass.out")
  echo "$out"
  grep -v '^loadgen:' "$WORK/pass.err" || true
  awk -v b="$before" -v a="$(server_cpu_ticks)" -v mb="$mbefore" -v ma="$(machine_cpu_ticks)" \
    -v t="$TICK" -v t0="$t0" -v t1="$(date +%s.%N)" -v n="$(nproc)" 'BEGIN {
      s = (a - b) / t; m = (ma - mb) / t; w = t1 - t0
      printf "server cpu    %.2f s over %.2f s wall (%.2f cores)\n", s, w, s / w
      printf "machine cpu   %.2f of %d cores busy (server, loadgen, kernel and anything else running)\n", m / w, n
    }'
  ANSWERED=$((ANSWERED + $(sed -n 's/^answered *\([0-9]*\).*/\1/p' <<<"$out")))
}

START_ENTRIES=$(audit_entries)
pass "concurrent" "$CONCURRENCY" "$DURATION"
pass "sequential" 1 "${SEQ_DURATION:-10}"

echo
echo "== stopping the server"
kill "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""

echo "== warden audit verify"
"$WARDEN" audit verify --config "$CONFIG"
END_ENTRIES=$(audit_entries)
ADDED=$((END_ENTRIES - START_ENTRIES))
echo "answered calls: $ANSWERED; audit entries added while loaded: $ADDED"
if [[ "$ADDED" -lt "$ANSWERED" ]]; then
  echo "MISSING AUDIT ENTRIES: fewer entries than answered calls" >&2
  exit 1
fi
