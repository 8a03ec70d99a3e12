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
