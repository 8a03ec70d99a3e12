"""The s1 stop-and-continue loop: the test oracle that every engine must match token for token (DESIGN.md §2).

It generates thinking until a stop token or the remaining cap, drops the stop, appends a wait string's
tokens and generates again from the whole prefix, then appends the answer opener and generates the
answer. Any ``complete(ids, max_new_tokens, stop_ids)`` backend can drive it: transformers' ``generate``
here (tests, and the baseline of ``benchmarks/forcing_overhead.py``). It is written apart from
``BudgetState`` on purpose, so that the two can check each other; it has no graceful cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from s1kit.budget import BudgetPolicy, ForcingTokens, Trace
from s1kit.engines.probe import ProbeResult

# complete(prefix ids, max new tokens, stop ids) -> new ids, ending with the stop token if one was hit.
Complete = Callable[[list[int], int, frozenset[int]], list[int]]
Call = tuple[list[int], int, frozenset[int]]  # the arguments of one ``complete`` call


@dataclass(frozen=True)
class ProbeCall:
    """An early-exit probe the loop asks its driver for: decode greedily after ``ids`` (the context so far, the
    answer opener and the answer prefix) for up to ``max_tokens``, stopping at ``end_ids``. The driver sends back
    a ``ProbeResult`` whose tokens count ``suffix_len`` (the opener and prefix it fed) plus the steps it decoded."""

    ids: list[int]
    suffix_len: int
    prefix: list[int]
    max_tokens: int
    end_ids: frozenset[int]


def stop_and_continue(
    prompt_ids: Sequence[int],
    policy: BudgetPolicy,
    tokens: ForcingTokens,
    complete: Complete,
    cap: int | None = None,
    unbounded: int = 1 << 30,
    probe: Callable[[ProbeCall], ProbeResult] | None = None,
) -> Trace:
    """Run the s1 loop for one prompt; ``cap`` overrides the policy's thinking cap (context window); ``probe``
    runs early-exit probes (needed when the policy has early exit)."""
    if policy.early_exit is not None and probe is None:
        raise ValueError("a policy with early exit needs a probe function")
    steps = loop_steps(prompt_ids, policy, tokens, cap, unbounded)
    call = next(steps)
    while True:
        try:
            call = steps.send(probe(call) if isinstance(call, ProbeCall) else complete(*call))
        except StopIteration as done:
            return done.value


def loop_steps(
    prompt_ids: Sequence[int],
    policy: BudgetPolicy,
    tokens: ForcingTokens,
    cap: int | None = None,
    unbounded: int = 1 << 30,
    trace: Trace | None = None,
    close_thinking: Callable[[], bool] | None = None,
) -> Generator[Call | ProbeCall, list[int] | ProbeResult, Trace]:
    """The s1 loop as a generator: yields each ``complete`` call's arguments, is sent its new ids, returns the trace.

    ``stop_and_continue`` drives it with a plain function; the remote engine drives many at once on one
    event loop, awaiting each call. ``trace`` is filled as the loop goes (so a driver can stream it after each
    call); once ``close_thinking()`` is true, thinking closes as at a cap of the tokens so far.

    Early exit (``policy.early_exit``) yields a ``ProbeCall`` at each probe point, as ``BudgetState`` decides
    them: before the proposal that follows every ``every``-th thinking token (calls end there) or a proposal that
    starts one of the words (the words' first tokens are stop ids of the call), unless the proposal is a stop or
    the thinking is shorter than ``min_thinking_tokens``. A settled probe closes thinking before that proposal."""
    cap = policy.max_thinking_tokens if cap is None else cap
    t = Trace() if trace is None else trace
    prompt = list(prompt_ids)
    ee = policy.early_exit
    probed_at = -1

    def probe_due(n: int, proposed: int) -> bool:
        return ee.is_probe_point(n, proposed, tokens, policy.min_thinking_tokens, probed_at)

    while True:
        if close_thinking is not None and close_thinking():
            cap = len(t.thinking_ids) if cap is None else min(cap, len(t.thinking_ids))
        remaining = unbounded if cap is None else cap - len(t.thinking_ids)
        if remaining <= 0:
            break
        n0, asked, stop = len(t.thinking_ids), remaining, tokens.stop_ids
        if ee is not None:  # calls end at the next count point and at the words' first tokens
            asked = min(asked, ee.every - n0 % ee.every) if ee.every else asked
            stop = stop | tokens.word_ids
        out = yield prompt + t.thinking_ids, asked, stop
        if ee is not None and out and probe_due(n0, out[0]):
            probed_at = n0
            if (yield from _probe(t, prompt, policy, tokens)):
                break
        if ee is not None and out and out[-1] in tokens.word_ids and out[-1] not in tokens.stop_ids:
            t.thinking_ids += out[:-1]  # the model proposes a word: probe the thinking before it
            if probe_due(len(t.thinking_ids), out[-1]):
                probed_at = len(t.thinking_ids)
                if (yield from _probe(t, prompt, policy, tokens)):
                    break
            t.thinking_ids.append(out[-1])
            continue
        stopped = bool(out) and out[-1] in tokens.stop_ids
        t.thinking_ids += out[:-1] if stopped else out
        if not stopped:
            if len(out) < asked:  # the backend ended without a stop token: treat as a cap
                break
            continue  # at the cap or a probe point: handled at the top of the loop
        if t.waits_used < policy.num_waits or len(t.thinking_ids) < policy.min_thinking_tokens:
            wait = list(tokens.wait_ids[t.waits_used % len(tokens.wait_ids)])
            t.waits_used += 1
            room = len(wait) if cap is None else cap - len(t.thinking_ids)
            t.thinking_ids += wait[:room]
            continue
        return (yield from _answer(t, prompt, list(tokens.opener_ids), [], policy, tokens))
    t.hit_cap = not t.early_exit
    ends_nl = tokens.ends_with_newline(t.thinking_ids[-1]) if t.thinking_ids else tokens.prompt_ends_with_newline
    opener, prefix = tokens.cap_close_ids(ends_nl)
    return (yield from _answer(t, prompt, list(opener), list(prefix), policy, tokens))


def _probe(t: Trace, prompt: list[int], policy: BudgetPolicy,
           tokens: ForcingTokens) -> Generator[ProbeCall, ProbeResult, bool]:
    """Probe the thinking so far; True (and ``early_exit`` set) once the rule holds."""
    ends_nl = tokens.ends_with_newline(t.thinking_ids[-1]) if t.thinking_ids else tokens.prompt_ends_with_newline
    opener, prefix = tokens.cap_close_ids(ends_nl)
    res = yield ProbeCall(prompt + t.thinking_ids + list(opener) + list(prefix), len(opener) + len(prefix),
                          list(prefix), policy.early_exit.probe_tokens, tokens.end_ids)
    return t.record_probe(policy.early_exit, res.answer, res.confidence, res.tokens)


def _answer(
    t: Trace,
    prompt: list[int],
    opener: list[int],
    prefix: list[int],
    policy: BudgetPolicy,
    tokens: ForcingTokens,
) -> Generator[Call, list[int], Trace]:
    out = yield prompt + t.thinking_ids + opener + prefix, policy.max_answer_tokens, tokens.end_ids
    ended = bool(out) and out[-1] in tokens.end_ids
    t.answer_ids = prefix + (out[:-1] if ended else out)
    t.token_ids = t.thinking_ids + opener + prefix + out
    t.finish_reason = "stop" if ended else "length"
    return t


def hf_complete(model: Any, pad_token_id: int) -> Complete:
    """A greedy ``complete`` backed by ``model.generate`` (one sequence, no cache kept between calls)."""
    import torch
    from transformers import GenerationConfig

    def complete(ids: list[int], max_new: int, stop: frozenset[int]) -> list[int]:
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new, eos_token_id=sorted(stop), pad_token_id=pad_token_id
        )
        x = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        return y[0, len(ids) :].tolist()

    return complete


def hf_probe(model: Any, tokenizer: Any, pad_token_id: int) -> Callable[[ProbeCall], ProbeResult]:
    """A ``probe`` backed by ``model.generate``: greedy, the mean probability of its tokens as confidence."""
    import torch
    from transformers import GenerationConfig

    from s1kit.engines.probe import normalized_answer

    def probe(call: ProbeCall) -> ProbeResult:
        config = GenerationConfig(do_sample=False, max_new_tokens=call.max_tokens, eos_token_id=sorted(call.end_ids),
                                  pad_token_id=pad_token_id, output_scores=True, return_dict_in_generate=True)
        x = torch.tensor([call.ids], device=model.device)
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        new = y.sequences[0, len(call.ids):].tolist()
        probs = [float(s[0].float().softmax(-1).max()) for s in y.scores]
        text = tokenizer.decode(call.prefix + [i for i in new if i not in call.end_ids], skip_special_tokens=True)
        return ProbeResult(normalized_answer(text), sum(probs) / len(probs) if probs else 0.0,
                           call.suffix_len + len(probs))

    return probe


def llama_cpp_requests(plain: Any) -> list:
    """The requests every llama.cpp engine (a server behind the remote engine, llama.cpp in this process) must decode
    as the loop does: caps, a minimum, 0-2 Waits with two wait strings, a wait string that ends the turn (the model
    answers it with <|im_start|>, a stop llama-cpp-python's server hides from its text), cap 0, no forcing.
    ``plain``: a format that thinks in free text until the turn ends."""
    from s1kit import Request

    return [
        Request("A train travels 60 km in 45 minutes. What is its average speed in km/h? Show your reasoning.",
                BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=8)),
        Request("What is 17*23?", BudgetPolicy(min_thinking_tokens=20, max_thinking_tokens=40, max_answer_tokens=8)),
        Request("Name a prime.", BudgetPolicy(num_waits=2, max_thinking_tokens=48, wait_strings=("Wait", " Hmm,"),
                                              max_answer_tokens=8), plain),
        Request("What is 17*23?", BudgetPolicy(num_waits=1, max_thinking_tokens=40, wait_strings=("<|im_end|>",),
                                               max_answer_tokens=8)),
        Request("Hi", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=8), plain),
        Request("What is 17*23?", BudgetPolicy(max_answer_tokens=8)),  # no forcing at all
    ]
