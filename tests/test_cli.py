"""The ``s1kit`` command as a user runs it, on the real SmolLM2 model: the console script's entry point in this
process (argv in; stdout, stderr and the exit code out), and a real process where a test needs one."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

from s1kit.cli import main

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}

# Python's default warning filters (what a user's process starts with): a warning that would reach a user's terminal
# reaches the captured stderr here too.
DEFAULT_WARNINGS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, "")]


def s1kit(*args, stdin=None):
    """``s1kit ARGS`` through the console script's ``main()`` in this process: the same parsing, usage errors,
    error handler and output as the installed command, without starting an interpreter and importing torch each
    time. Returns what a subprocess run returns (a ``CompletedProcess``: returncode, stdout, stderr)."""
    argv = sys.argv
    with CliRunner().isolation(input=stdin) as (out, err, _), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in DEFAULT_WARNINGS:
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        sys.argv = ["s1kit", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = argv
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["s1kit", *args], code, stdout, stderr)


def s1kit_process(*args, timeout=600, **kw):
    """``python -m s1kit.cli ARGS`` in a process of its own (a kill, a second writer, a fresh interpreter)."""
    return subprocess.run([sys.executable, "-m", "s1kit.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kw)


def completions(result):
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_generate_json_budgets(engine, tmp_path):
    # engine fixture: the model is converted and cached before the command loads it
    r = s1kit("generate", "--json", "--min-thinking", "48", "--max-thinking", "48", "--max-answer", "16",
              "What is 17*23?")
    (c,) = completions(r)
    keys = {"prompt", "thinking", "answer", "thinking_tokens", "answer_tokens", "waits_used", "hit_cap", "finish_reason"}
    assert keys <= c.keys() and c["prompt"] == "What is 17*23?"
    assert c["thinking_tokens"] == 48

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 17*23?"}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "Name a prime."}]}) + "\n")
    r = s1kit("generate", "--json", "--max-thinking", "32", "--max-answer", "8", "--input", str(path),
              "--think-open", "", "--stop-token", "<|im_end|>")
    cs = completions(r)
    assert len(cs) == 2
    for c in cs:
        assert c["thinking_tokens"] <= 32 and c["hit_cap"] == (c["thinking_tokens"] == 32)

    r = s1kit("generate", "--json", "--waits", "2", "--max-thinking", "400", "--max-answer", "8", "What is 17*23?")
    (c,) = completions(r)
    assert c["waits_used"] == 2 or c["hit_cap"]


def test_generate_human_output(engine):
    r = s1kit("generate", "--min-thinking", "8", "--max-thinking", "8", "--max-answer", "8", "What is 2+2?")
    assert r.returncode == 0 and "thinking 8 tok" in r.stdout and "cap hit" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-thinking", "-5", "x"], "--max-thinking must be >= 0"),
    (["--min-thinking", "64", "--max-thinking", "32", "x"], "--min-thinking (64) exceeds --max-thinking (32)"),
    (["--waits", "-1", "x"], "--waits must be >= 0"),
    (["--model", "no-such-model", "x"], "unknown model 'no-such-model'"),
    (["--stop-token", "</reasoning>", "x"], "is not a single token"),
    (["--format", "o1", "x"], "unknown thinking format"),
    (["   "], "empty prompt"),
    ([], "no prompt given"),
    (["--input", "/nonexistent.jsonl"], "no such file"),
    (["--temperature", "-1", "x"], "--temperature must be >= 0"),
])
def test_bad_input_is_one_line_exit_2(engine, args, message):
    r = s1kit("generate", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_is_one_line_from_a_fresh_process(engine):
    """What a user's terminal shows, imports included: a check that loads the tokenizer prints nothing else."""
    r = s1kit_process("generate", "--stop-token", "</reasoning>", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "is not a single token" in r.stderr and r.stdout == ""


def test_malformed_input_file_names_file_and_line(engine, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n')
    r = s1kit("generate", "--input", str(path))
    assert r.returncode == 2 and f"{path}:2: not valid JSON" in r.stderr
    path.write_text('{"text": "ok"}\n')
    r = s1kit("generate", "--input", str(path))
    assert r.returncode == 2 and f"{path}:1: no 'prompt'" in r.stderr


def test_every_command_has_help_with_an_example():
    for cmd in ("generate", "eval", "report", "models", "bench", "curate", "train", "serve"):
        r = s1kit(cmd, "--help")
        assert r.returncode == 0 and "Example: s1kit " + cmd in r.stdout


def test_defaults_come_from_the_library():
    """One source per default: the flags that build a BudgetPolicy / SamplingParams default to the library's."""
    import typer

    from s1kit.budget import BudgetPolicy
    from s1kit.cli import app
    from s1kit.serve.schemas import DEFAULT_MAX_ANSWER_TOKENS

    policy = BudgetPolicy()
    commands = typer.main.get_command(app).commands
    for name in ("generate", "eval"):
        defaults = {p.name: p.default for p in commands[name].params}
        assert defaults["max_answer"] == policy.max_answer_tokens == DEFAULT_MAX_ANSWER_TOKENS
        assert defaults["answer_prefix"] == policy.answer_prefix
    assert {p.name: p.default for p in commands["generate"].params}["min_thinking"] == policy.min_thinking_tokens


# The extras `make demo` does not install (train, curate, serve): their packages must not be needed before use.
EXTRAS_ONLY = ("pyarrow", "datasets", "trl", "peft", "fastapi", "uvicorn", "pytest")
BLOCK_EXTRAS = f"""
import sys
sys.modules.update(dict.fromkeys({EXTRAS_ONLY!r}))  # None: imports fail, find_spec says not installed
from s1kit.cli import main
sys.argv[0] = "s1kit"
main()
"""


def test_eval_runs_with_only_the_core_dependencies(engine, tmp_path):
    """`make demo` installs s1kit without extras: the CLI and a budget sweep must not import what extras bring."""
    run = [sys.executable, "-c", BLOCK_EXTRAS]
    r = subprocess.run([*run, "eval", "--benchmark", "gsm8k", "--limit", "2", "--max-thinking", "8,16",
                        "--max-answer", "8", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["control"] == 1.0
    r = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and "--max-batch-size" in r.stdout, r.stderr
    # and using a command whose extra is missing says which extra to install, in one line
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"question": "1+1?", "solution": "2", "thinking": "1+1=2"}) + "\n")
    for args, extra in ((["serve"], "serve"), (["curate", "--pool", str(pool), "--out", str(tmp_path / "c")], "curate"),
                        (["train", "--model", "smollm2-135m", "--data", str(pool), "--out", str(tmp_path / "t")],
                         "train")):
        r = subprocess.run([*run, *args], capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and f"s1kit[{extra}]" in r.stderr, r.stderr
