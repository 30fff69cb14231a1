#!/usr/bin/env bash
# The GPU checks (README "GPUs"), in one run on a machine with an NVIDIA GPU:
#
#   SHOAL=target/cuda/release/shoal MODEL=SmolLM2-135M-Instruct.Q4_1.gguf bench/gpu-check.sh
#
# 1. Same answers: the default model's greedy tokens for 3 prompts from a 3-node
#    loopback swarm with every node on the GPU, against `generate --local` on the CPU;
#    the first divergence, if any, is printed with both sides' tokens.
# 2. Speed: a random Llama-3-8B-shaped Q4_0 model (`shoal make-model`): `shoal bench`
#    with 1 node and with 3 nodes on the GPU; each prints the GPU's measured read
#    bandwidth, the bound it sets (block bytes per token), and decode tok/s against it.
#
# DEVICE=cpu runs the same on the CPU (to check this script anywhere); BLOCKS=N makes
# the 8B-shaped model N blocks long instead of 32; CHECKS=speed or CHECKS=tokens runs
# one part; DONOR=FILE takes the 8B model's tokenizer from another GGUF of the default
# model's vocabulary (e.g. a 1-block `make-model --shape smollm2-135m`, small enough to
# carry where the default model is not). Where PyTorch is installed, its reading of the
# GPU's bandwidth is printed beside ours, as a second opinion on the bound. Results go
# to $OUT (default /tmp/gpu-check). Bounded: every step has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
shoal=${SHOAL:-target/cuda/release/shoal}
checks=${CHECKS:-tokens,speed}
device=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

if [[ $checks == *tokens* ]]; then
model=${MODEL:?set MODEL to the default model GGUF (SmolLM2-135M-Instruct Q4_1)}
echo "== 1. greedy tokens: 3 nodes on $device vs one CPU process" >&2
first=""
for blocks in 0..10 10..20 20..30; do
  log="$out/serve-$blocks.log"
  "$shoal" serve --model "$model" --blocks "$blocks" --device "$device" \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 ${first:+--bootstrap "$first"} \
    > "$out/serve-$blocks.out" 2> "$log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q '^listening ' "$out/serve-$blocks.out" 2>/dev/null && break
    sleep 0.2
  done
  addr=$(sed -n 's/^listening //p' "$out/serve-$blocks.out" | head -1)
  [ -n "$addr" ] || { echo "server $blocks did not start:" >&2; cat "$log" >&2; exit 1; }
  first=${first:-$addr}
  grep -m1 "blocks run on" "$log" >&2 || true
done
prompts=("What is the capital of France? Answer in one sentence."
         "Write a haiku about the sea."
         "Explain photosynthesis to a child.")
for i in 0 1 2; do
  common=(--model "$model" --chat --prompt "${prompts[$i]}" --max-tokens 64 --json --top-logits 3)
  timeout 300 "$shoal" generate --local "${common[@]}" > "$out/cpu-$i.json"
  timeout 300 "$shoal" generate --bootstrap "$first" "${common[@]}" > "$out/swarm-$i.json" 2> "$out/swarm-$i.log"
  python3 - "$out/cpu-$i.json" "$out/swarm-$i.json" "${prompts[$i]}" <<'PY'
import json, sys
cpu, swarm = (json.load(open(p)) for p in sys.argv[1:3])
a, b = cpu["completion_tokens"], swarm["completion_tokens"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
if same is None and len(a) == len(b):
    print(f"same {len(a)} tokens: {sys.argv[3]!r}")
else:
    at = same if same is not None else min(len(a), len(b))
    print(f"DIVERGE at token {at} of {sys.argv[3]!r}: cpu {a[at:at+5]} swarm {b[at:at+5]}")
    # The three highest logits before the diverging choice, each side: a near tie
    # flipped by rounding shows as two candidates within a few hundredths.
    for name, side in (("cpu", cpu), ("swarm", swarm)):
        top = side["top_logits"][at]
        print(f"  {name} top logits: " + ", ".join(f"{t}: {l:.4f}" for t, l in top))
    print(f"  cpu:   {cpu['text']!r}\n  swarm: {swarm['text']!r}")
PY
done
cleanup
pids=()
fi
[[ $checks == *speed* ]] || exit 0

echo "== 2. speed of a Llama-3-8B-shaped Q4_0 model on $device" >&2
l8="$out/llama3-8b-q4_0.gguf"
[ -e "$l8" ] || timeout 900 "$shoal" make-model --shape llama3-8b --format gguf-q4_0 \
  ${BLOCKS:+--blocks "$BLOCKS"} --out "$l8" --tokenizer-from "${DONOR:-${MODEL:?set MODEL or DONOR}}"
if [ "$device" = cuda ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  python3 - <<'PY' | tee "$out/torch-bandwidth.txt"
import torch, time
x = torch.ones(1 << 28, device="cuda")  # 1 GiB of f32
best = 0.0
for _ in range(5):
    torch.cuda.synchronize(); t = time.perf_counter(); x.sum(); torch.cuda.synchronize()
    best = max(best, x.numel() * 4 / (time.perf_counter() - t))
print(f"PyTorch reads {best / 1e9:.1f} GB/s (sum of 1 GiB, best of 5)")
PY
fi
for nodes in 1 3; do
  timeout 900 "$shoal" bench --model "$l8" --device "$device" --nodes "$nodes" \
    --tokens 64 --repeats 2 --sessions 1 2>&1 | grep -v '^route \|^server ' | tee "$out/bench-$nodes.txt"
done
echo "results in $out" >&2
