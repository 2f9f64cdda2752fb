#!/usr/bin/env bash
# The whole test suite: installs what the end-to-end tests need that cargo does
# not bring (Debian's Prosody, a real XMPP server the XMPP tests start on
# loopback), then runs `cargo test --locked` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prosody >/dev/null || ! command -v prosodyctl >/dev/null; then
    echo "installing prosody (Debian package) for the XMPP tests" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq prosody >/dev/null
    # The package starts a system-wide server; the tests run their own.
    $sudo service prosody stop >/dev/null 2>&1 || true
fi
exec cargo test --locked "$@"
