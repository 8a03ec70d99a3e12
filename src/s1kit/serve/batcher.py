"""Dynamic batching: one worker thread owns the engine and runs concurrent HTTP requests as one batch.

Requests that arrive while a batch runs wait and go into the next one (up to ``max_batch_size``
sequences), each with its own budget policy. Streaming and cancellation ride on the engine's ``on_emit``
hook: after every token the worker turns the row's new tokens into text deltas, and a cancelled job (its
client went away) makes the hook return ``False`` so its rows stop at once. A continuous-batching engine
can replace this class behind the same ``submit`` / ``Job`` interface.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence, Union

from ..engines.base import Completion, Engine, Request, make_completion
from ..errors import S1KitError

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
    """One HTTP request's work: its engine requests, the events the handler awaits, and a cancel flag."""

    def __init__(self, requests: Sequence[Request], stream: bool = False) -> None:
        self.requests = list(requests)
        self.stream = stream
        self.cancelled = False
        self.finished = False  # the handler has the final event
        self.answered = False  # the worker has queued the final event
        self.prompt_tokens: list[int] | None = None  # per request, when the engine can count them up front
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def size(self) -> int:
        """Sequences this job adds to a batch (``n`` per request)."""
        return sum(r.sampling.n for r in self.requests)

    def cancel(self) -> None:
        """Stop spending work on this job (its client disconnected)."""
        self.cancelled = True

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


class _TextDeltas:
    """Turns a growing list of token ids into text deltas, decoding only a short window each step.

    With ``strip`` the deltas add up to the stripped text (as ``Completion.answer`` is): leading
    whitespace is dropped and trailing whitespace held back until more text follows it.
    """

    def __init__(self, tokenizer: Any, strip: bool) -> None:
        self.tokenizer, self.strip = tokenizer, strip
        self.start = self.read = 0  # the window [start, read) was decoded last time
        self.raw = ""  # text of ids[:read]
        self.sent = ""  # what the deltas so far add up to

    def update(self, ids: list[int]) -> str:
        """The delta after the ids grew."""
        if len(ids) > self.read:
            decode = self.tokenizer.decode
            before = decode(ids[self.start : self.read], skip_special_tokens=True)
            after = decode(ids[self.start :], skip_special_tokens=True)
            # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.raw += after[len(before) :]
                self.start, self.read = self.read, len(ids)
        return self._take(self.raw.strip() if self.strip else self.raw)

    def finish(self, text: str) -> str:
        """The rest of the engine's final text."""
        if not text.startswith(self.sent):
            log.warning("streamed text diverged from the final text; the stream may differ from it")
            return ""
        return self._take(text)

    def _take(self, visible: str) -> str:
        delta = visible[len(self.sent) :]
        self.sent = visible if delta else self.sent
        return delta


