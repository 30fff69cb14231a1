#!/usr/bin/env bash
# A model split over two nodes that size their own spans (issue 17): greedy text
# through the swarm against `generate --local`, each node's peak resident memory against
# its budget, and decode speed beside llama.cpp's on the same file.
#
#   MODEL=big.gguf BUDGET=9.5G bench/two-nodes.sh
#
# MODEL: a GGUF file (say `shoal make-model --shape qwen3-30b-a3b --dtype q4_k_m`).
# BUDGET: each node's --memory-budget. TOKENS (default 32): tokens generated.
# --local runs first and alone (it holds the whole model), then the two nodes start
# with --memory-budget and no --blocks, then llama.cpp decodes alone.
# Logs go to $OUT (default /tmp/two-nodes). The client needs memory too: two nodes of
# 25 Qwen3-30B-A3B blocks each (--memory-budget 11G) were too much for 23 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
shoal=${SHOAL:-target/debug/shoal}
model=${MODEL:?MODEL=file.gguf}
budget=${BUDGET:?BUDGET=size}
tokens=${TOKENS:-32}
out=${OUT:-/tmp/two-nodes}
mkdir -p "$out"
prompt="Write a story about a lighthouse keeper."
common=(--model "$model" --prompt "$prompt" --chat --max-tokens "$tokens" --json)

# REUSE_LOCAL=1 keeps a --local result already in $OUT (same model and tokens).
if [ "${REUSE_LOCAL:-0}" != 1 ] || [ ! -s "$out/local.json" ]; then
  /usr/bin/time -f "%M" -o "$out/local.rss" timeout 1800 "$shoal" generate --local "${common[@]}" \
    > "$out/local.json" 2> "$out/local.log"
fi
echo "local: peak resident $(( $(cat "$out/local.rss") / 1024 )) MiB"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
first=""
for i in 1 2; do
  SHOAL_NO_MDNS=true RUST_LOG=info "$shoal" serve --model "$model" --memory-budget "$budget" \
    --max-seq-len 1024 --rebalance-interval 0 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
    ${first:+--bootstrap "$first"} > "$out/node-$i.out" 2> "$out/node-$i.log" &
  pids+=($!)
  for _ in $(seq 1 3000); do
    grep -q '^listening ' "$out/node-$i.out" 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$out/node-$i.log" >&2; exit 1; }
    sleep 0.2
  done
  addr=$(sed -n 's/^listening //p' "$out/node-$i.out" | head -1)
  [ -n "$addr" ] || { echo "node $i did not start" >&2; exit 1; }
  first=${first:-$addr}
  grep -o 'budget .* fits .*' "$out/node-$i.log" | head -1 | sed "s/^/node $i: /"
done
SHOAL_NO_MDNS=true timeout 1800 "$shoal" generate --bootstrap "$first" "${common[@]}" \
  > "$out/swarm.json" 2> "$out/swarm.log"
python3 - "$out/local.json" "$out/swarm.json" <<'PY'
import json, sys
local, swarm = (json.load(open(p)) for p in sys.argv[1:3])
same = local["completion_tokens"] == swarm["completion_tokens"]
route = " -> ".join(f'{r["start"]}..{r["end"]}' for r in swarm["route"])
print(f'{"same" if same else "DIFFERENT"} {len(swarm["completion_tokens"])} tokens as --local; '
      f'decode tok/s: swarm {swarm["tokens_per_second"]:.2f} ({route}), '
      f'local {local["tokens_per_second"]:.2f}')
PY
for i in 1 2; do
  p=${pids[$((i - 1))]}
  echo "node $i: peak resident $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$p/status) (budget $budget)"
done
cleanup
pids=()
# llama.cpp alone on the same file and threads (bench/llama-cpp.sh without its `shoal
# bench` half, which starts three servers beside a local copy: too much for a model
# this size on this machine), then the ratios.
llama=$(bench/llama-cpp.sh --model "$model" --tokens "$tokens" --llama-only | tail -1)
echo "$llama"
python3 - "$out/local.json" "$out/swarm.json" "$(echo "$llama" | awk '{print $2}')" <<'PY'
import json, sys
local, swarm = (json.load(open(p))["tokens_per_second"] for p in sys.argv[1:3])
ref = float(sys.argv[3])
print(f"shoal local {local / ref:.2f}x, swarm {swarm / ref:.2f}x of llama.cpp")
PY
