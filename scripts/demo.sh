#!/usr/bin/env bash
# make demo: a real stdio MCP server (mcp-server-time) behind `toolmesh sidecar`, one tool call through it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
PORT="${TOOLMESH_DEMO_PORT:-7400}"
URL="http://127.0.0.1:${PORT}"
LOG="$(mktemp -t toolmesh-demo.XXXXXX.log)"
export PYTHONSAFEPATH=1

echo "==> starting toolmesh sidecar on ${URL}/mcp in front of mcp-server-time (stdio)"
"$BIN/toolmesh" sidecar --upstream-command "$BIN/mcp-server-time" --listen "127.0.0.1:${PORT}" \
  --server-name time >"$LOG" 2>&1 &
SIDECAR=$!
stop() {
  if kill -0 "$SIDECAR" 2>/dev/null; then
    kill -TERM "$SIDECAR" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SIDECAR" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SIDECAR" 2>/dev/null || true
  fi
  wait "$SIDECAR" 2>/dev/null || true
}
trap stop EXIT

ready=""
for _ in $(seq 1 300); do
  if ! kill -0 "$SIDECAR" 2>/dev/null; then
    echo "toolmesh sidecar exited; its log:" >&2; cat "$LOG" >&2; exit 1
  fi
  if "$BIN/python" - "$URL/readyz" <<'PY' 2>/dev/null
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
PY
  then ready=1; break; fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "toolmesh sidecar did not become ready within 30 s; its log:" >&2; cat "$LOG" >&2; exit 1
fi
echo "==> ready: $(curl -s "$URL/readyz" 2>/dev/null || echo ok)"

echo "==> tools the sidecar serves"
"$BIN/toolmesh" tools "$URL/mcp"
echo
echo "==> toolmesh call $URL/mcp get_current_time timezone=Europe/Paris"
"$BIN/toolmesh" call "$URL/mcp" get_current_time timezone=Europe/Paris
echo
echo "==> done (sidecar log: $LOG)"
