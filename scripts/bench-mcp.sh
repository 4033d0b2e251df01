#!/usr/bin/env bash
# What Warden's MCP gateways add to a request: the same tiny MCP server
# (crates/warden/examples/mcp_echo.rs) reached directly and through each gateway, with
# durable audit, timed by crates/warden/examples/mcp_latency.rs from outside:
#
#   stdio:  direct (the server as a child)         vs  `warden mcp-proxy --server URL` (remote)
#                                                  and `warden mcp-proxy --embedded`
#   HTTP:   direct (the server's own /mcp)         vs  `warden serve`'s /mcp/bench
#
# each with 1 session x CALLS sequential `tools/call`s and SESSIONS concurrent sessions x
# CALLS/4, plus 1 session x CALLS `resources/read`s (governed as `bench/resources/read`).
# Mode ts1 times the HTTP `tools/call` with the official TypeScript SDK's client instead
# (tests/mcp/http_latency.mjs; needs `npm ci --prefix tests/mcp`), so the figures hold for
# a real client too; it reports no CPU (the throughput includes its warm-up).
# The added latency is a mode's figure minus the direct figure of the same transport in
# the same round.
#
# With BEFORE=/path/to/another/warden, every Warden run is made with both binaries
# ("before" and "after"), each on its own store and its own `warden serve`, alternating
# which goes first from one round to the next so that drift in the machine's load falls
# on both alike. The harness and the upstream are always this tree's.
#
#   git worktree add --detach /tmp/warden-before 0e821b7
#   (cd /tmp/warden-before && CARGO_TARGET_DIR=/tmp/warden-before/target cargo build --release -p warden)
#   BEFORE=/tmp/warden-before/target/release/warden ./scripts/bench-mcp.sh
#
# Each line also gives the CPU per measured request of everything involved, and the
# script ends with `warden audit verify` on each store (a failed verification fails it).
#
# Environment: CARGO_TARGET_DIR (default target), CALLS (1000), SESSIONS (32), ROUNDS (3),
# BEFORE (unset), MODES (all of: stdio1 stdio32 http1 http32 read; also ts1), KEEP=1 keeps the setup,
# TMPDIR (where the stores go: TMPDIR=/dev/shm takes the disk out, to split its share).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
CALLS=${CALLS:-1000}
SESSIONS=${SESSIONS:-32}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-stdio1 stdio32 http1 http32 read}

cargo build --release -p warden --bin warden --example mcp_latency --example mcp_echo
AFTER="$PWD/$TARGET/release/warden"
LAT="$PWD/$TARGET/release/examples/mcp_latency"
ECHO="$PWD/$TARGET/release/examples/mcp_echo"
BUILDS=(after)
if [[ -n "${BEFORE:-}" ]]; then
  BEFORE=$(realpath "$BEFORE")
  [[ -x "$BEFORE" ]] || { echo "BEFORE=$BEFORE is not an executable" >&2; exit 2; }
  BUILDS=(before after)
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The upstream over HTTP, shared by the direct runs and both gateways.
"$ECHO" --http 127.0.0.1:0 >"$WORK/echo.out" 2>"$WORK/echo.err" &
PIDS+=($!)
ECHO_PID=$!
UPSTREAM=""
for _ in $(seq 100); do
  UPSTREAM=$(sed -n 's/^listening on //p' "$WORK/echo.out")
  [[ -n "$UPSTREAM" ]] && break
  sleep 0.05
done
[[ -n "$UPSTREAM" ]] || { echo "mcp_echo did not start" >&2; cat "$WORK/echo.err" >&2; exit 1; }

# One setup per build: its own store, token and `warden serve`.
declare -A BIN CONF URL TOKEN SERVE_PID
for b in "${BUILDS[@]}"; do
  if [[ $b == after ]]; then BIN[$b]=$AFTER; else BIN[$b]=$BEFORE; fi
  d="$WORK/$b"
  mkdir -p "$d/policy"
  (umask 077 && echo "wop_bench_operator_token_0123456789" >"$d/operator.token")
  cat >"$d/warden.toml" <<EOF
[server]
listen = "127.0.0.1:0"
operator_token_file = "operator.token"

[store]
path = "warden.db"

[identity]
issuer = "warden-bench"
key_file = "warden.key"

[policy]
schema = "policy/bench.cedarschema"
policies = "policy"

[[tiers]]
tier = 1
max_classification = "internal"

[[mcp_servers]]
name = "bench"
url = "http://$UPSTREAM/mcp"
timeout = "30s"

[[tools]]
name = "bench/echo"
scope = "bench:echo"
classification = "public"

# A resource read is an action like a tool call (Warden before issue 14 passed it
# through undecided, so this entry and its rule were unused then).
[[tools]]
name = "bench/resources/read"
scope = "bench:read"
classification = "public"

[[agents]]
id = "bench-agent"
owner = "bench"
tier = 1
scopes = ["bench:echo", "bench:read"]
rotation = "30d"
EOF
  cat >"$d/policy/bench.cedarschema" <<'EOF'
entity Agent = { owner: String, tier: Long, scopes: Set<String> };
entity Tool;

