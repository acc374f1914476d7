#!/usr/bin/env bash
# Try toolmesh on a laptop cluster: a kind cluster, the image built and loaded into it, the Helm chart,
# the quickstart's time server, and one tool call through the gateway over a port-forward.
# Needs docker, kind, kubectl and helm, and `make install` (for the `toolmesh` client). Run from anywhere;
# CLUSTER, IMAGE, NAMESPACE and PORT override the defaults. `kind delete cluster --name toolmesh` cleans up.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CLUSTER=${CLUSTER:-toolmesh}
IMAGE=${IMAGE:-ghcr.io/toolmesh/toolmesh:0.1.0}
NAMESPACE=${NAMESPACE:-toolmesh-system}
PORT=${PORT:-7401}
TOOLMESH=${TOOLMESH:-$ROOT/.venv/bin/toolmesh}

for tool in docker kind kubectl helm curl "$TOOLMESH"; do
  command -v "$tool" >/dev/null || { echo "run.sh needs $tool" >&2; exit 2; }
done

echo "==> kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 180s
kubectl config use-context "kind-$CLUSTER"

echo "==> image $IMAGE"
docker build --tag "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "==> helm install toolmesh into $NAMESPACE"
helm upgrade --install toolmesh "$ROOT/charts/toolmesh" --namespace "$NAMESPACE" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --wait --timeout 5m

# The quickstart's stdio time server runs in the toolmesh image itself (it has only a command); its
# everything server's command points into a local checkout, so the cluster gets examples/servers/ instead.
echo "==> examples/quickstart/time.yaml and policy.yaml"
kubectl apply -f "$ROOT/examples/quickstart/time.yaml" -f "$ROOT/examples/quickstart/policy.yaml"
kubectl wait mcpserver time --for=condition=Ready --timeout=5m
kubectl wait mcpserver time --for=condition=Healthy --timeout=2m
kubectl get mcpservers

echo "==> a tool call through the gateway"
kubectl --namespace "$NAMESPACE" port-forward svc/toolmesh-registry "$PORT:7401" >/dev/null &
forward=$!
trap 'kill "$forward"' EXIT
for _ in $(seq 100); do
  curl --silent --fail "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
# Healthy means one registry replica has the sidecar's heartbeat; the replica behind this forward may
# learn it a moment later, so list until the tool is there (60 s at most) before calling it.
for _ in $(seq 120); do
  "$TOOLMESH" tools "http://127.0.0.1:$PORT/mcp" 2>/dev/null | grep -q time__get_current_time && break
  sleep 0.5
done
"$TOOLMESH" tools "http://127.0.0.1:$PORT/mcp"
"$TOOLMESH" call "http://127.0.0.1:$PORT/mcp" time__get_current_time timezone=UTC
