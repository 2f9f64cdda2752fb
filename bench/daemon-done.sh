#!/usr/bin/env bash
# The harness's completion check in daemon mode (run.sh's DAEMON_DONE_CMD, given
# B's placeholders): B is in sync once it has applied A's history as far as A has
# scanned and shown it to peers. Both steps block until true (or 30 s), so the
# harness learns it at once instead of walking B's tree at intervals.
#   bench/daemon-done.sh LATUS STATE PEER_STATE
set -euo pipefail
latus=$1 state=$2 peer_state=$3
seq=$(LATUS_HOME="$peer_state" "$latus" wait bench --scanned --timeout 30)
LATUS_HOME="$state" exec "$latus" wait bench --applied "$(cat "$peer_state/id"):$seq" --timeout 30 >/dev/null
