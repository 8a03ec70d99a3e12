"""One bad request, item or line never hurts the others (issue 26): the server's engine loop is supervised and
drains on SIGTERM, eval records an item that cannot run instead of stopping, the run's identity is its complete
settings, the run store repairs a torn line, chat survives a failing turn, and bad command-line input is one
``error:`` line. Real SmolLM2-135M (the session ``engine`` fixture), a real uvicorn server on loopback, and
schemathesis / hypothesis fuzzing, each bounded in examples and time."""

import asyncio
import dataclasses
import io
import json
import logging
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from s1kit import BudgetPolicy, Request, S1KitError
from s1kit.budget import EarlyExit
from s1kit.engines.base import SamplingParams

MODEL = "smollm2-135m"
# A Mistral/Gemma/Llama-2-style chat template: it raises on two user turns in a row, as theirs do.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LONG = "hello " * 9000  # beyond SmolLM2's 8192-token context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server, thread):
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)


def serve_in_thread(app, drain_timeout=30.0):
    """The app on a free loopback port, run by the server ``s1kit serve`` runs (in a thread: no signals)."""
    from s1kit.serve.app import make_server

    port = free_port()
    srv = make_server(app, "127.0.0.1", port, drain_timeout=drain_timeout)
    thread = threading.Thread(target=srv.run, daemon=True)
    start(srv, thread)
    return srv, thread, f"http://127.0.0.1:{port}"


def idle(engine):
    """Leave the shared engine with nothing queued or decoding (a test that broke a worker may leave rows)."""
    if engine.has_work:
        engine.fail(RuntimeError("cleared by the test"))
    assert not engine.has_work


@pytest.fixture(scope="module")
def server(engine):
    """The app (no API key) on a free loopback port; stopped (worker joined) after the module."""
    import uvicorn

    from s1kit.serve import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    start(srv, thread)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(60)
    idle(engine)


def body(prompt="What is 2+2?", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_answer_tokens": 3, "temperature": 0,
            "thinking_budget": {"min_tokens": 3, "max_tokens": 3}, **kw}


def post(server, payload, path="/v1/chat/completions", timeout=60):
    return httpx.post(server + path, json=payload, timeout=timeout)


def openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def health(server):
    return httpx.get(server + "/health", timeout=10)


# ------------------------------------------------------------------ 1. a template that raises


