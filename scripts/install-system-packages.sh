#!/usr/bin/env bash
# Install the Debian packages the test suite runs for real, when they are missing.
set -euo pipefail
needed=()
command -v redis-server >/dev/null || needed+=(redis-server)
{ command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || needed+=(postgresql)
command -v chromium >/dev/null || needed+=(chromium)
command -v turnserver >/dev/null || needed+=(coturn)
if [ ${#needed[@]} -eq 0 ]; then
  exit 0
fi
echo "Installing system packages: ${needed[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${needed[@]}" >/dev/null
