#!/usr/bin/env bash
# Build llama-cpp-python (the peer engine for parity tests and benchmarks) from its PyPI source,
# for portable AVX2 (the native build picks AVX-512/AMX kernels that crash on some VMs), with
# nothing that downloads. The wheel and the unpacked source (for convert_hf_to_gguf.py) are cached.
set -euo pipefail
VERSION=0.3.36
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/gemma4
SRC=$CACHE/llama_cpp_python-$VERSION
WHEELS=$CACHE/wheels-avx2
mkdir -p "$CACHE" "$WHEELS"
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
  tar -xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
if ! ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (about 6-12 minutes on 2 cores)..."
  CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip wheel -q --no-deps "$SRC" -w "$WHEELS"
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-$VERSION-*.whl
"$PYTHON" -m pip install -q -c constraints.txt "diskcache>=5.6.3" "typing-extensions>=4.5.0"
