#!/usr/bin/env bash
# Builds shoal with CUDA (`--features cuda`) on an ordinary Linux machine that has no
# CUDA toolkit: NVIDIA's compiler, headers and runtime come from PyPI into the cache.
# Every package is pinned to one release: left alone, pip pulls the newest nvidia-nvvm,
# whose PTX the pinned ptxas refuses ("Unsupported .version 9.5").
#
#   bench/build-cuda.sh [COMPUTE_CAP]      # default 90 (H100); 89 = RTX 40xx, 86 = RTX 30xx
#
# Needs Python's pip, gcc and a driver that runs CUDA 13.0 code (driver >= 580) on the
# machine that will run the binary; the build machine needs no GPU. The binary loads
# libcuda, cuBLAS and friends at run time (set LD_LIBRARY_PATH where they live, e.g. a
# Python environment's nvidia/*/lib). SHOAL_CUDA_VERSION picks another 13.x release;
# CARGO_TARGET_DIR keeps the CUDA build apart from the CPU one (default target/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

cap=${1:-${CUDA_COMPUTE_CAP:-90}}
version=${SHOAL_CUDA_VERSION:-13.0}
cache=${SHOAL_CACHE_DIR:-$HOME/.cache/shoal}/cuda-$version
root=$cache/nvidia/cu13
if [ ! -x "$root/bin/nvcc" ]; then
  echo "installing NVIDIA's CUDA $version compiler and headers from PyPI into $cache ..." >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$cache" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-runtime==$version.*" \
    "nvidia-cuda-crt==$version.*" "nvidia-cuda-cccl==$version.*" "nvidia-nvvm==$version.*"
fi
"$root/bin/nvcc" --version | tail -1 >&2

# candle links CUDA's libraries dynamically, so the link needs them: cuBLAS, cuRAND and
# NVRTC from PyPI (the runtime came with the compiler), and libcuda, the driver's own
# library, which no package carries: the link uses a stub that only declares its
# functions (as the toolkit's stubs/libcuda.so does); at run time the driver's real
# libcuda.so.1 is loaded in its place.
if [ ! -e "$root/lib/libcuda.so" ]; then
  echo "installing cuBLAS, cuRAND and NVRTC $version from PyPI for the link ..." >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$cache/link-libs" \
    "nvidia-cublas==$version.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==$version.*"
  for lib in cublas cublasLt curand nvrtc; do
    found=$(find "$cache/link-libs" -name "lib$lib.so.*" | sort | head -1)
    ln -sf "$found" "$root/lib/lib$lib.so"
  done
  ln -sf "$root/lib/libcudart.so.13" "$root/lib/libcudart.so"
  cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -mindepth 1 -type d | head -1)
  cudarc=$(ls -d "$cudarc"/cudarc-0.19.* | tail -1)
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" |
    sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$cache/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$cache/libcuda-stub.c"
fi

export PATH="$root/bin:$PATH"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
export CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$root/lib:${LIBRARY_PATH:-}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features cuda --bin shoal
echo "built $CARGO_TARGET_DIR/release/shoal with CUDA $version for compute capability $cap" >&2
