"""The remote engine against a server that forces budgets itself (s1kit's vLLM processor), on the CPU.

vLLM cannot be installed in CI, so the server is ``vllm_standin.VLLMStandIn``: vLLM's HTTP answers over the
real SmolLM2 (float32, transformers) with s1kit's processor core applied to every step's logits. The
engine must find the processor by itself, send one request per sample, read the counts back from the
tokens, and give greedy tokens equal to the stop-and-continue loop run against the same server. Replaying
tokens where the model wrote a wait string itself is tested on small ids (as test_budget.py does).
"""

import httpx
import pytest

from s1kit import BudgetPolicy, Request, S1KitError, SamplingParams, ThinkingFormat
from s1kit.budget import BudgetState
from s1kit.engines.remote import RemoteEngine
from s1kit.integrations.replay import replay

from test_budget import IM_END, IM_START, ONE_WAIT, TOKENS, TWO_TOKEN_WAIT
from vllm_standin import VLLMStandIn

PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))


@pytest.fixture(scope="module")
def plugin_server(engine):
    server = VLLMStandIn(engine.model, engine.tokenizer, plugin=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_server(engine):
    server = VLLMStandIn(engine.model, engine.tokenizer, plugin=False)
    yield server
    server.close()


REQUESTS = [
    Request("A train travels 60 km in 45 minutes. What is its average speed in km/h? Show your reasoning.",
            BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=6)),
    Request("What is 17*23?", BudgetPolicy(min_thinking_tokens=30, max_thinking_tokens=30, max_answer_tokens=6)),
    Request("Name a prime.", BudgetPolicy(num_waits=1, max_thinking_tokens=60, max_answer_tokens=6), PLAIN),
    Request("Name a prime.", BudgetPolicy(num_waits=3, max_thinking_tokens=80, wait_strings=("Wait", " Hmm,"),
                                          max_answer_tokens=6), PLAIN),
    Request("Say hi.", BudgetPolicy(min_thinking_tokens=20, max_answer_tokens=6), PLAIN),
    Request("Hi", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=6)),
]


def test_greedy_forced_in_the_server_equals_the_loop_against_the_same_server(plugin_server):
    with RemoteEngine(plugin_server.url, "smollm2-135m", concurrency=4) as forced, \
            RemoteEngine(plugin_server.url, "smollm2-135m", plugin=False) as loop:
        assert forced.plugin and not loop.plugin
        sent = forced.completions_sent
        a = forced.generate(REQUESTS)
        assert forced.completions_sent - sent >= len(REQUESTS)
        sent = loop.completions_sent
        b = loop.generate(REQUESTS)
        loop_calls = loop.completions_sent - sent
    for x, y, req in zip(a, b, REQUESTS):
        assert x.token_ids == y.token_ids, req.policy
        assert (x.thinking_tokens, x.answer_tokens, x.waits_used, x.hit_cap, x.finish_reason, x.answer) == (
            y.thinking_tokens, y.answer_tokens, y.waits_used, y.hit_cap, y.finish_reason, y.answer), req.policy
    assert [c.thinking_tokens for c in a] == [24, 30, 13, 27, 23, 0]  # the model stops itself in 2-4
    assert [c.waits_used for c in a] == [0, 5, 1, 3, 0, 0] and [c.hit_cap for c in a] == [1, 1, 0, 0, 0, 1]
    assert a[1].answer.startswith("Final Answer:") and " Hmm," in a[3].thinking
    assert loop_calls > len(REQUESTS) + 4  # the loop needed a call per continuation; forced, one per sample
    # the requests the processor saw: vllm_xargs with the policy, neutral penalties, no stop strings
    (body,) = [b for b in plugin_server.requests if b.get("vllm_xargs", {}).get("s1_max_thinking_tokens") == 24]
    assert body["repetition_penalty"] == 1.0 and body["top_k"] == 0 and "stop" not in body
    assert body["max_tokens"] == 24 + 7 + 6 + 1  # cap + closing (newline, opener, prefix) + answer + end token


def test_a_server_without_the_processor_gets_the_loop_and_plugin_true_says_how_to_start_one(plain_server):
    with RemoteEngine(plain_server.url, "smollm2-135m") as engine:
        assert not engine.plugin
        (c,) = engine.generate([REQUESTS[1]])
        assert c.thinking_tokens == 30 and c.hit_cap
    with pytest.raises(S1KitError, match="does not run s1kit's vLLM processor: a cap of 0 came back unforced.*"
                                         "--logits-processors s1kit.integrations.vllm:S1BudgetLogitsProcessor"):
        RemoteEngine(plain_server.url, "smollm2-135m", plugin=True)


