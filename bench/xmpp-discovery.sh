#!/usr/bin/env bash
# Time from starting `latus serve` on two devices that know nothing of each other
# but the same XMPP account (no address) to the first file synced, through a
# Prosody on loopback (scripts/xmpp-dev-server.sh). Median of RUNS (default 5).
#   bench/xmpp-discovery.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
cargo build --release --quiet
latus="$PWD/target/release/latus"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
scripts/xmpp-dev-server.sh "$work/xmpp" "$port" >"$work/prosody.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
done
export SSL_CERT_FILE="$work/xmpp/certs/localhost.crt"
echo latus-dev >"$work/password"

times=()
for run in $(seq "$runs"); do
    dir="$work/run$run"
    for d in a b; do
        mkdir -p "$dir/$d/folder"
        export LATUS_HOME="$dir/$d/home"
        "$latus" init >/dev/null
        "$latus" folder add docs "$dir/$d/folder" >/dev/null
        "$latus" xmpp set alice@localhost --password-file "$work/password" \
            --server "127.0.0.1:$port" >/dev/null
    done
    id_a="$(LATUS_HOME="$dir/a/home" "$latus" id)"
    id_b="$(LATUS_HOME="$dir/b/home" "$latus" id)"
    for pair in "a $id_b" "b $id_a"; do
        set -- $pair
        LATUS_HOME="$dir/$1/home" "$latus" peer add "$2" >/dev/null
        LATUS_HOME="$dir/$1/home" "$latus" folder share docs "$2" >/dev/null
    done
    echo "first file" >"$dir/a/folder/first.txt"
    start="$(date +%s.%N)"
    LATUS_HOME="$dir/a/home" "$latus" serve --listen 127.0.0.1:0 2>"$dir/a.log" &
    pid_a=$!
    LATUS_HOME="$dir/b/home" "$latus" serve --listen 127.0.0.1:0 2>"$dir/b.log" &
    pid_b=$!
    pids+=("$pid_a" "$pid_b")
    for _ in $(seq 6000); do
        [ "$(cat "$dir/b/folder/first.txt" 2>/dev/null)" = "first file" ] && break
        sleep 0.01
    done
    end="$(date +%s.%N)"
    [ "$(cat "$dir/b/folder/first.txt" 2>/dev/null)" = "first file" ] || {
        echo "run $run: the file did not arrive; logs in $dir" >&2
        cat "$dir/a.log" "$dir/b.log" >&2
        exit 1
    }
    kill "$pid_a" "$pid_b"
    wait "$pid_a" "$pid_b" 2>/dev/null || true
    times+=("$(python3 -c "print($end - $start)")")
done
sorted=($(printf '%s\n' "${times[@]}" | sort -n))
printf 'start to first file synced through XMPP discovery: median %.3f s over %d runs (%s)\n' \
    "${sorted[$((runs / 2))]}" "$runs" "$(printf '%.3f ' "${sorted[@]}")"
