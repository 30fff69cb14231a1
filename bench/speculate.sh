#!/usr/bin/env bash
# Speculative decoding on a 3-server loopback swarm with emulated round trips: decode
# speed with --speculate off and ngram on a prompt whose answer repeats its context, and
# whether the greedy texts are identical.
#
#   bench/speculate.sh [--rtt-ms 40] [--tokens 96]
set -euo pipefail
cd "$(dirname "$0")/.."
rtt=40
tokens=96
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt-ms) rtt="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bin shoal
shoal=target/release/shoal
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
boot=""
for blocks in 0..10 10..20 20..30; do
  i=${#pids[@]}
  RUST_LOG=warn timeout 600 "$shoal" serve --no-mdns --blocks "$blocks" \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 --emulate-rtt-ms "$rtt" ${boot:+--bootstrap "$boot"} \
    > "$work/s$i.out" 2> "$work/s$i.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q '^listening' "$work/s$i.out" 2>/dev/null && break; sleep 0.1; done
  [ -z "$boot" ] && boot=$(awk '/^listening/{print $2}' "$work/s$i.out")
done
sleep 2
prompt="Repeat this paragraph exactly, word for word: The lighthouse keeper climbed the hundred steps every evening, lit the great lamp, wound the clockwork that turned it, and sat by the window to watch the ships pass safely along the rocky coast until morning came. Then he wrote the night in his log, ate his bread, and slept until noon."
for mode in off ngram; do
  timeout 600 "$shoal" generate --no-mdns --bootstrap "$boot" --emulate-rtt-ms "$rtt" --chat \
    --prompt "$prompt" --max-tokens "$tokens" --speculate "$mode" --json > "$work/$mode.json"
done
python3 - "$work/off.json" "$work/ngram.json" "$rtt" <<'PY'
import json, sys
off, ngram = (json.load(open(p)) for p in sys.argv[1:3])
same = off["completion_tokens"] == ngram["completion_tokens"]
d = ngram["drafts"]
print(f"3 servers, emulated RTT {sys.argv[3]} ms, {len(off['completion_tokens'])} tokens")
print(f"--speculate off:   {off['tokens_per_second']:.2f} tok/s")
print(f"--speculate ngram: {ngram['tokens_per_second']:.2f} tok/s "
      f"({d['accepted']} of {d['drafted']} drafts accepted in {d['steps']} verify steps)")
print(f"speed-up {ngram['tokens_per_second'] / off['tokens_per_second']:.2f}x; identical text: {same}")
PY
