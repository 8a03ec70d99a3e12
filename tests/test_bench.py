"""``s1kit bench`` on the CPU: a random-weight SmolLM2-135M architecture through the fast path, eagerly.

Speed is not asserted (performance lives in BENCHMARKS.md); the test checks that the command measures, writes
every documented field, that forcing on really forces, and that bad options give one clear error.
"""

import json

import pytest
import torch

from s1kit.bench import random_model
from test_cli import s1kit

FIELDS = {"arch", "batch", "forcing", "ms_per_step", "floor_ms", "ratio_to_floor", "hf_generate_static_ms",
          "hf_generate_dynamic_ms", "device", "tokens_per_s"}


def test_bench_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    r = s1kit("bench", "--arch", "smollm2-135m", "--batch", "2", "--prompt-len", "8", "--new-tokens", "6",
              "--device", "cpu", "--compare-hf-generate", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(x["batch"], x["forcing"]) for x in rows] == [(2, True), (2, False)]
    for x in rows:
        assert FIELDS <= x.keys() and x["device"] == "cpu"
        assert x["ms_per_step"] > 0 and x["floor_ms"] > 0 and x["hf_generate_static_ms"] > 0
        assert x["ratio_to_floor"] == pytest.approx(x["ms_per_step"] / x["floor_ms"])


def test_fast_path_forces_exact_budgets_on_token_ids():
    """What bench times: rows of token ids with synthetic forcing ids, min = max = N thinking tokens."""
    from s1kit.bench import synthetic_tokens
    from s1kit.budget import BudgetPolicy
    from s1kit.engines.core import token_rows
    from s1kit.engines.fast import FastDecoder

    model = random_model("smollm2-135m", "cpu", torch.float32)
    tokens = synthetic_tokens(model.config.vocab_size)
    policy = BudgetPolicy(min_thinking_tokens=7, max_thinking_tokens=7, max_answer_tokens=2)
    rows = token_rows([list(range(100, 100 + n)) for n in (5, 9, 3)], policy, tokens)
    FastDecoder(model, None, pad_id=0, slots=2).run(rows)  # 3 rows through 2 slots
    for r in rows:
        t = r.trace
        assert len(t.thinking_ids) == 7 and t.hit_cap
        assert t.token_ids[7:7 + 6] == list(tokens.newline_ids + tokens.opener_ids + tokens.prefix_ids) or \
            t.token_ids[7:7 + 5] == list(tokens.opener_ids + tokens.prefix_ids)


@pytest.mark.parametrize("args, message", [
    (["--arch", "qwen2.5-1.5b", "--model", "smollm2-135m"], "not both"),
    (["--arch", "gpt-17"], "unknown arch"),
    (["--forcing", "sometimes"], "--forcing"),
    (["--batch", "0"], "--batch"),
    (["--new-tokens", "0"], "must be >= 1"),
])
def test_bench_bad_options(args, message):
    r = s1kit("bench", "--device", "cpu", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
