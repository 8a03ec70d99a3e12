"""The engine core (add / step / abort / stop_thinking) on the real SmolLM2-135M, float32 on the CPU, for each
decoder: the plain loop, the fast path stepped eagerly, and the fast path with pipelined publishing (each chunk's
tokens published while the next chunk runs, as on a GPU). Greedy decoding: a request's tokens must not depend on
what else is decoding, when it joined, or what was aborted beside it."""

import pytest

from s1kit import BudgetPolicy, Request, ThinkingFormat
from s1kit.engines.fast import FastDecoder
from s1kit.engines.hf import HFEngine

# Thinking in free text until the turn ends: long thinking is easy to get from this model.
PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))


def exact(n, answer=6):
    return BudgetPolicy(min_thinking_tokens=n, max_thinking_tokens=n, max_answer_tokens=answer)


@pytest.fixture(params=["loop", "fast", "fast-pipelined"])
def core(engine, request):
    """A fresh two-slot engine core over the session's model, with the decoder under test."""
    e = HFEngine(engine.model, engine.tokenizer, batch_size=2, fast=request.param != "loop")
    if request.param == "fast-pipelined":  # what the GPU runs: chunks of 3 steps, published one chunk late
        e._decoder = FastDecoder(engine.model, engine.tokenizer, e.pad_id, slots=2, sync_every=3, pipeline=True)
    return e


def run(core, *handles):
    while core.has_work:
        core.step()
    return [h.completions()[0] for h in handles]


def test_a_request_added_while_another_decodes_gets_its_budget_and_the_tokens_it_gets_alone(core):
    long = Request("Explain why the sky is blue.", exact(40), PLAIN)
    late = Request("What is 17*23?", exact(12))
    alone_long, alone_late = core.generate([long])[0], core.generate([late])[0]
    h1 = core.add(long)
    for _ in range(9):
        core.step()
    assert 0 < len(h1.rows[0].trace.thinking_ids) < 40 and not h1.done  # it is decoding
    h2 = core.add(late)
    c1, c2 = run(core, h1, h2)
    assert (c1.thinking_tokens, c2.thinking_tokens) == (40, 12)
    assert c2.token_ids == alone_late.token_ids and c1.token_ids == alone_long.token_ids


def test_an_abort_mid_stream_frees_the_slot_for_the_next_queued_request(core):
    a, b = (core.add(Request(p, exact(60), PLAIN)) for p in ("Tell me about cats.", "Tell me about dogs."))
    queued = core.add(Request("What is 2+2?", exact(5)))
    for _ in range(7):
        core.step()
    assert queued.rows[0].slot is None and a.rows[0].trace.token_ids  # both slots busy, the third waits
    core.abort(a)
    [cancelled] = a.completions()
    assert a.done and cancelled.finish_reason == "cancelled" and 0 < cancelled.thinking_tokens < 60
    core.step()
    assert queued.rows[0].slot is not None or queued.done  # it took the freed slot at once
    got_b, got_q = run(core, b, queued)
    assert got_b.thinking_tokens == 60 and got_q.thinking_tokens == 5
    assert got_q.token_ids == core.generate([queued.request])[0].token_ids  # as if run alone


def test_stop_thinking_closes_as_a_cap_at_that_point_would(core):
    req = Request("Write a long story about a dragon and a knight.", BudgetPolicy(max_answer_tokens=8), PLAIN)
    h = core.add(req)
    while len(h.rows[0].trace.thinking_ids) < 10:
        core.step()
    seen = len(h.rows[0].trace.thinking_ids)
    core.stop_thinking(h)
    [c] = run(core, h)
    lag = core.decoder.sync_every if isinstance(core.decoder, FastDecoder) and core.decoder.pipeline else 0
    assert seen <= c.thinking_tokens <= seen + lag and c.hit_cap
    assert c.answer.startswith("Final Answer:")
    capped = core.generate([Request(req.prompt, BudgetPolicy(max_thinking_tokens=c.thinking_tokens,
                                                             max_answer_tokens=8), PLAIN)])[0]
    assert c.token_ids == capped.token_ids  # the same tokens as a cap at that count


