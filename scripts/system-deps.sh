#!/usr/bin/env bash
# Debian packages the tests and benchmarks need; installs only what is missing.
set -euo pipefail
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ ${#need[@]} -eq 0 ]; then
  echo "==> system packages: all present"
  exit 0
fi
echo "==> installing Debian packages: ${need[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "==> system packages installed"
