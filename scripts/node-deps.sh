#!/usr/bin/env bash
# npm packages the tests use, each folder with its own committed package-lock.json:
#   tests/node/          reference MCP servers (@modelcontextprotocol/server-everything)
#   tests/conformance/   Node 22 (from npm's node@22) and @modelcontextprotocol/conformance
set -euo pipefail
cd "$(dirname "$0")/.."
for dir in tests/node tests/conformance; do
  [ -f "$dir/package.json" ] || continue
  if [ -d "$dir/node_modules" ] && [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]; then
    echo "==> npm packages in $dir: up to date"
    continue
  fi
  echo "==> npm ci in $dir"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done
