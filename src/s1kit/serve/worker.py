"""One worker thread owns the engine core and runs every HTTP request through it, with no batch windows.

A submitted ``Job`` (one HTTP request: one engine request per prompt, ``n`` rows each) is added to the core at
the worker's next turn, between two steps, and its rows start decoding beside whatever already runs; each row
publishes its tokens as it goes, which the worker turns into text deltas for streaming, and a job is answered
the moment its own rows end. A job whose client went away is aborted at the next turn (its rows free their
places at once); ``stop_thinking`` closes a job's thinking at its next step, as a cap would.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Sequence, Union

from ..engines.base import Completion, Engine, Request
from ..errors import S1KitError
from ..streaming import TextDeltas

log = logging.getLogger("s1kit.serve")


@dataclass(frozen=True)
class Delta:
    """New text of one choice: thinking (``reasoning``) and/or answer (``content``)."""

    index: int
    reasoning: str = ""
    content: str = ""


class JobError(Exception):
    """Why a job failed, with the HTTP status to answer."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


Event = Union[Delta, list, JobError]  # deltas, then the completions (a list) or the error


class Job:
    """One HTTP request's work: its engine requests, the events its handler awaits, and what it asked for."""

    def __init__(self, requests: Sequence[Request], stream: bool = False) -> None:
        self.requests = list(requests)
        self.stream = stream
        self.cancelled = False
        self.finished = False  # the handler has the final event
        self.answered = False  # the worker has queued the final event
        self.handles: list[Any] = []  # engine handles, one per request (worker thread only)
        self._first: list[int] = []  # choice index of each request's first sample
        self._deltas: dict[tuple[int, int], tuple[TextDeltas, TextDeltas]] = {}
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def size(self) -> int:
        """Sequences (choices) of this job: ``n`` per request."""
        return sum(r.sampling.n for r in self.requests)

    async def next_event(self) -> Event:
        """The next delta, or the final list of completions, or a ``JobError``."""
        event = await self._events.get()
        if not isinstance(event, Delta):
            self.finished = True
        return event

    def _put(self, event: Event) -> None:  # called from the worker thread
        self.answered = self.answered or not isinstance(event, Delta)
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is waiting
            pass


class EngineWorker:
    """The thread that owns the engine core (see the module docstring); ``submit``/``cancel``/``stop_thinking``
    may be called from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "running": 0, "steps": 0,
                      "max_running": 0, "thinking_tokens": 0, "answer_tokens": 0}
        self._inbox: queue.SimpleQueue[tuple[str, Job] | None] = queue.SimpleQueue()
        self._running: set[Job] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="s1kit-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs submitted but not yet added to the engine core."""
        return self._inbox.qsize()

    def submit(self, job: Job) -> Job:
        """Hand a job to the engine core (at the worker's next turn)."""
        if self._closed:
            raise JobError(503, "the server is shutting down", "server_error")
        self.stats["requests"] += 1
        self._inbox.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        """Stop spending work on ``job`` (its client went away)."""
        job.cancelled = True
        self._inbox.put(("abort", job))

    def stop_thinking(self, job: Job) -> None:
        """Make ``job``'s sequences stop thinking: the answer opener and prefix are forced at their next step."""
        self._inbox.put(("stop", job))

    def close(self, timeout: float | None = 30) -> None:
        """Abort what runs, fail what waits, stop the worker."""
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- worker thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                # Idle: sleep until a message comes. Busy: take what came since the last step, then step.
                msg = self._inbox.get(block=not self.engine.has_work)
            except queue.Empty:
                msg = ("step", None)
            if msg is None:
                break
            kind, job = msg
            if kind == "add":
                self._add(job)
            elif kind == "abort":
                for h in job.handles:
                    self.engine.abort(h)
            elif kind == "stop":
                for h in job.handles:
                    self.engine.stop_thinking(h)
            if not self._inbox.empty():
                continue  # take every waiting message before the next step
            if self.engine.has_work:
                self._step()
        for job in list(self._running):  # shutting down: stop what runs, answer what waits
            for h in job.handles:
                self.engine.abort(h)
        while not self._inbox.empty():
            msg = self._inbox.get()
            if msg is not None and msg[0] == "add":
                msg[1]._put(JobError(503, "the server is shutting down", "server_error"))

    def _step(self) -> None:
        self.stats["steps"] += 1
        try:
            self.engine.step()
        except Exception as e:  # noqa: BLE001 - the engine failed: fail what it held, keep serving
            log.error("engine step failed", exc_info=e)
            self.engine.fail(e)

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self.stats["cancelled"] += 1
            return
        first = 0
        try:
            for k, request in enumerate(job.requests):
                job._first.append(first)
                first += request.sampling.n
                job.handles.append(self.engine.add(request, lambda row, job=job: self._on_row(job, row), k))
        except (S1KitError, ValueError) as e:  # e.g. a prompt too long for the context: this request alone
            for h in job.handles:
                self.engine.abort(h)
            self._answer(job, JobError(400, str(e)), "failed")
            return
        self._running.add(job)
        self.stats["running"] = len(self._running)
        self.stats["max_running"] = max(self.stats["max_running"], sum(j.size for j in self._running))

    def _on_row(self, job: Job, row: Any) -> None:
        """A row of ``job`` published tokens or ended: stream its deltas; answer the job once all its rows ended."""
        if job.answered:
            return
        ri, si = row.handle.request_index, row.sample_index
        if job.stream:
            pair = job._deltas.get((ri, si))
            if pair is None:
                pair = job._deltas[ri, si] = (TextDeltas(self.engine.tokenizer, False),
                                              TextDeltas(self.engine.tokenizer, True))
            thinking, answer = pair
            if row.done and row.completion is not None:
                delta = Delta(job._first[ri] + si, thinking.finish(row.completion.thinking),
                              answer.finish(row.completion.answer))
            else:
                delta = Delta(job._first[ri] + si, thinking.update(row.trace.thinking_ids),
                              answer.update(row.trace.answer_ids))
            if delta.reasoning or delta.content:
                job._put(delta)
        if not row.done or not all(h.done for h in job.handles):
            return
        error = next((h.error for h in job.handles if h.error is not None), None)
        if error is not None:
            self._answer(job, self._job_error(error), "failed")
            return
        completions: list[Completion] = [c for h in job.handles for c in h.completions()]
        self.stats["thinking_tokens"] += sum(c.thinking_tokens for c in completions)
        self.stats["answer_tokens"] += sum(c.answer_tokens for c in completions)
        self._answer(job, completions, "cancelled" if job.cancelled else "completed")

    def _answer(self, job: Job, event: Any, outcome: str) -> None:
        self.stats[outcome] += 1
        self._running.discard(job)
        self.stats["running"] = len(self._running)
        job._put(event)

    @staticmethod
    def _job_error(e: BaseException) -> JobError:
        """A failure of the engine after the request passed its checks: not the client's fault."""
        if isinstance(e, S1KitError):  # e.g. the remote engine's server is unreachable
            return JobError(502, f"the engine failed: {e}", "server_error")
        return JobError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
