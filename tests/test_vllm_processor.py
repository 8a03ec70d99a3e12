"""s1kit's vLLM logits processor, on the CPU.

vLLM cannot be installed in CI (its wheels need a CUDA GPU), so these tests drive the processor's logic
directly: ``BudgetRows`` (integrations/processor.py: per-request state, masking, the drawn proposals, rows
added/removed/moved), ``sampling.py`` and the request fields of ``xargs.py``. ``integrations/vllm.py`` only
translates vLLM's interface into these calls; it is exercised on a GPU by ``benchmarks/remote_vllm.py``.
What vLLM itself does around the processor is simulated here in a few lines and says so: a persistent
batch that removes, adds, parks (not scheduled) and condenses rows, steps whose token it discards (partial
prefills), live output lists, and a sampler that takes the argmax of the processed logits (after forcing,
every row with a budget is one-hot or untouched). Tokens come from the real SmolLM2 tokenizer (with
``<think>``/``</think>`` added for the r1 format, as in R1 distills); the authority is ``BudgetState``.
"""

import copy
import math
import random
import re

import pytest
import torch

from s1kit import R1, S1, BudgetPolicy, BudgetState, ThinkingFormat
from s1kit.forcing import ForcingCompiler
from s1kit.engines.remote import load_tokenizer
from s1kit.integrations.processor import BudgetRows, RequestParams, check_request
from s1kit.integrations.sampling import RowSampling, filtered_logits, uniform
from s1kit.integrations.xargs import from_xargs, to_xargs

CUSTOM = ThinkingFormat("custom", think_open="Thoughts:", stop_tokens=("<|im_end|>",), answer_open="Answer:",
                        end_tokens=("<|im_end|>",))


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer with <think> and </think> added (r1), as a distill's tokenizer has them."""
    t = copy.deepcopy(load_tokenizer("smollm2-135m"))
    t.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return t


def params(policy, fmt=S1, sampling=RowSampling(), seed=None, max_tokens=4096, ending=(2,)):
    return RequestParams(to_xargs(policy, fmt), sampling, seed, max_tokens, frozenset(ending))


def random_policy(rng, i):
    """The i-th random policy: with and without a cap (i % 4 < 2) and Waits (odd i), one or two wait strings."""
    cap = rng.choice([0, 1, 4, 12, 30]) if i % 4 < 2 else None
    lo = rng.choice([0, 3, 10, 25])
    lo = lo if cap is None else min(lo, cap)
    waits = rng.choice([("Wait",), ("Wait", " Hmm,")])
    return BudgetPolicy(max_thinking_tokens=cap, min_thinking_tokens=lo, num_waits=i % 2 * rng.choice([1, 2, 3]),
                        wait_strings=waits, max_answer_tokens=rng.choice([1, 4, 9]))


