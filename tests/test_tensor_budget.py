"""The tensor (fast-path) budget machine against the pure BudgetState, on identical proposal streams.

Ids are small integers as in test_budget.py (the machines only see ids, so nothing is mocked); proposals are
random with stop and end tokens made frequent, over many policies, all slots of a batch stepped together.
"""

import random

import pytest
import torch

from s1kit.budget import BudgetPolicy, BudgetState, EarlyExit, ForcingTokens
from s1kit.engines.tensor_budget import ANSWER, END, NONE, OPENER, PREFIX, THINK, TensorBudget, replay

from test_budget import IM_END, IM_START, EOS, NL, ONE_WAIT, TOKENS, TWO_TOKEN_WAIT

VOCAB = 128
NL_TABLE = torch.zeros(VOCAB, dtype=torch.bool)
NL_TABLE[[NL, 40]] = True  # same rule as TOKENS.ends_with_newline
WORD, DOT = 41, 43  # an early-exit word's first token; a token ending a sentence
SENTENCE = torch.zeros(VOCAB, dtype=torch.bool)
SENTENCE[DOT] = True


def _with_words(tokens):
    return ForcingTokens(**{**tokens.__dict__, "word_ids": frozenset({WORD}), "ends_sentence": lambda t: t == DOT})


def random_policy(rng: random.Random) -> BudgetPolicy:
    cap = rng.choice([None, 0, 1, 3, 8, 20])
    lo = rng.choice([0, 2, 6, 12])
    if cap is not None:
        lo = min(lo, cap)
    return BudgetPolicy(max_thinking_tokens=cap, min_thinking_tokens=lo, num_waits=rng.choice([0, 1, 2, 3]),
                        max_answer_tokens=rng.choice([1, 3, 10]))