def test_a_chat_template_that_raises_fails_that_request_alone(engine, server):
    saved = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = STRICT_TEMPLATE
    try:
        two_users = body(messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": "hi again"}])
        err = openai_error(post(server, two_users, timeout=30), 400)
        assert "chat template" in err["message"] and "alternate" in err["message"]
        err = openai_error(post(server, {**two_users, "stream": True}, timeout=30), 400)
        assert "alternate" in err["message"]
        r = post(server, body())  # the worker lives on
        assert r.status_code == 200 and r.json()["choices"][0]["thinking"]["tokens"] == 3
    finally:
        engine.tokenizer.chat_template = saved
    h = health(server)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["queued"] == 0


# ------------------------------------------------------------------ 2. parameters that cannot sample


def test_a_request_that_cannot_sample_is_refused_up_front_and_harms_no_other(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            good = [body(p, thinking_budget={"min_tokens": 6, "max_tokens": 6})
                    for p in ("Name a colour.", "Say hi.", "Is 7 prime?")]
            bad = body("Name a fruit.", temperature=1e-300, thinking_budget={"min_tokens": 6, "max_tokens": 6})
            return await asyncio.gather(*(c.post(server + "/v1/chat/completions", json=b) for b in [*good, bad]))

    *good, bad = asyncio.run(main())
    assert [r.status_code for r in good] == [200, 200, 200], [r.text for r in good]
    assert all(r.json()["choices"][0]["thinking"]["tokens"] == 6 for r in good)
    err = openai_error(bad, 422)  # an invalid field, refused before it is queued, as every other
    assert err["param"] == "temperature" and "0 (greedy) or >= 0.01" in err["message"]
    for value in (1e-5, 5e-324):
        assert openai_error(post(server, body(temperature=value)), 422)["param"] == "temperature"
    assert post(server, body(temperature=0.01, seed=1)).status_code == 200  # the floor itself samples
    probes = body(thinking_budget={"max_tokens": 8, "early_exit": {"every": 1, "probe_tokens": 10**9}})
    err = openai_error(post(server, probes), 400)  # a probe as long as the context could never end
    assert err["param"] == "thinking_budget.early_exit.probe_tokens"


class _BadDecode:
    """The real engine seen through a tokenizer whose ``decode`` fails: what the worker streams (text deltas) breaks
    for a streaming job; the engine's own completions use the real tokenizer."""

    class Tokenizer:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def decode(self, *args, **kw):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken tokenizer")

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, self.Tokenizer(engine.tokenizer)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_row_that_cannot_sample_or_stream_fails_its_request_alone(engine):
    """Past the up-front checks: a row whose distribution is not finite (temperature 1e-300 forced past
    ``SamplingParams``), or whose text cannot be streamed, ends its own request with a 500; the requests decoding
    beside it finish."""
    from s1kit.serve.worker import EngineWorker, Job, JobError

    def job(prompt, sampling=SamplingParams(), stream=False):
        return Job([Request(prompt, BudgetPolicy(min_thinking_tokens=4, max_thinking_tokens=4, max_answer_tokens=1),
                            sampling=sampling)], stream=stream)

    async def run(worker, jobs):
        async def final(j):
            while not isinstance(event := await j.next_event(), (list, JobError)):
                pass
            return event

        for j in jobs:
            worker.submit(j)
        return await asyncio.gather(*(final(j) for j in jobs))

    unsampleable = SamplingParams(temperature=1.0, seed=1)
    object.__setattr__(unsampleable, "temperature", 1e-300)

    async def main():
        results = []
        for eng, odd in [(engine, job("Name a fruit.", unsampleable)), (_BadDecode(engine), job("Hi.", stream=True))]:
            worker = EngineWorker(eng)
            try:
                results.append(await run(worker, [job("Name a colour."), odd, job("Say hi.")]))
            finally:
                worker.close()
        return results

    for first, odd, *rest in asyncio.run(main()):
        assert isinstance(odd, JobError) and odd.status == 500, odd
        assert all(isinstance(r, list) and r[0].thinking_tokens == 4 for r in [first, *rest])
    assert not engine.has_work


# ------------------------------------------------------------------ 1. a failure of the engine itself


class _Broken:
    """The real engine whose step raises once armed, and whose recovery (``fail``) raises too: the engine itself is
    broken, which the worker cannot repair."""

    def __init__(self, engine):
        self.engine, self.armed = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.armed:
            raise RuntimeError("device lost")
        self.engine.step()

    def fail(self, error):
        raise RuntimeError("cannot reset the device")


def test_a_broken_engine_is_reported_by_health_and_to_every_waiting_request(engine):
    from s1kit.serve import create_app

    broken = _Broken(engine)
    srv, thread, url = serve_in_thread(create_app(broken, MODEL))
    try:
        assert health(url).json()["status"] == "ok"
        broken.armed = True
        err = openai_error(post(url, body(), timeout=30), 500)
        assert "device lost" in err["message"] and err["type"] == "server_error"
        h = health(url)
        assert h.status_code == 503 and h.json()["status"] == "error" and "device lost" in h.json()["error"]
        t0 = time.monotonic()
        err = openai_error(post(url, body(stream=True), timeout=30), 503)
        assert "device lost" in err["message"] and time.monotonic() - t0 < 5  # at once, never a hang
    finally:
        srv.should_exit = True
        thread.join(60)
        idle(engine)
    assert not thread.is_alive()


# ------------------------------------------------------------------ 4. one prompt of a list too long


@pytest.mark.parametrize("prompts", [["hi", LONG], [LONG, "hi"]])
def test_a_prompt_list_with_one_prompt_too_long_is_a_400_in_either_order(server, prompts):
    payload = {"model": MODEL, "prompt": prompts, "max_tokens": 3, "temperature": 0, "thinking_budget": 3}
    err = openai_error(post(server, payload, path="/v1/completions"), 400)
    assert "does not fit the model's context" in err["message"]
    assert health(server).json()["queued"] == 0


# ------------------------------------------------------------------ 9. SIGTERM: drain, then proper errors


def test_sigterm_drains_in_flight_requests_then_ends_the_rest_with_proper_errors(engine, caplog):
    from s1kit.serve import create_app

    # 8 s of drain: the short request (a few dozen steps) finishes inside it even on a loaded 2-core machine
    srv, thread, url = serve_in_thread(create_app(engine, MODEL), drain_timeout=8)
    endless = {"min_tokens": 4000, "max_tokens": 4000}
    results = {}

    def run(name, payload):
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=60) as r:
                results[name] = (r.status_code, [line for line in r.iter_lines() if line])
        except httpx.HTTPError as e:
            results[name] = e

    clients = [threading.Thread(target=run, args=a) for a in [
        ("stream", body(stream=True, thinking_budget=endless)),
        ("plain", body(thinking_budget=endless)),
        ("short", body(thinking_budget={"min_tokens": 4, "max_tokens": 4}))]]
    with caplog.at_level(logging.ERROR):
        for c in clients:
            c.start()
        deadline = time.monotonic() + 60
        while health(url).json()["running"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.handle_exit(signal.SIGTERM, None)  # what the signal calls
        for c in clients:
            c.join(60)
        thread.join(60)
    took = time.monotonic() - t0
    assert not thread.is_alive() and 7.5 < took < 40, took
    status, lines = results["short"]  # finished within the deadline: answered normally
    assert status == 200 and json.loads(lines[0])["choices"][0]["thinking"]["tokens"] == 4
    status, lines = results["plain"]
    assert status == 503 and "shutting down" in json.loads(lines[0])["error"]["message"]
    status, lines = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not engine.has_work


# ------------------------------------------------------------------ 7. schemathesis against the real server


def test_schemathesis_finds_no_server_error_and_no_hang(engine, server):
    """Every endpoint, from the server's own OpenAPI schema, positive and negative cases: no 5xx, every answer
    within its timeout, and a live /health afterwards. Half the bodies are steered to the engine (the served model,
    a user turn last, small counts); generation is kept short by a small context window (every request must fit
    it or is refused) and at most 2 samples per request."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(httpx.get(server + "/openapi.json").json())
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                       "/v1/requests/{request_id}/stop_thinking"}
    generating = ("/v1/chat/completions", "/v1/completions")
    positive = [st.tuples(op.as_strategy(generation_mode=GenerationMode.POSITIVE), st.booleans()) for op in ops]
    negative = [st.tuples(op.as_strategy(generation_mode=GenerationMode.NEGATIVE), st.just(False)) for op in ops]
    steered = [st.tuples(op.as_strategy(generation_mode=GenerationMode.POSITIVE), st.just(True)) for op in ops
               if op.path in generating]
    strategy = st.one_of(positive + negative + steered * 2)  # half the examples reach the engine
    seen = []

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def check(drawn):
        case, served = drawn
        b = case.body
        if isinstance(b, dict):
            if isinstance(b.get("n"), int) and b["n"] > 2:
                b["n"] = 2
            if served and case.operation.path in generating:
                _steer(b)  # half the bodies are steered to the engine; the rest stay as drawn
        r = case.call(base_url=server, timeout=30)
        seen.append((case.operation.path, r.status_code))
        assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])

    saved, engine.max_context = engine.max_context, 128
    try:
        check()
    finally:
        engine.max_context = saved
    assert any(code == 200 for path, code in seen if path == "/v1/chat/completions")
    h = health(server)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["running"] == 0
    assert post(server, body()).status_code == 200


def _steer(b: dict) -> None:
    """Make a drawn body likely to reach the engine (the schema cannot say every rule: a user turn last, neutral
    penalties, the served model), keeping its drawn sampling and budget fields."""
    b["model"] = MODEL
    for key in ("stop", "logprobs", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty",
                "top_logprobs", "logit_bias", "thinking_token_budget"):  # refused unless neutral; one budget field
        b.pop(key, None)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(b.get(key), int) and b[key] > 3:
            b[key] = 3
    if b.get("max_tokens") is None and b.get("max_completion_tokens") is None:
        b["max_tokens"] = 3  # the default answer budget (512) does not fit the small context
    budget = b.get("thinking_budget")
    if isinstance(budget, dict):  # short thinking: the drawn shape of the budget, with small counts
        for key, most in (("max_tokens", 4), ("min_tokens", 4), ("grace_tokens", 2)):
            if not isinstance(budget.get(key), int) or budget[key] > most:
                budget[key] = most if key == "max_tokens" else min(budget.get(key) or 0, most) \
                    if isinstance(budget.get(key), int) else budget.get(key, 0)
        if isinstance(budget.get("early_exit"), dict) and isinstance(budget["early_exit"].get("probe_tokens"), int):
            budget["early_exit"]["probe_tokens"] = min(budget["early_exit"]["probe_tokens"], 4)
    elif b.get("reasoning_effort") is None:
        b["thinking_budget"] = 4
    if isinstance(b.get("messages"), list):
        b["messages"].append({"role": "user", "content": "Say hi."})


# ------------------------------------------------------------------ 4. the run's identity: every field


def _record(policy: BudgetPolicy, sampling: SamplingParams, **fields):
    from s1kit.data.benchmarks import Item
    from s1kit.evaluate.record import RunRecord
    from s1kit.evaluate.sweep import Setting

    items = [Item("a", "What is 1+1?", "2")]
    setting = Setting("budget", "max=8", policy, hi=policy.max_thinking_tokens)
    return RunRecord.create(MODEL, "gsm8k", items, [setting], sampling=sampling, **fields), items


def _reread(record, tmp_path):
    from s1kit.evaluate.record import RunDir

    run = RunDir(tmp_path)
    run.write(record)
    return run.read()


POLICY = BudgetPolicy(max_thinking_tokens=8, max_answer_tokens=16)
RULE = EarlyExit(every=8)
SAMPLING = SamplingParams(temperature=0.5, seed=0)
# A different valid value for every field; a field added to any of these classes must be added here too.
POLICY_VALUES = {
    "max_thinking_tokens": st.sampled_from([None, 0, 4, 9, 4096]),
    "min_thinking_tokens": st.sampled_from([1, 4, 8]),
    "num_waits": st.integers(1, 5),
    "wait_strings": st.lists(st.sampled_from(["Hmm", "Wait,", " Let me check", "Wait"]), min_size=1, max_size=3)
    .map(tuple),
    "answer_prefix": st.sampled_from(["", "Answer:", "Final Answer: ", "\\boxed{"]),
    "max_answer_tokens": st.integers(1, 64),
    "cap_grace": st.integers(1, 32),
    "early_exit": st.just(RULE),
}
RULE_VALUES = {
    "every": st.sampled_from([None, 1, 16, 64]),
    "words": st.lists(st.sampled_from(["Wait", "Hmm", "But"]), min_size=1, max_size=2).map(tuple),
    "probe_tokens": st.integers(1, 40),
    "agree": st.sampled_from([None, 1, 3]),
    "confidence": st.sampled_from([0.5, 0.9, 1.0]),
}
SAMPLING_VALUES = {
    "temperature": st.sampled_from([0.0, 0.7, 1.0, 2.0]),
    "top_p": st.sampled_from([0.5, 0.9]),
    "top_k": st.integers(1, 50),
    "seed": st.sampled_from([None, 1, 2**40]),
}


def test_every_field_that_determines_samples_has_a_changed_value_to_try():
    assert set(POLICY_VALUES) == {f.name for f in dataclasses.fields(BudgetPolicy)}
    assert set(RULE_VALUES) == {f.name for f in dataclasses.fields(EarlyExit)}
    assert set(SAMPLING_VALUES) | {"n"} == {f.name for f in dataclasses.fields(SamplingParams)}


@st.composite
def one_change(draw):
    """(what, recorded policy, asked policy, recorded sampling, asked sampling): exactly one field differs."""
    where = draw(st.sampled_from(["policy", "rule", "sampling"]))
    base = POLICY if where != "rule" else replace(POLICY, early_exit=RULE)
    if where == "policy":
        name = draw(st.sampled_from(sorted(POLICY_VALUES)))
        changed = dict(policy=_valid(lambda v: replace(base, **{name: v}), draw(POLICY_VALUES[name])))
    elif where == "rule":
        name = draw(st.sampled_from(sorted(RULE_VALUES)))
        changed = dict(policy=replace(base, early_exit=_valid(lambda v: replace(RULE, **{name: v}),
                                                              draw(RULE_VALUES[name]))))
    else:
        name = draw(st.sampled_from(sorted(SAMPLING_VALUES)))
        changed = dict(sampling=_valid(lambda v: replace(SAMPLING, **{name: v}), draw(SAMPLING_VALUES[name])))
    old = (base, SAMPLING)
    new = (changed.get("policy", base), changed.get("sampling", SAMPLING))
    from hypothesis import assume

    assume(new != old)
    if draw(st.booleans()):  # either order: the recorded run has the default, or the rerun does
        old, new = new, old
    return name, old, new


def _valid(make, value):
    from hypothesis import assume

    try:
        return make(value)
    except ValueError:
        assume(False)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=one_change())
def test_changing_any_one_field_refuses_the_rerun(change, tmp_path):
    from s1kit.evaluate.record import RunMismatch

    name, (old_policy, old_sampling), (new_policy, new_sampling) = change
    recorded, items = _record(old_policy, old_sampling)
    recorded = _reread(recorded, tmp_path)  # as a rerun finds it: config.json read back
    asked, _ = _record(new_policy, new_sampling)
    with pytest.raises(RunMismatch) as e:
        recorded.extended_by(asked, items, tmp_path)
    assert name in str(e.value)
    same, _ = _record(old_policy, old_sampling)
    assert recorded.extended_by(same, items, tmp_path) == recorded  # the same asks resume


@pytest.mark.parametrize("field, value", [("model", "other"), ("engine", "remote"), ("dtype", "bfloat16"),
                                          ("format", "r1"), ("max_tries", 3), ("question_field", "q"),
                                          ("answer_field", "a"), ("grader", 1)])
def test_changing_any_run_field_refuses_the_rerun(tmp_path, field, value):
    from s1kit.evaluate.record import RunMismatch, RunRecord

    recorded, items = _record(POLICY, SAMPLING, dtype="float32")
    recorded = _reread(recorded, tmp_path)
    growing = {"settings", "items", "items_sha256", "limit", "samples", "record"}
    assert {f.name for f in dataclasses.fields(RunRecord)} - growing >= {field}
    with pytest.raises(RunMismatch, match=field):
        recorded.extended_by(replace(recorded, **{field: value}), items, tmp_path)


def test_the_issue_case_cap_grace_either_way(tmp_path):
    """``--cap-grace 4`` added to a rerun (and the reverse): refused, neither stale samples nor a KeyError."""
    from s1kit.data.benchmarks import Item
    from s1kit.evaluate.record import RunMismatch, RunRecord
    from s1kit.evaluate.sweep import build_grid

    items = [Item("a", "What is 1+1?", "2")]
    for old, new in [(0, 4), (4, 0)]:
        recorded = _reread(RunRecord.create(MODEL, "gsm8k", items, build_grid(max_thinking=[8], cap_grace=old)),
                           tmp_path)
        asked = RunRecord.create(MODEL, "gsm8k", items, build_grid(max_thinking=[8], cap_grace=new))
        with pytest.raises(RunMismatch, match="cap_grace of budget:max=8"):
            recorded.extended_by(asked, items, tmp_path)


# ------------------------------------------------------------------ 3. eval: an item that cannot run


def in_process(*args):
    from s1kit.cli import app

    r = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


@pytest.fixture
def loaded(engine, monkeypatch):
    """Commands get the session's engine instead of loading the model again."""
    from s1kit.cli.engine import EngineChoice

    monkeypatch.setattr(EngineChoice, "open", lambda self, **kw: engine)
    return engine


def _bench(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QUESTION = "There are 6 birds on a tree and 2 fly away. How many birds are left?"
FORCED = ["--max-thinking", "0", "--max-answer", "1", "--answer-prefix", "Final Answer: 4 birds are left.\n"]


def test_an_item_that_cannot_run_is_an_error_row_reported_apart(loaded, tmp_path):
    data = _bench(tmp_path / "b.jsonl", [{"id": "ok1", "question": QUESTION, "answer": "4"},
                                         {"id": "huge", "question": "word " * 30000, "answer": "4"},
                                         {"id": "ok2", "question": QUESTION, "answer": "4"}])
    out = tmp_path / "run"
    r = in_process("eval", "--benchmark", str(data), *FORCED, "--out", str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "1 sample(s) could not run" in r.stdout and "huge" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["settings"]
    assert row["n"] == 2 and row["accuracy"] == 1.0 and row["errors"] == 1
    [err] = summary["errors"]
    assert err["item_id"] == "huge" and "does not fit the model's context" in err["error"]
    assert "huge" in (out / "report.md").read_text()
    stored = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["item_id"] for s in stored) == ["huge", "ok1", "ok2"]
    before = (out / "samples.jsonl").read_bytes()
    r = in_process("eval", "--benchmark", str(data), *FORCED, "--out", str(out))  # the rerun computes nothing
    assert r.returncode == 0 and (out / "samples.jsonl").read_bytes() == before
    r = in_process("report", str(out))
    assert r.returncode == 0 and "1 sample(s) could not run" in r.stdout


# ------------------------------------------------------------------ 10. report --regrade from anywhere


def test_report_regrade_works_from_any_directory(loaded, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _bench(work / "b.jsonl", [{"id": "one", "question": QUESTION, "answer": "4"}])
    monkeypatch.chdir(work)
    r = in_process("eval", "--benchmark", "b.jsonl", *FORCED, "--out", "run")
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path)
    r = in_process("report", "--regrade", "work/run")
    assert r.returncode == 0, r.stderr
    assert "regraded 1 samples: 0 changed, 1 correct" in r.stdout
    monkeypatch.chdir(work)  # and the rerun from where it ran still resumes
    r = in_process("eval", "--benchmark", "b.jsonl", *FORCED, "--out", "run")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ 6. the run store: torn and bad lines


def _sample(i, text="é中"):
    return {"setting": "budget:max=0", "method": "budget", "label": "max=0", "item_id": str(i), "sample": 0,
            "gold": "4", "prediction": "4", "graded": "answer", "correct": True, "thinking_tokens": 0,
            "answer_tokens": 1, "waits_used": 0, "hit_cap": True, "finish_reason": "length", "tries": 1,
            "probe_tokens": 0, "early_exit": False, "answer": "4", "thinking": text}


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_torn_last_line_is_dropped_and_repaired_in_any_encoding_state(tmp_path, cut):
    from s1kit.evaluate.sweep import SampleStore

    path = tmp_path / "samples.jsonl"
    whole = "".join(json.dumps(_sample(i), ensure_ascii=False) + "\n" for i in range(2)).encode()
    torn = json.dumps(_sample(2, "中文中文"), ensure_ascii=False).encode()
    at = torn.index("中".encode()) + cut  # inside or after a 3-byte character, and into the next
    path.write_bytes(whole + torn[:at])
    store = SampleStore(path)
    assert sorted(store.records) == [("budget:max=0", "0", 0), ("budget:max=0", "1", 0)]
    store.add(_sample(3))
    store.close()
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == ["0", "1", "3"]  # the fragment is gone: jq reads it


@pytest.mark.parametrize("bad, why", [(b"42", "not a JSON object"), (b'{"setting": "x"}', "not a sample"),
                                      (b"\xff\xfe{}", "not UTF-8"), (b"{not json", "not valid JSON")])
def test_any_other_bad_line_names_the_file_and_line(tmp_path, bad, why):
    from s1kit.evaluate.record import RunDir, RunRecord
    from s1kit.evaluate.sweep import build_grid

    out = tmp_path / "run"
    out.mkdir()
    RunDir(out).write(RunRecord.create(MODEL, "gsm8k", [], build_grid(max_thinking=[0])))
    good = json.dumps(_sample(0), ensure_ascii=False).encode()
    (out / "samples.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    r = in_process("report", str(out))
    line = error_line(r)
    assert f"{out / 'samples.jsonl'}:2" in line and why in line


# ------------------------------------------------------------------ 7. chat survives any one turn's failure


class _StepFails:
    def __init__(self, engine):
        self.engine, self.armed = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.armed:
            self.armed = False
            raise RuntimeError("probability tensor contains either inf, nan")
        self.engine.step()


def test_chat_survives_any_single_failing_turn_and_keeps_its_history(engine):
    from rich.console import Console

    from s1kit.chat import ChatSession, run_chat

    flaky = _StepFails(engine)
    session = ChatSession(flaky, BudgetPolicy(max_thinking_tokens=2, max_answer_tokens=2))
    lines = iter(["Say hi.", "/temperature 1e-300", LONG, "!fail", "Say bye."])

    def read(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if line == "!fail":
            flaky.armed = True
            return "Name a colour."
        return line

    out = io.StringIO()
    run_chat(session, Console(file=out, width=200), read)
    text = out.getvalue()
    assert "0.01" in text and "does not fit the model's context" in text and "inf, nan" in text, text
    assert text.count("error:") == 3 and "Traceback" not in text
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Say hi.", "Say bye."]
    assert session.sampling.temperature == 0 and not engine.has_work


# ------------------------------------------------------------------ 8. command-line input: one error line


def _cuda_visible():
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_visible(), reason="needs a torch that sees no GPU")
@pytest.mark.parametrize("command", [["generate", "x"], ["eval", "--out", "OUT"], ["serve", "--port", "PORT"],
                                     ["chat"]])
@pytest.mark.parametrize("device, needle", [("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"),
                                            ("quantum", "not a device")])
def test_a_device_that_is_not_there_is_one_line(tmp_path, command, device, needle):
    args = [str(tmp_path / "run") if a == "OUT" else str(free_port()) if a == "PORT" else a for a in command]
    line = error_line(in_process(*args, "--device", device))
    assert f"--device {device}" in line and needle in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["generate", "x"], ["eval", "--out", "OUT"], ["chat"]])
def test_a_temperature_that_cannot_sample_is_one_line(tmp_path, command):
    args = [str(tmp_path / "run") if a == "OUT" else a for a in command]
    line = error_line(in_process(*args, "--temperature", "1e-300"))
    assert "--temperature must be 0 (greedy) or >= 0.01" in line


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": 42}\n', ":1: 'prompt' must be text"),
    (b'{"prompt": "ok"}\nnull\n', ":2: expected a JSON object"),
    (b'{"prompt": null}\n', ":1: 'prompt' must be text"),
    (b'{"messages": ["hi"]}\n', ":1: 'messages' must be a list of"),
    (b'{"messages": []}\n', ":1: 'messages' must be a list of"),
    (b'{"prompt": "  "}\n', ":1: 'prompt' is empty"),
    (b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', ":2: not UTF-8"),
])
def test_generate_input_records_that_cannot_run_name_the_file_and_line(tmp_path, content, needle):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    line = error_line(in_process("generate", "--input", str(path)))
    assert f"{path}{needle}" in line


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=8)
prompt_records = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"prompt": json_values | st.text(), "messages": json_values | st.lists(
        st.fixed_dictionaries({}, optional={"role": json_values | st.sampled_from(["user", "assistant", "system"]),
                                            "content": json_values | st.text()}), max_size=3),
        "question": json_values, "problem": json_values}))