class Batcher:
    """Collects concurrent jobs into engine batches on one worker thread; each keeps its own budget."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, window_s: float = 0.005) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not window_s >= 0:
            raise ValueError(f"the batch window must be >= 0 seconds, got {window_s}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.window_s = window_s  # how long a first request waits for company
        self.streams_tokens = "on_emit" in inspect.signature(engine.generate).parameters
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "max_batch": 0,
                      "thinking_tokens": 0, "answer_tokens": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the queue but did not fit the last batch
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="s1kit-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job) -> Job:
        """Queue a job for the next batch."""
        if self._closed:
            raise JobError(503, "the server is shutting down", "server_error")
        self.stats["requests"] += 1
        self._queue.put(job)
        return job

    def close(self, timeout: float | None = 30) -> None:
        """Stop the running batch at its next token, fail queued jobs, stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- worker thread ----------------------------------------------------------------------------------

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                break
            batch, size = [first], first.size
            deadline = time.monotonic() + self.window_s
            stop = False
            while size < self.max_batch_size:
                try:
                    job = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if size + job.size > self.max_batch_size:
                    self._held.appendleft(job)
                    break
                batch.append(job)
                size += job.size
            self._run_batch(batch)
            if stop:
                break
        while True:  # shutting down: answer whatever still waits
            try:
                job = self._next(0)
            except queue.Empty:
                break
            if job is not None:
                job._put(JobError(503, "the server is shutting down", "server_error"))

    def _run_batch(self, batch: list[Job]) -> None:
        jobs = []
        for job in batch:
            if job.cancelled:
                self.stats["cancelled"] += 1
                continue
            try:
                self._check(job)
                jobs.append(job)
            except (S1KitError, ValueError) as e:
                self._fail(job, JobError(400, str(e)))
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], self._error(e))
                return
            for job in (j for j in jobs if not j.answered):  # one bad request must not fail the others
                try:
                    self._generate([job])
                except Exception as err:
                    self._fail(job, self._error(err))

    def _check(self, job: Job) -> None:
        """Per-request checks the engine can make before decoding (prompt length against the context)."""
        prepare = getattr(self.engine, "prepare", None)
        job.prompt_tokens = [len(prepare(r)[0]) for r in job.requests] if prepare is not None else None

    @staticmethod
    def _error(e: Exception) -> JobError:
        """A failure of the engine after the request passed its checks: not the client's fault."""
        if isinstance(e, S1KitError):  # e.g. the remote engine's server is unreachable
            return JobError(502, f"the engine failed: {e}", "server_error")
        log.error("generation failed", exc_info=e)
        return JobError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _fail(self, job: Job, error: JobError) -> None:
        self.stats["failed"] += 1
        job._put(error)

    def _generate(self, jobs: list[Job]) -> None:
        requests: list[Request] = []
        owners: list[tuple[Job, int]] = []  # engine request index -> (job, index of its first choice)
        prompt_tokens: list[int | None] = []
        for job in jobs:
            first = 0
            for k, r in enumerate(job.requests):
                requests.append(r)
                owners.append((job, first))
                prompt_tokens.append(job.prompt_tokens[k] if job.prompt_tokens else None)
                first += r.sampling.n
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], sum(j.size for j in jobs))
        tokenizer = self.engine.tokenizer
        deltas: dict[tuple[int, int], tuple[_TextDeltas, _TextDeltas]] = {}
        done: dict[tuple[int, int], Completion] = {}
        left = {id(j): j.size for j in jobs}  # sequences of each job still running

        def streams(ri: int, si: int) -> tuple[_TextDeltas, _TextDeltas]:
            pair = deltas.get((ri, si))
            if pair is None:
                pair = deltas[ri, si] = (_TextDeltas(tokenizer, False), _TextDeltas(tokenizer, True))
            return pair

        def finished(c: Completion) -> None:
            done[c.request_index, c.sample_index] = c
            job, first = owners[c.request_index]
            if job.stream:
                thinking, answer = streams(c.request_index, c.sample_index)
                delta = Delta(first + c.sample_index, thinking.finish(c.thinking), answer.finish(c.answer))
                if delta.reasoning or delta.content:
                    job._put(delta)
            self.stats["thinking_tokens"] += c.thinking_tokens
            self.stats["answer_tokens"] += c.answer_tokens
            left[id(job)] -= 1
            if left[id(job)] == 0:  # answer the job now, not when the longest sequence of the batch ends
                self.stats["cancelled" if job.cancelled else "completed"] += 1
                job._put([done[ri, si] for ri, (owner, _) in enumerate(owners) if owner is job
                          for si in range(requests[ri].sampling.n)])

        def on_emit(ri: int, si: int, state: Any) -> bool:
            job, first = owners[ri]
            if job.cancelled or self._closed:  # the client left, or the server is stopping
                return False
            if job.stream:
                thinking, answer = streams(ri, si)
                delta = Delta(first + si, thinking.update(state.thinking_ids), answer.update(state.answer_ids))
                if delta.reasoning or delta.content:
                    job._put(delta)
            if state.done and prompt_tokens[ri] is not None:
                finished(make_completion(state, tokenizer, requests[ri], prompt_tokens[ri], ri, si))
            return True

        if self.streams_tokens:
            completions = self.engine.generate(requests, on_emit=on_emit)
        else:  # e.g. the remote engine: jobs are answered (streams get their texts) when the batch ends
            completions = self.engine.generate(requests)
        for c in completions:
            if (c.request_index, c.sample_index) not in done:
                finished(c)
