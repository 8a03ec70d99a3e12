"""A terminal chat with budget forcing (``s1kit chat``): thinking streams dimmed, then the answer, then how many
thinking tokens the turn used against its budget. Commands between turns change the budget; Ctrl-C stops the
current answer and returns to the prompt.

The session keeps the conversation (user turns and the model's answers, not its thinking) and drives the engine
core directly: ``add`` the turn, ``step`` until it ends, print each row update as it arrives, ``abort`` on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import replace
from typing import Any, Callable, Iterator

from .budget import BudgetPolicy
from .engines.base import MIN_TEMPERATURE, Request, SamplingParams
from .errors import S1KitError
from .formats import get_format
from .streaming import TextDeltas

HELP = """commands:
  /budget N|none   cap thinking at N tokens (none: no cap)
  /min N           think at least N tokens (a stop before that becomes a wait string)
  /waits N         suppress the first N stops, appending "Wait"
  /answer N        answer budget in tokens
  /format s1|r1    thinking format
  /temperature T   0 = greedy
  /reset           forget the conversation
  /settings        show the budget
  /help            this list
  /quit            leave (Ctrl-D too); Ctrl-C stops the current answer"""


class ChatSession:
    """The conversation, its budget and format, and one turn at a time through an engine core."""

    def __init__(self, engine: Any, policy: BudgetPolicy, format: str = "s1", sampling: SamplingParams | None = None,
                 system: str | None = None) -> None:
        self.engine, self.policy, self.format = engine, policy, get_format(format)
        self.sampling = sampling or SamplingParams()
        self.system = system
        self.history: list[dict[str, str]] = []

    def settings(self) -> str:
        """The budget in one line."""
        p = self.policy
        cap = "none" if p.max_thinking_tokens is None else str(p.max_thinking_tokens)
        return (f"budget {cap} · min {p.min_thinking_tokens} · waits {p.num_waits} · answer {p.max_answer_tokens} "
                f"· format {self.format.name} · temperature {self.sampling.temperature:g}")

    def command(self, line: str) -> str:
        """Apply a ``/command``; returns what to print (``ValueError`` with a message for a bad one)."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        fields = {"budget": "max_thinking_tokens", "min": "min_thinking_tokens", "waits": "num_waits",
                  "answer": "max_answer_tokens"}
        if name in fields:
            value: int | None
            if name == "budget" and arg.lower() in ("none", "off", "inf"):
                value = None
            else:
                try:
                    value = int(arg)
                except ValueError:
                    raise ValueError(f"/{name} needs a whole number, e.g. /{name} 256") from None
            changes = {fields[name]: value}
            if name == "budget" and value is not None and self.policy.min_thinking_tokens > value:
                changes["min_thinking_tokens"] = value  # a lower cap pulls the minimum down with it
            try:
                self.policy = replace(self.policy, **changes)
            except ValueError as e:
                raise ValueError(str(e).replace("max_thinking_tokens", "/budget").replace(
                    "min_thinking_tokens", "/min").replace("num_waits", "/waits").replace(
                    "max_answer_tokens", "/answer")) from None
            return self.settings()
        if name == "format":
            self.format = get_format(arg)
            return self.settings()
        if name == "temperature":
            try:
                sampling = replace(self.sampling, temperature=float(arg))
            except ValueError:
                raise ValueError(f"/temperature needs 0 (greedy) or a number of at least {MIN_TEMPERATURE:g}, "
                                 f"e.g. /temperature 0.7 (got {arg!r})") from None
            self.sampling = sampling
            return self.settings()
        if name == "reset":
            self.history.clear()
            return "conversation cleared"
        if name == "settings":
            return self.settings()
        if name == "help":
            return HELP
        raise ValueError(f"unknown command /{name} (try /help)")

    def turn(self, text: str, on_thinking: Callable[[str], None], on_answer: Callable[[str], None]) -> Any:
        """One exchange: stream the thinking and the answer through the callbacks; the ``Completion``.

        A ``KeyboardInterrupt`` while it decodes aborts it (the turn is not kept) and propagates; so does any
        failure, after the engine is left with nothing of the turn (a failed step resets it, as the server does).
        The conversation keeps only turns that ended."""
        messages = self.history + [{"role": "user", "content": text}]
        request = Request(messages, self.policy, self.format, self.sampling, self.system)
        thinking, answer = TextDeltas(self.engine.tokenizer, False), TextDeltas(self.engine.tokenizer, True)

        def update(row: Any) -> None:
            if row.done:
                on_thinking(thinking.finish(row.completion.thinking))
                on_answer(answer.finish(row.completion.answer))
            else:
                on_thinking(thinking.update(row.trace.thinking_ids))
                on_answer(answer.update(row.trace.answer_ids))

        handle = self.engine.add(request, update)
        try:
            with _ctrl_c_between_steps() as interrupted:
                while not handle.done:
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    try:
                        self.engine.step()
                    except Exception as e:  # the step failed: its state may be half-updated
                        fail = getattr(self.engine, "fail", None)
                        if fail is not None:
                            fail(e)
                        raise
        except BaseException:
            self.engine.abort(handle)
            raise
        [c] = handle.completions()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": c.answer}]
        return c

    def footer(self, c: Any) -> str:
        """How the turn used its budget."""
        cap = self.policy.max_thinking_tokens
        used = f"{c.thinking_tokens}/{cap}" if cap is not None else f"{c.thinking_tokens}"
        how = "cap hit" if c.hit_cap else "stopped by the model"
        return f"thinking {used} tokens · waits {c.waits_used} · {how} · answer {c.answer_tokens} tokens"


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[threading.Event]:
    """While decoding, Ctrl-C only sets a flag that the loop reads between steps: a KeyboardInterrupt raised at an
    arbitrary point (inside a finalizer, where Python ignores it, or a library's cleanup) could be lost."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signals reach only the main thread; there a KeyboardInterrupt still works as usual
        return
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _reason(e: BaseException) -> str:
    """A failure as one line: the message of a user-facing error, the kind and message of anything else."""
    if isinstance(e, (S1KitError, ValueError)):
        return " ".join(str(e).split())
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def run_chat(session: ChatSession, console: Any, read: Callable[[str], str] = input) -> None:
    """The read-eval-print loop on ``console`` (rich): commands, turns, Ctrl-C and Ctrl-D."""
    console.print(f"[bold]s1kit chat[/] · {session.settings()} · /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if line in ("/quit", "/exit", "/q"):
                return
            try:
                console.print(session.command(line), style="cyan", markup=False, highlight=False)
            except Exception as e:  # noqa: BLE001 - a bad command never ends the session
                console.print(f"error: {_reason(e)}", style="red", markup=False, highlight=False)
            continue
        started = {"answer": False}

        def thinking(delta: str) -> None:
            if delta:
                console.print(delta, style="dim", end="", markup=False, highlight=False, soft_wrap=True)

        def answer(delta: str) -> None:
            if delta:
                if not started["answer"]:
                    console.print("\n", end="")
                    started["answer"] = True
                console.print(delta, style="bold", end="", markup=False, highlight=False, soft_wrap=True)

        try:
            c = session.turn(line, thinking, answer)
        except KeyboardInterrupt:
            console.print("\n[stopped]", style="yellow", markup=False)
            continue
        except Exception as e:  # noqa: BLE001 - e.g. the conversation no longer fits the context: this turn only
            console.print(f"\nerror: {_reason(e)} (the turn is dropped; the conversation so far is kept, /reset "
                          "clears it)", style="red", markup=False, highlight=False)
            continue
        console.print()
        console.print(session.footer(c), style="cyan", markup=False, highlight=False)