class Sim:
    """vLLM's persistent batch around the processor (simulated: vLLM cannot run here), one request per row.

    Each step begins with one batch update in vLLM's order: requests that left (finished, or not scheduled
    this step: "parked") leave holes; new and returning requests take the lowest holes, which vLLM then
    does not report as removed; the other holes are removed and the last rows move into them (condense);
    sometimes two rows swap. Returning requests come back with a new output list (async scheduling)."""

    def __init__(self, tok, slots, vocab, rng, parked=4096):
        self.core = BudgetRows(tok, max_model_len=None, parked=parked)
        self.tok, self.slots, self.vocab, self.rng = tok, slots, vocab, rng
        self.batch = []  # row index -> request, or None for a hole left this step
        self.waiting, self.parked, self.finished = [], [], []

    def add(self, req):
        self.waiting.append(req)

    def _update(self):
        holes = sorted(i for i, r in enumerate(self.batch) if r is None)
        if self.parked and self.rng.random() < 0.5:  # a parked request is scheduled again, with a new list
            req = self.parked.pop(0)
            req["out"] = list(req["out"])
            self.waiting.append(req)
        added = []
        for req in self.waiting:
            i = holes.pop(0) if holes else len(self.batch)
            if i == len(self.batch):
                self.batch.append(None)
            self.batch[i] = req
            added.append(i)
        self.waiting = []
        for i in holes:  # removed (processed first), then added, then moved: vLLM's order
            self.core.remove(i)
        for i in added:
            req = self.batch[i]
            self.core.add(i, req["key"], req["params"], [1, 2, 3], req["out"])
        for hole in holes:
            while self.batch and self.batch[-1] is None:
                self.batch.pop()
            if hole < len(self.batch):
                self.batch[hole] = self.batch.pop()
                self.core.move(len(self.batch), hole, swap=False)
        while self.batch and self.batch[-1] is None:
            self.batch.pop()
        if len(self.batch) > 1 and self.rng.random() < 0.2:
            a, b = self.rng.sample(range(len(self.batch)), 2)
            self.batch[a], self.batch[b] = self.batch[b], self.batch[a]
            self.core.move(a, b, swap=True)

    def step(self, logits_of):
        """One decode step: the batch update, the processor's masking, the 'sampled' argmax, appended."""
        self._update()
        if not self.batch:
            return
        logits = torch.stack([logits_of(req) for req in self.batch])
        raw = logits.clone()
        tokens = self.core.apply(logits).argmax(-1).tolist()
        for i, (req, row_raw, token) in enumerate(zip(list(self.batch), raw, tokens)):
            if req["prefill_chunks"] > 0:  # a partial prefill: vLLM discards the sampled token
                req["prefill_chunks"] -= 1
                continue
            req["consumed"](row_raw)
            req["out"].append(token)
            if token in req["params"].ending_ids or len(req["out"]) >= req["params"].max_tokens:
                self.finished.append(req)
                self.batch[i] = None
            elif len(self.batch) > 1 and self.rng.random() < 0.05:  # not scheduled next step
                self.parked.append(req)
                self.batch[i] = None

    @property
    def busy(self):
        return any(r is not None for r in self.batch) or self.parked or self.waiting


def _request(tok, rng, i, fmt, vocab, proposals_of):
    policy = random_policy(rng, i)
    tokens = ForcingCompiler(tok, [2])(fmt, policy)
    req = {"key": object(), "policy": policy, "tokens": tokens, "out": [], "prefill_chunks": rng.choice([0, 0, 1, 2]),
           "params": params(policy, fmt, RowSampling(rng.choice([0.0, 0.7]), rng.choice([1.0, 0.9]),
                                                      rng.choice([0, 20])), seed=i)}
    req["proposals"] = proposals_of(req)
    return req


def _stops_frequent(tok, fmt, rng, n, waits=True):
    special = list(ForcingCompiler(tok, [2])(fmt, BudgetPolicy()).stop_ids) + [198] + [33359] * waits  # "\n", "Wait"
    return [rng.choice(special) if rng.random() < 0.25 else rng.randrange(3, 49152) for _ in range(n)]


@pytest.mark.parametrize("fmt,forgets", [(S1, False), (R1, False), (CUSTOM, False), (S1, True)],
                         ids=["s1", "r1", "custom", "s1-forgets-parked-rows"])
