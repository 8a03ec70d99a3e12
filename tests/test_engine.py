"""The single-pass hf engine on the real SmolLM2-135M: exact budgets, and token-for-token equality with
the s1 stop-and-continue reference loop for greedy float32 decoding on the CPU."""

import os

import pytest
import torch

from s1kit import BudgetPolicy, Request, SamplingParams, ThinkingFormat

from reference import hf_complete, stop_and_continue

# The untrained-for-thinking model tends to close thinking at once in the s1 format; this custom format
# lets it think in free text until it ends its turn, so long sampled thinking is covered too.
PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))

PROMPTS = [
    "What is 17*23?",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Show your reasoning.",
    "Hi",
    "List three prime numbers greater than 50 and explain how you checked that each one is prime.",
]
POLICIES = [
    BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=12),
    BudgetPolicy(min_thinking_tokens=40, max_thinking_tokens=64, max_answer_tokens=12),
    BudgetPolicy(num_waits=1, max_thinking_tokens=80, max_answer_tokens=12),
    BudgetPolicy(num_waits=2, max_thinking_tokens=90, wait_strings=("Wait", " Hmm,"), max_answer_tokens=12),
    BudgetPolicy(num_waits=3, max_thinking_tokens=120, wait_strings=("\nWait,", " Alternatively", "Wait"),
                 max_answer_tokens=12),
    BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=10),
    BudgetPolicy(max_answer_tokens=12),  # no forcing at all
]


def _requests():
    out = []
    for i, policy in enumerate(POLICIES):
        for fmt in ("s1", PLAIN):
            out.append(Request(PROMPTS[i % len(PROMPTS)], policy, fmt))
    return out


@pytest.fixture(scope="module")
def references(engine):
    """The s1 stop-and-continue loop's result for every request of ``_requests()`` (greedy, float32)."""
    complete = hf_complete(engine.model, engine.pad_id)
    out = []
    for req in _requests():
        ids, tokens, cap = engine.prepare(req)
        out.append(stop_and_continue(ids, req.policy, tokens, complete, cap))
    return out


def _assert_equal(requests, completions, refs):
    for req, c, ref in zip(requests, completions, refs):
        assert c.token_ids == ref.token_ids, f"mismatch for {req.policy} / {req.format.name}"
        assert (c.thinking_tokens, c.waits_used, c.hit_cap, c.finish_reason) == (
            len(ref.thinking_ids), ref.waits_used, ref.hit_cap, ref.finish_reason)


def test_single_pass_equals_reference_loop_token_for_token(engine, references):
    requests = _requests()
    assert engine.batch_size >= len(requests)  # one batch, prompts of different lengths
    completions = engine.generate(requests)
    _assert_equal(requests, completions, references)
    waits_seen = {c.waits_used for c in completions}
    # the comparison exercised caps, waits of every count, and long free-running thinking
    assert {0, 1, 2, 3} <= waits_seen
    assert any(c.hit_cap for c in completions) and any(not c.hit_cap for c in completions)
    assert max(c.thinking_tokens for c in completions) >= 60


def test_fast_path_with_continuous_batching_equals_reference_loop(engine, references):
    """The fast path (static slots, tensor budget machine, refilled slots) on the CPU, eagerly (no CUDA graphs)."""
    from s1kit.engines.hf import HFEngine

    fast = HFEngine(engine.model, engine.tokenizer, batch_size=4, fast=True)
    pairs = [(r, ref) for r, ref in zip(_requests(), references) if r.policy.max_thinking_tokens is not None]
    requests = [r for r, _ in pairs]
    completions = fast.generate(requests)  # 12 requests through 4 slots: finished slots are refilled
    _assert_equal(requests, completions, [ref for _, ref in pairs])
    stats = fast.fast_stats()  # the fast path really ran, and its counters add up
    assert stats["steps"] > 0 and stats["rows"] == len(requests)
    assert stats["tokens"] == sum(len(c.token_ids) for c in completions)
    assert stats["slot_steps"] == 4 * stats["steps"] and 0 < stats["busy_slot_steps"] <= stats["slot_steps"]
    assert {0, 1, 2, 3} <= {c.waits_used for c in completions}