def test_updates_stream_each_rows_tokens_and_completions_arrive_as_rows_end(core):
    published: dict[int, list[int]] = {}
    ended = []

    def on_update(row):
        ids = row.trace.token_ids
        assert ids[: len(published.get(row.handle.request_index, []))] == published.get(row.handle.request_index, [])
        published[row.handle.request_index] = list(ids)
        if row.done:
            ended.append((row.handle.request_index, sum(h.done for h in handles)))

    reqs = [Request("What is 3*4?", exact(n)) for n in (20, 4, 9)]
    handles = [core.add(r, on_update, i) for i, r in enumerate(reqs)]
    got = run(core, *handles)
    assert [c.thinking_tokens for c in got] == [20, 4, 9]
    # each answered when it ended, not when the batch did: the first ended while the others still decoded
    assert ended[0] == (1, 1) and sorted(i for i, _ in ended) == [0, 1, 2]
    assert all(published[i] == c.token_ids for i, c in enumerate(got))


def test_generate_validates_every_request_before_decoding(core):
    from s1kit import S1KitError

    with pytest.raises(S1KitError, match="does not fit"):
        core.generate([Request("Hi", exact(3)), Request("word " * 9000, exact(3))])
    assert not core.has_work


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU: run on the device machine")
def test_gpu_core_joins_aborts_and_stops_inside_cuda_graphs():
    """The pipelined fast path on CUDA (captured steps, pinned snapshots published a chunk late): budgets stay exact
    for rows that join mid-decode, an abort frees its slot for a queued row, stop-thinking closes as a cap, and the
    tokens published along the way are the completion's. A random Qwen2.5-0.5B architecture in bfloat16."""
    import torch

    from s1kit.bench import random_model, synthetic_tokens
    from s1kit.engines.core import token_rows

    torch.manual_seed(0)
    model = random_model("qwen2.5-0.5b", "cuda", torch.bfloat16)
    tokens = synthetic_tokens(model.config.vocab_size)
    dec = FastDecoder(model, None, pad_id=0, slots=4, compile=False)
    assert dec.pipeline and dec.sync_every == 16
    rows = token_rows([torch.randint(100, 5000, (n,)).tolist() for n in (7, 90, 30, 64, 5, 12)],
                      exact(150, answer=4), tokens)
    stop = token_rows([[101, 102, 103]], BudgetPolicy(max_thinking_tokens=5000, max_answer_tokens=4), tokens)[0]
    queue = __import__("collections").deque(rows[:4])
    seen = {id(r): [] for r in rows + [stop]}
    for _ in range(3):  # four rows decode; two more and the stop-row join below
        for r in dec.step(queue):
            assert r.trace.token_ids[: len(seen[id(r)])] == seen[id(r)]
            seen[id(r)] = list(r.trace.token_ids)
    queue.extend(rows[4:] + [stop])
    victim = rows[0]
    dec.cancel(victim)
    victim.done, victim.slot = True, None
    pending = set(rows[1:] + [stop])
    stopped_at = None
    while pending:
        for r in dec.step(queue):
            if r is stop and stopped_at is None and len(r.trace.thinking_ids) >= 40:
                stopped_at = len(r.trace.thinking_ids)
                dec.stop_thinking(r)
            if r.done:
                pending.discard(r)
    assert all(len(r.trace.thinking_ids) == 150 and r.trace.hit_cap for r in rows[1:])
    assert stopped_at <= len(stop.trace.thinking_ids) <= stopped_at + 2 * dec.sync_every and stop.trace.hit_cap
    assert dec.stats["rows"] == 6


