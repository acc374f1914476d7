#!/usr/bin/env bash
# make demo: `toolmesh up examples/quickstart/` (mcp-server-time over stdio and the MCP reference
# server over Streamable HTTP, each behind a sidecar with the team policy), real tool calls through
# the one gateway URL (a cache hit shown from the sidecar's /metrics, the example workflow of
# examples/workflows/), then a clean stop. TOOLMESH_DEMO_PORT moves the gateway off 7401.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
PORT="${TOOLMESH_DEMO_PORT:-7401}"
GATEWAY="http://127.0.0.1:${PORT}/mcp"
LOG="$(mktemp -t toolmesh-demo.XXXXXX.log)"

echo "==> toolmesh up examples/quickstart/ --listen 127.0.0.1:${PORT}"
"$BIN/toolmesh" up examples/quickstart/ --listen "127.0.0.1:${PORT}" >"$LOG" 2>&1 &
UP=$!
stop() {
  if kill -0 "$UP" 2>/dev/null; then
    kill -INT "$UP" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$UP" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP" 2>/dev/null || true
  fi
  wait "$UP" 2>/dev/null || true
}
trap stop EXIT

# Wait (up to 2 minutes: a cold machine starts Node and Python servers) for the server table.
for _ in $(seq 1 1200); do
  if ! kill -0 "$UP" 2>/dev/null; then
    echo "toolmesh up exited; its output:" >&2; cat "$LOG" >&2; exit 1
  fi
  grep -q "^==> running" "$LOG" && break
  sleep 0.1
done
if ! grep -q "^==> running" "$LOG"; then
  echo "toolmesh up did not finish starting within 2 minutes; its output:" >&2; cat "$LOG" >&2; exit 1
fi
cat "$LOG"
if grep -q " failed" "$LOG"; then
  echo "a server failed to start (see above)" >&2; exit 1
fi

echo
echo "==> toolmesh call $GATEWAY time__get_current_time timezone=Europe/Paris   (a clock: never cached)"
"$BIN/toolmesh" call "$GATEWAY" time__get_current_time timezone=Europe/Paris
echo
echo "==> toolmesh call $GATEWAY everything__get-sum a=2 b=3   (twice: the policy caches get-sum for an hour)"
"$BIN/toolmesh" call "$GATEWAY" everything__get-sum a=2 b=3
"$BIN/toolmesh" call "$GATEWAY" everything__get-sum a=2 b=3
echo
# Each sidecar counts its cache lookups at /metrics (the METRICS column of the table above).
echo "==> cache lookups, from each sidecar's /metrics"
for server in time everything; do
  metrics="$(awk -v s="$server" '$1 == s && $3 == "ready" { print $NF; exit }' "$LOG")"
  "$BIN/python" -c 'import sys, urllib.request
lines = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines()
found = [l for l in lines if l.startswith("toolmesh_cache_lookups_total{")]
print(sys.argv[2] + ": " + ("; ".join(found) or "no cache lookups"))' "$metrics" "$server"
done
echo
echo "==> toolmesh call $GATEWAY toolmesh__run_workflow --json \"\$(cat examples/workflows/quickstart.json)\""
"$BIN/toolmesh" call "$GATEWAY" toolmesh__run_workflow --json "$(cat examples/workflows/quickstart.json)"
echo
echo "==> stopping toolmesh up"
stop
trap - EXIT
tail -n 2 "$LOG"
echo "==> done"
