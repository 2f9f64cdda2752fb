#!/usr/bin/env bash
# Makes a small sample folder to try Latus on: text and binary files, nested
# directories, a symlink and a .latusignore. Usage: scripts/sample-tree.sh DIR
set -euo pipefail
dir="${1:?usage: $0 DIR}"
mkdir -p "$dir/docs/notes" "$dir/photos/2026" "$dir/music" "$dir/build"
printf 'Shopping list\n- bread\n- tea\n' > "$dir/docs/list.txt"
printf '# Plans\nSync everything, lose nothing.\n' > "$dir/docs/notes/plans.md"
for i in 1 2 3; do head -c $((200000 * i)) /dev/urandom > "$dir/photos/2026/img_$i.jpg"; done
head -c 3000000 /dev/urandom > "$dir/music/track.flac"
echo 'temporary build output' > "$dir/build/out.o"
printf 'build/\n*.tmp\n' > "$dir/.latusignore"
echo 'scratch' > "$dir/scratch.tmp"
ln -sfn docs/list.txt "$dir/latest-list"
echo "sample tree in $dir"
