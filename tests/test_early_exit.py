"""Early exit (stop when the probed answer has settled) and the graceful cap, on the real SmolLM2-135M, float32 on
the CPU, greedy, for both decoders: the plain loop (probes before each step) and the fast path (a probe point
pauses the slot until the host probes and releases it)."""

from dataclasses import replace

import pytest

from s1kit import BudgetPolicy, Request, ThinkingFormat
from s1kit.budget import EarlyExit
from s1kit.engines.hf import HFEngine

PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))
STORY = "Write a long story about a dragon who learns to count."
FORCED = "Final Answer: \\boxed{42}"  # every probe then answers 42: the answers agree as soon as two are in


@pytest.fixture(scope="module", params=["loop", "fast"])
def core(engine, request):
    return HFEngine(engine.model, engine.tokenizer, batch_size=4, fast=request.param == "fast")


def test_probes_never_change_the_sequence(core):
    base = BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=6)
    never = replace(base, early_exit=EarlyExit(every=6, words=("the",), agree=1000))  # probes, never exits
    plain, probed = core.generate([Request(STORY, base, PLAIN), Request(STORY, never, PLAIN)])
    assert probed.token_ids == plain.token_ids and probed.thinking == plain.thinking
    assert probed.probe_tokens > 0 and not probed.early_exit and plain.probe_tokens == 0


@pytest.mark.parametrize("rule, minimum, expected", [
    (EarlyExit(every=5, agree=2, probe_tokens=4), 0, 10),  # probes at 5 and 10 agree: exit at 10
    (EarlyExit(every=5, agree=2, probe_tokens=4), 12, 20),  # no probe before the minimum: 15 and 20
    (EarlyExit(every=7, agree=None, confidence=0.01), 0, 7),  # the first probe is confident enough
])
def test_the_exit_fires_at_the_first_point_where_the_rule_holds(core, rule, minimum, expected):
    policy = BudgetPolicy(max_thinking_tokens=60, min_thinking_tokens=minimum, max_answer_tokens=6,
                          answer_prefix=FORCED, early_exit=rule)
    [c] = core.generate([Request(STORY, policy, PLAIN)])
    assert (c.thinking_tokens, c.early_exit, c.hit_cap) == (expected, True, False)
    assert c.answer.startswith(FORCED) and c.probe_tokens > 0
    capped = core.generate([Request(STORY, BudgetPolicy(max_thinking_tokens=expected, max_answer_tokens=6,
                                                        answer_prefix=FORCED), PLAIN)])[0]
    assert c.token_ids == capped.token_ids  # closed exactly as a cap at that point closes


def test_a_word_probe_point_is_before_the_word(core):
    free = core.generate([Request(STORY, BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=4), PLAIN)])[0]
    words = core.compile.word_ids(("the",))
    first = next(i for i, t in enumerate(free.token_ids) if t in words)  # where the model starts " the"
    policy = BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=4, answer_prefix=FORCED,
                          early_exit=EarlyExit(words=("the",), agree=1))
    [c] = core.generate([Request(STORY, policy, PLAIN)])
    assert c.early_exit and c.thinking_tokens == first and c.token_ids[:first] == free.token_ids[:first]


def test_graceful_cap_ends_the_sentence_within_its_window(core):
    hard = core.generate([Request(STORY, BudgetPolicy(max_thinking_tokens=20, max_answer_tokens=4), PLAIN)])[0]
    [c] = core.generate([Request(STORY, BudgetPolicy(max_thinking_tokens=20, cap_grace=30, max_answer_tokens=4),
                                 PLAIN)])
    assert 20 <= c.thinking_tokens <= 50 and c.hit_cap
    assert c.token_ids[:20] == hard.token_ids[:20]  # the same thinking up to the cap, then the grace tokens
    assert c.thinking_tokens == 50 or c.thinking.rstrip(" \"')").endswith((".", "!", "?")) or c.thinking.endswith("\n")


LOOP_RULES = [
    BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=6, answer_prefix=FORCED,
                 early_exit=EarlyExit(every=5, agree=2, probe_tokens=4)),
    BudgetPolicy(max_thinking_tokens=60, min_thinking_tokens=12, max_answer_tokens=6, answer_prefix=FORCED,
                 early_exit=EarlyExit(every=5, agree=2, probe_tokens=4)),
    BudgetPolicy(max_thinking_tokens=60, max_answer_tokens=4, answer_prefix=FORCED,
                 early_exit=EarlyExit(words=("the",), agree=1)),
    BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=6,
                 early_exit=EarlyExit(every=6, words=("the",), agree=1000)),  # probes, never exits
    BudgetPolicy(max_thinking_tokens=48, num_waits=2, max_answer_tokens=6,
                 early_exit=EarlyExit(every=9, probe_tokens=6)),  # Waits and probes in one sequence
]


@pytest.mark.parametrize("policy", LOOP_RULES)
def test_the_stop_and_continue_loop_probes_where_the_engine_does(engine, policy):
    """The remote engine's loop (``loop_steps``, driven here by transformers' generate for calls and probes)
    takes the same probe points, exits at the same token and counts the same probe tokens as BudgetState."""
    from reference import hf_complete, hf_probe, stop_and_continue

    loop = HFEngine(engine.model, engine.tokenizer, batch_size=1, fast=False)
    req = Request(STORY, policy, PLAIN)  # in s1's format SmolLM2 ends its thinking at once: nothing to probe
    [c] = loop.generate([req])
    ids, tokens, cap = loop.prepare(req)
    ref = stop_and_continue(ids, policy, tokens, hf_complete(engine.model, engine.pad_id), cap,
                            probe=hf_probe(engine.model, engine.tokenizer, engine.pad_id))
    assert ref.token_ids == c.token_ids
    assert (len(ref.thinking_ids), ref.waits_used, ref.hit_cap, ref.early_exit, ref.probe_tokens) == (
        c.thinking_tokens, c.waits_used, c.hit_cap, c.early_exit, c.probe_tokens)
    assert ref.probe_tokens > 0


@pytest.mark.parametrize("kw, message", [
    ({}, "needs a probe point"),
    ({"every": 0}, "every must be >= 1"),
    ({"every": 8, "agree": None}, "needs a rule"),
    ({"every": 8, "confidence": 1.5}, "confidence must be in"),
    ({"words": ("",)}, "words must be non-empty"),
    ({"every": 8, "probe_tokens": 0}, "probe_tokens must be >= 1"),
])
def test_bad_early_exit_parameters_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        EarlyExit(**kw)
    with pytest.raises(ValueError, match="cap_grace must be >= 0"):
        BudgetPolicy(cap_grace=-1)