type Call = {
  classification: String,
  hour: Long,
  weekday: Long,
  delegation_depth: Long,
  cost_estimate: decimal,
};

action "bench/echo" appliesTo {
  principal: Agent, resource: Tool,
  context: { params: { message: String }, call: Call },
};

action "bench/resources/read" appliesTo {
  principal: Agent, resource: Tool,
  context: { params: { uri: String }, call: Call },
};
EOF
  # The same shape of policy as the example's echo: a permit and a forbid to evaluate.
  cat >"$d/policy/bench.cedar" <<'EOF'
@id("echo")
permit (principal, action == Action::"bench/echo", resource);

@id("no-secrets-in-echo")
forbid (principal, action == Action::"bench/echo", resource)
when { context.params.message like "*password*" };

@id("bench-resources")
permit (principal, action == Action::"bench/resources/read", resource)
when { context.params.uri like "bench://*" };
EOF
  CONF[$b]="$d/warden.toml"
  TOKEN[$b]=$("${BIN[$b]}" --config "${CONF[$b]}" agent token bench-agent)
  NO_COLOR=1 RUST_LOG=warn,warden_server=info "${BIN[$b]}" --config "${CONF[$b]}" serve --listen 127.0.0.1:0 \
    >"$d/serve.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  SERVE_PID[$b]=$pid
  # Port 0: the kernel picks a free port; the server logs the address it bound.
  addr=""
  for _ in $(seq 200); do
    addr=$(grep -o 'addr=127\.0\.0\.1:[0-9]*' "$d/serve.log" | head -n1 | cut -d= -f2 || true)
    [[ -n "$addr" ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$d/serve.log" >&2; exit 1; }
    sleep 0.05
  done
  [[ -n "$addr" ]] || { echo "warden serve ($b) did not report its address" >&2; cat "$d/serve.log" >&2; exit 1; }
  URL[$b]="http://$addr"
  for _ in $(seq 100); do curl -fsS "${URL[$b]}/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "${URL[$b]}/readyz" >/dev/null
done

TICK=$(getconf CLK_TCK)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
busy_now() {
  local a; a=$(busy_ticks); sleep 1
  awk -v a="$a" -v b="$(busy_ticks)" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }'
}

# The floor under every governed request: one fdatasync of the audit (the permit waits for
# it). Probed where the stores are, 200 overwrites of one page each, as SQLite's WAL does.
fsync_probe() {
  command -v python3 >/dev/null || { echo "fdatasync: (no python3 to probe it)"; return; }
  python3 - "$WORK/fsync-probe" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
os.pwrite(fd, b"\0" * (1 << 20), 0); os.fsync(fd)
ts = []
for i in range(200):
    os.pwrite(fd, b"x" * 4096, (i % 256) * 4096)
    t = time.perf_counter(); os.fdatasync(fd); ts.append(time.perf_counter() - t)
os.close(fd); os.unlink(sys.argv[1])
ts.sort()
print("fdatasync p50 %.3f ms, p90 %.3f ms, p99 %.3f ms" % (ts[100] * 1e3, ts[180] * 1e3, ts[198] * 1e3))
PY
}

echo "== machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
echo "== load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== builds: ${BUILDS[*]}; upstream http://$UPSTREAM/mcp; rounds $ROUNDS"

WATCH=(--clock-ticks "$TICK" --watch-pid "$ECHO_PID")
for b in "${BUILDS[@]}"; do WATCH+=(--watch-pid "${SERVE_PID[$b]}"); done
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
WARMUP=50
# run ROUND MODE VARIANT MCP_LATENCY_ARGS...: one measurement, printed and recorded. The
# harness counts, for the measured requests only, the CPU of what it started (proxies and
# their servers) and of the long-lived processes (the upstream and both `warden serve`s).
run() {
  local round=$1 mode=$2 variant=$3 out
  shift 3
  out=$("$@")
  printf '%-8s %-16s %s load=%s\n' "$mode" "$variant" "$out" "$(cut -d' ' -f1 /proc/loadavg)"
  awk -v r="$round" -v m="$mode" -v v="$variant" '{
      for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      sub("ms", "", f["p50"]); sub("ms", "", f["p99"]); sub("/s", "", f["throughput"]); sub("us", "", f["cpu"])
      print r "\t" m "\t" v "\t" f["p50"] "\t" f["p99"] "\t" f["throughput"] "\t" f["failed"] "\t" f["cpu"]
    }' <<<"$out" >>"$RESULTS"
}