lines_of = st.lists(st.one_of(prompt_records.map(lambda v: json.dumps(v).encode()), st.binary(max_size=12)),
                    min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines_of)
def test_any_input_file_gives_runnable_prompts_or_names_file_and_line(tmp_path, lines):
    from s1kit.cli.generate import read_prompts
    from s1kit.formats import as_messages

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        prompts = read_prompts(path)
    except S1KitError as e:
        assert str(e).startswith(f"{path}:") or str(e) == f"{path}: no prompts", e
        return
    for p in prompts:
        messages = as_messages(p)
        assert all(isinstance(m["content"], str) and isinstance(m["role"], str) for m in messages)
        Request(p)


bench_records = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "id": json_values, "question": json_values | st.text(), "answer": json_values | st.text(),
    "solution": json_values | st.text(), "Incorrect Answer 1": json_values, "Correct Answer": json_values}))


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(bench_records.map(lambda v: json.dumps(v).encode()), st.binary(max_size=12)),
                      min_size=1, max_size=4), suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_benchmark_file_loads_or_names_the_file(tmp_path, lines, suffix):
    from s1kit.data.benchmarks import load_benchmark

    path = tmp_path / f"bench{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n" if suffix == ".jsonl" else b"[" + b",".join(lines) + b"]")
    try:
        bench = load_benchmark(str(path))
    except S1KitError as e:
        assert str(e).startswith(str(path)), e
        return
    for it in bench.items:
        assert isinstance(it.question, str) and it.question and it.gold
        it.question.encode("utf-8")