def proposals(rng: random.Random, n: int) -> list[int]:
    special = [IM_START, IM_END, EOS, NL, 40]
    return [rng.choice(special) if rng.random() < 0.3 else rng.randrange(1, 60) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_tensor_machine_equals_pure_machine(seed):
    rng = random.Random(seed)
    slots = 16
    tb = TensorBudget(slots, "cpu", VOCAB, NL_TABLE)
    rows = []
    for b in range(slots):
        tokens = rng.choice([TOKENS, ONE_WAIT, TWO_TOKEN_WAIT])
        policy = random_policy(rng)
        cap = rng.choice([None, None, 5]) if policy.min_thinking_tokens <= 5 else None
        tb.load(b, policy, tokens, cap)
        rows.append((policy, tokens, cap, proposals(rng, 80)))
    emitted, kinds = [], []
    for t in range(80):
        e, k = tb.step(torch.tensor([r[3][t] for r in rows]), pad_id=0)
        emitted.append(e.tolist())
        kinds.append(k.tolist())
    for b, (policy, tokens, cap, props) in enumerate(rows):
        pure = replay(policy, tokens, cap, props)
        assert pure.done, "80 proposals always finish these policies"
        ks = [kinds[t][b] for t in range(80)]
        es = [emitted[t][b] for t in range(80)]
        out = [e for e, k in zip(es, ks) if k != NONE]
        assert out == pure.token_ids
        assert [e for e, k in zip(es, ks) if k == THINK] == pure.thinking_ids
        assert [e for e, k in zip(es, ks) if k in (PREFIX, ANSWER)] == pure.answer_ids
        assert int(tb.waits_used[b]) == pure.waits_used
        assert bool(tb.hit_cap[b]) == pure.hit_cap
        assert {1: "stop", 2: "length"}[int(tb.finish[b])] == pure.finish_reason
        assert ks.index(NONE) == len(pure.token_ids)  # nothing after the end
        assert all(k == OPENER for k in ks if k == OPENER)
        assert (END in ks) == (pure.finish_reason == "stop")


def test_reloading_a_slot_starts_a_fresh_sequence():
    tb = TensorBudget(2, "cpu", VOCAB, NL_TABLE)
    policy = BudgetPolicy(max_thinking_tokens=2, max_answer_tokens=1)
    for b in range(2):
        tb.load(b, policy, TOKENS, None)
    for p in [5, 6] + [0] * 7:  # 2 thinking, 6 forced closing tokens, 1 answer token
        tb.step(torch.tensor([p, p]), pad_id=0)
    assert tb.phase.tolist() == [2, 2]
    tb.load(0, BudgetPolicy(num_waits=1), TOKENS, None)
    e, k = tb.step(torch.tensor([IM_START, 7]), pad_id=0)
    assert e.tolist() == [30, 0] and k.tolist() == [THINK, NONE]  # slot 0 waits, slot 1 stays finished


@pytest.mark.parametrize("seed", range(4))
def test_stop_thinking_mirrors_the_pure_machine_with_and_without_grace(seed):
    """Stop-thinking mid-sequence: ``BudgetState.stop_thinking`` and ``TensorBudget.stop_thinking`` emit the same,
    caps and graceful caps included (with a grace window the sentence ends first, in both)."""
    rng = random.Random(100 + seed)
    slots = 12
    tb = TensorBudget(slots, "cpu", VOCAB, NL_TABLE, sentence_table=SENTENCE)
    rows = []
    for b in range(slots):
        tokens = _with_words(rng.choice([TOKENS, ONE_WAIT, TWO_TOKEN_WAIT]))
        cap = rng.choice([None, None, 4, 30])
        policy = BudgetPolicy(max_thinking_tokens=cap, min_thinking_tokens=min(rng.choice([0, 30]), cap or 99),
                              num_waits=rng.choice([0, 2]), max_answer_tokens=5, cap_grace=rng.choice([0, 3, 8]))
        tb.load(b, policy, tokens, None)
        props = [rng.choice([IM_START, IM_END, EOS, NL, DOT]) if rng.random() < 0.15 else rng.randrange(1, 60)
                 for _ in range(80)]
        rows.append((BudgetState(policy, tokens), props, rng.randrange(1, 12)))
    graced = 0
    outs = [[] for _ in range(slots)]
    for t in range(80):
        for b, (state, _, at) in enumerate(rows):
            if t == at:
                state.stop_thinking()
                tb.stop_thinking(b)
                graced += not state.done and state.policy.cap_grace > 0 and not state.next_is_forced
        e, k = tb.step(torch.tensor([r[1][t] for r in rows]), pad_id=0)
        for b, (state, props, _) in enumerate(rows):
            if not state.done:
                state.step(props[t])
            if k[b] != NONE:
                outs[b].append(int(e[b]))
    for b, (state, _, _) in enumerate(rows):
        assert state.done and outs[b] == state.token_ids, (b, state.policy)
        assert bool(tb.hit_cap[b]) == state.hit_cap
    assert graced, "some row thinks on in a grace window after stop-thinking"


@pytest.mark.parametrize("seed", range(8))
def test_cap_grace_and_early_exit_pauses_mirror_the_pure_machine(seed):
    """Graceful caps, and early-exit probe points: the engine asks the pure machine ``probe_due`` before each step
    and reports the probe (here an oracle: a non-empty answer with agree=1 exits); the tensor machine pauses the
    slot at the same point and the host releases it (go on, or exit). The step right after a pause takes no
    proposal of its own (the held one, or the forced closing), so the streams are fed accordingly."""
    rng = random.Random(500 + seed)
    slots = 12
    tb = TensorBudget(slots, "cpu", VOCAB, NL_TABLE, sentence_table=SENTENCE)
    rows = []
    for b in range(slots):
        tokens = _with_words(rng.choice([TOKENS, ONE_WAIT, TWO_TOKEN_WAIT]))
        ee = rng.choice([None, EarlyExit(every=rng.choice([3, 5]), agree=1), EarlyExit(words=("w",), agree=1),
                         EarlyExit(every=4, words=("w",), agree=1)])
        cap = rng.choice([None, 6, 15])
        policy = BudgetPolicy(max_thinking_tokens=cap, min_thinking_tokens=min(rng.choice([0, 4]), cap or 99),
                              num_waits=rng.choice([0, 1, 2]), max_answer_tokens=rng.choice([2, 6]),
                              cap_grace=rng.choice([0, 0, 3]), early_exit=ee)
        tb.load(b, policy, tokens, None)
        props = [rng.choice([IM_START, IM_END, EOS, NL, 40, WORD, DOT]) if rng.random() < 0.35 else
                 rng.randrange(1, 60) for _ in range(200)]
        rows.append((policy, tokens, props, [rng.random() < 0.3 for _ in range(60)]))
    # the pure machine, driven as the plain loop drives it
    pure = []
    for policy, tokens, props, decisions in rows:
        s, d = BudgetState(policy, tokens), list(decisions)
        for p in props:
            if s.done:
                break
            if s.probe_due(p):
                s.observe_probe("yes" if d.pop(0) else "", 0.0, 3)
            s.step(p)
        assert s.done
        pure.append(s)
    # the tensor machine, driven as the fast path drives it
    at = [0] * slots
    after_pause = [False] * slots
    decisions = [list(r[3]) for r in rows]
    out = [[] for _ in range(slots)]
    while not all(p == 2 for p in tb.phase.tolist()):
        e, k = tb.step(torch.tensor([rows[b][2][min(at[b], 199)] for b in range(slots)]), pad_id=0)
        phase = tb.phase.tolist()
        for b in range(slots):
            if k[b] != NONE:
                out[b].append(int(e[b]))
            if not after_pause[b]:
                at[b] += 1
            after_pause[b] = False
            if phase[b] == 3 and not tb.resume[b]:  # paused at a probe point: the host answers
                tb.release(b, exit=decisions[b].pop(0))
                after_pause[b] = True
    for b, s in enumerate(pure):
        assert out[b] == s.token_ids, (b, rows[b][0])
        assert bool(tb.hit_cap[b]) == s.hit_cap and bool(tb.exited[b]) == s.early_exit
        assert int(tb.waits_used[b]) == s.waits_used
    assert any(s.early_exit for s in pure) and any(s.probe_answers for s in pure if not s.early_exit)
