#!/usr/bin/env bash
# One command: peak memory of `chorus eval --text-file` on a 290 kB and a 1 MB plain-text file (the
# newest State of the Union addresses of the corpus cache, joined), with chorus's allocator
# settings and with glibc's defaults. A streamed evaluation's peak must not grow with the file.
#
#   scripts/eval_text_file_memory.sh                      # the report's base and VAE (cargo xtask report)
#   scripts/eval_text_file_memory.sh --model lm=PATH …    # any --model / --device arguments
#
# Needs: the corpora (`chorus data fetch`), a chorus binary ($CHORUS, default the LibTorch build of
# `cargo xtask setup-torch`), GNU time (/usr/bin/time). Writes out/text-file-memory/.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CHORUS_CACHE:-$HOME/.cache/chorus}"
chorus="${CHORUS:-target/tch/debug/chorus}"
out=out/text-file-memory
mkdir -p "$out"
if [ $# -eq 0 ]; then
  set -- --model base=out/report/base/lm --model VAE=out/report/runs/vae/seed-0/checkpoints/best \
    --iw-samples 2 --device tch --set data.batch_size=16 --set data.max_seq_len=128
fi
python3 - "$cache/corpora/sotu/package/data" "$out" <<'PY'
import glob, sys
data, out = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(data + "/*.txt"), reverse=True)  # newest first
for target, name in [(250_000, "sotu-290k.txt"), (1_000_000, "sotu-1m.txt")]:
    texts, size = [], 0
    for f in files:
        texts.append(open(f, encoding="utf-8", errors="replace").read())
        size += len(texts[-1].encode())
        if size >= target:
            break
    open(f"{out}/{name}", "w").write("\n\n".join(texts))
PY
echo "| file | bytes | passages | allocator | wall | peak RSS |"
echo "|---|---|---|---|---|---|"
for allocator in chorus glibc; do
  for f in sotu-290k sotu-1m; do
    env=()
    [ "$allocator" = glibc ] && env=(MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072)
    env "${env[@]}" /usr/bin/time -f "%e %M" -o "$out/$f-$allocator.time" \
      "$chorus" eval --text-file "$out/$f.txt" --json "$out/$f-$allocator.json" "$@" \
      > "$out/$f-$allocator.out" 2> "$out/$f-$allocator.err"
    read -r wall rss < "$out/$f-$allocator.time"
    passages=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['rows'][0]['examples'])" "$out/$f-$allocator.json")
    echo "| $f.txt | $(stat -c %s "$out/$f.txt") | $passages | $allocator | ${wall} s | $((rss / 1024)) MB |"
  done
done
