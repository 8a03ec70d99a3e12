"""The engine core that every entry point uses: requests in, rows decoded together, completions out.

A core lives as long as the process. ``add`` queues a request (its ``n`` samples become rows), ``step``
advances every active row and publishes what each emitted, ``abort`` ends a request at once and
``stop_thinking`` makes it close its thinking at the next step exactly as a cap would. A finished or
aborted row frees its place at once and a queued row takes it (continuous admission). ``generate`` — the
CLI, the Python API, sweeps and curation — is a thin loop over these; the server calls them directly from
one worker thread. Every callback runs on the thread that calls ``step``.

The core keeps the books, in the shape of vLLM's schedule -> execute -> update: ``step`` admits queued rows
where the backend has room (``admit_from``: in order, a row that does not fit yet waits and later ones may pass
it), the backend decodes (``_decode``) and returns a ``StepOutput`` per row it advanced (the tokens it emitted
with their kinds, its budget machine's counters, how the row ended), and the core applies them to each row's
``Trace`` (``apply``) and publishes. Each backend keeps its own budget machine (a ``BudgetState`` per row on the
host, or ``TensorBudget`` on the device); only the core writes ``row.trace``, on the stepping thread.

Backends (the hf plain loop, the hf fast path, llama.cpp, the remote engine) implement ``_room``, ``_fits``, ``_admit``,
``_decode``, ``_cancel``, ``_stop_thinking`` and ``_seed``.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

from ..budget import Counts, FinishReason, ForcingTokens, Trace
from ..errors import RequestError
from ..formats import render_prompt
from ..forcing import context_cap
from .base import Completion, Request, SamplingParams, make_completion


class Prepared(NamedTuple):
    """A request made ready for decoding: prompt ids, compiled forcing tokens and the effective thinking cap."""

    prompt_ids: list[int]
    tokens: ForcingTokens
    cap: int | None


class Row:
    """One sequence, one sample of a request: the row type every backend decodes.

    ``trace`` is the row's ``Trace`` (what it emitted so far and how it ended), written only by the engine core
    from the backend's ``StepOutput``s; ``slot`` is the backend's place for the row while it decodes.
    """

    __slots__ = ("handle", "sample_index", "seed", "trace", "done", "completion", "slot")

    def __init__(self, handle: "Handle", sample_index: int, seed: int) -> None:
        self.handle = handle
        self.sample_index = sample_index
        self.seed = seed
        self.trace: Trace = Trace()
        self.done = False
        self.completion: Completion | None = None
        self.slot: Any = None  # the backend's place for the row while it decodes (a slot index, a run)

    @property
    def request(self) -> Request:
        """The request this row samples."""
        return self.handle.request

    @property
    def prepared(self) -> Prepared:
        """Prompt ids, forcing tokens and cap of the request."""
        return self.handle.prepared


def token_rows(prompts: Sequence[Sequence[int]], policy: Any, tokens: ForcingTokens,
               sampling: SamplingParams | None = None) -> list[Row]:
    """Rows straight from token ids, for a decoder driven without a core (benchmarks, tests: no tokenizer)."""
    request = Request("", policy, sampling=sampling or SamplingParams())
    return [Handle(request, Prepared(list(p), tokens, None), 0, None, 0).rows[0] for p in prompts]


@dataclass(eq=False)
class StepOutput:
    """What a backend's decoding did to one row since it last reported: the tokens it emitted and their kinds
    (``budget.Kind`` codes), its machine's counters, and how the row ended (``finish``; with ``error``, the
    failure that ended its request)."""

    row: Row
    tokens: Sequence[int] = ()
    kinds: Sequence[int] = ()
    counts: Counts = field(default_factory=Counts)
    finish: FinishReason | None = None
    error: BaseException | None = None

    @classmethod
    def since(cls, row: Row, machine: Trace, start: int) -> "StepOutput":
        """A host machine's (``BudgetState``'s) tokens from ``start`` on, its counters and its end."""
        return cls(row, machine.token_ids[start:], machine.kinds[start:], machine.counts, machine.finish_reason)


class HostPlace:
    """A row's place in a backend that steps its budget machine on the host (plain loop, llama.cpp, remote engine):
    the machine (a ``BudgetState``, set when the row starts), how much of it was reported, and the failure that
    ended the row, if one did."""

    def __init__(self, state: Any = None) -> None:
        self.state, self.reported = state, 0
        self.error: BaseException | None = None

    def output(self, row: Row) -> StepOutput:
        """What the machine emitted since the last report, its counters and its end."""
        out = StepOutput.since(row, self.state, self.reported)
        self.reported = len(self.state.token_ids)
        out.error = self.error
        return out


def apply(out: StepOutput) -> None:
    """Write a backend's output into its row's trace (and its request's error): the one place traces grow."""
    row = out.row
    t = row.trace
    t.record(out.tokens, out.kinds)
    t.set_counts(out.counts)
    if out.error is not None:
        row.handle.error = row.handle.error or out.error
        t.finish_reason = FinishReason.ERROR
    elif out.finish is not None:
        t.finish_reason = FinishReason(out.finish)


def admit_from(queue: deque[Row], room: int, fits: Callable[[Row], bool]) -> list[Row]:
    """Take up to ``room`` rows that ``fits`` from ``queue``, in order (a row that does not fit stays queued)."""
    if room <= 0 or not queue:
        return []
    take: list[Row] = []
    kept: list[Row] = []
    while queue and len(take) < room:
        row = queue.popleft()
        (take if fits(row) else kept).append(row)
    queue.extendleft(reversed(kept))
    return take


# on_update(row): the row published tokens, or finished (then ``row.done`` and ``row.completion`` are set)
OnUpdate = Callable[[Row], None]


class Handle:
    """A request inside an engine core: its rows, its listener, and its completions once every row ended."""

    def __init__(self, request: Request, prepared: Prepared, request_index: int, on_update: OnUpdate | None,
                 seed: int) -> None:
        self.request, self.prepared, self.request_index = request, prepared, request_index
        self.on_update = on_update
        self.rows = [Row(self, si, seed + si) for si in range(request.sampling.n)]
        self.error: BaseException | None = None  # a backend failure that ended this request

    @property
    def done(self) -> bool:
        """True once every row has ended (finished, aborted or failed)."""
        return all(r.done for r in self.rows)

    def completions(self) -> list[Completion]:
        """The completions of every row, in sample order (raises the request's error if it failed)."""
        if self.error is not None:
            raise self.error
        return [r.completion for r in self.rows]


class EngineCore:
    """add / step / abort / stop_thinking over rows, with ``generate`` as a loop over them (see the module)."""

    tokenizer: Any
    max_context: int | None = None

    def __init__(self) -> None:
        self._queue: deque[Row] = deque()  # rows waiting for a place, in admission order
        self._live: set[Row] = set()  # rows queued or decoding
        self.completed_rows = 0

    # -- what backends provide ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def compile(self, fmt: Any, policy: Any) -> ForcingTokens:  # replaced by a ForcingCompiler in __init__
        raise NotImplementedError

    def _room(self, waiting: Sequence[Row]) -> int:
        """How many queued rows can start now (``waiting``: the queue, in order, for a backend that sizes its
        memory to it)."""
        raise NotImplementedError

    def _fits(self, row: Row) -> bool:
        """Whether ``row`` can start in the room there is now (else it waits, and later rows may pass it)."""
        return True

    def _admit(self, rows: list[Row]) -> None:
        """Start decoding ``rows`` (each takes a place: ``row.slot``)."""
        raise NotImplementedError

    def _decode(self) -> list[StepOutput]:
        """Advance the decoding rows; what each emitted or how it ended since it last reported."""
        raise NotImplementedError

    def _cancel(self, row: Row) -> None:
        """Stop decoding ``row`` (it has a place) and free its place."""
        raise NotImplementedError

    def _stop_thinking(self, row: Row) -> None:
        """Make ``row`` (it has a place) close its thinking at its next step, as at the cap."""
        raise NotImplementedError

    def _seed(self, seed: int) -> None:
        """Seed a backend whose sampling draws from one generator for all rows (the fast path); the others seed
        each row from ``row.seed`` and ignore this."""

    # -- the core --------------------------------------------------------------------------------------

    def prepare(self, request: Request) -> Prepared:
        """Prompt ids, forcing tokens and effective cap; ``S1KitError``/``ValueError`` if it cannot run."""
        text = render_prompt(self.tokenizer, request.prompt, request.format, request.system)
        ids = self.encode(text)
        tokens = self.compile(request.format, request.policy)
        cap = context_cap(request.policy, tokens, len(ids), self.max_context)
        return Prepared(ids, tokens, 0 if request.format.closed else cap)  # thinking off: closed at the first step

    def add(self, request: Request, on_update: OnUpdate | None = None, request_index: int = 0,
            prepared: Prepared | None = None) -> Handle:
        """Queue ``request`` (``n`` rows); ``on_update(row)`` is called as each row publishes tokens or ends."""
        prepared = prepared or self.prepare(request)
        seed = request.sampling.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        elif not self._live:  # an idle core: a seeded request starts a reproducible run on any backend
            self._seed(seed)
        handle = Handle(request, prepared, request_index, on_update, seed)
        self._queue.extend(handle.rows)
        self._live.update(handle.rows)
        return handle

    @property
    def has_work(self) -> bool:
        """True while any row is queued or decoding."""
        return bool(self._live)

    @property
    def waiting(self) -> int:
        """Rows queued for a place."""
        return len(self._queue)

    def step(self) -> None:
        """Admit queued rows where there is room, advance every active row, and apply and publish its output."""
        if self._queue:
            take = admit_from(self._queue, self._room(self._queue), self._fits)
            if take:
                self._admit(take)
        for out in self._decode():
            row = out.row
            if row.done:  # aborted since the backend decoded it
                continue
            apply(out)
            if row.trace.finish_reason is not None:
                self._finish(row)
            elif row.handle.on_update is not None:
                row.handle.on_update(row)

    def abort(self, handle: Handle) -> None:
        """End every row of ``handle`` now (``finish_reason == "cancelled"``); their places are freed."""
        for row in handle.rows:
            if row.done:
                continue
            if row.slot is not None:
                self._cancel(row)
            else:
                try:
                    self._queue.remove(row)
                except ValueError:
                    pass
            row.trace.finish_reason = FinishReason.CANCELLED
            self._finish(row)

    def stop_thinking(self, handle: Handle) -> None:
        """Make every row of ``handle`` stop thinking: the answer opener and prefix are forced at its next step,
        exactly as at the thinking cap (a queued row stops as soon as it starts)."""
        for row in handle.rows:
            if not row.done and row.slot is not None:
                self._stop_thinking(row)
        # Rows still queued start with a zero cap: they close at their first step.
        handle.prepared = handle.prepared._replace(cap=0)

    def fail(self, error: BaseException) -> None:
        """End every queued and decoding row with ``error`` (the backend cannot go on with them)."""
        self._queue.clear()
        for row in list(self._live):
            if row.slot is not None:
                try:
                    self._cancel(row)
                except Exception:  # noqa: BLE001 - the backend is already failing; free what can be freed
                    pass
            row.handle.error = row.handle.error or error
            row.trace.finish_reason = row.trace.finish_reason or FinishReason.ERROR
            self._finish(row)

    def _finish(self, row: Row) -> None:
        row.slot = None
        row.done = True
        self._live.discard(row)
        h = row.handle
        row.completion = make_completion(row.trace, self.tokenizer, h.request, len(h.prepared.prompt_ids),
                                         h.request_index, row.sample_index)
        self.completed_rows += 1
        if h.on_update is not None:
            h.on_update(row)

    def generate(self, requests: Sequence[Request], on_progress: Callable[[int], None] | None = None,
                 on_complete: Callable[[Completion], None] | None = None,
                 on_error: Callable[[int, RequestError], None] | None = None) -> list[Completion]:
        """Completions for ``requests``, ``n`` per request, in request order: all of them or an error.

        ``on_progress(k)`` counts finished sequences; ``on_complete(completion)`` receives each one as soon as it
        ends (in any order). Every request is prepared (validated) before anything decodes. With ``on_error``, a
        request that fails alone (``RequestError``: it cannot be sampled, a server refuses it) is handed to it as
        ``(request index, error)`` and left out of the result while the others go on; any other failure still
        ends the call."""
        if self.has_work:
            raise RuntimeError("generate() needs an idle engine core; a server drives it through add/step")
        prepared = [self.prepare(r) for r in requests]

        failed: list[BaseException] = []
        alone: set[int] = set()  # requests that failed alone, reported to on_error
        guessed: list[Row] = []  # completions whose waits_used could only be guessed

        def listener(row: Row) -> None:
            if not row.done:
                return
            h = row.handle
            if h.error is not None:
                if on_error is not None and isinstance(h.error, RequestError):
                    if h.request_index not in alone:
                        alone.add(h.request_index)
                        self.abort(h)  # its other samples stop too
                        on_error(h.request_index, h.error)
                    return
                failed.append(h.error)
                return
            if not row.completion.waits_exact:
                guessed.append(row)
            if on_progress is not None:
                on_progress(1)
            if on_complete is not None:
                on_complete(row.completion)

        # Longest prompts first: fewer padding columns in shared prefills.
        order = sorted(range(len(requests)), key=lambda i: -len(prepared[i].prompt_ids))
        handles: list[Handle | None] = [None] * len(requests)
        try:
            for i in order:
                handles[i] = self.add(requests[i], listener, i, prepared[i])
            while self.has_work and not failed:
                self.step()
            if failed:  # all or nothing: the first failure ends the call
                raise failed[0]
        except BaseException:
            for h in handles:
                if h is not None:
                    self.abort(h)
            raise
        if guessed:
            warnings.warn(f"{len(guessed)} sampled sequence(s) hold a wait string the model may have written itself "
                          "where a Wait was due: their waits_used counts it as forced (the tokens cannot tell; "
                          "waits_exact is false in each)", RuntimeWarning, stacklevel=2)
        return [c for i, h in enumerate(handles) if i not in alone for c in h.completions()]
