#!/usr/bin/env bash
# Weights from the swarm, on loopback: a node with no model file fetching a 10-block span
# of a Llama-3-8B-shaped Q4_0 model from 1 and from 3 seeders, against copying the file
# locally, and the time from `shoal serve` to its `listening` line for such a node.
#
#   bench/weights.sh [--work DIR] [--blocks N] [--share-mbps M]
#
# The model (make-model, 12 blocks by default: ~2 GB) is written once into the work
# directory (default: $SHOAL_CACHE_DIR/bench-weights or ~/.cache/shoal/bench-weights) and
# kept. Seeders serve one block each and share the whole file with --share-mbps (default
# 0: no limit, so the link and the checks are what is measured). Every node stops by
# itself: each is started under `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

work="${SHOAL_CACHE_DIR:-$HOME/.cache/shoal}/bench-weights"
blocks=12
share=0
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --blocks) blocks="$2"; shift 2 ;;
    --share-mbps) share="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$work"
cargo build --release --quiet --bin shoal
shoal=target/release/shoal
model="$work/llama3-8b-q4_0-$blocks.gguf"
if [ ! -f "$model" ]; then
  echo "writing $model (make-model, $blocks blocks)..." >&2
  "$shoal" make-model --shape llama3-8b --dtype q4_0 --blocks "$blocks" --out "$model" >&2
fi
span_end=$(( blocks < 11 ? blocks : 11 ))
span="1..$span_end"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Starts a node (arguments after the log file), waits for its `listening` line, prints
# its address; its start time in ms goes to $log.start.
start_node() {
  local log="$1"; shift
  date +%s%3N > "$log.start"
  RUST_LOG=info timeout 600 "$shoal" serve --no-mdns --listen /ip4/127.0.0.1/tcp/0 "$@" \
    > "$log.out" 2> "$log" &
  pids+=($!)
  for _ in $(seq 1 1200); do
    if grep -q '^listening' "$log.out" 2>/dev/null; then
      date +%s%3N > "$log.up"
      awk '/^listening/{print $2; exit}' "$log.out"
      return 0
    fi
    sleep 0.1
  done
  echo "a node did not start; its log:" >&2; cat "$log" >&2; return 1
}

# Copying the file locally: the baseline (from the page cache, as the seeders read it).
cat "$model" > /dev/null
t0=$(date +%s%3N); cp "$model" "$work/copy.gguf"; sync "$work/copy.gguf"; t1=$(date +%s%3N)
size=$(stat -c %s "$model"); rm -f "$work/copy.gguf"
copy_mib_s=$(python3 -c "print(f'{$size / 2**20 / (($t1 - $t0) / 1000):.0f}')")
echo "copying the whole file ($((size >> 20)) MiB) locally: $((t1 - t0)) ms, $copy_mib_s MiB/s"

seed1=$(start_node "$work/seed1.log" --model "$model" --blocks 0..1 --share-mbps "$share")
for n in 1 3; do
  if [ "$n" = 3 ] && [ "${#pids[@]}" -lt 3 ]; then
    start_node "$work/seed2.log" --model "$model" --blocks 0..1 --share-mbps "$share" \
      --bootstrap "$seed1" > /dev/null
    start_node "$work/seed3.log" --model "$model" --blocks 0..1 --share-mbps "$share" \
      --bootstrap "$seed1" > /dev/null
  fi
  cache="$work/fileless-$n"; rm -rf "$cache"
  log="$work/fileless-$n.log"
  start_node "$log" --blocks "$span" --bootstrap "$seed1" --cache-dir "$cache" > /dev/null
  up_ms=$(( $(cat "$log.up") - $(cat "$log.start") ))
  fetched=$(grep -o 'fetched blocks-[^:]*: [0-9]* MiB in [0-9.]*s ([0-9.]* MiB/s) from [0-9]* peers' "$log" | sed 's/.*: //')
  echo "span $span from $n seeder(s): $fetched; serve to listening: $up_ms ms"
  kill "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
done
