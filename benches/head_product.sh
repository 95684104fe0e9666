#!/bin/sh
# Builds and runs head_product.c against the ggml that `cargo build` built (its sapphirerapids module:
# the one with the AMX buffer type), 2 threads. Arguments as head_product.c's; default Gemma 3 270M's head.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
module=$(ls "$target"/debug/build/llama-cpp-sys-2-*/out/build/bin/libggml-cpu-sapphirerapids.so | head -1)
include=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp/ggml/include | head -1)
out=$(mktemp -d)
cc -O2 -I"$include" "$root/benches/head_product.c" -o "$out/head_product" -L"$(dirname "$module")" -l:libggml-cpu-sapphirerapids.so -lggml-base -Wl,-rpath,"$(dirname "$module")"
"$out/head_product" ${1:-640} ${2:-262144} ${3:-1} ${4:-8} ${5:-20}
rm -rf "$out"
