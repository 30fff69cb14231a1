"""llama.cpp's greedy choices along a given continuation (through llama-cpp-python):
the independent reference Shoal's model code is checked against.

    python3 llama_cpp_greedy.py MODEL.gguf PROMPT [IDS] [--threads N]

PROMPT is tokenized by llama.cpp (with BOS when the file asks for it); IDS is a
comma-separated continuation (say, the tokens Shoal chose). llama.cpp evaluates prompt
and continuation in one pass and, for every continuation position, reports the token it
would choose there greedily and its top-2 logit gap. Prints one JSON object:
`prompt_ids`, `choices`, `gaps`.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    args = sys.argv[1:]
    threads = 2
    if "--threads" in args:
        at = args.index("--threads")
        threads = int(args[at + 1])
        del args[at:at + 2]
    path, prompt = args[0], args[1]
    continuation = [int(t) for t in args[2].split(",") if t] if len(args) > 2 else []
    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                n_batch=1024, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    llm.eval(ids + continuation)
    choices, gaps = [], []
    for i in range(len(continuation)):
        logits = np.array(llm.scores[len(ids) - 1 + i], dtype=np.float64)
        order = np.argsort(-logits, kind="stable")
        choices.append(int(order[0]))
        gaps.append(float(logits[order[0]] - logits[order[1]]))
    print(json.dumps({"prompt_ids": list(map(int, ids)), "choices": choices, "gaps": gaps}))


if __name__ == "__main__":
    main()
