#!/usr/bin/env bash
# The image's base without any registry: a python:3.11-slim-bookworm look-alike made from Debian's own packages
# (debootstrap minbase + python3.11), with pip, setuptools and wheel in /usr/local as the official image has them.
# The root filesystem is cached once per version of this script; the docker image is re-imported from it when
# the engine lacks it (a new engine, a pruned one):
#
#   ${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}/base-<hash>/rootfs.tar  ->  local/python:3.11-slim-bookworm
#
# Needs root, debootstrap and a running docker engine (tests/pods/dockerd.sh start).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TAG="${BASE_IMAGE:-local/python:3.11-slim-bookworm}"
CACHE_ROOT="${TOOLMESH_CACHE:-$HOME/.cache/toolmesh}"
HASH="$(sha256sum "$HERE/base-image.sh" | cut -c1-12)"
OUT="$CACHE_ROOT/base-$HASH"
TAR="$OUT/rootfs.tar"
t0=$SECONDS
step() { echo "    [+$((SECONDS - t0))s] $*"; }

if [ "$(docker image inspect -f '{{ index .Config.Labels "io.toolmesh.base" }}' "$TAG" 2>/dev/null)" = "$HASH" ]; then
    echo "==> base image $TAG: present"
    exit 0
fi
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
command -v flock >/dev/null && flock 9

if [ ! -s "$TAR" ]; then
    echo "==> base image: Debian bookworm minbase with python3.11 (debootstrap, once per version of this script)"
    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || { echo "base-image.sh: no debootstrap (make system-deps)" >&2; exit 1; }
    PATH="$PATH:/usr/sbin:/sbin"
    MIRROR="${DEBIAN_MIRROR:-$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | grep -E '^(deb |URIs:)' | grep -o 'http[^ ]*/debian\b' | head -1 || true)}"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    W="$(mktemp -d "$OUT/work.XXXXXX")"; R="$W/rootfs"
    trap 'rm -rf "$W"' EXIT
    step "debootstrap from $MIRROR"
    debootstrap --variant=minbase bookworm "$R" "$MIRROR" >"$W/debootstrap.log" 2>&1 || { tail -20 "$W/debootstrap.log" >&2; exit 1; }
    step "python3.11 from apt in the chroot"
    cp /etc/resolv.conf "$R/etc/resolv.conf"
    cat >"$R/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
    chroot "$R" apt-get update -qq
    chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3.11 python3.11-venv python3-wheel-whl ca-certificates >"$W/apt.log"
    # Where a TLS-intercepting proxy stands in front of PyPI, its CA must be trusted inside the image too.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
        chroot "$R" update-ca-certificates >/dev/null
    fi
    step "pip, setuptools and wheel into /usr/local"
    pip_whl="$(ls "$R"/usr/share/python-wheels/pip-*.whl)"; pip_whl="/usr/share/python-wheels/${pip_whl##*/}"
    chroot "$R" env -u PIP_FIND_LINKS python3.11 "$pip_whl/pip" install -q --no-index \
        --find-links /usr/share/python-wheels --root-user-action=ignore --break-system-packages pip setuptools wheel
    rm -f "$R/usr/lib/python3.11/EXTERNALLY-MANAGED"   # the official image has no such marker
    ln -sf /usr/bin/python3.11 "$R/usr/local/bin/python3"
    ln -sf /usr/bin/python3.11 "$R/usr/local/bin/python"
    chroot "$R" env -u PIP_FIND_LINKS PATH=/usr/local/bin:/usr/bin:/bin python -m pip install -q \
        --root-user-action=ignore --upgrade pip setuptools wheel
    step "trim"
    chroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/root/.cache "$R"/etc/resolv.conf \
        "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/usr/share/locale/*
    tar -C "$R" -cf "$TAR.tmp" .
    mv -f "$TAR.tmp" "$TAR"
    rm -rf "$W"; trap - EXIT
    step "root filesystem cached in $TAR"
fi

echo "==> importing $TAG"
docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
    -c "LABEL io.toolmesh.base=$HASH" -c 'CMD ["python3"]' "$TAR" "$TAG" >/dev/null
docker run --rm --network none "$TAG" python -c 'import sys, pip, ensurepip; print("    python", sys.version.split()[0])'
step "base image $TAG ready"
