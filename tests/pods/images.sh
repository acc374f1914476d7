#!/usr/bin/env bash
# The images the real-node tier runs, built by a local docker engine with no registry:
#   local/python:3.11-slim-bookworm  base-image.sh (cached root filesystem)
#   toolmesh:dev                     the project's Dockerfile, as users build it, on that base
#   local/pause:3.10                 the pod sandbox (pause from tests/pods/build.sh)
#   mcp/everything:latest            the reference server the examples name (tests/pods/everything/)
# Writes build seconds and sizes to $TOOLMESH_PODS_STATE/images.json. Needs `dockerd.sh start` and `build.sh`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${TOOLMESH_PODS_STATE:-${TMPDIR:-/tmp}/toolmesh-pods}"
PODS_BIN="${PODS_BIN:?the folder build.sh printed}"
BASE=local/python:3.11-slim-bookworm
IMAGE="${TOOLMESH_IMAGE:-toolmesh:dev}"
mkdir -p "$STATE"
export DOCKER_BUILDKIT=0   # the legacy builder: BuildKit would fetch its frontend from a registry
t0=$SECONDS
build() {  # build ARGS...: docker build, its output shown only when it fails (the legacy builder's notice is noise)
    local log; log="$(mktemp "$STATE/build.XXXXXX")"
    if ! docker build --quiet --force-rm "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
    rm -f "$log"
}

"$HERE/base-image.sh"

echo "==> building $IMAGE from the Dockerfile (PYTHON_IMAGE=$BASE)"
start=$SECONDS
build --network host --build-arg "PYTHON_IMAGE=$BASE" --tag "$IMAGE" "$ROOT"
toolmesh_seconds=$((SECONDS - start))
echo "    built in ${toolmesh_seconds}s"

echo "==> local/pause:3.10"
tar -C "$PODS_BIN" -c pause | docker import -c 'ENTRYPOINT ["/pause"]' -c 'USER 65535:65535' - local/pause:3.10 >/dev/null

echo "==> mcp/everything:latest (Node.js $(node --version) and tests/node's server-everything)"
[ -d "$ROOT/tests/node/node_modules/@modelcontextprotocol/server-everything" ] \
    || { echo "images.sh: tests/node/node_modules is missing: make node-deps" >&2; exit 1; }
ctx="$(mktemp -d "$STATE/everything.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
cp "$HERE/everything/Dockerfile" "$ctx/"
cp "$(readlink -f "$(command -v node)")" "$ctx/node"
cp -r "$ROOT/tests/node/node_modules" "$ctx/node_modules"
build --network none --build-arg "BASE_IMAGE=$BASE" --tag mcp/everything:latest "$ctx"

size() { docker image inspect -f '{{ .Size }}' "$1"; }
cat >"$STATE/images.json" <<JSON
{"toolmesh_image": "$IMAGE", "toolmesh_build_seconds": $toolmesh_seconds, "toolmesh_bytes": $(size "$IMAGE"),
 "base_bytes": $(size "$BASE"), "everything_bytes": $(size mcp/everything:latest), "images_seconds": $((SECONDS - t0))}
JSON
echo "==> images ready in $((SECONDS - t0))s: $IMAGE $(( $(size "$IMAGE") / 1000000 )) MB"
