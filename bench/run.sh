#!/usr/bin/env bash
# The benchmark harness (`make bench`): prepares wrk and the comparison proxies, measures, writes and plots bench/results/.
#
#   bench/run.sh [--quick] [--seconds N] [TARGET ...]     e.g. bench/run.sh --quick sidecar
#   bench/run.sh --repeat 3                                every target three times round-robin, medians kept
#   bench/run.sh --conformance [TARGET ...]                the conformance checks each proxy keeps
#   bench/run.sh --gateway                                 gateway tools/list over 100 servers x 20 tools
#   bench/run.sh --soak 10 sidecar                         also hold the sidecar under load, sampling memory
#   bench/run.sh --markdown                                the last results as the README's table
#   bench/run.sh --pods                                    the real-node tier's timings (root; pods.json, pods.png)
#
# Targets are listed by `bench/run.sh --help`; `direct` is always measured too, as the reference.
# Run it on a quiet machine: other work on the same cores shows up as latency.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v wrk >/dev/null || bash scripts/system-deps.sh
ARGS=("$@")

wants() {  # wants NAME-PREFIX: true when no target was named, or one starting with the prefix was
  local named=0 arg
  for arg in "${ARGS[@]}"; do
    case "$arg" in -*|[0-9]*) ;; *) named=1; [[ "$arg" == "$1"* ]] && return 0 ;; esac
  done
  [ "$named" -eq 0 ]
}

# FastMCP (mcp>=2.3) and mcp-proxy (mcp<2) cannot share an environment, and neither belongs in .venv.
if [ ! -f bench/.venv/.installed ]; then
  echo "==> bench/.venv: FastMCP 4.2.3 and matplotlib"
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q --upgrade pip
  bench/.venv/bin/pip install -q fastmcp==4.2.3 matplotlib==3.11.2
  touch bench/.venv/.installed
fi
if wants mcp-proxy && [ ! -f bench/.venv-mcp-proxy/.installed ]; then
  echo "==> bench/.venv-mcp-proxy: mcp-proxy 0.13.0"
  python3 -m venv bench/.venv-mcp-proxy
  bench/.venv-mcp-proxy/bin/pip install -q --upgrade pip
  bench/.venv-mcp-proxy/bin/pip install -q mcp-proxy==0.13.0
  touch bench/.venv-mcp-proxy/.installed
fi

if [ "${1:-}" = "--pods" ]; then
  exec bench/.venv/bin/python bench/pods_bench.py
fi

status=0
.venv/bin/python bench/harness.py "$@" || status=$?
if [ -f bench/results/sidecar.json ]; then
  bench/.venv/bin/python bench/plot.py bench/results/sidecar.json bench/results/sidecar.png
fi
exit "$status"
