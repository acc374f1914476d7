#!/usr/bin/env bash
# Builds the node the real-node tier runs beside the control plane (tests/cluster/build.sh): kubelet and
# kube-proxy from the same Kubernetes release, a CoreDNS trimmed to seven plugins, and the static `pause`
# binary every pod sandbox runs. Once, into a cache outside the checkout:
#
#   ${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}/pods-<hash>/bin/{kubelet,kube-proxy,coredns,pause}
#
# <hash> covers this script and the Go modules under tests/pods/go/; tests/helpers/pods.py computes the same.
# The Go module and build caches are the control plane's, so kubelet and kube-proxy mostly link packages
# already compiled for kube-apiserver. Each binary is built to a temporary name and renamed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}"
HASH_INPUTS=(
    build.sh
    go/node/go.mod go/node/go.sum go/node/tools.go
    go/coredns/go.mod go/coredns/go.sum go/coredns/main.go
)
HASH="$(cd "$HERE" && sha256sum "${HASH_INPUTS[@]}" | sha256sum | cut -c1-12)"
PODS_DIR="$CACHE_ROOT/pods-$HASH"
BIN="$PODS_DIR/bin"
mkdir -p "$BIN"

command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "pods/build.sh: no 'go' on PATH; Go 1.26 or newer is needed" >&2; exit 1; }
command -v gcc >/dev/null || { echo "pods/build.sh: no 'gcc' (make system-deps) for the static pause binary" >&2; exit 1; }

export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off
export GOMODCACHE="$CACHE_ROOT/gomod" GOCACHE="$CACHE_ROOT/gocache"
export GOFLAGS="-modcacherw -buildvcs=false -mod=readonly"

exec 9>"$PODS_DIR/.lock"
command -v flock >/dev/null && flock 9

K8S_VERSION="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' "$HERE/go/node/go.mod")"
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done

TARGETS=(
    "kubelet|node|k8s.io/kubernetes/cmd/kubelet|$K8S_LDFLAGS"
    "kube-proxy|node|k8s.io/kubernetes/cmd/kube-proxy|$K8S_LDFLAGS"
    "coredns|coredns|.|-s -w"
)
TIMES="$PODS_DIR/build-seconds.txt"
total=$(( ${#TARGETS[@]} + 1 ))
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
    echo "$name $((SECONDS - start))" >>"$TIMES"
    echo "    $name built in $((SECONDS - start))s"
done

# pause: the sandbox process of every pod, from the Kubernetes module's own source, linked statically.
i=$((i + 1))
if [[ -x "$BIN/pause" ]]; then
    echo "==> pause ($i/$total) already built"
else
    echo "==> building pause ($i/$total) ..."
    k8s_dir="$(go -C "$HERE/go/node" mod download -json k8s.io/kubernetes | awk -F'"' '$2 == "Dir" { print $4 }')"
    gcc -Os -static -o "$BIN/.pause.tmp.$$" "$k8s_dir/build/pause/linux/pause.c"
    mv -f "$BIN/.pause.tmp.$$" "$BIN/pause"
fi

echo "==> node binaries ready in $BIN ($((SECONDS - build_start))s)"
echo "$BIN"
