#!/usr/bin/env bash
# Speculative decoding on a 3-server loopback swarm with emulated round trips: decode
# speed with --speculate off and each mode asked for, on a prompt whose answer repeats
# its context (or --prompt), and whether the greedy texts are identical.
#
#   bench/speculate.sh [--rtt-ms 40] [--tokens 96] [--modes "ngram auto"]
#                      [--model F] [--draft-model D] [--prompt TEXT] [--repeat N]
#
# --repeat N runs the modes N times, interleaved (off, ngram, auto, off, ...), and
# reports each mode's median speed: this machine's speed drifts by 10% and more between
# runs a minute apart.
#
# SHOAL=path/to/shoal runs that binary instead of building this tree's release one.
set -euo pipefail
cd "$(dirname "$0")/.."
rtt=40
tokens=96
modes="ngram"
repeat=1
model=()
draft=()
prompt="Repeat this paragraph exactly, word for word: The lighthouse keeper climbed the hundred steps every evening, lit the great lamp, wound the clockwork that turned it, and sat by the window to watch the ships pass safely along the rocky coast until morning came. Then he wrote the night in his log, ate his bread, and slept until noon."
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt-ms) rtt="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --model) model=(--model "$2"); shift 2 ;;
    --draft-model) draft=(--draft-model "$2"); shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
shoal=${SHOAL:-}
if [ -z "$shoal" ]; then
  cargo build --release --quiet --bin shoal
  shoal=target/release/shoal
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
boot=""
for blocks in 0..10 10..20 20..30; do
  i=${#pids[@]}
  RUST_LOG=warn timeout 600 "$shoal" serve --no-mdns --blocks "$blocks" "${model[@]}" \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 --emulate-rtt-ms "$rtt" ${boot:+--bootstrap "$boot"} \
    > "$work/s$i.out" 2> "$work/s$i.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q '^listening' "$work/s$i.out" 2>/dev/null && break; sleep 0.1; done
  [ -z "$boot" ] && boot=$(awk '/^listening/{print $2}' "$work/s$i.out")
done
sleep 2
for round in $(seq 1 "$repeat"); do
  for mode in off $modes; do
    timeout 600 "$shoal" generate --no-mdns --bootstrap "$boot" --emulate-rtt-ms "$rtt" --chat \
      "${model[@]}" "${draft[@]}" --prompt "$prompt" --max-tokens "$tokens" --speculate "$mode" \
      --json > "$work/$mode.$round.json"
  done
done
python3 - "$rtt" "$work" "$repeat" off $modes <<'PY'
import json, statistics, sys
rtt, work, repeat, modes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
runs = {m: [json.load(open(f"{work}/{m}.{i}.json")) for i in range(1, repeat + 1)] for m in modes}
tps = {m: statistics.median(r["tokens_per_second"] for r in rs) for m, rs in runs.items()}
off = runs["off"][0]
print(f"3 servers, emulated RTT {rtt} ms, {len(off['completion_tokens'])} tokens"
      + (f", median of {repeat} interleaved runs" if repeat > 1 else ""))
for m, rs in runs.items():
    d = rs[0]["drafts"]
    same = all(r["completion_tokens"] == off["completion_tokens"] for r in rs)
    print(f"--speculate {m:6} {tps[m]:7.2f} tok/s  {tps[m] / tps['off']:.2f}x off  "
          f"drafts {d['accepted']}/{d['drafted']} in {d['steps']} verify steps ({d['draft_seconds']:.2f} s drafting)  "
          f"identical text: {same}")
PY
