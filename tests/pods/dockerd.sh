#!/usr/bin/env bash
# A Docker engine for the real-node tier:  dockerd.sh start | stop
# `start` uses an engine that already answers; otherwise it starts Debian's dockerd (root) without a bridge and
# without iptables rules, so the host's network is left as it was (builds and test containers use the host
# network), and remembers that it did. `stop` stops only an engine `start` started.
set -euo pipefail
STATE="${TOOLMESH_PODS_STATE:-${TMPDIR:-/tmp}/toolmesh-pods}"
PIDFILE="$STATE/dockerd.pid"
mkdir -p "$STATE"

start() {
    if docker info >/dev/null 2>&1; then
        echo "==> docker engine: already running"
        return 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd.sh: no dockerd; run make system-deps (Debian's docker.io)" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "dockerd.sh: dockerd must start as root" >&2; exit 1; }
    echo "==> starting dockerd (no bridge, no iptables; log $STATE/dockerd.log)"
    dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 300); do
        docker info >/dev/null 2>&1 && { echo "    dockerd ready"; return 0; }
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
        sleep 0.1
    done
    echo "dockerd.sh: dockerd did not answer within 30 s; its log:" >&2
    tail -20 "$STATE/dockerd.log" >&2
    exit 1
}

stop() {
    [ -f "$PIDFILE" ] || return 0
    local pid; pid="$(cat "$PIDFILE")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -9 "$pid" 2>/dev/null; then
            echo "    dockerd did not stop within 30 s: killed"
        fi
    fi
    # An engine killed (or slow to clean up) leaves its network namespace mounted; it was ours, so it goes.
    for ns in /run/docker/netns/*; do
        [ -e "$ns" ] || continue
        if mountpoint -q "$ns"; then umount "$ns" || umount -l "$ns" || true; fi
    done
    rm -f "$PIDFILE"
    echo "==> dockerd stopped"
}

"${1:?start|stop}"
