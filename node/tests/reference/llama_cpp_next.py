"""llama.cpp's greedy next token after each of several prompts given as token ids
(through llama-cpp-python).

    python3 llama_cpp_next.py MODEL.gguf < prompts.json

Reads a JSON list of token id lists on stdin; prints a JSON object with `choices` (the
token llama.cpp would choose after each) and `gaps` (its top-2 logit gap there).
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, n_threads_batch=2,
                logits_all=True, verbose=False)
    choices, gaps = [], []
    for ids in json.load(sys.stdin):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        order = np.argsort(-logits, kind="stable")
        choices.append(int(order[0]))
        gaps.append(float(logits[order[0]] - logits[order[1]]))
    print(json.dumps({"choices": choices, "gaps": gaps}))


if __name__ == "__main__":
    main()
