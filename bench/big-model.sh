#!/usr/bin/env bash
# A model no single node can hold (issue 10): an 8B-shaped Q4_0 model (~4.2 GB, random
# weights from `shoal make-model`) served by NODES nodes on this machine, each started
# with --memory-budget BUDGET and no --blocks, so each sizes and places its own span.
# Prints the spans they chose, each node's peak resident memory (VmHWM from /proc)
# against the budget, and, for 2 prompts, whether greedy generation through the swarm
# equals `generate --local` on the same file token for token, with decode speeds.
# Then a fifth node joins as a replica of the first span (same budget, --blocks of
# node 1), and the server of the first hop of a KILL_TOKENS-token generation is killed
# once the generation is under way: the text must still equal `--local`.
#
#   bench/big-model.sh            # SHOAL=target/debug/shoal NODES=4 BUDGET=1.6G TOKENS=16
#
# Results go to $OUT (default /tmp/big-model); the model is written there once.
set -euo pipefail
cd "$(dirname "$0")/.."
shoal=${SHOAL:-target/debug/shoal}
out=${OUT:-/tmp/big-model}
nodes=${NODES:-4}
budget=${BUDGET:-1.6G}
tokens=${TOKENS:-16}
mkdir -p "$out"
model=$out/llama3-8b-q4_0.gguf
[ -e "$model" ] || timeout 900 "$shoal" make-model --shape llama-3-8b --dtype q4_0 --out "$model"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
first=""
for i in $(seq 1 "$nodes"); do
  SHOAL_NO_MDNS=true RUST_LOG=info "$shoal" serve --model "$model" --memory-budget "$budget" \
    --max-seq-len 2048 --rebalance-interval 0 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
    ${first:+--bootstrap "$first"} > "$out/node-$i.out" 2> "$out/node-$i.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q '^listening ' "$out/node-$i.out" 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$out/node-$i.log" >&2; exit 1; }
    sleep 0.2
  done
  addr=$(sed -n 's/^listening //p' "$out/node-$i.out" | head -1)
  [ -n "$addr" ] || { echo "node $i did not start" >&2; cat "$out/node-$i.log" >&2; exit 1; }
  first=${first:-$addr}
  grep -o 'budget .* fits .*' "$out/node-$i.log" | head -1 | sed "s/^/node $i: /"
done
prompts=("Write a story about a lighthouse keeper." "Explain how tides work.")
for i in 0 1; do
  common=(--model "$model" --prompt "${prompts[$i]}" --chat --max-tokens "$tokens" --json)
  timeout 900 "$shoal" generate --local "${common[@]}" > "$out/local-$i.json"
  SHOAL_NO_MDNS=true timeout 900 "$shoal" generate --bootstrap "$first" "${common[@]}" \
    > "$out/swarm-$i.json" 2> "$out/swarm-$i.log"
  python3 - "$out/local-$i.json" "$out/swarm-$i.json" <<'PY'
import json, sys
local, swarm = (json.load(open(p)) for p in sys.argv[1:3])
same = local["completion_tokens"] == swarm["completion_tokens"]
route = " -> ".join(f'{r["start"]}..{r["end"]}' for r in swarm["route"])
print(f'{"same" if same else "DIFFERENT"} {len(swarm["completion_tokens"])} tokens; '
      f'decode tok/s: swarm {swarm["tokens_per_second"]:.2f} ({route}), '
      f'local {local["tokens_per_second"]:.2f}')
PY
done
for i in $(seq 1 "$nodes"); do
  p=${pids[$((i - 1))]}
  echo "node $i: peak resident $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$p/status) (budget $budget)"
done

# A replica of node 1's span, then a node killed mid-generation.
span=$(grep -o 'weakest at [0-9]*\.\.[0-9]*' "$out/node-1.log" | head -1 | awk '{print $3}')
SHOAL_NO_MDNS=true RUST_LOG=info "$shoal" serve --model "$model" --memory-budget "$budget" \
  --blocks "$span" --max-seq-len 2048 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
  --bootstrap "$first" > "$out/node-5.out" 2> "$out/node-5.log" &
pids+=($!)
for _ in $(seq 1 600); do grep -q '^listening ' "$out/node-5.out" 2>/dev/null && break; sleep 0.2; done
ktokens=${KILL_TOKENS:-48}
common=(--model "$model" --prompt "${prompts[0]}" --chat --max-tokens "$ktokens" --json)
timeout 900 "$shoal" generate --local "${common[@]}" > "$out/local-kill.json"
SHOAL_NO_MDNS=true timeout 900 "$shoal" generate --bootstrap "$first" "${common[@]}" \
  > "$out/swarm-kill.json" 2> "$out/swarm-kill.log" &
gen=$!
for _ in $(seq 1 600); do grep -q '^route ' "$out/swarm-kill.log" 2>/dev/null && break; sleep 0.1; done
victim=$(grep -m1 '^route ' "$out/swarm-kill.log" | awk '{print $2}' | cut -d'[' -f1)
sleep 4   # past the prefill, into decoding
for i in $(seq 1 5); do
  if grep -q "$victim" "$out/node-$i.out"; then
    kill "${pids[$((i - 1))]}"
    echo "killed node $i ($span, first hop) 4 s into a $ktokens-token generation"
  fi
done
wait "$gen"
python3 - "$out/local-kill.json" "$out/swarm-kill.json" <<'PY'
import json, sys
local, swarm = (json.load(open(p)) for p in sys.argv[1:3])
same = local["completion_tokens"] == swarm["completion_tokens"]
print(f'after the kill: {"same" if same else "DIFFERENT"} {len(swarm["completion_tokens"])} tokens as --local; '
      f're-routes: {len(swarm["reroutes"])}; final route: '
      + " -> ".join(f'{r["start"]}..{r["end"]}' for r in swarm["route"]))
PY
