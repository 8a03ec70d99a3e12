#!/bin/bash
# The GPU-only tests and the decode benchmark, in one call on the device machine (CI has no GPU).
#
#   bash scripts/gpu_tests.sh            # carry: .whl (gguf, math-verify and theirs), .gpucheck (a model dir)
#
# - The image lacks gguf and math-verify: their wheels ($WHEELS, default .whl) go to /tmp/site.
# - The sampling-in-CUDA-graphs test needs a model with a tokenizer, and the image has no PyPI model packages:
#   GPU_TEST_MODEL names a local directory (default .gpucheck/tiny-smollm2-tokenizer: SmolLM2's tokenizer on a small
#   random Llama, made once here with transformers' save_pretrained).
# - Then the decode benchmark of `s1kit bench --arch qwen2.5-1.5b --batch 32 --forcing on` (random weights: no
#   staging); results under $OUT.
set -u
export PYTHONUNBUFFERED=1 S1KIT_CACHE=/root/cache TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && touch /tmp/site/.ok || exit 9
fi
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
S1KIT_GPU_TEST_MODEL=${GPU_TEST_MODEL:-$PWD/.gpucheck/tiny-smollm2-tokenizer} timeout 300 python3 -m pytest -q \
  -p no:cacheprovider -k gpu tests/test_engine.py tests/test_engine_core.py tests/test_decode_attention.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# what `s1kit bench --arch qwen2.5-1.5b --batch 32 --forcing on` runs, without the CLI's imports
timeout 240 python3 -c "from s1kit.bench import run_bench, write_json
write_json(run_bench('qwen2.5-1.5b', None, [32], 128, 512, [True], False, None, None), '$OUT/bench.json')" 2>&1 \
  | tee "$OUT/bench.log" | tail -25