# The Warden variants of one mode, for build B: stdio proxies or the HTTP gateway.
warden_runs() {
  local round=$1 mode=$2 b=$3 sessions=$4 calls=$5
  shift 5
  local lat=(env "WARDEN_TOKEN=${TOKEN[$b]}" "$LAT" "${WATCH[@]}" --sessions "$sessions" --calls "$calls" --warmup "$WARMUP" "$@")
  local proxy=("${BIN[$b]}" --config "${CONF[$b]}" mcp-proxy --name bench)
  case $mode in
    stdio*|read)
      run "$round" "$mode" "remote-$b" "${lat[@]}" -- "${proxy[@]}" --server "${URL[$b]}" -- "$ECHO"
      run "$round" "$mode" "embedded-$b" "${lat[@]}" -- "${proxy[@]}" --embedded -- "$ECHO"
      ;;
  esac
  case $mode in
    http*|read) run "$round" "$mode" "http-$b" "${lat[@]}" --url "${URL[$b]}/mcp/bench" ;;
    ts*) run "$round" "$mode" "http-$b" env "WARDEN_TOKEN=${TOKEN[$b]}" "${TS[@]}" --sessions "$sessions" \
           --calls "$calls" --warmup "$WARMUP" --url "${URL[$b]}/mcp/bench" ;;
  esac
}
TS=(node "$PWD/tests/mcp/http_latency.mjs")

for round in $(seq "$ROUNDS"); do
  echo "== round $round: $(busy_now) cores busy in the second before it (of $(nproc)); $(fsync_probe)"
  order=("${BUILDS[@]}")
  if (( round % 2 == 0 )) && (( ${#BUILDS[@]} == 2 )); then order=(after before); fi
  for mode in $MODES; do
    sessions=1 calls=$CALLS extra=()
    case $mode in
      *32) sessions=$SESSIONS calls=$((CALLS / 4)) ;;
      read) extra=(--resource bench://resource) ;;
    esac
    lat=(env -u WARDEN_TOKEN "$LAT" "${WATCH[@]}" --sessions "$sessions" --calls "$calls" --warmup "$WARMUP" "${extra[@]}")
    case $mode in
      stdio*|read) run "$round" "$mode" direct-stdio "${lat[@]}" -- "$ECHO" ;;
    esac
    case $mode in
      http*|read) run "$round" "$mode" direct-http "${lat[@]}" --url "http://$UPSTREAM/mcp" ;;
      ts*) run "$round" "$mode" direct-http env -u WARDEN_TOKEN "${TS[@]}" --sessions "$sessions" \
             --calls "$calls" --warmup "$WARMUP" --url "http://$UPSTREAM/mcp" ;;
    esac
    for b in "${order[@]}"; do
      warden_runs "$round" "$mode" "$b" "$sessions" "$calls" "${extra[@]}"
    done
  done
done
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# Medians over the rounds; "added" is each round's figure minus that round's direct
# figure on the same transport, then the median of those differences.
echo
echo "== summary: medians of $ROUNDS rounds (ms; throughput in requests/s; added cpu: CPU per request"
echo "   beyond the direct run's, whose own is in parentheses; failed: requests refused, all rounds)"
awk -F'\t' '
  function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    key = $2 SUBSEP $3; p50[key] = p50[key] " " $4; p99[key] = p99[key] " " $5; tp[key] = tp[key] " " $6
    failed[key] += $7; cpu[key] = cpu[key] " " $8
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
    if ($3 ~ /^direct/) { d50[$1, $2, $3] = $4; d99[$1, $2, $3] = $5; dcpu[$1, $2, $3] = $8 }
    rows[NR] = $0
  }
  END {
    for (i = 1; i <= NR; i++) {
      split(rows[i], f, "\t")
      if (f[3] ~ /^direct/) continue
      base = (f[3] ~ /^http/) ? "direct-http" : "direct-stdio"
      key = f[2] SUBSEP f[3]
      a50[key] = a50[key] " " (f[4] - d50[f[1], f[2], base])
      a99[key] = a99[key] " " (f[5] - d99[f[1], f[2], base])
      if (f[8] != "-") acpu[key] = acpu[key] " " (f[8] - dcpu[f[1], f[2], base])
    }
    printf "| %-7s | %-16s | %8s | %8s | %9s | %9s | %10s | %9s | %6s |\n", "mode", "variant", "p50", "p99", "added p50", "added p99", "throughput", "added cpu", "failed"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for (i = 1; i <= n; i++) {
      split(order[i], k, SUBSEP)
      ad50 = (order[i] in a50) ? sprintf("%.3f", median(a50[order[i]])) : "-"
      ad99 = (order[i] in a99) ? sprintf("%.3f", median(a99[order[i]])) : "-"
      adcpu = (order[i] in acpu) ? sprintf("%.0f us", median(acpu[order[i]])) : sprintf("(%.0f us)", median(cpu[order[i]]))
      if (k[1] ~ /^ts/) adcpu = "-"
      printf "| %-7s | %-16s | %8.3f | %8.3f | %9s | %9s | %10.0f | %9s | %6d |\n", k[1], k[2], median(p50[order[i]]), median(p99[order[i]]), ad50, ad99, median(tp[order[i]]), adcpu, failed[order[i]]
    }
  }' "$RESULTS"

echo
echo "== audit (servers stopped first)"
status=0
for b in "${BUILDS[@]}"; do
  kill "${SERVE_PID[$b]}"; wait "${SERVE_PID[$b]}" 2>/dev/null || true
  if verified=$("${BIN[$b]}" --config "${CONF[$b]}" audit verify 2>&1); then
    echo "$b: $(tail -n1 <<<"$verified")"
  else
    echo "$b: AUDIT VERIFICATION FAILED: $verified" >&2
    status=1
  fi
done
exit "$status"
