"""The OpenAI-compatible server on loopback, driven by the official ``openai`` client: a real uvicorn server
running the real SmolLM2-135M (the session ``engine`` fixture), small budgets to stay fast."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from s1kit import BudgetPolicy
from s1kit.serve import EFFORT_BUDGETS, create_app
from s1kit.serve.schemas import ChatCompletionRequest
from test_cli import s1kit

MODEL = "smollm2-135m"
KEY = "test-key"
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    """The app on a free loopback port in a background thread; stopped (worker joined) after the module."""
    port = free_port()
    app = create_app(engine, MODEL, api_key=KEY)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=600)


def health(server) -> dict:
    return httpx.get(server + "/health").json()


def chat(client, prompt, budget, max_tokens=6, temperature=0, **kw):  # max_tokens: the answer budget here
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          temperature=temperature,
                                          extra_body={"thinking_budget": budget, "max_answer_tokens": max_tokens}, **kw)


def reassemble(chunks):
    """(reasoning, content, finish_reasons, usage) of a streamed chat completion, per choice index."""
    reasoning, content, finish, usage = {}, {}, {}, None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            reasoning[c.index] = reasoning.get(c.index, "") + (getattr(c.delta, "reasoning_content", None) or "")
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return reasoning, content, finish, usage


def test_exact_budget_through_the_openai_client(client):
    r = chat(client, "What is 17*23?", {"min_tokens": 24, "max_tokens": 24}, max_tokens=8)
    msg = r.choices[0].message
    assert r.usage.completion_tokens_details.reasoning_tokens == 24
    assert msg.content.strip() and msg.content.startswith("Final Answer:")  # the cap forces the answer prefix
    assert msg.reasoning_content and r.choices[0].thinking["tokens"] == 24 and r.choices[0].thinking["hit_cap"]
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_reassembles_to_the_non_streamed_result(client):
    budget = {"min_tokens": 20, "max_tokens": 20, "wait_strings": ["Wait,", " Hmm"]}  # forced Waits, then the cap
    full = chat(client, "Name a prime number.", budget)
    chunks = list(chat(client, "Name a prime number.", budget, stream=True, stream_options={"include_usage": True}))
    reasoning, content, finish, usage = reassemble(chunks)
    assert reasoning == {0: full.choices[0].message.reasoning_content}
    assert content == {0: full.choices[0].message.content} and content[0]
    assert finish == {0: full.choices[0].finish_reason}
    assert usage.model_dump() == full.usage.model_dump()
    deltas = [c for ch in chunks for c in ch.choices if getattr(c.delta, "reasoning_content", None)]
    assert len(deltas) >= 5  # token by token, not one blob at the end


def test_64_concurrent_streams_with_different_budgets_have_no_cross_talk(engine, server):
    """64 streams at once, each with its own exact budget and prompt: every stream reassembles to what the engine
    gives that request (greedy), and each ends with its own budget of thinking tokens."""
    from s1kit import Request
    from s1kit.engines.hf import HFEngine

    before = health(server)
    prompts = ["What is 2+2?", "Name a colour.", "Say hi.", "What is 9*9?", "Name a fruit.", "Count to three.",
               "What is the capital of France?", "Is 7 prime?"]
    cases = [(prompts[i % 8], 2 + (i * 7) % 17) for i in range(64)]  # 64 different (prompt, budget) pairs
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=600)

    async def one(prompt, n):
        chunks = [c async for c in await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"thinking_budget": {"min_tokens": n, "max_tokens": n}, "max_answer_tokens": 4})]
        reasoning, content, _, usage = reassemble(chunks)
        return reasoning[0], content[0], usage.completion_tokens_details.reasoning_tokens

    async def main():
        return await asyncio.gather(*(one(p, n) for p, n in cases))

    results = asyncio.run(main())
    # what the engine gives each request, all 64 in one batch as the server ran them (results do not depend on
    # the batch's composition: tests/test_engine.py)
    expected = HFEngine(engine.model, engine.tokenizer, batch_size=64).generate([Request(
        p, BudgetPolicy(min_thinking_tokens=n, max_thinking_tokens=n, max_answer_tokens=4)) for p, n in cases])
    for (p, n), got, c in zip(cases, results, expected):
        assert got == (c.thinking, c.answer, n), f"{p!r} with budget {n}"
    after = health(server)
    assert after["completed"] - before["completed"] == 64
    assert after["max_running"] >= 16  # requests decoded side by side, not one after another


def test_stop_thinking_endpoint_closes_a_running_request(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {**_body(max_answer_tokens=6, thinking_budget={"min_tokens": 3000, "max_tokens": 3000}), "stream": True}
    assert httpx.post(server + "/v1/requests/nope/stop_thinking", headers=headers).status_code == 404
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        assert r.status_code == 200
        lines, stopped = [], None
        for line in r.iter_lines():
            lines.append(line)
            if stopped is None and "reasoning_content" in line:
                rid = json.loads(line[len("data: "):])["id"]
                stopped = httpx.post(f"{server}/v1/requests/{rid}/stop_thinking", headers=headers)
    assert stopped.status_code == 200 and stopped.json()["stopped"]
    final = [json.loads(x[6:]) for x in lines if x.startswith("data: {") and '"finish_reason": "' in x][-1]
    thinking = final["choices"][0]["thinking"]
    assert 0 < thinking["tokens"] < 3000 and thinking["hit_cap"]  # closed as a cap at that point would close it
    content = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
                      for x in lines if x.startswith("data: {") and '"choices": [{' in x)
    assert content.startswith("Final Answer:")


def test_text_completions_and_models(client):
    r = client.completions.create(model=MODEL, prompt=["What is 3+4?", "Name a planet."], temperature=0,
                                  extra_body={"thinking_budget": {"min_tokens": 6, "max_tokens": 6},
                                              "max_answer_tokens": 4})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text.startswith("Final Answer:") and c.reasoning_content for c in r.choices)
    assert r.usage.completion_tokens_details.reasoning_tokens == 12
    stream = client.completions.create(model=MODEL, prompt=["What is 3+4?", "Name a planet."],
                                       temperature=0, stream=True,
                                       extra_body={"thinking_budget": {"min_tokens": 6, "max_tokens": 6},
                                                   "max_answer_tokens": 4})
    text, reasoning = {0: "", 1: ""}, {0: "", 1: ""}
    for ch in stream:
        for c in ch.choices:
            text[c.index] += c.text
            reasoning[c.index] += c.reasoning_content or ""
    assert text == {c.index: c.text for c in r.choices}
    assert reasoning == {c.index: c.reasoning_content for c in r.choices}
    assert [m.id for m in client.models.list()] == [MODEL]


def test_n_seeded_samples_stream_to_their_own_choices(client):
    kw = dict(n=2, temperature=0.8, seed=7, max_tokens=3)
    full = chat(client, "Tell me a fact.", {"min_tokens": 5, "max_tokens": 5}, **kw)
    reasoning, content, _, usage = reassemble(chat(client, "Tell me a fact.", {"min_tokens": 5, "max_tokens": 5},
                                                   stream=True, stream_options={"include_usage": True}, **kw))
    assert reasoning == {c.index: c.message.reasoning_content for c in full.choices}
    assert content == {c.index: c.message.content for c in full.choices}
    assert reasoning[0] != reasoning[1]  # two samples, not one twice
    assert usage.completion_tokens_details.reasoning_tokens == full.usage.completion_tokens_details.reasoning_tokens == 10


def test_reasoning_effort_and_budget_shorthands():
    def policy(**body):
        return ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}).policy()

    assert EFFORT_BUDGETS == {"none": 0, "minimal": 64, "low": 256, "medium": 1024, "high": 4096}
    assert policy() == BudgetPolicy(max_answer_tokens=512)  # no thinking cap unless asked (the context bounds it)
    assert policy(reasoning_effort="low", max_tokens=32) == BudgetPolicy(max_thinking_tokens=256, max_answer_tokens=32)
    assert policy(thinking_budget=100) == BudgetPolicy(max_thinking_tokens=100, max_answer_tokens=512)
    assert policy(thinking_budget={}) == BudgetPolicy(max_answer_tokens=512)  # explicitly uncapped
    assert policy(extra_body={"thinking_budget": {"min_tokens": 8, "num_waits": 2, "wait_strings": "Hmm",
                                                  "answer_prefix": "Answer:"}}) == BudgetPolicy(
        min_thinking_tokens=8, num_waits=2, wait_strings=("Hmm",), answer_prefix="Answer:", max_answer_tokens=512)


def _post(server, body, key=KEY, path="/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server + path, json=body, headers=headers, timeout=600)
    return httpx.post(server + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=600)


def _body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_answer_tokens": 4, **kw}


@pytest.mark.parametrize("body, status, needle", [
    (b'{"model": "smollm2-135m", "messages": [', 400, "not valid JSON"),
    ([1, 2], 422, "valid dictionary"),
    (_body(thinking_budget={"min_tokens": 30, "max_tokens": 24}), 422, "min_tokens (30) exceeds max_tokens (24)"),
    (_body(thinking_budget={"max_token": 24}), 422, "thinking_budget.max_token: Extra inputs are not permitted"),
    (_body(thinking_budget={"max_tokens": -1}), 422, "thinking_budget.max_tokens"),
    (_body(thinking_budget={"max_tokens": "24"}), 422, "thinking_budget.max_tokens"),
    (_body(thinking_budget={"wait_strings": []}), 422, "wait_strings must be a non-empty list"),
    (_body(thinking_budgets={"max_tokens": 24}), 422, "thinking_budgets: Extra inputs are not permitted"),
    (_body(reasoning_effort="extreme"), 422, "reasoning_effort"),
    (_body(reasoning_effort="low", thinking_budget=64), 422, "either thinking_budget or reasoning_effort"),
    (_body(extra_body={"thinking_budget": 8}, thinking_budget=9), 422, "both in the body and in extra_body"),
    (_body(temperature=3), 422, "temperature"),
    (_body(stop=[""]), 422, "stop strings must not be empty"),
    (_body(messages=[]), 422, "messages"),
    (_body(messages=[{"role": "user", "content": "   "}]), 422, "non-empty user message"),
    (_body(messages=[{"role": "tool", "content": "x"}]), 422, "messages.0.role"),
    (_body(model="gpt-4o"), 404, "does not exist"),
    (_body(messages=[{"role": "user", "content": "hello " * 9000}]), 400, "does not fit the model's context"),
    (_body(), 401, "API key"),
])
def test_bad_requests_get_one_clear_openai_shaped_error(server, body, status, needle):
    r = _post(server, body, key=None if status == 401 else KEY)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] in ("invalid_request_error", "server_error")


def test_errors_through_the_client_and_nothing_is_lost(client, server):
    with pytest.raises(openai.UnprocessableEntityError, match="exceeds max_tokens"):
        chat(client, "hi", {"min_tokens": 9, "max_tokens": 3})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(server, {}, path="/v1/nothing-here").status_code == 404
    assert httpx.get(server + "/health").status_code == 200  # no key needed
    # the server keeps serving after all the bad requests
    assert chat(client, "hi", {"min_tokens": 2, "max_tokens": 2}).usage.completion_tokens_details.reasoning_tokens == 2
    assert health(server)["queued"] == 0


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_client_that_disconnects_stops_costing_work(server):
    big = _body(max_answer_tokens=8, thinking_budget={"min_tokens": 4000, "max_tokens": 4000})
    before = health(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server + "/v1/chat/completions", json={**big, "stream": True}, headers=headers,
                      timeout=600) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += "reasoning_content" in line
            if seen == 3:
                break  # thinking is streaming; now hang up
        assert seen == 3
    _wait_for(lambda: health(server)["cancelled"] == before["cancelled"] + 1)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(server + "/v1/chat/completions", json=big, headers=headers, timeout=3)
    _wait_for(lambda: health(server)["cancelled"] == before["cancelled"] + 2)
    after = health(server)
    assert after["thinking_tokens"] - before["thinking_tokens"] < 1000  # far from 2 x 4000
    assert after["queued"] == 0


def test_serve_help_and_bad_options():
    r = s1kit("serve", "--help")
    assert r.returncode == 0 and "Example: s1kit serve" in r.stdout and "thinking_budget" in r.stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            (["--port", port], "cannot listen on 127.0.0.1:" + port),
            (["--port", "70000"], "--port must be in 1..65535"),
            (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
            (["--max-model-len", "10"], "--max-model-len must be >= 64"),
            (["--engine", "remote", "--port", str(free_port())], "--engine remote needs --base-url"),
            (["--engine", "vllm", "--port", str(free_port())], "unknown engine 'vllm'"),
            (["--base-url", "http://x/v1", "--port", str(free_port())], "--base-url is only used with --engine remote"),
            (["--format", "o1"], "unknown thinking format"),
        ]
        for args, message in cases:
            r = s1kit("serve", *args)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
            assert lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_s1kit_serve_end_to_end(engine):
    """The command as a user runs it: start, answer one budgeted request, stop on Ctrl-C."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "s1kit.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32", "--max-batch-size", "4"],
                            env={**ENV, "S1KIT_SERVE_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
            except httpx.TransportError:
                return False

        _wait_for(up, timeout=240)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        # the "must show", verbatim: default sampling and answer budget
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 17*23?"}],
                                      extra_body={"thinking_budget": {"min_tokens": 24, "max_tokens": 24}})
        assert r.usage.completion_tokens_details.reasoning_tokens == 24 and r.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"serving 'smollm2-135m' at http://127.0.0.1:{port}/v1" in err and "Traceback" not in err


