#!/usr/bin/env bash
# The GPU rows of docs/performance.md, for a GPU owner (../shared/GPU.md's recipe). Builds nothing:
# on the CPU machine run
#   cargo build --release -p chorus-cli --features cuda && strip target/release/chorus
#   mkdir -p gpu-run && cp target/release/chorus gpu-run/
# then on the GPU machine, from the checkout (it needs python3 with torch, nothing else):
#   bash benches/gpu/run.sh gpu-run [OUT]
# It times chorus (burn-cuda, f32) and the PyTorch twin (benches/twin/, eager f32, tf32 and bf16)
# on the same work in one go, cheapest chorus warm-up first, each command under a time limit so
# that one slow row can't take the others with it:
#   1. scoring at the SmolLM2-135M shape, batch 16 × 512 (random f32 weights: a GGUF is
#      dequantised to f32 on burn-cuda anyway, and the 98 MB GGUF doesn't fit in what travels to
#      a lent GPU);
#   2. a training step of one LM at the small shape (d 256 × 4, batch 32 × 512);
#   3. the same at the SmolLM2-135M shape (batch 16 × 512);
#   4. the joint ELBO at the small shape, cached and live assistants.
# Each chorus row's `warm_up_s`/`first_pass_s` is its warm-up, which holds burn-cuda's kernel
# compilation and autotuning: on a fresh H200 that took longer than 120 s (small shape) and 300 s
# (SmolLM2 shape) for a training step (docs/performance.md, "GPU"). cubecl keeps each autotune
# result (the fastest kernel for a key of operation and shapes) in target/autotune/ under the
# directory chorus runs in, one line per key as soon as it is measured; later processes with that
# cache compile only the chosen kernel. A lent GPU starts bare, so the script carries the cache
# across leases: it keeps it in OUT/autotune/ (killed commands' keys included), seeded from
# benches/gpu/autotune/, committed after an earlier run. Commit OUT/autotune/ there and the next
# lease skips what was tuned (cubecl checks each entry against the binary's candidate kernels,
# by name, and tunes again where they changed). Each entry also holds every candidate's timing.
# CHORUS_LIMIT_S (default 1200) bounds each chorus command; the twin's commands get 90 s.
# Results: OUT/gpu-bench.jsonl (one JSON line per command; a command over its limit leaves a
# `{"failed": "over its N s", ...}` line), the commands' stderr in OUT/gpu-bench.log.
set -uo pipefail
dir=${1:?usage: run.sh DIR (holding the chorus binary) [OUT]}
out=${2:-$dir}
mkdir -p "$out"
dir=$(cd "$dir" && pwd)
out=$(cd "$out" && pwd)
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
here=$(cd "$(dirname "$0")/../.." && pwd)
chorus="$dir/chorus"
# cubecl's autotune cache is target/autotune/ beside the Cargo.toml above the working directory;
# here it is a link into OUT, so each result lands there as it is measured, whatever stops the run.
cd "$here"
mkdir -p "$out/autotune" target
for seed in target/autotune benches/gpu/autotune; do
  [ -d "$seed" ] && cp -rn "$seed/." "$out/autotune/"
done
rm -rf target/autotune
ln -s "$out/autotune" target/autotune
twin="python3 $here/benches/twin/train_step.py --device cuda"
score="python3 $here/benches/twin/score.py"
log="$out/gpu-bench.jsonl"
err="$out/gpu-bench.log"
: > "$log"
: > "$err"
started=$(date +%s)

# run LIMIT_S CMD...: one JSON line into $log, stderr into $err.
run() {
  local limit=$1
  shift
  echo "# +$(($(date +%s) - started))s: $*" | tee -a "$err" >&2
  local line
  line=$(timeout "$limit" "$@" 2>>"$err" | tail -n 1)
  local rc=$?
  if [ $rc -ne 0 ] || [ -z "$line" ]; then
    local why="exit $rc"
    [ $rc -eq 124 ] && why="over its ${limit} s"
    line="{\"failed\": \"$why\", \"command\": \"$*\"}"
  fi
  echo "$line" | tee -a "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
  | tee -a "$err"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee -a "$err"

limit=${CHORUS_LIMIT_S:-1200}
big="--shape smollm2 --batch 16 --seq 512"
small="--shape small --batch 32 --seq 512"

run "$limit" "$chorus" --device cuda bench-score $big --repeats 10
for dtype in bf16 f32; do
  run 90 $score smollm2 --peer torch --device cuda --dtype $dtype --batch 16 --seq 512 --repeats 10
done

run "$limit" "$chorus" --device cuda bench-step $small --steps 10
for dtype in bf16 f32; do run 90 $twin $small --steps 10 --dtype $dtype; done

run "$limit" "$chorus" --device cuda bench-step $big --steps 10
for dtype in bf16 f32 tf32; do run 90 $twin $big --steps 10 --dtype $dtype; done

for joint in cached live; do
  run "$limit" "$chorus" --device cuda bench-step $small --joint $joint --steps 10
  for dtype in bf16 f32; do run 90 $twin $small --joint $joint --steps 10 --dtype $dtype; done
done
echo "# done after $(($(date +%s) - started))s; results: $log" | tee -a "$err" >&2
