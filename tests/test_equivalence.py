"""One semantics on every engine: greedy on the real SmolLM2-135M in float32, the same requests give the same
tokens, thinking counts, Waits, cap hits, early exits and finish reasons on

- the in-process plain loop (``HFEngine``, the CPU default),
- the remote engine's stop-and-continue path (``BudgetState`` stepped over each server call),
- the remote engine's one-request-per-sample path through s1kit's processor (policies it takes),
- and, for policies without a graceful cap (it has none), the s1 reference loop (``tests/reference.py``).

The servers are ``vllm_standin.VLLMStandIn`` (vLLM cannot run in CI): vLLM's HTTP answers over the same model
object in transformers, with and without s1kit's processor applied to every step's logits. Policies are drawn
by hypothesis: caps, minimums, Waits with several strings, graceful caps and early exit.
"""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from s1kit import BudgetPolicy, Request, ThinkingFormat
from s1kit.budget import EarlyExit
from s1kit.engines.remote import RemoteEngine

from reference import hf_complete, hf_probe, stop_and_continue
from vllm_standin import VLLMStandIn

# SmolLM2 closes thinking at once in the s1 format; in this one it thinks in free text until it ends its turn.
PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))
PROMPTS = ["Name a prime.", "What is 17*23?", "Write a long story about a dragon who learns to count.", "Say hi."]


@st.composite
def policies(draw):
    cap = draw(st.sampled_from([0, 6, 16, 28]))  # bounded: SmolLM2 thinks on for thousands of tokens uncapped
    minimum = min(draw(st.sampled_from([0, 0, 10, 20])), cap)
    early = draw(st.sampled_from([None, None, EarlyExit(every=6, agree=2, probe_tokens=4),
                                  EarlyExit(every=5, agree=1, probe_tokens=3)]))
    return BudgetPolicy(max_thinking_tokens=cap, min_thinking_tokens=minimum, num_waits=draw(st.integers(0, 3)),
                        wait_strings=draw(st.sampled_from([("Wait",), ("Wait", " Hmm,")])),
                        cap_grace=draw(st.sampled_from([0, 0, 6])), early_exit=early,
                        max_answer_tokens=draw(st.sampled_from([3, 5])))


@st.composite
def requests(draw):
    return [Request(draw(st.sampled_from(PROMPTS)), draw(policies()), draw(st.sampled_from([PLAIN, PLAIN, "s1"])))
            for _ in range(4)]


@pytest.fixture(scope="module")
def servers(engine):
    with_processor = VLLMStandIn(engine.model, engine.tokenizer, plugin=True)
    without = VLLMStandIn(engine.model, engine.tokenizer, plugin=False)
    try:
        with RemoteEngine(with_processor.url, "smollm2-135m", concurrency=4) as forced, \
                RemoteEngine(without.url, "smollm2-135m", concurrency=4) as loop:
            assert forced.plugin and not loop.plugin
            yield forced, loop
    finally:
        with_processor.close()
        without.close()


def _record(c):
    return (c.token_ids, c.thinking_tokens, c.answer_tokens, c.waits_used, c.hit_cap, c.early_exit,
            c.finish_reason, c.probe_tokens)


COVERED = [  # always run (besides the drawn ones): every kind of forcing at least once
    Request(PROMPTS[2], BudgetPolicy(max_thinking_tokens=16, cap_grace=6, max_answer_tokens=3), PLAIN),
    Request(PROMPTS[0], BudgetPolicy(max_thinking_tokens=28, num_waits=2, wait_strings=("Wait", " Hmm,"),
                                     max_answer_tokens=3), PLAIN),
    Request(PROMPTS[2], BudgetPolicy(max_thinking_tokens=28, early_exit=EarlyExit(every=6, agree=2, probe_tokens=4),
                                     max_answer_tokens=3), PLAIN),
    Request(PROMPTS[1], BudgetPolicy(max_thinking_tokens=10, min_thinking_tokens=10, max_answer_tokens=3), "s1"),
]


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@example(reqs=COVERED)
@given(reqs=requests())
def test_every_engine_gives_the_same_tokens_and_counts(engine, servers, reqs):
    forced, loop = servers
    expected = [_record(c) for c in engine.generate(reqs)]
    assert [_record(c) for c in loop.generate(reqs)] == expected
    sent = forced.completions_sent
    assert [_record(c) for c in forced.generate(reqs)] == expected
    on_processor = [r for r in reqs if forced._uses_plugin(r)]
    if not any(r.policy.early_exit or r.policy.cap_grace for r in reqs):
        assert forced.completions_sent - sent >= len(on_processor)
    complete, probe = hf_complete(engine.model, engine.pad_id), hf_probe(engine.model, engine.tokenizer, engine.pad_id)
    for req, want in zip(reqs, expected):
        if req.policy.cap_grace:
            continue  # the s1 loop has no graceful cap
        ids, tokens, cap = engine.prepare(req)
        ref = stop_and_continue(ids, req.policy, tokens, complete, cap, probe=probe)
        got = (ref.token_ids, len(ref.thinking_ids), ref.waits_used, ref.hit_cap, ref.early_exit, ref.finish_reason)
        assert got == (want[0], want[1], want[3], want[4], want[5], want[6]), req.policy


def test_a_graceful_cap_and_stop_thinking_behave_alike_remotely(engine, servers):
    """The remote loop has the grace window (the sentence ends first, within ``cap_grace`` tokens) and closes a
    request whose thinking was stopped before it started exactly as a cap of zero."""
    _, loop = servers
    story = "Write a long story about a dragon who learns to count."
    graced = Request(story, BudgetPolicy(max_thinking_tokens=12, cap_grace=30, max_answer_tokens=3), PLAIN)
    [local], [remote] = engine.generate([graced]), loop.generate([graced])
    assert _record(remote) == _record(local) and 12 < local.thinking_tokens <= 42 and local.hit_cap
    h = loop.add(Request(story, BudgetPolicy(max_thinking_tokens=500, max_answer_tokens=3), PLAIN))
    loop.stop_thinking(h)
    while loop.has_work:
        loop.step()
    [c] = h.completions()
    [zero] = engine.generate([Request(story, BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=3), PLAIN)])
    assert (c.thinking_tokens, c.hit_cap, c.token_ids) == (0, True, zero.token_ids)