class _FailsWhenArmed:
    """The real engine, made to fail one step on demand: an engine failure cannot be provoked naturally, and the
    worker must fail only what the engine held at that moment and keep serving."""

    def __init__(self, engine):
        self.engine, self.armed, self.added = engine, False, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add(self, *args, **kw):
        self.added += 1
        return self.engine.add(*args, **kw)

    def step(self):
        if self.armed and self.added >= 2:  # fail once both armed jobs are in the engine
            self.armed = False
            raise RuntimeError("boom")
        self.engine.step()


def test_worker_answers_each_job_when_its_own_rows_end_and_survives_a_failed_step(engine):
    from s1kit import Request
    from s1kit.serve.worker import EngineWorker, Job, JobError

    def job(prompt, n):
        return Job([Request(prompt, BudgetPolicy(min_thinking_tokens=n, max_thinking_tokens=n, max_answer_tokens=3))])

    async def finals(worker, named):
        order = []

        async def final(name, j):
            while not isinstance(event := await j.next_event(), (list, JobError)):
                pass
            order.append(name)
            return event

        for j in named.values():
            worker.submit(j)
        results = await asyncio.gather(*(final(name, j) for name, j in named.items()))
        return dict(zip(named, results)), order

    flaky = _FailsWhenArmed(engine)

    async def main():
        worker = EngineWorker(flaky)
        try:
            mixed = await finals(worker, {"long": job("What is 2+2?", 40), "short": job("Name a colour.", 2)})
            flaky.armed, flaky.added = True, 0
            failed = await finals(worker, {"a": job("Name a fruit.", 2), "b": job("Say hi.", 2)})
            after = await finals(worker, {"c": job("Name a fruit.", 2)})
            return mixed, failed, after, dict(worker.stats)
        finally:
            worker.close()

    (mixed, order), (failed, _), (after, _), stats = asyncio.run(main())
    assert mixed["long"][0].thinking_tokens == 40 and mixed["short"][0].thinking_tokens == 2
    assert order == ["short", "long"]  # answered when its own sequence ended, not with the other
    assert all(isinstance(failed[k], JobError) and failed[k].status == 500 and "boom" in failed[k].message
               for k in "ab")
    assert after["c"][0].thinking_tokens == 2  # the worker and the engine kept serving
    assert stats["completed"] == 3 and stats["failed"] == 2 and stats["running"] == 0


