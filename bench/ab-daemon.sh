#!/usr/bin/env bash
# Compares two builds of latus on a first sync between two daemons on loopback
# (`bench/daemon.sh` sets each up, as the harness's daemon mode does), cold cache,
# in alternating runs: this machine's speed drifts over minutes, so only runs
# interleaved in one session compare. Prints each run, then the medians of the
# wall time (both daemons started to B in sync) and of each daemon's CPU-seconds.
#
#   bench/ab-daemon.sh OLD_LATUS NEW_LATUS [RUNS (5)] [SET (large)]
#
# Needs root (drop_caches). The datasets are the shared harness's (seed 42, under
# $BENCH_DIR/datasets; run bench/compare.sh once to make them).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
old=$1 new=$2 runs=${3:-5} set=${4:-large}
BENCH_DIR="${BENCH_DIR:-${TMPDIR:-/tmp}/latus-peerbench}"
src="$BENCH_DIR/datasets/$set"
[ -d "$src" ] || { echo "no dataset $src (run bench/compare.sh once)" >&2; exit 2; }
work="$BENCH_DIR/work/ab-daemon"
results=$(mktemp)
trap 'pkill -9 -f "latus.*serve --listen 127.0.0.1:4710" || true; rm -f "$results"' EXIT

# One run: prints "seconds cpu_a cpu_b".
run() {
    local latus=$1
    rm -rf "$work" && mkdir -p "$work"/{A,B,sa,sb}
    cp -a "$src/." "$work/A"
    sync && echo 3 > /proc/sys/vm/drop_caches
    local t0 t1 a b
    t0=$(date +%s.%N)
    "$HERE/daemon.sh" "$latus" a "$work/A" "$work/sa" 47101 "$work/sb" 47102 >"$work/a.log" 2>&1 &
    a=$!
    "$HERE/daemon.sh" "$latus" b "$work/B" "$work/sb" 47102 "$work/sa" 47101 >"$work/b.log" 2>&1 &
    b=$!
    for _ in $(seq 600); do
        "$HERE/daemon-done.sh" "$latus" "$work/sb" "$work/sa" >/dev/null 2>&1 && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
    diff -r --exclude=.latus "$work/A" "$work/B" >/dev/null || { echo "B differs from A" >&2; exit 1; }
    # utime + stime, in clock ticks (fields 14 and 15 of /proc/PID/stat).
    cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
    echo "$(echo "$t1 - $t0" | bc) $(cpu $a) $(cpu $b)"
    kill -9 $a $b 2>/dev/null || true
    wait $a $b 2>/dev/null || true
}

for ((i = 1; i <= runs; i++)); do
    for latus in "$old" "$new"; do
        line="$latus $(run "$latus")"
        echo "$line" | tee -a "$results"
    done
done
python3 - "$results" "$old" "$new" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for latus in sys.argv[2:]:
    mine = [[float(x) for x in row[1:]] for row in rows if row[0] == latus]
    wall, a, b = (statistics.median(col) for col in zip(*mine))
    print(f"{latus}: {wall:.3f} s, CPU A {a:.2f} s, B {b:.2f} s (medians of {len(mine)})")
EOF