def test_a_request_that_cannot_sample_fails_alone_and_generate_can_go_on_without_it(engine):
    """The plain loop: a sampled row whose distribution is not finite (a temperature of 1e-300 forced past
    ``SamplingParams``' check) fails its own request with a ``RequestError``. ``generate`` raises it by default; with
    ``on_error`` it reports the request and returns the others, unchanged (eval stores such an item as an error)."""
    from s1kit import SamplingParams
    from s1kit.errors import RequestError

    core = HFEngine(engine.model, engine.tokenizer, batch_size=4)
    broken = SamplingParams(temperature=1.0, seed=1, n=2)
    object.__setattr__(broken, "temperature", 1e-300)
    good = [Request("Name a colour.", exact(6)), Request("Say hi.", exact(4))]
    reqs = [good[0], Request("Name a fruit.", exact(6), sampling=broken), good[1]]
    with pytest.raises(RequestError, match="not finite"):
        core.generate(reqs)
    failed = []
    out = core.generate(reqs, on_error=lambda i, e: failed.append((i, type(e).__name__)))
    assert failed == [(1, "RequestError")] and not core.has_work
    assert [c.token_ids for c in out] == [c.token_ids for c in core.generate(good)]


def test_the_core_keeps_the_books_from_each_backends_step_outputs(core):
    """Every decoder reports token columns with their kinds; only the core writes a row's trace (a plain ``Trace``,
    never the backend's machine), and what it filed adds up: thinking, the opener, the forced prefix and answer,
    the end token, a typed finish reason."""
    from s1kit.budget import FinishReason, Kind, Trace

    policy = BudgetPolicy(min_thinking_tokens=20, max_thinking_tokens=20, max_answer_tokens=8)
    h = core.add(Request("What is 2+3?", policy))
    seen = []
    while core.has_work:
        core.step()
        t = h.rows[0].trace
        assert type(t) is Trace and len(t.kinds) == len(t.token_ids)
        assert t.token_ids[: len(seen)] == seen  # published tokens are never rewritten
        seen = list(t.token_ids)
    [c] = h.completions()
    t = h.rows[0].trace
    assert c.thinking_tokens == t.kinds.count(Kind.THINK) == len(t.thinking_ids) == 20 and c.hit_cap
    assert t.kinds.index(Kind.OPENER) == 20 and Kind.PREFIX in t.kinds
    assert c.answer_tokens == t.kinds.count(Kind.PREFIX) + t.kinds.count(Kind.ANSWER)
    assert c.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and isinstance(c.finish_reason, FinishReason)
    assert (t.kinds[-1] is Kind.END) == (c.finish_reason == "stop") and c.waits_exact


def test_admission_takes_rows_in_order_and_a_row_that_does_not_fit_waits_without_blocking_later_ones():
    """``admit_from``: the core's one admission rule for every backend."""
    from collections import deque

    from s1kit.engines.core import admit_from

    queue = deque(range(6))
    assert admit_from(queue, 3, lambda r: r % 2 == 1) == [1, 3, 5] and list(queue) == [0, 2, 4]
    assert admit_from(queue, 1, lambda r: True) == [0] and list(queue) == [2, 4]
    assert admit_from(queue, 0, lambda r: True) == [] and admit_from(queue, 5, lambda r: False) == []
    assert list(queue) == [2, 4]


def test_the_fast_paths_workspace_is_made_in_inference_mode(engine):
    """A workspace (its cache and, on CUDA, its captured steps) made outside inference mode records autograd work
    in every step: on the H200 that cost 3.38 against 2.15 ms/step. The core makes it through ``room``."""
    e = HFEngine(engine.model, engine.tokenizer, batch_size=2, fast=True)
    e.add(Request("Hi", exact(2)))
    e.step()
    ws = e.decoder.ws
    assert ws.kv.keys[0].is_inference() and ws.logits.is_inference() and ws.tb.phase.is_inference()
    while e.has_work:
        e.step()
