"""llama.cpp's quantiser (through llama-cpp-python): writes OUT from IN (an F32 or F16
GGUF; with --requantize, an already quantised one, such as the default model) in one
of its file types, with its own per-tensor choices.

    python3 llama_cpp_quantize.py IN.gguf OUT.gguf TYPE [--requantize]

TYPE: q4_k_m, q5_k_m, q6_k, iq4_xs, iq4_nl, q4_0, q5_0, q5_1, q8_0, mxfp4_moe.
"""
import ctypes
import sys

import llama_cpp

TYPES = {
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "iq4_xs": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "iq4_nl": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "mxfp4_moe": llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
}


def main() -> None:
    src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[kind]
    params.nthread = 2
    params.allow_requantize = "--requantize" in sys.argv[4:]
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":
    main()
