"""``s1kit bench``: decode speed of the fast path against the memory-bandwidth floor and ``model.generate``.

A step's floor is the bytes it must read (every parameter once, plus the K/V of the tokens each row attends
to) over the device-to-device copy bandwidth measured here. Random-weight models of real architectures cost
what trained ones cost, so ``--arch`` needs no download; budget forcing runs with min = max = new tokens, so
every row decodes exactly that many thinking tokens whatever the weights propose.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .budget import BudgetPolicy, ForcingTokens

# Public Qwen2.5 / SmolLM2 configurations (from their config.json files on the Hugging Face hub).
ARCHS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass
class BenchResult:
    """One (model, batch, forcing) measurement; the JSON rows of ``s1kit bench``."""

    arch: str
    batch: int
    forcing: bool
    prompt_len: int
    new_tokens: int
    ms_per_step: float
    tokens_per_s: float
    floor_ms: float
    ratio_to_floor: float
    bandwidth_gbs: float
    hf_generate_dynamic_ms: float | None
    hf_generate_static_ms: float | None
    device: str
    dtype: str


def random_model(arch: str, device: str, dtype: torch.dtype) -> Any:
    """A randomly initialised model of a built-in architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the best of ``reps``."""
    n = mib * 1024 * 1024 // 4
    if device.type != "cuda":
        n //= 16  # a CPU copy is slow; a smaller buffer still leaves the caches
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def floor_ms(model: Any, batch: int, prompt_len: int, new_tokens: int, bandwidth: float) -> float:
    """Bytes a decode step must read (parameters + mean K/V in use) over the bandwidth, in ms."""
    from .engines.fast import _model_dims

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    layers, kv, head_dim, _ = _model_dims(model)
    elt = next(model.parameters()).element_size()
    kv_per_token = 2 * layers * kv * head_dim * elt
    mean_ctx = prompt_len + new_tokens / 2
    return (params + batch * mean_ctx * kv_per_token) / bandwidth * 1e3


def synthetic_tokens(vocab: int) -> ForcingTokens:
    """Forcing ids for a model without a tokenizer: stops, opener, prefix and Wait as fixed ids."""
    top = vocab - 1
    return ForcingTokens(stop_ids=frozenset({top}), end_ids=frozenset({top - 1}), opener_ids=(top - 2, 10, 11),
                         newline_ids=(12,), prefix_ids=(13, 14), wait_ids=((15,),), ends_with_newline=lambda t: False)


_DECODERS: dict[int, Any] = {}


def bench_fast(model: Any, batch: int, prompt_len: int, new_tokens: int, forcing: bool, seed: int = 0) -> float:
    """ms per decode step of the fast path for ``batch`` rows of ``new_tokens`` thinking tokens."""
    from .engines.core import token_rows
    from .engines.fast import FastDecoder, _model_dims

    vocab = _model_dims(model)[3]
    dec = _DECODERS.get(id(model))
    if dec is None:  # one decoder per model: its compiled forward is reused across batch sizes
        dec = _DECODERS[id(model)] = FastDecoder(model, None, pad_id=0, seed=seed)
    dec.slots = batch
    dec.forcing = forcing
    tokens = synthetic_tokens(vocab)
    policy = BudgetPolicy(min_thinking_tokens=new_tokens, max_thinking_tokens=new_tokens, max_answer_tokens=1)
    g = torch.Generator().manual_seed(seed)

    def rows() -> list:
        return token_rows(torch.randint(100, vocab - 100, (batch, prompt_len), generator=g).tolist(), policy, tokens)

    dec.run(rows())  # warm-up: allocation and graph capture
    dec.reset_stats()
    dec.run(rows())
    return dec.stats["decode_s"] / dec.stats["steps"] * 1e3


def bench_generate(model: Any, batch: int, prompt_len: int, new_tokens: int, cache: str) -> float:
    """ms per new token of ``model.generate`` (greedy, exactly ``new_tokens``) with a dynamic or static cache."""
    from transformers import GenerationConfig

    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (batch, prompt_len), device=model.device)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                           eos_token_id=None, cache_implementation="static" if cache == "static" else None)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)  # warm-up
        sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        sync()
    return (time.perf_counter() - t) / new_tokens * 1e3


def run_bench(arch: str | None, model_ref: str | None, batches: list[int], prompt_len: int, new_tokens: int,
              forcing: list[bool], compare_hf: bool, device: str | None, dtype: str | None,
              log=print) -> list[BenchResult]:
    """Measure every (batch, forcing) combination; one model load."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    if model_ref:
        from .models import load_model

        model, _ = load_model(model_ref, device=dev, dtype=dt)
        name = model_ref
    else:
        model = random_model(arch or "qwen2.5-1.5b", dev, dt)
        name = arch or "qwen2.5-1.5b"
    bw = copy_bandwidth(model.device)
    label = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    out = []
    for b in batches:
        fl = floor_ms(model, b, prompt_len, new_tokens, bw)
        dyn = stat = None
        if compare_hf:
            dyn = bench_generate(model, b, prompt_len, new_tokens, "dynamic")
            stat = bench_generate(model, b, prompt_len, new_tokens, "static")
        for f in forcing:
            ms = bench_fast(model, b, prompt_len, new_tokens, f)
            r = BenchResult(name, b, f, prompt_len, new_tokens, ms, b / ms * 1e3, fl, ms / fl, bw / 1e9, dyn, stat,
                            label, str(dt).removeprefix("torch."))
            log(r)
            out.append(r)
    return out


def write_json(results: list[BenchResult], path: str) -> None:
    """Save results as a JSON list."""
    with open(path, "w") as f:
        json.dump([asdict(r) for r in results], f, indent=2)