def test_seeded_samples_repeat_and_bad_fields_are_refused(plugin_server):
    req = Request("Tell me a story.", BudgetPolicy(max_thinking_tokens=10, num_waits=1, max_answer_tokens=3), PLAIN,
                  SamplingParams(temperature=1.0, seed=5, n=2))
    with RemoteEngine(plugin_server.url, "smollm2-135m") as engine:
        a, b = engine.generate([req]), engine.generate([req])
        assert [c.token_ids for c in a] == [c.token_ids for c in b] and a[0].token_ids != a[1].token_ids
        assert all(c.thinking_tokens == 10 for c in a)
        with pytest.raises(S1KitError, match="would end the request inside vLLM"):
            engine.generate([Request("Hi", BudgetPolicy(num_waits=1, wait_strings=("<|im_end|>",)))])
    r = httpx.post(plugin_server.url + "/completions", json={
        "prompt": [1, 2, 3], "max_tokens": 8, "vllm_xargs": {"s1_max_thinking_tokns": 4}})
    assert r.status_code == 400 and "unknown s1kit budget field(s) s1_max_thinking_tokns" in r.text
    r = httpx.post(plugin_server.url + "/completions", json={
        "prompt": [1, 2, 3], "max_tokens": 8, "vllm_xargs": {"s1_num_waits": 1}, "repetition_penalty": 1.1})
    assert r.status_code == 400 and "cannot honour" in r.text


def test_replay_reads_a_wait_the_model_wrote_itself():
    policy = BudgetPolicy(num_waits=1, max_thinking_tokens=8, max_answer_tokens=2)
    # the model wrote "Wait" (30) itself at position 1, then tried to stop (replaced by a Wait at 3), then the
    # cap closed thinking: the tokens read the same either way at 1 and 3
    truth = BudgetState(policy, ONE_WAIT)
    proposals = [5, 30, 6, IM_END, 7, 8, 9, 10, 0, 0, 0, 0, 0, 0, 11, 12]
    for p in proposals:
        if not truth.done:
            truth.step(p)
    tokens = truth.token_ids + [IM_END]  # the end token the processor forces after the answer budget
    guess = replay(tokens, policy, ONE_WAIT, None)
    assert guess.state.token_ids == truth.token_ids and guess.trailing == [IM_END]
    assert guess.ambiguous == [1] and guess.guessed == [1]  # at 3 a Wait was no longer due under the guess
    told = replay(tokens, policy, ONE_WAIT, None, choices={1: False, 3: True})
    assert told.state.waits_used == truth.waits_used == 1 and told.guessed == []
    assert told.ambiguous == [1, 3]
    # a two-token wait string: the model's own first half (31) not followed by the second (32) is no Wait,
    # even where the server said "stop" (choices): the reading that leads nowhere is undone
    policy = BudgetPolicy(num_waits=1, max_answer_tokens=2)
    truth = BudgetState(policy, TWO_TOKEN_WAIT)
    for p in [5, 31, 6, IM_END, 0, 7, IM_START, 0, 0, 13, IM_END]:
        if not truth.done:
            truth.step(p)
    assert truth.token_ids[:6] == [5, 31, 6, 31, 32, 7] and truth.waits_used == 1
    done = replay(truth.token_ids, policy, TWO_TOKEN_WAIT, None, choices={1: True})
    assert done.state.token_ids == truth.token_ids and done.state.waits_used == 1 and done.state.done
    assert done.ambiguous == [1, 3] and done.guessed == [3]
    with pytest.raises(S1KitError, match="do not follow the budget policy at output position 2"):
        replay([5, 6, 99], BudgetPolicy(max_thinking_tokens=2), TOKENS, None)


def test_early_exit_through_a_processor_server_runs_the_loop_with_probes_and_equals_the_engine(plugin_server, engine):
    """Early exit needs probes, so such requests take the stop-and-continue loop even where the server has the
    processor; on a server that stops on token ids, word probe points work too. Greedy on the same model, the
    result equals the in-process engine's: same tokens, same exit point, same probe tokens."""
    from s1kit.budget import EarlyExit
    from s1kit.engines.hf import HFEngine

    forced = "Final Answer: \\boxed{42}"
    story = "Write a long story about a dragon who learns to count."
    requests = [
        Request(story, BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=6, answer_prefix=forced,
                                    early_exit=EarlyExit(every=5, agree=2, probe_tokens=4)), PLAIN),
        Request(story, BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=4, answer_prefix=forced,
                                    early_exit=EarlyExit(words=("the",), agree=1)), PLAIN),
        Request(story, BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=6,
                                    early_exit=EarlyExit(every=6, words=("the",), agree=1000)), PLAIN),
        Request(story, BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=6, answer_prefix=forced,
                                    early_exit=EarlyExit(every=7, agree=None, confidence=0.01)), PLAIN),
    ]
    with RemoteEngine(plugin_server.url, "smollm2-135m", concurrency=4) as remote:
        assert remote.plugin
        sent = len(plugin_server.requests)
        got = remote.generate(requests)
        bodies = plugin_server.requests[sent:]
    want = HFEngine(engine.model, engine.tokenizer, batch_size=4, fast=False).generate(requests)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert (g.thinking_tokens, g.early_exit, g.hit_cap, g.probe_tokens) == (
            w.thinking_tokens, w.early_exit, w.hit_cap, w.probe_tokens)
    assert [g.early_exit for g in got] == [True, True, False, True] and got[0].thinking_tokens == 10
    assert got[3].thinking_tokens == 7  # the first probe's confidence (logprobs from the server) is enough
    assert not any("vllm_xargs" in b for b in bodies)  # no request went through the processor
