#!/usr/bin/env bash
# One Latus daemon for the shared harness's daemon mode (run.sh with DAEMON_CMD):
#   bench/daemon.sh LATUS NAME DIR STATE PORT PEER_STATE PEER_PORT
# Makes the device (its home is STATE), waits for the peer's id, trusts it at
# 127.0.0.1:PEER_PORT, shares DIR as folder "bench" with it, and becomes
# `latus serve` (exec, so the harness measures the daemon itself).
set -euo pipefail
latus=$1 name=$2 dir=$3 state=$4 port=$5 peer_state=$6 peer_port=$7
export LATUS_HOME="$state"
"$latus" init >/dev/null
"$latus" id >"$state/id.tmp" && mv "$state/id.tmp" "$state/id"
for _ in $(seq 600); do
    [ -s "$peer_state/id" ] && break
    sleep 0.05
done
peer=$(cat "$peer_state/id")
"$latus" peer add "$peer" --name "peer-of-$name" --addr "127.0.0.1:$peer_port" >/dev/null
"$latus" folder add bench "$dir" >/dev/null
"$latus" folder share bench "$peer" >/dev/null
exec "$latus" --log-level warn serve --listen "127.0.0.1:$port" --watch-delay 0.2