def test_processor_follows_budget_state_on_random_proposal_streams(tok, fmt, forgets):
    """Point-mass logits make each step's proposal a chosen token: stops, Waits, newlines and anything else.

    ``forgets``: the processor keeps no parked row, so every returning request is rebuilt from its tokens
    (exact as long as the model never writes a wait string itself, which these streams then avoid)."""
    rng = random.Random(fmt.name + str(forgets))
    vocab = len(tok)
    sim = Sim(tok, 12, vocab, rng, parked=0 if forgets else 4096)

    def logits_of(req):
        row = torch.full((vocab,), float("-inf"))
        row[req["proposals"][min(len(req["fed"]), 199)]] = 0.0
        return row

    def consumed(req):
        return lambda raw: req["fed"].append(int(raw.argmax()))

    pending = []
    for i in range(40):
        req = _request(tok, rng, i, fmt, vocab, lambda r: _stops_frequent(tok, fmt, rng, 200, waits=not forgets))
        req["fed"] = []
        req["consumed"] = consumed(req)
        pending.append(req)
    for _ in range(3000):
        live = sum(r is not None for r in sim.batch) + len(sim.parked)
        for _ in range(min(len(pending), sim.slots - live)):
            sim.add(pending.pop())
        if not sim.busy:
            break
        sim.step(logits_of)
    assert len(sim.finished) == 40
    for req in sim.finished:
        ref = BudgetState(req["policy"], req["tokens"])
        for p in req["fed"]:
            if ref.done:
                break
            ref.step(p)
        assert ref.done
        out = req["out"]
        assert out[: len(ref.token_ids)] == ref.token_ids
        assert out[len(ref.token_ids):] in ([], [2])  # the end token forced after an answer budget
        assert out[-1] == 2
    kinds = {(r["policy"].num_waits > 0, r["policy"].max_thinking_tokens is not None) for r in sim.finished}
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}


def test_greedy_rows_on_random_logits_equal_the_machine_fed_the_argmax(tok):
    """Real-valued logits: the machine is fed each step's argmax (greedy s1), the sampler sees the processed row."""
    rng = random.Random(7)
    vocab = len(tok)
    gen = torch.Generator().manual_seed(7)
    stop_ids = [1, 2]
    sim = Sim(tok, 8, vocab, rng)

    def logits_of(req):
        row = torch.randn(vocab, generator=gen)
        if rng.random() < 0.3:
            row[rng.choice(stop_ids + [33359])] = 10.0  # make a stop (or "Wait") the argmax now and then
        return row

    reqs = []
    for i in range(16):
        policy = random_policy(rng, i)
        req = {"key": object(), "policy": policy, "tokens": ForcingCompiler(tok, [2])(S1, policy), "out": [],
               "prefill_chunks": rng.choice([0, 1]), "params": params(policy), "fed": []}
        req["consumed"] = lambda raw, req=req: req["fed"].append(int(raw.argmax()))
        reqs.append(req)
        sim.add(req)
    for _ in range(600):
        if not sim.busy:
            break
        sim.step(logits_of)
    assert len(sim.finished) == 16
    for req in reqs:
        ref = BudgetState(req["policy"], req["tokens"])
        for p in req["fed"]:
            if not ref.done:
                ref.step(p)
        assert req["out"][: len(ref.token_ids)] == ref.token_ids
    assert sum(r["policy"].num_waits > 0 for r in reqs) >= 4


def _reference_keep(logits, s: RowSampling):
    """Which tokens vLLM's definitions keep, written out plainly: temperature, min-p, top-k, top-p."""
    x = [v / s.temperature for v in logits]
    m = max(x)
    p = [math.exp(v - m) for v in x]
    z = sum(p)
    p = [v / z for v in p]
    keep = [pi >= max(p) * s.min_p for pi in p]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if 0 < s.top_k < len(x):
        kth = x[order[s.top_k - 1]]
        keep = [k and x[i] >= kth for i, k in enumerate(keep)]
    kept = [i for i in order if keep[i]]
    mass = sum(math.exp(x[i] - m) for i in kept)
    above = 0.0
    for rank, i in enumerate(kept):
        if rank and above >= s.top_p:
            keep[i] = False
        above += math.exp(x[i] - m) / mass
    return keep, x


SAMPLINGS = [RowSampling(1.0), RowSampling(0.7, top_p=0.9), RowSampling(1.3, top_k=40), RowSampling(0.8, min_p=0.05),
             RowSampling(1.0, top_p=0.8, top_k=100)]


