#!/usr/bin/env bash
# Debian packages the tests and benchmarks need; installs only what is missing.
# The real-node tier (tests/pods/) needs a Docker engine (docker.io brings containerd and runc), debootstrap for
# the registry-free base image, the CNI plugins, gcc for the static pause binary, and the host's network tools.
set -euo pipefail
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/sbin/dockerd ] || need+=(docker.io)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
[ -x /usr/sbin/iptables ] || need+=(iptables)
[ -x /usr/sbin/nft ] || need+=(nftables)
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "==> system packages: all present"
  exit 0
fi
echo "==> installing Debian packages: ${need[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "==> system packages installed"
