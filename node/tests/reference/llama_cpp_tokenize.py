"""llama.cpp's tokenization (through llama-cpp-python): the reference Shoal's
tokenizers are checked against.

    python3 llama_cpp_tokenize.py MODEL.gguf < texts.json

Reads a JSON list of strings on stdin; prints a JSON list of token id lists, each as
llama.cpp tokenizes a prompt (BOS when the file asks for it, special tokens not parsed).
Only the vocabulary is loaded.
"""
import json
import sys

from llama_cpp import Llama


def main() -> None:
    llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    texts = json.load(sys.stdin)
    out = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts]
    print(json.dumps([list(map(int, ids)) for ids in out]))


if __name__ == "__main__":
    main()