def test_budgets_are_exact_on_the_real_model(engine):
    reqs = [
        Request("What is 17*23?", BudgetPolicy(min_thinking_tokens=48, max_thinking_tokens=48, max_answer_tokens=8)),
        Request("What is 17*23?", BudgetPolicy(max_thinking_tokens=32, max_answer_tokens=8), PLAIN),
        Request("What is 17*23?", BudgetPolicy(num_waits=2, max_thinking_tokens=400, max_answer_tokens=8)),
        Request("What is 17*23?", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=8)),
    ]
    exact, capped, waited, zero = engine.generate(reqs)
    assert exact.thinking_tokens == 48 and exact.hit_cap
    assert capped.thinking_tokens <= 32 and capped.hit_cap == (capped.thinking_tokens == 32)
    assert waited.waits_used == 2 or waited.hit_cap
    assert zero.thinking_tokens == 0 and zero.answer.startswith("Final Answer:")
    for c in (exact, zero):
        assert c.answer.startswith("Final Answer:")  # a capped answer opens with the prefix
        text = engine.tokenizer.decode(c.token_ids)
        assert "<|im_start|>answer\nFinal Answer:" in text


def test_sampling_is_seeded_and_n_gives_distinct_samples(engine):
    req = Request("Tell me a short story about a cat.", BudgetPolicy(max_thinking_tokens=16, max_answer_tokens=16),
                  PLAIN, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, n=3))
    a = engine.generate([req])
    b = engine.generate([req])
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # same seed, same samples
    assert [c.sample_index for c in a] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a}) > 1  # the n samples differ
    other = engine.generate([Request(req.prompt, req.policy, PLAIN, SamplingParams(temperature=1.0, seed=99))])
    assert other[0].token_ids != a[0].token_ids


def test_results_do_not_depend_on_batch_composition(engine):
    reqs = [Request(p, BudgetPolicy(num_waits=1, max_thinking_tokens=40, max_answer_tokens=8), PLAIN) for p in PROMPTS]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs[:2]]
    assert [c.token_ids for c in together[:2]] == [c.token_ids for c in alone]


def test_progress_reports_every_finished_row(engine):
    seen = []
    engine.generate([Request(p, BudgetPolicy(max_thinking_tokens=8, max_answer_tokens=4)) for p in PROMPTS],
                    on_progress=seen.append)
    assert sum(seen) == len(PROMPTS)


def test_prompt_longer_than_context_is_a_clear_error(engine):
    from s1kit import S1KitError

    with pytest.raises(S1KitError, match="does not fit the model's context"):
        engine.generate([Request("word " * 9000, BudgetPolicy(max_answer_tokens=8))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on the device machine (CUDA graphs)")
def test_gpu_fast_path_samples_inside_cuda_graphs():
    """Sampled rows on the GPU fast path: the captured step draws from the engine's own generator, which
    must be registered with each CUDA graph (torch registers only its default one). S1KIT_GPU_TEST_MODEL names
    another model (the GPU machine gets staged GGUFs, not SmolLM2's package)."""
    from s1kit.engines.hf import HFEngine

    model = os.environ.get("S1KIT_GPU_TEST_MODEL", "smollm2-135m")
    gpu = HFEngine.load(model, device="cuda", dtype="bfloat16", batch_size=8)
    policy = BudgetPolicy(num_waits=1, max_thinking_tokens=48, max_answer_tokens=8)
    reqs = [Request(p, policy, PLAIN, SamplingParams(temperature=1.0, top_p=0.9, n=2)) for p in PROMPTS]
    out = gpu.generate(reqs) + gpu.generate(reqs)  # a second call replays the captured graphs
    assert gpu.fast_stats()["rows"] == len(out) == 4 * len(PROMPTS)
    assert all(0 < c.thinking_tokens <= 48 for c in out)
    assert len({tuple(c.token_ids) for c in out}) > len(PROMPTS)  # draws differ, inside a call and across calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on the device machine (Triton kernel)")
def test_gpu_split_attention_and_fused_projections_decode_as_sdpa_does():
    """The GPU-only parts of the fast path (split-K decode attention, fused q/k/v and gate/up GEMMs) inside
    CUDA graphs give the tokens of SDPA and separate GEMMs: float32, a random Qwen2.5-0.5B architecture
    (biases, 7 query heads per KV head), contexts over several attention chunks, more rows than slots."""
    from s1kit.bench import random_model, synthetic_tokens
    from s1kit.engines.core import token_rows
    from s1kit.engines.fast import FastDecoder

    torch.manual_seed(0)
    model = random_model("qwen2.5-0.5b", "cuda", torch.float32)
    tokens = synthetic_tokens(model.config.vocab_size)
    policy = BudgetPolicy(min_thinking_tokens=300, max_thinking_tokens=300, max_answer_tokens=4)
    prompts = [torch.randint(100, 5000, (n,)).tolist() for n in (7, 200, 64, 130, 3, 90)]
    traces = []
    for on in (False, True):
        rows = token_rows(prompts, policy, tokens)
        FastDecoder(model, None, pad_id=0, slots=4, compile=False, fuse=on, split_attention=on).run(rows)
        traces.append([r.trace.token_ids for r in rows])
    assert traces[0] == traces[1]
