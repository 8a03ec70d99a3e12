#!/bin/bash
# s1kit serve against vllm serve, and s1kit's vLLM processor, on one GPU of the device machine (no hub, no package
# index), same model files, same load, same client (benchmarks/serve_load.py, benchmarks/remote_vllm.py).
#
#   PARTS="vllm" bash scripts/gpu_serve_bench.sh        # then, in the next call on the same machine:
#   PARTS="s1kit bench tests" bash scripts/gpu_serve_bench.sh
#
# - vLLM 0.26.0 staged in /root/vllm (../shared/tools/vllm-wheels; DESIGN.md section 7) is installed once.
# - The model: the real Qwen2.5-Coder-0.5B-Instruct when its GGUF chunks were staged in /root/stage (stage-chunks),
#   converted once by s1kit; otherwise its real config and tokenizer (.carry/coder05) with random bf16 weights.
# - .carry/whl holds what the image lacks for s1kit (fastapi with opentelemetry-api and annotated-doc, uvicorn,
#   pydantic, math-verify, gguf; without vLLM staged, nothing else brings opentelemetry-api).
# - vllm: two servers (without and with s1kit's processor, 0.4 of the GPU each, started one after the other);
#   the serving load (256 chat requests, 64 at a time: vLLM 320 tokens with ignore_eos) against the plain one,
#   then remote_vllm.py (exactness, equality with the loop, streaming, throughput) against both.
# - s1kit: s1kit serve (fast path, 64 slots) with the same model and the same load (exactly 256 thinking tokens
#   + at most 64 answer tokens).
# Rows: $OUT/serve_vs_vllm.json, $OUT/remote_vllm.json, $OUT/bench_b32.json; logs in $OUT.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false S1KIT_CACHE=/root/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date +%F)"
if [ -f /root/vllm/dC/vllm-install-device ] && [ ! -f /tmp/vsite/.ok ]; then bash /root/vllm/dC/vllm-install-device; fi
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/whl/*.whl && touch /tmp/site/.ok || exit 9
fi
# vLLM's own requirements (in /tmp/vsite) go before ours so its pydantic/fastapi versions win for it.
export PYTHONPATH=$PWD/src:/tmp/vsite:/tmp/site
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  # qwen2.5-coder-0.5b (models.py)
if [ ! -f /root/model.path ]; then
  if ls /root/stage/part.* >/dev/null 2>&1; then
    cat /root/stage/part.* > /root/stage/q05.gguf && rm /root/stage/part.*
    echo "$SHA  /root/stage/q05.gguf" | sha256sum -c || exit 8
  fi
  if [ -f /root/stage/q05.gguf ]; then
    python3 -c "from s1kit.models import resolve; print(resolve('/root/stage/q05.gguf'))" | tail -1 > /root/model.path
  else
    python3 - <<'EOF' || exit 7
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".carry/coder05"), dtype=torch.bfloat16)
m.save_pretrained("/root/coder05")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(".carry/coder05/" + f, "/root/coder05/")
EOF
    echo /root/coder05 > /root/model.path
  fi
fi
MODEL=$(cat /root/model.path)
echo "model: $MODEL"
wait_up() {  # URL, pid, seconds
  for _ in $(seq "$3"); do
    curl -sf "$1" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
LOAD="--model m --requests 256 --concurrency 64 --thinking 256 --answer 64 --json $OUT/serve_vs_vllm.json"
for part in ${PARTS:-vllm}; do
  echo "=== $part $(date +%T)"
  case $part in
    vllm)
      # One after the other: started together, the second server's memory profile (H200, 2026-12-02) saw the
      # first one's allocations and found no room for its KV cache ("No available memory for the cache blocks").
      S="python3 -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name m --max-model-len 4096 \
         --generation-config vllm --gpu-memory-utilization 0.4"
      VLLM_CACHE_ROOT=/root/vc2 $S --port 8001 > "$OUT/vllm_plain.log" 2>&1 &
      p2=$!
      wait_up http://127.0.0.1:8001/v1/models $p2 420
      VLLM_CACHE_ROOT=/root/vc1 $S --port 8000 --logits-processors s1kit.integrations.vllm:S1BudgetLogitsProcessor \
        > "$OUT/vllm_plugin.log" 2>&1 &
      p1=$!
      if kill -0 $p2 2>/dev/null && wait_up http://127.0.0.1:8000/v1/models $p1 420; then
        echo "=== vllm up $(date +%T)"
        timeout 240 python3 benchmarks/serve_load.py --url http://127.0.0.1:8001/v1 --label vllm --body plain \
          --device "$DEV" $LOAD
        echo "=== remote_vllm $(date +%T)"
        timeout 420 python3 benchmarks/remote_vllm.py --plugin-url http://127.0.0.1:8000/v1 \
          --plain-url http://127.0.0.1:8001/v1 --tokenizer "$MODEL" --loop-before .bench/remote_a765aa6.py \
          --device "$DEV" --json "$OUT/remote_vllm.json" 2>&1 | tail -40
      else
        echo "vllm did not start"; tail -30 "$OUT/vllm_plain.log"; tail -30 "$OUT/vllm_plugin.log"
      fi
      kill -INT $p1 $p2; wait $p1 $p2 ;;
    s1kit)
      python3 -m s1kit.cli serve --model "$MODEL" --served-model-name m --port 8000 --max-batch-size 64 \
        --max-model-len 4096 > "$OUT/s1kit_serve.log" 2>&1 &
      pid=$!
      if wait_up http://127.0.0.1:8000/health $pid 400; then
        echo "=== s1kit up $(date +%T)"
        timeout 240 python3 benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --label s1kit --body s1kit \
          --device "$DEV" $LOAD
        curl -s http://127.0.0.1:8000/health; echo
      else
        echo "s1kit serve did not start"; tail -20 "$OUT/s1kit_serve.log"
      fi
      kill -INT $pid; wait $pid ;;
    bench)
      timeout 300 python3 -m s1kit.cli bench --arch qwen2.5-1.5b --batch 32 --forcing on,off \
        --json "$OUT/bench_b32.json" 2>&1 | tail -8 ;;
    tests)
      S1KIT_GPU_TEST_MODEL="$MODEL" timeout 400 python3 -m pytest -q -p no:cacheprovider -k gpu tests/test_engine.py \
        tests/test_engine_core.py tests/test_decode_attention.py 2>&1 | tail -15 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