def test_error_bodies_survive_text_that_utf8_cannot_encode():
    """A message quoting a client's own text (a lone surrogate in a key) must still encode: the 422, not a 500."""
    from s1kit.serve.app import _error

    r = _error(422, "messages.0.\ud800: extra inputs are not permitted", param="\ud800")
    assert json.loads(r.body)["error"]["message"].startswith("messages.0.\\ud800")


def test_early_exit_and_grace_through_the_server(client):
    forced = "Final Answer: \\boxed{42}"  # every probe then answers 42: two probes agree at 8 tokens
    budget = {"max_tokens": 40, "num_waits": 40, "answer_prefix": forced,  # Waits keep this model thinking
              "early_exit": {"every": 4, "agree": 2, "probe_tokens": 3}}
    r = chat(client, "Tell me about dragons.", budget, max_tokens=4)
    stats = r.choices[0].thinking
    assert stats["tokens"] == 8 and stats["early_exit"] and not stats["hit_cap"] and stats["probe_tokens"] > 0
    assert r.choices[0].message.content.startswith(forced)
    with pytest.raises(openai.UnprocessableEntityError, match="needs a rule"):
        chat(client, "hi", {"max_tokens": 8, "early_exit": {"every": 4, "agree": None}})
    graceful = chat(client, "Tell me about dragons.", {"min_tokens": 6, "max_tokens": 6, "grace_tokens": 20})
    assert 6 <= graceful.choices[0].thinking["tokens"] <= 26 and graceful.choices[0].thinking["hit_cap"]
