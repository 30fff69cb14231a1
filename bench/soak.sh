#!/usr/bin/env bash
# Servers must not keep anything of the clients they met (issue 16). Two servers of the
# default model (blocks 0..15 and 15..30, --max-cache-tokens CACHE) answer FRESH short
# generations from fresh client processes (a new peer id each), then SAME from one
# client run again and again with one --identity. Each server's resident memory
# (VmRSS) is read every EVERY generations; at the end `shoal status` must show every
# cache token free and no session open, and each server's memory between generation
# FROM and the last must have grown by less than LIMIT percent. Exits non-zero if not.
#
#   bench/soak.sh       # SHOAL=target/release/shoal FRESH=500 SAME=500 TOKENS=8 EVERY=100
#
# FRESH and EVERY must be even. Fresh clients run two at a time (each spends most of its ~0.4 s starting up and
# looking the servers up); the same identity runs one at a time (two processes with
# one peer id would each take the other for its own restart). About 5 minutes with a
# release build on 2 cores. Logs and the table go to $OUT (default /tmp/soak).
set -euo pipefail
cd "$(dirname "$0")/.."
shoal=${SHOAL:-target/release/shoal}
out=${OUT:-/tmp/soak}
fresh=${FRESH:-500}
same=${SAME:-500}
tokens=${TOKENS:-8}
every=${EVERY:-100}
from=${FROM:-200}
limit=${LIMIT:-5}
cache=${CACHE:-4096}
[ -x "$shoal" ] || cargo build --release --bin shoal
mkdir -p "$out"
export SHOAL_NO_MDNS=true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

first=""
for blocks in 0..15 15..30; do
  i=${#pids[@]}
  RUST_LOG=info "$shoal" serve --blocks "$blocks" --max-cache-tokens "$cache" \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 ${first:+--bootstrap "$first"} \
    > "$out/server-$i.out" 2> "$out/server-$i.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q '^listening ' "$out/server-$i.out" 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$out/server-$i.log" >&2; exit 1; }
    sleep 0.2
  done
  addr=$(sed -n 's/^listening //p' "$out/server-$i.out" | head -1)
  [ -n "$addr" ] || { echo "server $blocks did not start" >&2; exit 1; }
  first=${first:-$addr}
done

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
"$shoal" keygen --identity --out "$out/client.key" --force > /dev/null
prompt="The capital of France is"
gen() {
  timeout 120 "$shoal" generate --bootstrap "$first" --prompt "$prompt" \
    --max-tokens "$tokens" --json "$@" > /dev/null 2>> "$out/clients.log" \
    || { echo "generation failed (see $out/clients.log)" >&2; exit 1; }
}
table=$out/rss.tsv
printf 'generation\tserver 0..15 KiB\tserver 15..30 KiB\tseconds\n' | tee "$table"
start=$SECONDS
n=0
note() {
  if (( n % every == 0 )); then
    printf '%d\t%d\t%d\t%d\n' "$n" "$(rss "${pids[0]}")" "$(rss "${pids[1]}")" \
      $((SECONDS - start)) | tee -a "$table"
  fi
}
note
while (( n < fresh )); do
  gen & a=$!
  gen & b=$!
  wait "$a"
  wait "$b"
  n=$((n + 2))
  note
done
while (( n < fresh + same )); do
  gen --identity "$out/client.key"
  n=$((n + 1))
  note
done

"$shoal" status --json --bootstrap "$first" > "$out/status.json"
python3 - "$table" "$out/status.json" "$from" "$limit" "$cache" <<'PY'
import json, sys
table, status, start, limit, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rows = [l.split("\t") for l in open(table).read().splitlines()[1:]]
rows = {int(r[0]): (int(r[1]), int(r[2])) for r in rows}
last = max(rows)
ok = True
for i in (0, 1):
    a, b = rows[min(k for k in rows if k >= start)][i], rows[last][i]
    growth = 100.0 * (b - a) / a
    print(f"server {i}: {a} KiB at generation {start}, {b} KiB at {last}: {growth:+.2f}% (limit {limit}%)")
    ok &= growth < limit
servers = json.load(open(status))["servers"]
for a in servers:
    free, open_ = a["free_cache_tokens"], a["sessions"]
    print(f"{a['span']['start']}..{a['span']['end']}: {free} of {cache} cache tokens free, {open_} sessions open")
    ok &= free == cache and open_ == 0
ok &= len(servers) == 2
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
