#!/usr/bin/env bash
# Installs the servers the tests run real instances of (Redis, NATS), and openssl for the TLS
# test, from Debian's packages if they are missing. The tests start them on loopback ports of their own and stop them afterwards.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# The TLS test makes its own CA and server certificate.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "services: redis-server, nats-server and openssl present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "services: installing ${missing[*]}"
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "services: installed ${missing[*]}"
