#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server) from the source build_llama_cpp.sh unpacked, with
# the same portable AVX2 flags and nothing downloaded (no web UI, no TLS), for the serving benchmark
# (benchmarks/serve.py). The binary is cached: $CACHE/llama-server.
set -euo pipefail
VERSION=0.3.36
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/gemma4
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
[ -f "$SRC/CMakeLists.txt" ] || { echo "run scripts/build_llama_cpp.sh first (it unpacks the source)"; exit 1; }
if [ ! -x "$CACHE/llama-server" ]; then
  echo "building llama-server (about 10 minutes on 2 cores)..."
  cmake -S "$SRC" -B "$CACHE/llama-server-build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
    -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >/dev/null
  cmake --build "$CACHE/llama-server-build" --target llama-server -j "$(nproc)" >/dev/null
  cp "$CACHE/llama-server-build/bin/llama-server" "$CACHE/llama-server"
fi
echo "$CACHE/llama-server"
