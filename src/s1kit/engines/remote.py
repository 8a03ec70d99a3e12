"""Remote engine: budget forcing over any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang, llama.cpp).

Two paths, picked per request:

- **forced in the server** (``remote_forced.py``: a vLLM server started with s1kit's logits processor): one
  request per sample carries the whole policy and vLLM enforces it in its own decode loop.
- **stop and continue** everywhere else, with the row's ``BudgetState`` as the authority: each server call
  decodes freely until a stop token or as far as the machine lets proposals through (the cap and its grace
  window, the answer budget, the next early-exit count point); the returned tokens are stepped through the
  machine as the model's proposals and the first one it replaces (a Wait for a stop, the closing at a cap)
  cuts them there; forced tokens are emitted locally and the next call continues from the whole prefix (the
  server's prefix cache makes that cheap). Caps, minimums, Waits, graceful caps, early exit and stop-thinking
  therefore behave exactly as in the in-process engine.

The parts: ``remote_http.Client`` (an httpx client on its own event-loop thread, retries), ``remote_server.Server``
(what the server is and its dialect: token-id or text prompts, stop ids or strings, answers read back as ids),
``remote_forced.ForcedPath``, and the engine here. The tokenizer is loaded locally. Every sequence runs as a task
on the client's loop, at most ``concurrency`` at a time; the engine core (``core.py``) starts the tasks and learns
from each what it decoded (after every call, so the server streams them) and when it ended. An abort cancels the
task and its open request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, Sequence

from ..budget import BudgetState, FinishReason, Phase
from ..errors import S1KitError
from ..forcing import ForcingCompiler, context_cap
from .base import Request, SamplingParams
from .core import EngineCore, HostPlace, Prepared, Row, StepOutput
from .probe import normalized_answer
from .remote_forced import PLUGIN, ForcedPath
from .remote_http import Client
from .remote_server import Server, discover, returned_ids

__all__ = ["PLUGIN", "RemoteEngine", "load_tokenizer"]

UNBOUNDED = 1 << 30  # max_tokens of a thinking call without a cap (the server's context ends it)


class _Run(HostPlace):
    """A row's task on the event loop: its budget machine, and whether stop-thinking was asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.future: Future | None = None
        self.close_thinking = False


