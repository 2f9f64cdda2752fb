-- A throwaway Prosody (0.12, Debian's package) for tests and development, on
-- 127.0.0.1 only. Everything lives under $LATUS_PROSODY_DIR (data/, certs/, the
-- pid file) and it listens on $LATUS_PROSODY_PORT, so several can run at once:
--   LATUS_PROSODY_DIR=/tmp/x LATUS_PROSODY_PORT=15222 prosody -F --config prosody.cfg.lua
-- scripts/xmpp-dev-server.sh sets this up; the tests do the same (tests/common/prosody.rs).
local base = ENV_LATUS_PROSODY_DIR or "./xmpp-test"
local port = tonumber(ENV_LATUS_PROSODY_PORT or "15222")

run_as_root = true            -- CI and dev containers run as root
data_path = base .. "/data"   -- accounts and rosters; deleting it resets the server
pidfile = base .. "/prosody.pid"
-- Nagle off: each small stanza would otherwise wait for the delayed ACK (~40 ms a hop).
network_settings = { nagle = false; opportunistic_writes = true }
log = { { levels = { min = "info" }, to = "console" } }

interfaces = { "127.0.0.1" }
c2s_ports = { port }          -- STARTTLS
c2s_direct_tls_ports = { }
s2s_ports = { }               -- no federation
http_ports = { }
https_ports = { }

smacks_max_unacked_stanzas = 10  -- ask for acks every 10 stanzas, not after each
modules_enabled = {
  "roster"; "saslauth"; "tls"; "disco"; "smacks"; "ping"; "posix";
}
-- No federation, no offline storage, and no rate limits: Debian's default caps
-- a client at 10 kB/s.
modules_disabled = { "s2s"; "offline"; "limits" }

authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
allow_unencrypted_plain_auth = false

certificates = base .. "/certs"
ssl = {
  certificate = base .. "/certs/localhost.crt";
  key = base .. "/certs/localhost.key";
}

VirtualHost "localhost"