@pytest.mark.parametrize("s", SAMPLINGS[1:], ids=lambda s: f"T{s.temperature}-p{s.top_p}-k{s.top_k}-m{s.min_p}")
def test_filter_keeps_the_tokens_vllm_keeps(s):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 500, generator=gen)
    got = torch.isfinite(filtered_logits(logits, [s] * 3))
    for row, kept in zip(logits.tolist(), got.tolist()):
        assert kept == _reference_keep(row, s)[0]
    assert 1 < got.sum(1).min() and got.sum(1).max() < 500  # every filter here drops something, keeps several


def _stop_probability(logits, s, stop_ids):
    keep, x = _reference_keep(logits, s)
    m = max(v for v, k in zip(x, keep) if k)
    w = [math.exp(v - m) if k else 0.0 for v, k in zip(x, keep)]
    return sum(w[i] for i in stop_ids) / sum(w)


@pytest.mark.parametrize("s", SAMPLINGS[:4], ids=lambda s: f"T{s.temperature}-p{s.top_p}-k{s.top_k}-m{s.min_p}")
def test_a_stop_becomes_a_wait_with_the_probability_the_model_gives_it(tok, s):
    """Where s1 replaces a sampled stop by a Wait, the processor forces the Wait at that rate, else keeps thinking."""
    vocab = 2048  # token ids of interest are small: stops 1 and 2; "Wait" is 33359, so it gets its own slot
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(vocab, generator=gen)
    base[1], base[2] = 5.0, 4.5  # <|im_start|>, <|im_end|>: a stop is likely but not certain
    wait = 33359
    full = torch.full((len(tok),), float("-inf"))
    full[:vocab] = base
    p_stop = _stop_probability(full[:vocab].tolist(), s, [1, 2])
    assert 0.05 < p_stop < 0.95
    policy = BudgetPolicy(num_waits=1)
    n, batch, waits, other = 0, 200, 0, set()
    core = BudgetRows(tok, max_model_len=None)
    for round_ in range(10):
        outs = []
        for i in range(batch):
            outs.append([])
            core.add(i, object(), params(policy, S1, s, seed=round_ * batch + i), [5], outs[-1])
        emitted = core.apply(full.repeat(batch, 1)).argmax(-1).tolist()
        for i, (e, out) in enumerate(zip(emitted, outs)):
            out.append(e)
            if e == wait:
                waits += 1
            else:
                other.add(e)
            core.remove(i)
        n += batch
    sd = math.sqrt(p_stop * (1 - p_stop) / n)
    assert abs(waits / n - p_stop) < 4.5 * sd, (waits / n, p_stop)
    keep, _ = _reference_keep(full[:vocab].tolist(), s)
    assert other and all(keep[t] and t not in (1, 2) for t in other)  # otherwise a non-stop from the distribution
    # the machine took the forced Waits as Waits: feed the next step and read its state
    core.add(0, object(), params(policy, S1, s, seed=0), [5], out := [])
    e = core.apply(full.unsqueeze(0).clone()).argmax(-1).item()
    out.append(e)
    core.apply(full.unsqueeze(0).clone())
    assert core.rows[0].state.waits_used == (e == wait)


def test_greedy_forces_the_wait_exactly_when_a_stop_is_the_argmax(tok):
    core = BudgetRows(tok, max_model_len=None)
    logits = torch.zeros(2, len(tok))
    logits[0, 2] = 5.0  # <|im_end|> is the argmax: replaced by "Wait"
    logits[1, 2], logits[1, 500] = 5.0, 5.5  # token 500 wins
    for i in range(2):
        core.add(i, object(), params(BudgetPolicy(num_waits=1)), [5], [])
    out = core.apply(logits).argmax(-1).tolist()
    assert out == [33359, 500]