def load_tokenizer(ref: Any) -> Any:
    """A tokenizer object, or one loaded from a model reference (bundled name, ``.gguf``, dir, HF id)."""
    if not isinstance(ref, str):
        return ref
    from transformers import AutoTokenizer

    from ..models import resolve

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(ref))
    except OSError as e:
        raise S1KitError(f"could not load a tokenizer for {ref!r} ({str(e).splitlines()[0]}); "
                         "pass --tokenizer with a local model directory, .gguf file or bundled name") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class RemoteEngine(EngineCore):
    """Budget forcing against an OpenAI-compatible completions server at ``base_url`` (``.../v1``).

    ``model`` is the tokenizer source unless ``tokenizer`` is given, and the model name sent to the server
    unless ``served_model`` is; a server that serves a single model gets that one. ``plugin``: True requires
    s1kit's vLLM processor on the server, False never uses it, None (default) uses it when a probe finds it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.5,
        served_model: str | None = None,
        token_prompts: bool | None = None,
        max_context: int | None = None,
        plugin: bool | None = None,
    ) -> None:
        self.client = Client(base_url, api_key, concurrency, timeout, retries, backoff)
        super().__init__()
        self.concurrency = concurrency
        self._running: set[Row] = set()  # rows whose task runs on the event loop
        self._events: SimpleQueue[StepOutput] = SimpleQueue()  # what the rows' tasks decoded, for the core
        try:
            served, listed_context, kind = discover(self.client, model, served_model)
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
            self.compile = ForcingCompiler(self.tokenizer)
            self.max_context = max_context if max_context is not None else listed_context
            self.server = Server(self.client, self.tokenizer, served, self.max_context, kind, token_prompts)
            self.forced = ForcedPath(self.server, self.compile)
            self.plugin = self.forced.found(required=plugin is True) if plugin is not False else False
        except BaseException:
            self.close()
            raise

    @property
    def served_model(self) -> str:
        """The model name sent to the server."""
        return self.server.served_model

    @property
    def completions_sent(self) -> int:
        """Completion requests sent so far (retries included)."""
        return self.client.completions_sent

    @property
    def peak_in_flight(self) -> int:
        """The most completion requests that were open at once."""
        return self.client.peak_in_flight

    def close(self) -> None:
        """Cancel running sequences, close the HTTP connections and stop the event loop thread."""
        if self.client.closed:
            return
        for row in list(getattr(self, "_running", ())):
            self._cancel(row)
        self.client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (thread-safe)."""
        with self.server._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the stop-and-continue loop ---------------------------------------------------------------------

    async def _loop_sequence(self, row: Row, run: _Run) -> None:
        """One sequence over plain server calls, its ``BudgetState`` stepped over each call's tokens (see the
        module); nothing is ever guessed. What each call added is reported to the stepping thread (streaming)."""
        job, policy = row.prepared, row.request.policy
        state = run.state = BudgetState(policy, job.tokens, job.cap)
        every = policy.early_exit.every if policy.early_exit is not None else None
        calls = itertools.count(1)
        while True:
            if run.close_thinking:
                run.close_thinking = False
                state.stop_thinking()
            while state.next_is_forced:  # a Wait being spelled out, the opener, a cap's closing
                state.step(-1)
            if state.done:
                return
            room = state.free_proposals()
            if state.phase is Phase.THINK:
                ask, stop = UNBOUNDED if room is None else room, job.tokens.stop_ids
                if every:  # calls end at the next count point, where a probe is due
                    ask = min(ask, every - len(state.thinking_ids) % every)
            else:
                ask, stop = room, job.tokens.end_ids
            out = await self._complete(row, job.prompt_ids + state.token_ids, ask, stop, calls)
            for proposed in out:
                if state.probe_due(proposed):
                    await self._probe(row, state)
                if state.step(proposed) != proposed or state.done:
                    break  # the machine acted (or ended): the rest of the call's tokens are not the sequence's
            else:
                if not out:  # the server can decode nothing more (its context is full)
                    state.end(FinishReason.LENGTH)
                elif len(out) < ask and out[-1] not in stop and state.phase is Phase.THINK:
                    state.stop_thinking()  # it stopped early without a stop token: close as at a cap
            self._events.put(run.output(row))

    async def _probe(self, row: Row, state: BudgetState) -> None:
        """An early-exit probe of ``state`` now: a greedy side request on the sequence's context, the answer opener
        and prefix (a server's prefix cache makes the shared part cheap); its confidence is the mean probability
        of the tokens it returned (logprobs). The result goes to ``state.observe_probe``."""
        ee, tokens = row.request.policy.early_exit, row.prepared.tokens
        opener, prefix = state.probe_suffix()
        ids = row.prepared.prompt_ids + state.token_ids + list(opener) + list(prefix)
        body = self.server.body(ids, ee.probe_tokens, tokens.end_ids, SamplingParams(), row.seed)
        if ee.confidence is not None:
            body["logprobs"] = 1
        choice, used = await self.server.client.complete(body)
        out = returned_ids(choice)
        if out is None:
            out = await self.server.retokenize(choice["text"])
        answer = [i for i in out if i not in tokens.end_ids and not self.server.is_special(i)]
        # decode steps, the end token's included (as the in-process probe counts them): the server's count if given
        steps = min(used if used is not None else len(answer) + (choice["finish_reason"] == "stop"), ee.probe_tokens)
        confidence = 0.0
        if ee.confidence is not None:
            logprobs = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
            if not logprobs and steps:
                raise S1KitError(f"{self.server.client.base_url} returned no logprobs: early exit by confidence needs them "
                                 "(use agree=N with this server)")
            confidence = sum(math.exp(x) for x in logprobs) / len(logprobs) if logprobs else 0.0
        text = self.decode(list(prefix) + answer)
        state.observe_probe(normalized_answer(text), confidence, len(opener) + len(prefix) + steps)

    async def _complete(self, row: Row, ids: list[int], max_new: int, stop: frozenset[int], calls: Any) -> list[int]:
        """Up to ``max_new`` new ids after ``ids`` (ending with a stop id if the server stopped at one)."""
        out: list[int] = []
        while True:  # a second call only when a text-only server's output re-tokenized short
            seed = (row.seed + 7919 * next(calls)) % 2**31  # distinct per call, reproducible per sequence
            new, stopped, exhausted = await self.server.call(ids + out, max_new - len(out), stop, row.request.sampling,
                                                             seed)
            out += new
            if stopped or len(out) >= max_new or not new or not exhausted:
                return out[:max_new]

    # -- the engine core's hooks ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (the local tokenizer, which the server shares)."""
        return self.server.encode(text)

    def prepare(self, request: Request) -> Prepared:
        """Prompt ids, compiled forcing tokens and effective cap of a request (validates the format)."""
        prepared = super().prepare(request)  # rendered, encoded, compiled; the cap fits the context (0: thinking off)
        ee = request.policy.early_exit
        if ee is not None and ee.words and not self.server.stops_on_ids:
            raise S1KitError("early-exit words need a server that stops on token ids (vLLM, SGLang); this one stops "
                             "on text, where a word cannot be told from the inside of another: probe every N tokens")
        if not self._uses_plugin(request):
            return prepared
        ids, tokens, _ = prepared
        self.forced.check(tokens)
        # forced in the server, the sequence also holds the end token forced after an answer budget
        return prepared._replace(cap=context_cap(request.policy, tokens, len(ids) + 1, self.max_context))

    def _uses_plugin(self, request: Request) -> bool:
        """Whether a request runs as one request on the server's processor."""
        return bool(self.plugin) and ForcedPath.takes(request)

    def _room(self, waiting: Sequence[Row]) -> int:
        return self.concurrency - len(self._running)

    def _admit(self, rows: list[Row]) -> None:
        """Start each row's task on the event loop."""
        for row in rows:
            row.slot = run = _Run()
            self._running.add(row)
            run.future = self.client.submit(self._sequence(row, run))

    def _decode(self) -> list[StepOutput]:
        """What the running rows' tasks reported since the last step."""
        if not self._running:
            return []
        try:  # a short wait, so that whoever steps (a server's worker) also gets to take new requests
            events = [self._events.get(timeout=0.05)]
        except Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except Empty:
                break
        outputs = []
        for out in events:
            if out.row not in self._running:
                continue  # aborted, or ended, meanwhile
            if out.finish is not None or out.error is not None:
                self._running.discard(out.row)
            outputs.append(out)
        return outputs

    def _cancel(self, row: Row) -> None:
        self._running.discard(row)
        if row.slot is not None and row.slot.future is not None:
            row.slot.future.cancel()  # cancels the task, and with it the request in flight

    def _stop_thinking(self, row: Row) -> None:
        row.slot.close_thinking = True  # the loop closes after the call in flight

    async def _sequence(self, row: Row, run: _Run) -> None:
        """A row's task: its sequence, then the news that it ended (or failed) for the stepping thread."""
        try:
            if self._uses_plugin(row.request):
                run.state = await self.forced.sequence(row)
            else:
                await self._loop_sequence(row, run)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - reported to the stepping thread, which fails the request
            self._events.put(StepOutput(row, error=e))
            return
        self._events.put(run.output(row))

