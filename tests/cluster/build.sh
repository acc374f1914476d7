#!/usr/bin/env bash
# Builds the real Kubernetes control plane the cluster tests run (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok, helm) from the pinned Go modules
# in tests/cluster/go/, once, into a cache outside the checkout:
#
#   ${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}/cluster-<hash>/bin/
#
# <hash> covers this script and every go.mod/go.sum under tests/cluster/go/, so a version
# bump builds into a fresh directory; tests/helpers/kube.py computes the same hash.
# Binaries already built are skipped; each is built to a temporary name and renamed, so an
# interrupted build never leaves a half-written binary behind. The Go module and build
# caches live under the same cache root, so rebuilding after a bump is mostly linking.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}"

# The hash inputs, relative to tests/cluster/, in this fixed order (kube.py lists the same).
HASH_INPUTS=(
    build.sh
    go/etcd/go.mod go/etcd/go.sum
    go/helm/go.mod go/helm/go.sum
    go/kubernetes/go.mod go/kubernetes/go.sum
    go/kwok/go.mod go/kwok/go.sum
)
HASH="$(cd "$HERE" && sha256sum "${HASH_INPUTS[@]}" | sha256sum | cut -c1-12)"
CLUSTER_DIR="$CACHE_ROOT/cluster-$HASH"
BIN="$CLUSTER_DIR/bin"
mkdir -p "$BIN"

# A non-login shell may miss the toolchain's usual home.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
    echo "build.sh: no 'go' on PATH; Go 1.26 or newer is needed to build the cluster binaries" >&2
    exit 1
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off
export GOMODCACHE="$CACHE_ROOT/gomod" GOCACHE="$CACHE_ROOT/gocache"
export GOFLAGS="-modcacherw -buildvcs=false -mod=readonly"

# Two builds at once (two checkouts, two terminals) would race on the same names; take turns.
exec 9>"$CLUSTER_DIR/.lock"
if command -v flock >/dev/null; then
    flock 9
fi

# Versions come from the go.mod files, so a bump there is the only edit needed.
module_version() {  # module_version DIR MODULE
    awk -v m="$2" '$1 == m || ($1 == "require" && $2 == m) { print $NF; exit }' "$HERE/go/$1/go.mod"
}
K8S_VERSION="$(module_version kubernetes k8s.io/kubernetes)"
HELM_VERSION="$(module_version helm helm.sh/helm/v3)"
KWOK_VERSION="$(module_version kwok sigs.k8s.io/kwok)"
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"

# `kubectl version` reads these on both client and server side.
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
KWOK_LDFLAGS="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"

# name | module dir | package | ldflags
TARGETS=(
    "kube-apiserver|kubernetes|k8s.io/kubernetes/cmd/kube-apiserver|$K8S_LDFLAGS"
    "kube-controller-manager|kubernetes|k8s.io/kubernetes/cmd/kube-controller-manager|$K8S_LDFLAGS"
    "kube-scheduler|kubernetes|k8s.io/kubernetes/cmd/kube-scheduler|$K8S_LDFLAGS"
    "kubectl|kubernetes|k8s.io/kubernetes/cmd/kubectl|$K8S_LDFLAGS"
    "etcd|etcd|go.etcd.io/etcd/server/v3|-s -w"
    "kwok|kwok|sigs.k8s.io/kwok/cmd/kwok|$KWOK_LDFLAGS"
    "helm|helm|helm.sh/helm/v3/cmd/helm|$HELM_LDFLAGS"
)

# Build seconds per binary, kept next to the binaries for bench/results/controlplane.json.
TIMES="$CLUSTER_DIR/build-seconds.txt"
total=${#TARGETS[@]}
i=0
build_start=$SECONDS
for target in "${TARGETS[@]}"; do
    IFS='|' read -r name dir pkg ldflags <<<"$target"
    i=$((i + 1))
    if [[ -x "$BIN/$name" ]]; then
        echo "==> $name ($i/$total) already built"
        continue
    fi
    echo "==> building $name ($i/$total) ..."
    start=$SECONDS
    tmp="$BIN/.$name.tmp.$$"
    trap 'rm -f "$tmp"' EXIT
    go build -C "$HERE/go/$dir" -trimpath -ldflags "$ldflags" -o "$tmp" "$pkg"
    mv -f "$tmp" "$BIN/$name"
    trap - EXIT
    took=$((SECONDS - start))
    echo "$name $took" >>"$TIMES"
    echo "    $name built in ${took}s"
done

# kwok plays the kubelet only with stage configs: node initialisation and lease heartbeats,
# and pods that become ready, complete and get deleted promptly.
STAGES="$CLUSTER_DIR/kwok-stages.yaml"
if [[ ! -s "$STAGES" ]]; then
    echo "==> writing kwok stage config"
    kwok_dir="$(go -C "$HERE/go/kwok" mod download -json sigs.k8s.io/kwok | awk -F'"' '$2 == "Dir" { print $4 }')"
    tmp="$STAGES.tmp.$$"
    {
        first=1
        for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
                 pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
            [[ $first == 1 ]] || echo "---"
            first=0
            cat "$kwok_dir/kustomize/stage/$f"
        done
    } >"$tmp"
    mv -f "$tmp" "$STAGES"
fi

echo "==> cluster binaries ready in $BIN ($((SECONDS - build_start))s)"
echo "$BIN"
