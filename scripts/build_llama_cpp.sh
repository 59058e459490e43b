#!/usr/bin/env bash
# Build (once) a CPU-only llama-cpp-python wheel from source into a cache outside the clone, then
# install it into the given python (default: python3). The GGUF export tests run exported files in
# it; the build takes minutes on 2 cores, so it is cached across CI runs and sessions.
# Usage: scripts/build_llama_cpp.sh [/path/to/python]
set -euo pipefail
PY=${1:-python3}
VERSION=0.3.36
CACHE=${FLEXTRON_WHEEL_CACHE:-$HOME/.cache/megatron_flextron/wheels}
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION (CPU only, 2 jobs) into $CACHE ..." >&2
  tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # Portable CPU build: no GPU backends, no OpenMP, no -march=native (the cache may outlive the CPU).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps "llama-cpp-python==$VERSION" -w "$tmp" >&2
  built=$(ls "$tmp"/llama_cpp_python-"$VERSION"-*.whl)
  mv "$built" "$CACHE/"  # same filesystem: the cached wheel appears whole or not at all
  wheel="$CACHE/$(basename "$built")"
fi
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$wheel" >&2
# Runtime dependencies of llama_cpp (numpy is already pinned by requirements.txt).
"$PY" -m pip install -q --disable-pip-version-check "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3" >&2
