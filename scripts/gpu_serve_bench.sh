#!/bin/bash
# s1kit serve against vllm serve on one GPU, same model files, same load, same client (benchmarks/serve_load.py),
# on the device machine (no hub, no package index): the issue's load is 256 chat requests, 64 at a time, ~320
# completion tokens each (s1kit: exactly 256 thinking tokens + at most 64 answer tokens; vLLM: 320 tokens with
# ignore_eos). The model is Qwen2.5-Coder-0.5B-Instruct's real config and tokenizer (carried in .carry/coder05)
# with random bf16 weights, written once to /root/coder05.
#
#   PARTS="tests bench s1kit vllm" bash scripts/gpu_serve_bench.sh      # any subset, in this order
#
# vllm needs vLLM staged in /root/vllm (../shared/tools/vllm-wheels, DESIGN.md section 7); the other parts need only
# the wheels in .carry/whl (fastapi, uvicorn, pydantic, math-verify, gguf), installed once into /tmp/site.
# Rows go to $OUT/serve_vs_vllm.json (and the log to $OUT/serve.log).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date +%F)"
if [ -f /root/vllm/dC/vllm-install-device ] && [ ! -f /tmp/vsite/.ok ]; then bash /root/vllm/dC/vllm-install-device; fi
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/whl/*.whl && touch /tmp/site/.ok || exit 9
fi
# vLLM's own requirements (in /tmp/vsite) go before ours so its pydantic/fastapi versions win for it.
export PYTHONPATH=$PWD/src:/tmp/vsite:/tmp/site
MODEL=/root/coder05
if [ ! -f $MODEL/model.safetensors ]; then
  python3 - <<'EOF' || exit 7
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(".carry/coder05")
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained("/root/coder05")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(".carry/coder05/" + f, "/root/coder05/")
EOF
fi
wait_up() {  # URL, pid, seconds
  for _ in $(seq "$3"); do
    curl -sf "$1" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
LOAD="--model coder --requests 256 --concurrency 64 --thinking 256 --answer 64 --json $OUT/serve_vs_vllm.json"
for part in ${PARTS:-tests bench s1kit vllm}; do
  echo "=== $part $(date +%T)"
  case $part in
    tests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider -k gpu tests/test_engine.py tests/test_engine_core.py \
        tests/test_decode_attention.py 2>&1 | tail -15 ;;
    bench)
      timeout 300 python3 -m s1kit.cli bench --arch qwen2.5-1.5b --batch 32 --forcing on,off \
        --json "$OUT/bench_b32.json" 2>&1 | tail -8 ;;
    s1kit)
      python3 -m s1kit.cli serve --model $MODEL --served-model-name coder --port 8000 --max-batch-size 64 \
        --max-model-len 2048 > "$OUT/s1kit_serve.log" 2>&1 &
      pid=$!
      if wait_up http://127.0.0.1:8000/health $pid 400; then
        timeout 300 python3 benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --label s1kit --body s1kit --device "$DEV" $LOAD
        curl -s http://127.0.0.1:8000/health; echo
      else
        echo "s1kit serve did not start"; tail -20 "$OUT/s1kit_serve.log"
      fi
      kill -INT $pid; wait $pid ;;
    vllm)
      python3 -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name coder --port 8100 \
        > "$OUT/vllm_serve.log" 2>&1 &
      pid=$!
      if wait_up http://127.0.0.1:8100/v1/models $pid 400; then
        timeout 300 python3 benchmarks/serve_load.py --url http://127.0.0.1:8100/v1 --label vllm --body plain --device "$DEV" $LOAD
      else
        echo "vllm serve did not start"; tail -20 "$OUT/vllm_serve.log"
      fi
      kill -INT $pid; wait $pid ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
