#!/usr/bin/env bash
# Runs `latus sync A B` beside rsync and Unison on the shared benchmark datasets and
# mutation cases, in one run (../shared/bench/run.sh with CUSTOM_CMD).
#
#   bench/compare.sh                         # small + large, cold cache, REPEAT=2
#   SETS=small TOOLS=rsync REPEAT=1 bench/compare.sh
#   MODE=daemon TOOLS=syncthing bench/compare.sh   # two `latus serve` beside two Syncthings
#
# The table run.sh prints has one row per tool, set and case (initial, touch1pct,
# renamedir, movebig, append1m): seconds, bytes written to disk, peak RSS, CPU.
# Knobs: MODE [sync|daemon]  SETS [small,large]  TOOLS [rsync,unison; daemon: syncthing]
#        CACHE [cold]  REPEAT [2; daemon: 1]
#        BENCH_DIR [${TMPDIR:-/tmp}/latus-peerbench]  SHARED [<project>/../shared]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(dirname "$HERE")"
SHARED="${SHARED:-$PROJECT/../shared}"
export BENCH_DIR="${BENCH_DIR:-${TMPDIR:-/tmp}/latus-peerbench}"

(cd "$PROJECT" && cargo build --release --locked --quiet)
LATUS="$PROJECT/target/release/latus"
# The device home lives outside the synced folders (each folder's history is in
# its own .latus/, like Unison's archive but per root).
HOME_DIR="$BENCH_DIR/latus-home"
mkdir -p "$HOME_DIR"

# The harness skips tool markers (.stfolder, …) when it verifies B against A; a
# copy of it learns that .latus/ is Latus's marker (each root's own history).
HARNESS="$BENCH_DIR/harness"
rm -rf "$HARNESS" && mkdir -p "$BENCH_DIR" && cp -r "$SHARED/bench" "$HARNESS"
sed -i 's/^IGNORE_NAMES = {/IGNORE_NAMES = {".latus", /' "$HARNESS/gen_dataset.py"
grep -q '".latus"' "$HARNESS/gen_dataset.py" || { echo "could not teach the harness .latus/" >&2; exit 2; }
# Its daemon hooks fill their placeholders from a table that also holds each
# daemon's Popen once started, and str.replace fails on it: skip what is not text.
sed -i 's/tmpl = tmpl.replace("{" + k + "}", v)$/tmpl = tmpl.replace("{" + k + "}", v) if isinstance(v, str) else tmpl/' "$HARNESS/bench.py"
grep -q 'isinstance(v, str)' "$HARNESS/bench.py" || { echo "could not mend the harness's hooks" >&2; exit 2; }

if [ "${MODE:-sync}" = daemon ]; then
    # Two daemons on loopback (bench/daemon.sh sets each one up); the harness
    # counts the bytes on the loopback interface and each daemon's peak RSS.
    # B is done when `latus wait` says so (bench/daemon-done.sh); DAEMON_DONE_CMD=
    # (empty) makes the harness compare B's tree with A's instead.
    done_cmd="$HERE/daemon-done.sh $LATUS {STATE} {PEER_STATE}"
    SETS="${SETS:-small,large}" \
    TOOLS="${TOOLS:-syncthing}" \
    CACHE="${CACHE:-cold}" \
    REPEAT="${REPEAT:-1}" \
    CUSTOM_NAME=latus \
    DAEMON_CMD="exec $HERE/daemon.sh $LATUS {NAME} {DIR} {STATE} {PORT} {PEER_STATE} {PEER_PORT}" \
    DAEMON_DONE_CMD="${DAEMON_DONE_CMD-$done_cmd}" \
        "$HARNESS/run.sh"
    exit
fi
SETS="${SETS:-small,large}" \
TOOLS="${TOOLS:-rsync,unison}" \
CACHE="${CACHE:-cold}" \
REPEAT="${REPEAT:-2}" \
CUSTOM_NAME=latus \
CUSTOM_CMD="exec $LATUS --home $HOME_DIR --log-level warn sync {A} {B}" \
    "$HARNESS/run.sh"
