"""One worker thread owns the engine core and runs every HTTP request through it, with no batch windows.

A submitted ``Job`` (one HTTP request: one engine request per prompt and sample, so that each choice is a row of its
own) is added to the core at the worker's next turn, between two steps, and its rows start decoding beside whatever
already runs; each row publishes its tokens as it goes, which the worker turns into text deltas for streaming, and a
job is answered the moment its own rows end. A job whose client went away is aborted at the next turn (its rows free
their places at once); ``stop_thinking`` closes a job's thinking at its next step, as a cap would.

A job's ``Limits`` are the OpenAI bounds the engine's static budget cannot express: the completion-token limit
(``max_tokens``: thinking and answer together) and the stop strings. The worker fits each request's thinking cap
and answer budget into the limit and the context window before queueing it, and each row's ``ChoiceText`` cuts its
output exactly; a row that reaches a stop string or the limit is aborted right after the step that showed it.

The loop is supervised. A failure while preparing (rendering, encoding) or publishing one job ends that job alone:
a 400 when the request cannot run (too long, a chat template that refuses its messages), else a 500. A failed
step fails what the engine held at that moment and the engine is reset (``engine.fail``). A failure the worker
cannot recover from (the reset itself fails, or the loop breaks) stops it: every job waiting or running gets a
500, every later one a 503, and ``error`` says why (``/health`` reports it). ``drain`` (SIGTERM) stops admission
and ends what still runs at its deadline with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence, Union

from ..budget import BudgetPolicy
from ..engines.base import Completion, Engine, Request
from ..engines.core import Prepared
from ..errors import S1KitError
from .output import ChoiceText

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

DEFAULT_ANSWER_TOKENS = BudgetPolicy().max_answer_tokens  # the answer budget when no max_tokens is given


@dataclass(frozen=True)
class Limits:
    """What an HTTP request bounds besides its budget policy: ``max_tokens`` (completion tokens: thinking, answer
    opener, answer and end of turn, as OpenAI counts them; exact), the answer's ``stop`` strings (and whether the
    answer keeps the one it ends at), and the answer budget it asked for (``max_answer_tokens``, s1kit's own). With
    Limits the worker also fits the thinking cap and the answer budget into the context window (see
    ``EngineWorker._prepare``); without, a job's requests run as they are."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    max_answer_tokens: int | None = None


class Job:
    """One HTTP request's work: its engine requests, the events its handler awaits, and what it asked for."""

    def __init__(self, requests: Sequence[Request], stream: bool = False, limits: Limits | None = None) -> None:
        self.requests = list(requests)
        self.stream = stream
        self.limits = limits
        self.cancelled = False
        self.finished = False  # the handler has the final event
        self.answered = False  # the worker has queued the final event
        self.handles: list[Any] = []  # engine handles, one per choice (worker thread only)
        self.choices: list[ChoiceText] = []  # what each choice shows, in choice order (worker thread only)
        self.created = time.monotonic()
        self.first_token_at: float | None = None  # when the first of its rows published a token
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


def _template_error() -> type[BaseException]:
    """jinja2's ``TemplateError`` (what a chat template's ``raise_exception`` raises), if jinja2 is there."""
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers' chat templates need jinja2
        return S1KitError
    return TemplateError


SHUTTING_DOWN = "the server is shutting down"


class _Broken(Exception):
    """The engine failed and could not be reset."""


class EngineWorker:
    """The thread that owns the engine core (see the module docstring); ``submit``/``cancel``/``stop_thinking``/
    ``drain`` may be called from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "running": 0, "steps": 0,
                      "max_running": 0, "thinking_tokens": 0, "answer_tokens": 0}
        self.error: str | None = None  # why the worker stopped serving (the engine failed beyond repair)
        self.last_error: str | None = None  # the last failed step or job (the worker kept serving)
        self.draining = False
        self._deadline: float | None = None  # drain: when what still runs is ended
        self._drained = False  # the drain deadline passed: nothing more runs
        self._inbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._running: set[Job] = set()
        self._doomed: list[Job] = []  # jobs answered with an error inside a step, to abort after it
        self._ending: list[Any] = []  # handles of rows cut inside a step (a stop string, max_tokens), to abort after it
        self._closed = False
        self._template_error = _template_error()
        self._thread = threading.Thread(target=self._run, name="s1kit-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the worker serves: its thread runs and the engine has not failed beyond repair."""
        return self.error is None and self._thread.is_alive()

    @property
    def status(self) -> str:
        """``ok``, ``draining`` (shutting down), or ``error`` (see ``error``)."""
        if not self.alive:
            return "ok" if self._closed and self.error is None else "error"
        return "draining" if self.draining else "ok"

    def refusal(self) -> "JobError | None":
        """Why a new job would be refused now (shutting down, or the engine failed), else None."""
        if self.error is not None or (not self._thread.is_alive() and not self._closed):
            return JobError(503, f"the engine failed and this server cannot serve: {self.error or 'worker stopped'}",
                            "server_error")
        if self._closed or self.draining:
            return JobError(503, SHUTTING_DOWN, "server_error")
        return None

    @property
    def queued(self) -> int:
        """Jobs submitted but not yet added to the engine core."""
        return self._inbox.qsize()

    @property
    def waiting(self) -> int:
        """Jobs that have not produced a token yet: submitted, or in the engine but waiting for a place (or in
        their prefill)."""
        return self.queued + sum(1 for j in list(self._running) if j.first_token_at is None)

    def submit(self, job: Job) -> Job:
        """Hand a job to the engine core (at the worker's next turn); ``JobError`` (503) when none is taken now."""
        refused = self.refusal()
        if refused is not None:
            raise refused
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

    def drain(self, timeout: float) -> None:
        """Stop taking jobs (503), let what runs finish for up to ``timeout`` seconds, then end the rest with a 503
        (a streamed response gets it as its last event)."""
        self.draining = True
        self._inbox.put(("drain", time.monotonic() + max(0.0, timeout)))

    def close(self, timeout: float | None = 30) -> None:
        """Abort what runs, fail what waits, stop the worker."""
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- worker thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - beyond repair: say so to everyone instead of hanging
            self.error = str(e) if isinstance(e, _Broken) else f"{type(e).__name__}: {e}"
            log.critical("the engine worker stopped", exc_info=e)
            failure = JobError(500, f"the engine failed and this server cannot serve: {self.error}", "server_error")
            held = list(self._running) + self._doomed
            for job in held:
                self._answer(job, failure, "failed")
            self._fail_waiting(failure)
            for job in held:  # leave no rows behind for whoever uses the engine next, if it still can
                for h in job.handles:
                    try:
                        self.engine.abort(h)
                    except Exception:  # noqa: BLE001 - it is broken already
                        pass
            return
        self._stop()

    def _serve(self) -> None:
        while True:
            busy = self.engine.has_work
            wait = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            try:
                # Idle: sleep until a message comes (or the drain deadline). Busy: take what came since the last
                # step, then step.
                msg = self._inbox.get(block=not busy, timeout=None if busy else wait)
            except queue.Empty:
                msg = ("step", None)
            if msg is None:
                return
            kind, job = msg
            if kind == "add":
                self._add(job)
            elif kind == "abort":
                for h in job.handles:
                    self.engine.abort(h)
            elif kind == "stop":
                for h in job.handles:
                    self.engine.stop_thinking(h)
            elif kind == "drain":
                self._deadline = job if self._deadline is None else min(self._deadline, job)
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._deadline, self._drained = None, True
                self._end_running(JobError(503, f"{SHUTTING_DOWN}: this request did not finish before the drain "
                                                "deadline", "server_error"))
            if not self._inbox.empty():
                continue  # take every waiting message before the next step
            if self.engine.has_work:
                self._step()

    def _stop(self) -> None:
        """Shutting down: stop what runs, answer what waits."""
        self._end_running(JobError(503, SHUTTING_DOWN, "server_error"))
        self._fail_waiting(JobError(503, SHUTTING_DOWN, "server_error"))

    def _end_running(self, error: JobError) -> None:
        for job in list(self._running):
            self._answer(job, error, "failed")
            for h in job.handles:
                self.engine.abort(h)

    def _fail_waiting(self, error: JobError) -> None:
        while not self._inbox.empty():
            msg = self._inbox.get()
            if msg is not None and msg[0] == "add" and not msg[1].answered:
                msg[1]._put(error)

    def _step(self) -> None:
        self.stats["steps"] += 1
        try:
            self.engine.step()
        except Exception as e:  # noqa: BLE001 - the engine failed: fail what it held, keep serving
            log.error("engine step failed", exc_info=e)
            self.last_error = f"{type(e).__name__}: {e}"
            try:
                self.engine.fail(e)
            except Exception as reset:  # noqa: BLE001 - beyond repair: the worker stops (see _run)
                raise _Broken(f"{self.last_error}; resetting the engine failed too: {type(reset).__name__}: "
                              f"{reset}") from reset
        doomed, self._doomed = self._doomed, []
        for job in doomed:  # answered with an error during the step: free their rows now
            for h in job.handles:
                self.engine.abort(h)
        ending, self._ending = self._ending, []
        for h in ending:  # rows at a stop string or max_tokens: end them (their listener cuts the output)
            self.engine.abort(h)

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self.stats["cancelled"] += 1
            return
        if job.answered:
            return
        if self._drained:
            self._answer(job, JobError(503, SHUTTING_DOWN, "server_error"), "failed")
            return
        try:
            # Every request of the job is prepared before any is queued: one that cannot run fails the job alone,
            # before the others decode.
            prepared = [self._prepare(r, job.limits) for r in job.requests]
        except (S1KitError, ValueError, self._template_error) as e:  # too long, a template refusing the messages
            self._answer(job, JobError(400, self._cannot_run(e)), "failed")
            return
        except Exception as e:  # noqa: BLE001 - a bug or a backend failure: this request alone
            log.error("preparing a request failed", exc_info=e)
            self.last_error = f"{type(e).__name__}: {e}"
            self._answer(job, JobError(500, f"internal error while preparing the request: {type(e).__name__}: {e}",
                                       "server_error"), "failed")
            return
        limits = job.limits or Limits()
        tokenizer = self.engine.tokenizer
        try:
            for k, (request, ready) in enumerate(prepared):
                seed = request.sampling.seed
                for si in range(request.sampling.n):
                    # One engine request per sample: each choice is a handle of its own, which a stop string or
                    # max_tokens can end alone. Seeds as the core gives a request's samples (seed + sample index).
                    sampling = replace(request.sampling, n=1, seed=None if seed is None else seed + si)
                    choice = ChoiceText(tokenizer, len(job.choices), k, si, limits.max_tokens, limits.stop,
                                        limits.include_stop, job.stream)
                    job.choices.append(choice)
                    choice.handle = self.engine.add(replace(request, sampling=sampling),
                                                    lambda row, job=job, choice=choice: self._on_row(job, choice, row),
                                                    k, ready)
                    job.handles.append(choice.handle)
        except Exception as e:  # noqa: BLE001 - this request alone
            log.error("queueing a request failed", exc_info=e)
            self._answer(job, self._job_error(e), "failed")
            for h in job.handles:
                self.engine.abort(h)
            return
        self._running.add(job)
        self.stats["running"] = len(self._running)
        self.stats["max_running"] = max(self.stats["max_running"], sum(j.size for j in self._running))

    def _prepare(self, request: Request, limits: Limits | None) -> tuple[Request, Prepared]:
        """The request as it will run and its prepared form. With ``limits``, its thinking cap and answer budget are
        fitted to ``max_tokens`` and the context window. The answer budget is ``max_answer_tokens``, else
        ``max_tokens``, else 512. Thinking may take all of ``max_tokens`` (the answer then gets nothing, as with
        OpenAI's and vLLM's reasoning models), but never the context's last ``max_answer_tokens`` tokens (without it,
        ``min(max_tokens, 512)``), which stay for the answer; without ``max_tokens`` thinking has the rest of the
        context."""
        if limits is None:
            return request, self.engine.prepare(request)
        policy, n, asked = request.policy, limits.max_tokens, limits.max_answer_tokens
        # Rendered, encoded and checked with the smallest answer budget; the budgets are set below.
        ids, tokens, cap = self.engine.prepare(replace(request, policy=replace(policy, max_answer_tokens=1)))
        context = self.engine.max_context
        if context is not None and n is not None and len(ids) + n > context:
            raise S1KitError(f"prompt of {len(ids)} tokens plus max_tokens={n} does not fit the model's context of "
                             f"{context} tokens")
        want = min([x for x in (n, asked) if x is not None], default=DEFAULT_ANSWER_TOKENS)
        caps = [c for c in (policy.max_thinking_tokens, n, cap) if c is not None]
        answer = want
        if context is not None:
            # the room the engine's own check leaves for thinking, closing and answer (one token spare)
            room = max(1, context - len(ids) - tokens.max_closing_len - policy.cap_grace - 1)
            reserve = min(want, room) if asked is not None else min(want, DEFAULT_ANSWER_TOKENS, room)
            caps.append(room - reserve)
            answer = min(want, room - min(caps))
        thinking = min(caps) if caps else None
        return (replace(request, policy=replace(policy, max_answer_tokens=max(1, answer))),
                Prepared(ids, tokens, thinking))

    def _cannot_run(self, e: BaseException) -> str:
        if isinstance(e, self._template_error) and not isinstance(e, (S1KitError, ValueError)):
            return f"the model's chat template refused the messages: {e}"
        return str(e)

    def _on_row(self, job: Job, choice: ChoiceText, row: Any) -> None:
        """A row of ``job`` published tokens or ended: stream its deltas; answer the job once all its rows ended.
        Runs inside the engine's step (or an abort): a failure here ends this job alone."""
        if job.answered:
            return
        try:
            self._publish(job, choice, row)
        except Exception as e:  # noqa: BLE001 - e.g. text that does not decode: this job alone, not the step
            log.error("publishing a row failed", exc_info=e)
            self.last_error = f"{type(e).__name__}: {e}"
            self._answer(job, JobError(500, f"internal error: {type(e).__name__}: {e}", "server_error"), "failed")
            self._doomed.append(job)

    def _publish(self, job: Job, choice: ChoiceText, row: Any) -> None:
        if job.first_token_at is None and row.trace.token_ids:
            job.first_token_at = time.monotonic()
        reasoning, content = choice.update(row)
        if choice.ending:  # a stop string or max_tokens: this row ends after the step
            choice.ending = False
            self._ending.append(choice.handle)
        if reasoning or content:
            job._put(Delta(choice.index, reasoning, content))
        if not row.done or not all(h.done for h in job.handles):
            return
        error = next((h.error for h in job.handles if h.error is not None), None)
        if error is not None:
            self._answer(job, self._job_error(error), "failed")
            return
        completions: list[Completion] = [c.completion(h.rows[0]) for c, h in zip(job.choices, job.handles)]
        self.stats["thinking_tokens"] += sum(c.thinking_tokens for c in completions)
        self.stats["answer_tokens"] += sum(c.answer_tokens for c in completions)
        self._answer(job, completions, "cancelled" if job.cancelled else "completed")

    def _answer(self, job: Job, event: Any, outcome: str) -> None:
        if job.answered:
            return
        self.stats[outcome] += 1
        self._running.discard(job)
        self.stats["running"] = len(self._running)
        job._put(event)

    def _job_error(self, e: BaseException) -> JobError:
        """A failure of the engine after the request passed its checks: not the client's fault."""
        if not isinstance(e, S1KitError):
            return JobError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        if any(c.__name__ == "RemoteEngine" for c in type(self.engine).__mro__):  # its server failed
            return JobError(502, f"the engine failed: {e}", "server_error")
        return JobError(500, f"the engine failed on this request: {e}", "server_error")  # e.g. it cannot sample
