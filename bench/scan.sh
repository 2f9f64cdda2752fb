#!/usr/bin/env bash
# Times `latus scan` beside Syncthing's scan on the shared benchmark datasets, in one run.
#
#   bench/scan.sh                          # small + large, warm cache, 5 repetitions
#   SETS=small CACHE=cold REPEAT=3 bench/scan.sh
#
# Syncthing (and the disk floors) run through ../shared/bench/run.sh with the same SETS
# and CACHE; Latus then scans a copy of each dataset: "scan" is a first scan (no
# .latus/), "rescan" a scan with nothing changed. Seconds are whole-process wall time
# (fork to exit), RSS the peak resident set (/usr/bin/time). Medians over REPEAT.
# Knobs: SETS [small,large]  CACHE [warm|cold]  REPEAT [5]  PEER_REPEAT [2]  SKIP_PEERS [0]  THREADS []
#        BENCH_DIR [${TMPDIR:-/tmp}/latus-peerbench]  SHARED [<project>/../shared]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(dirname "$HERE")"
SHARED="${SHARED:-$PROJECT/../shared}"
SETS="${SETS:-small,large}"
CACHE="${CACHE:-warm}"
REPEAT="${REPEAT:-5}"
PEER_REPEAT="${PEER_REPEAT:-2}"   # Syncthing's chain (scan + sync) takes minutes per repetition
SKIP_PEERS="${SKIP_PEERS:-0}"
THREADS="${THREADS:-}"
export BENCH_DIR="${BENCH_DIR:-${TMPDIR:-/tmp}/latus-peerbench}"
OUT="$BENCH_DIR/results/latus-scan-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

[ -x /usr/bin/time ] || { echo "needs /usr/bin/time: apt-get install -y time" >&2; exit 2; }
(cd "$PROJECT" && cargo build --release --locked --quiet)
LATUS="$PROJECT/target/release/latus"

# 1. The peers (this also generates the datasets, seed 42, under $BENCH_DIR/datasets).
if [ "$SKIP_PEERS" != 1 ]; then
    tools=syncthing
    [[ ",$SETS," == *",large,"* ]] && tools="floors,$tools"
    SETS="$SETS" TOOLS="$tools" CACHE="$CACHE" REPEAT="$PEER_REPEAT" "$SHARED/bench/run.sh" \
        | tee "$OUT/peers.txt"
fi

prep() {
    sync
    if [ "$CACHE" = cold ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# 2. Latus on a copy of each dataset (the scan writes .latus/ into the folder).
export LATUS_HOME="$OUT/home"
thread_args=()
[ -n "$THREADS" ] && thread_args=(--threads "$THREADS")
IFS=',' read -r -a sets <<< "$SETS"
for set in "${sets[@]}"; do
    src="$BENCH_DIR/datasets/$set"
    [ -d "$src" ] || { echo "no dataset $src (run without SKIP_PEERS=1 once)" >&2; exit 2; }
    work="$BENCH_DIR/work/latus-scan-$set"
    rm -rf "$work" && cp -a "$src" "$work"
    for ((i = 1; i <= REPEAT; i++)); do
        rm -rf "$work/.latus"
        for case in scan rescan; do
            prep
            /usr/bin/time -f "%e %M" -o "$OUT/time.txt" \
                "$LATUS" scan --json "${thread_args[@]}" "$work" > "$OUT/summary.json"
            read -r secs rss < "$OUT/time.txt"
            python3 - "$set" "$case" "$secs" "$rss" "$OUT/summary.json" >> "$OUT/latus.jsonl" <<'PY'
import json, sys
s = json.load(open(sys.argv[5]))
print(json.dumps({"set": sys.argv[1], "case": sys.argv[2], "seconds": float(sys.argv[3]),
                  "rss_kib": int(sys.argv[4]), "files": s["files"], "bytes_hashed": s["bytes_hashed"],
                  "changed": s["new"] + s["changed"] + s["deleted"]}))
PY
        done
    done
done

python3 - "$OUT/latus.jsonl" "$CACHE" <<'PY' | tee "$OUT/latus.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nlatus scan, {sys.argv[2]} cache (seconds: median [min-max] of {len(rows) // len({(r['set'], r['case']) for r in rows})} runs)")
print("| set | case | seconds | peak RSS | hashed | throughput |")
print("|---|---|---|---|---|---|")
for key in dict.fromkeys((r["set"], r["case"]) for r in rows):
    rs = [r for r in rows if (r["set"], r["case"]) == key]
    secs = [r["seconds"] for r in rs]
    med = statistics.median(secs)
    hashed = rs[0]["bytes_hashed"]
    rate = f"{hashed / med / 1e6:.0f} MB/s" if hashed else "-"
    print(f"| {key[0]} | {key[1]} | {med:.2f} [{min(secs):.2f}-{max(secs):.2f}] | "
          f"{max(r['rss_kib'] for r in rs) / 1024:.0f} MiB | {hashed / 2**20:.0f} MiB | {rate} |")
PY
echo "results in $OUT"
