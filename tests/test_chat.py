"""``s1kit chat`` driven through a real pseudo-terminal, as a person types it: budgets between turns, the footer
that reports thinking tokens against the budget, and Ctrl-C stopping an answer without leaving. Real SmolLM2-135M
on the CPU."""

import os
import pty
import re
import select
import sys
import time

import pytest

from s1kit import BudgetPolicy
from s1kit.chat import ChatSession


class Terminal:
    """A child process on a pty (its controlling terminal, so Ctrl-C is a real SIGINT from the tty)."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.environ.update(TRANSFORMERS_VERBOSITY="error", OMP_WAIT_POLICY="PASSIVE", COLUMNS="200")
            os.execv(sys.executable, [sys.executable, "-m", "s1kit.cli", *argv])
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 180) -> re.Match:
        """Read until ``pattern`` appears in the output after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; output: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:  # the child exited
                    pytest.fail(f"chat exited while waiting for {pattern!r}; output: {self.seen[-2000:]!r}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 65536)
            except OSError:
                pass
            time.sleep(0.1)
        os.kill(self.pid, 9)
        pytest.fail("chat did not exit")


def test_chat_in_a_pty_keeps_budgets_and_survives_ctrl_c():
    t = Terminal("chat", "--device", "cpu", "--dtype", "float32", "--max-thinking", "12", "--max-answer", "6")
    t.expect(r"you> ", timeout=300)
    t.send("/min 12\n")
    t.expect(r"budget 12 · min 12")
    t.expect(r"you> ")
    t.send("What is 2+2?\n")
    t.expect(r"thinking 12/12 tokens · waits \d+ · cap hit")
    t.expect(r"you> ")
    t.send("/budget 5\n")
    t.expect(r"budget 5 · min 5")  # a lower cap pulls the minimum down with it
    t.send("And 3+3?\n")
    t.expect(r"thinking 5/5 tokens")
    t.send("/budget lots\n")
    t.expect(r"error: /budget needs a whole number")
    t.send("/budget 4000\n/min 4000\n")
    t.expect(r"budget 4000 · min 4000")
    t.expect(r"you> ")
    t.send("Tell me a long story.\n")
    t.expect(r"story\.\r?\n.+", timeout=120)  # thinking is streaming
    time.sleep(1.0)
    t.send("\x03")  # Ctrl-C: stop this answer, stay in the chat
    t.expect(r"\[stopped\]", timeout=60)
    t.expect(r"you> ")
    t.send("/budget 4\n/min 0\nHi\n")  # the chat still answers after the interruption
    t.expect(r"thinking \d/4 tokens")
    t.send("/quit\n")
    assert t.wait() == 0


def test_chat_commands_are_checked(engine):
    s = ChatSession(engine, BudgetPolicy(max_thinking_tokens=64))
    assert "budget none" in s.command("/budget none") and s.policy.max_thinking_tokens is None
    assert "format r1" in s.command("/format r1") and s.format.name == "r1"
    for bad, message in [("/waits -1", "/waits"), ("/answer 0", "/answer"), ("/format o1", "unknown thinking format"),
                         ("/temperature hot", "/temperature"), ("/nope", "unknown command")]:
        with pytest.raises(ValueError, match=message):
            s.command(bad)
    s.command("/format s1")
    s.command("/budget 8")
    s.command("/min 8")
    c = s.turn("What is 3*3?", lambda d: None, lambda d: None)
    assert c.thinking_tokens == 8 and s.history[-1] == {"role": "assistant", "content": c.answer}
    s.command("/reset")
    assert s.history == []
