#!/usr/bin/env bash
# Starts a Prosody XMPP server on 127.0.0.1 for development, in the foreground,
# with accounts for trying `latus serve` with XMPP discovery:
#   scripts/xmpp-dev-server.sh [DIR] [PORT]      (default: ./xmpp-dev, 15222)
# Accounts: alice@localhost and bob@localhost, password "latus-dev".
# Clients must trust its self-signed certificate: SSL_CERT_FILE=DIR/certs/localhost.crt
# Needs Debian's prosody package (apt-get install -y prosody).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(mkdir -p "${1:-./xmpp-dev}" && cd "${1:-./xmpp-dev}" && pwd)"
port="${2:-15222}"
export LATUS_PROSODY_DIR="$dir" LATUS_PROSODY_PORT="$port"
config="$here/xmpp/prosody.cfg.lua"

mkdir -p "$dir/certs" "$dir/data"
if [ ! -f "$dir/certs/localhost.crt" ]; then
    # Not a CA (rustls refuses a CA certificate as a server's), named localhost.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -addext basicConstraints=critical,CA:FALSE \
        -keyout "$dir/certs/localhost.key" -out "$dir/certs/localhost.crt" 2>/dev/null
fi
for user in alice bob; do
    prosodyctl --config "$config" register "$user" localhost latus-dev >/dev/null
done
echo "prosody on 127.0.0.1:$port; accounts alice@localhost, bob@localhost (password latus-dev)"
echo "clients: export SSL_CERT_FILE=$dir/certs/localhost.crt"
exec prosody -F --config "$config"