def test_the_uniforms_are_a_function_of_seed_and_position():
    assert uniform(3, 10) == uniform(3, 10)
    us = [uniform(seed, pos) for seed in range(40) for pos in range(50)]
    assert len(set(us)) == len(us) and all(0 <= u < 1 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.02


def test_max_tokens_lowers_the_cap_so_the_answer_and_end_fit(tok):
    core = BudgetRows(tok, max_model_len=None)
    policy = BudgetPolicy(min_thinking_tokens=0, max_answer_tokens=5)  # no cap of its own
    core.add(0, object(), params(policy, max_tokens=30), [5], out := [])
    logits = torch.zeros(1, len(tok))
    logits[0, 100] = 1.0
    while not out or (out[-1] != 2 and len(out) < 30):
        out.append(core.apply(logits.clone()).argmax(-1).item())
    state = core.rows[0].state
    assert out[-1] == 2 and len(out) == 30  # 30 - 1 (end) - 5 (answer) - 7 (closing) = 17 thinking tokens
    assert len(state.thinking_ids) == 17 and state.hit_cap and state.finish_reason == "length"


def test_requests_the_processor_cannot_honour_end_with_the_reason_as_their_text(tok):
    core = BudgetRows(tok, max_model_len=None)
    bad_format = ThinkingFormat("custom", think_open="", stop_tokens=("not one token",), answer_open="A:")
    cases = [
        params(BudgetPolicy(max_answer_tokens=50), max_tokens=20),  # no room for the answer
        params(BudgetPolicy(), bad_format),  # a delimiter that is not one token
        params(BudgetPolicy(wait_strings=("<|im_end|>",), num_waits=1)),  # a forced token that ends the request
        params(BudgetPolicy(), ending=()),  # nothing ends it (ignore_eos without stop ids)
    ]
    messages = ["leaves no room to answer", "is not a single token", "would end the request", "no token that ends it"]
    for i, p in enumerate(cases):
        core.add(i, object(), p, [5], [])
    for i, message in enumerate(messages):
        assert message in core.rows[i].error
    text = [[] for _ in cases]
    for _ in range(120):
        for i, t in enumerate(core.apply(torch.zeros(len(cases), len(tok))).argmax(-1).tolist()):
            text[i].append(t)
    assert tok.decode(text[0]).startswith("[s1kit budget forcing refused this request: max_tokens=20 leaves no room")
    assert text[0][-1] == 2 and text[1][-1] == 2


def test_request_fields_round_trip_and_bad_ones_are_refused():
    policy = BudgetPolicy(max_thinking_tokens=64, min_thinking_tokens=8, num_waits=2, wait_strings=("Wait", " Hmm,"),
                          answer_prefix="", max_answer_tokens=32)
    for fmt in (S1, R1, CUSTOM):
        assert from_xargs(to_xargs(policy, fmt)) == (policy, fmt)
    assert "s1_max_thinking_tokens" not in to_xargs(BudgetPolicy(), S1)  # no cap: left out
    assert check_request(RequestParams({"other_extension": 1})) is None  # not ours
    bad = [
        ({"s1_max_thinking": 5}, "unknown s1kit budget field(s) s1_max_thinking"),
        ({"s1_max_thinking_tokens": "5"}, "s1_max_thinking_tokens must be an integer"),
        ({"s1_max_thinking_tokens": 5.0}, "s1_max_thinking_tokens must be an integer"),
        ({"s1_wait_strings": []}, "s1_wait_strings must be a non-empty string or a list"),
        ({"s1_format": "r2"}, "s1_format must be one of auto, s1, r1, custom"),
        ({"s1_format": "custom", "s1_stop_tokens": ["x"]}, "needs s1_think_open, s1_answer_open"),
        ({"s1_think_open": "x"}, "only go with s1_format 'custom'"),
        ({"s1_min_thinking_tokens": 9, "s1_max_thinking_tokens": 4}, "exceeds max_thinking_tokens"),
        ({"s1_max_answer_tokens": 0}, "max_answer_tokens must be >= 1"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_request(RequestParams(args))
    with pytest.raises(ValueError, match="cannot honour presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.1"):
        check_request(RequestParams({"s1_num_waits": 1}, penalties=(0.0, 0.0, 1.1)))
