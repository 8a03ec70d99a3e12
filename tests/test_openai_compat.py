"""`s1kit serve` speaks OpenAI and vLLM, and real clients use it: the ``openai`` SDK reads and streams ``reasoning``,
lm-evaluation-harness's ``local-chat-completions`` runs a GSM8K-style task with its stop strings and scores it.
Everything runs the real SmolLM2-135M (the session ``engine``), greedy, with small budgets."""

import json
import re
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from s1kit import BudgetPolicy, Request
from s1kit.errors import S1KitError
from s1kit.serve import create_app
from s1kit.serve.output import AnswerText
from s1kit.serve.schemas import EFFORT_BUDGETS, ChatCompletionRequest
from s1kit.serve.worker import EngineWorker, Limits

MODEL = "smollm2-135m"
MSG = [{"role": "user", "content": "What is 17*23?"}]
FORCED = {"min_tokens": 12, "max_tokens": 12}  # SmolLM2 stops thinking at once unless made to think: 12 tokens


def body(**kw):
    return {"model": MODEL, "messages": MSG, "temperature": 0, **kw}


# ------------------------------------------------------------------ without a server: budgets and their fit


def test_thinking_budget_fields_and_the_default_cap(engine):
    def policy(default=None, **kw):
        return ChatCompletionRequest.model_validate(body(**kw)).policy(default)

    assert policy().max_thinking_tokens is None  # no silent cap: the context window bounds thinking
    assert policy(default=300).max_thinking_tokens == 300  # s1kit serve --default-thinking-budget 300
    assert policy(default=300, thinking_token_budget=7).max_thinking_tokens == 7  # vLLM's field
    assert policy(default=300, thinking_budget={"min_tokens": 2}).max_thinking_tokens is None  # explicit: no cap
    assert [policy(reasoning_effort=e).max_thinking_tokens for e in ("none", "minimal", "low", "medium", "high")] \
        == [0, 64, 256, 1024, 4096] == list(EFFORT_BUDGETS.values())
    # an app-wide default reaches the engine: thinking 0 where the request names no budget, not where it does
    with TestClient(create_app(engine, MODEL, default_thinking_budget=0)) as client:
        capped = client.post("/v1/chat/completions", json=body(max_tokens=20)).json()["choices"][0]["thinking"]
        free = client.post("/v1/chat/completions", json=body(max_tokens=20, thinking_budget=FORCED)).json()
        assert client.get("/version").json()["default_thinking_budget"] == 0
    assert capped["tokens"] == 0 and capped["hit_cap"]
    assert free["choices"][0]["thinking"]["tokens"] == 12
    with pytest.raises(ValueError, match="default_thinking_budget"):
        create_app(engine, MODEL, default_thinking_budget=-1)


def test_the_default_thinking_budget_flag_reaches_the_app(engine, monkeypatch):
    """``s1kit serve --default-thinking-budget``: the command as a user runs it, with the session's engine and the
    server's run loop left out (the app it would serve is kept)."""
    import socket
    from types import SimpleNamespace

    import s1kit.serve.app as serve_app
    from s1kit.cli.engine import EngineChoice
    from test_cli import s1kit

    served = []
    monkeypatch.setattr(EngineChoice, "open", lambda self, **kw: engine)
    monkeypatch.setattr(serve_app, "make_server", lambda app, *a, **kw: SimpleNamespace(run=lambda: served.append(app)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    r = s1kit("serve", "--default-thinking-budget", "300", "--port", port)
    assert r.returncode == 0 and "default thinking cap 300" in r.stderr, r.stderr
    assert TestClient(served[0]).get("/version").json()["default_thinking_budget"] == 300
    bad = s1kit("serve", "--default-thinking-budget", "-1", "--port", port)
    assert bad.returncode == 2 and "--default-thinking-budget must be >= 0" in bad.stderr


def test_thinking_cap_and_answer_budget_fit_max_tokens_and_the_context(engine):
    worker = EngineWorker(engine)
    try:
        request = Request(MSG, BudgetPolicy(max_answer_tokens=512))  # uncapped thinking
        context, closing = engine.max_context, engine.prepare(request).tokens.max_closing_len
        for limit in (4, 100, None):
            ready_request, (ids, _, cap) = worker._prepare(request, Limits(max_tokens=limit))
            answer = ready_request.policy.max_answer_tokens
            assert cap is not None and cap + closing + answer <= context - len(ids)  # the engine's cache holds it
            if limit is None:  # no max_tokens: thinking gets the context but the last 512 tokens, kept for the answer
                assert answer == 512 and cap == context - len(ids) - closing - 1 - 512
            else:  # thinking and the answer may each take all of max_tokens (the cut is the server's)
                assert cap == limit and answer == limit
        # max_answer_tokens (s1kit's answer budget) is kept for the answer, within max_tokens
        ready_request, (ids, _, cap) = worker._prepare(request, Limits(max_answer_tokens=6))
        assert ready_request.policy.max_answer_tokens == 6 and cap == context - len(ids) - closing - 1 - 6
        ready_request, (_, _, cap) = worker._prepare(request, Limits(max_tokens=100, max_answer_tokens=6))
        assert ready_request.policy.max_answer_tokens == 6 and cap == 100
        with pytest.raises(S1KitError, match="does not fit the model's context"):
            worker._prepare(request, Limits(max_tokens=context))
    finally:
        worker.close()


@pytest.mark.parametrize("stops, include", [(("42.", "Q:"), False), (("\n\n", " is"), True), ((".", "Answer:"), False)])
def test_streamed_answer_text_never_sends_what_a_stop_string_takes_back(tokenizer, stops, include):
    ids = tokenizer.encode(" Final Answer: the result is 42.\n\nQ: next", add_special_tokens=False)
    text = AnswerText(tokenizer, stops, include)
    shown = []
    for end in range(1, len(ids) + 1):
        text.feed(ids[:end])
        shown.append(text.safe_text())
    final = text.cut_text()
    full = tokenizer.decode(ids).strip()
    first = min((full.find(s), s) for s in stops if s in full)
    assert final == (full[: first[0]] + (first[1] if include else "")).strip()
    assert all(final.startswith(s) for s in shown)  # every streamed prefix is kept by the cut
    kept, _, _ = text.stop_at
    assert tokenizer.decode(ids[:kept]).strip().find(first[1]) == first[0] and first[1] not in \
        tokenizer.decode(ids[: kept - 1]).strip()  # the row's tokens end with the one that completed the stop


# ------------------------------------------------------------------ one real server for the rest


@pytest.fixture(scope="module")
def added(engine):
    """The engine's handles of every row the server adds (to count what it decoded), recorded by a wrapper on the
    instance's ``add``; removed after the module."""
    handles = []

    def add(*args, **kw):
        handle = type(engine).add(engine, *args, **kw)
        handles.append(handle)
        return handle

    engine.add = add
    yield handles
    del engine.add


DOCS = [("What is 2+2?", "4"), ("What is 17*23?", "391"), ("What is 3+5?", "8"), ("What is 10-3?", "7")]


@pytest.fixture(scope="module")
def reference(engine):
    """What the engine itself gives (greedy), computed before the server starts, which then owns the engine: 12 forced
    thinking tokens and 4 answer tokens; the same with "Wait" as the wait string; the lm-eval task's questions."""
    forced = engine.generate([Request(MSG, BudgetPolicy(min_thinking_tokens=12, max_thinking_tokens=12,
                                                        max_answer_tokens=4))])[0]
    waits = engine.generate([Request(MSG, BudgetPolicy(min_thinking_tokens=12, max_thinking_tokens=12,
                                                       wait_strings=("Wait",), max_answer_tokens=4))])[0]
    docs = engine.generate([Request([{"role": "user", "content": f"Question: {q}\nAnswer:"}],
                                    BudgetPolicy(max_thinking_tokens=8, max_answer_tokens=24)) for q, _ in DOCS])
    return {"forced": forced, "waits": waits, "docs": docs}


@pytest.fixture(scope="module")
def server(engine, added, reference):
    """The app on a free loopback port in a background thread (no API key); stopped after the module."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning"))
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
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, payload, path="/v1/chat/completions"):
    return httpx.post(server + path, json=payload, timeout=300)


def reassemble(chunks):
    """(reasoning, reasoning_content, content, finish_reason, usage) of a streamed one-choice chat completion."""
    reasoning = reasoning_content = content = ""
    finish = usage = None
    for ch in chunks:
        usage = ch.usage or usage
        for c in ch.choices:
            reasoning += getattr(c.delta, "reasoning", None) or ""
            reasoning_content += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    return reasoning, reasoning_content, content, finish, usage


def test_the_openai_sdk_reads_and_streams_reasoning_and_sends_it_back(client):
    kw = dict(model=MODEL, messages=MSG, temperature=0, max_tokens=24, extra_body={"thinking_budget": FORCED})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.reasoning and msg.reasoning == msg.reasoning_content  # vLLM's name, and the older one for old clients
    assert r.usage.completion_tokens_details.reasoning_tokens == 12 and msg.content.startswith("Final Answer:")
    reasoning, reasoning_content, content, finish, usage = reassemble(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert (reasoning, content, finish) == (msg.reasoning, msg.content, r.choices[0].finish_reason)
    assert reasoning_content == reasoning and usage.model_dump() == r.usage.model_dump()
    # multi-turn: the assistant message as the SDK returned it (reasoning and reasoning_content) goes back in; earlier
    # thinking stays out of the prompt, as reasoning models' templates leave it out
    turns = [*MSG, msg, {"role": "user", "content": "And 2+2?"}]
    short = dict(model=MODEL, temperature=0, max_tokens=4)
    again = client.chat.completions.create(**short, messages=turns)
    without = client.chat.completions.create(**short, messages=[
        *MSG, {"role": "assistant", "content": msg.content}, {"role": "user", "content": "And 2+2?"}])
    assert again.usage.prompt_tokens == without.usage.prompt_tokens > r.usage.prompt_tokens
    assert again.choices[0].message.content == without.choices[0].message.content


def test_max_completion_tokens_bounds_thinking_and_answer_exactly(engine, server, added, reference):
    full = reference["forced"]
    closing = len(full.token_ids) - full.thinking_tokens - full.answer_tokens - (full.finish_reason == "stop")
    endless = {"max_tokens": 3000, "num_waits": 3000}  # Waits keep this model thinking
    for limit, field, budget in [(4, "max_completion_tokens", endless), (12 + closing + 3, "max_tokens", FORCED)]:
        n_added = len(added)
        r = post(server, body(**{field: limit}, thinking_budget=budget))
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert usage["completion_tokens"] == limit and choice["finish_reason"] == "length", r.text
        (row,) = [h.rows[0] for h in added[n_added:]]
        assert len(row.trace.token_ids) == limit  # the row was ended there: nothing decoded past the limit
        if limit == 4:  # inside the thinking, which never closed
            assert choice["message"]["content"] == "" and usage["completion_tokens_details"]["reasoning_tokens"] == 4
            assert choice["thinking"]["tokens"] == 4 and not choice["thinking"]["hit_cap"]
        else:  # 12 thinking tokens, the opener, 3 answer tokens (the answer budget would have allowed more)
            assert choice["message"]["content"] == engine.tokenizer.decode(full.token_ids[12 + closing: limit]).strip()
            assert choice["message"]["reasoning"] == full.thinking
    # max_answer_tokens: s1kit's own answer budget (sampled tokens after the forced prefix), thinking apart
    assert full.answer_tokens == 3 + 4 and full.finish_reason == "length"  # "Final Answer:" + 4 sampled tokens
    r = post(server, body(max_answer_tokens=2, thinking_budget=FORCED)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12 + closing + 3 + 2
    assert r["choices"][0]["message"]["content"] == engine.tokenizer.decode(full.token_ids[-4 - 3:-2]).strip()
    # streamed, the same cut
    streamed = body(max_completion_tokens=4, stream=True, stream_options={"include_usage": True},
                    thinking_budget=endless)
    with httpx.stream("POST", server + "/v1/chat/completions", json=streamed, timeout=300) as r:
        stream = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert stream[-1]["usage"]["completion_tokens"] == 4
    assert [c["finish_reason"] for ch in stream for c in ch["choices"] if c["finish_reason"]] == ["length"]


def test_stop_strings_cut_the_answer_not_the_thinking_and_end_the_row(engine, server, added, client, reference):
    budget = {"min_tokens": 12, "max_tokens": 12, "wait_strings": ["Wait"]}  # forced "Wait"s are in the thinking
    full = reference["waits"]
    assert "Wait" in full.thinking and " Answer" in full.answer
    for stop in (["Wait", " Answer"], " Answer"):  # a list, a string; " Answer" spans tokens with "Final"
        n_added = len(added)
        r = post(server, body(max_tokens=60, thinking_budget=budget, stop=stop))
        choice = r.json()["choices"][0]
        assert choice["message"]["reasoning"] == full.thinking  # the thinking is not cut at "Wait"
        assert choice["message"]["content"] == "Final" and choice["finish_reason"] == "stop", r.text
        (row,) = [h.rows[0] for h in added[n_added:]]
        answer_start = len(row.trace.token_ids) - len(row.trace.answer_ids)
        kept = r.json()["usage"]["completion_tokens"]
        # the row ended at the token that completed the stop string: counted, and nothing decoded after it
        assert engine.tokenizer.decode(row.trace.answer_ids).strip() == "Final Answer"
        assert kept == len(row.trace.token_ids) == answer_start + 2
    with_stop = post(server, body(max_tokens=60, thinking_budget=budget, stop=" Answer",
                                  include_stop_str_in_output=True))
    assert with_stop.json()["choices"][0]["message"]["content"] == "Final Answer"
    # streamed: "Final" could be the start of "l Answer": its "l" is held back, then cut, never sent
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=60, stream=True,
                                                 stop=["l Answer"], extra_body={"thinking_budget": budget}))
    reasoning, _, content, finish, _ = reassemble(chunks)
    assert (reasoning, content, finish) == (full.thinking, "Fina", "stop")
    assert not any("l" in (c.delta.content or "") for ch in chunks for c in ch.choices)


@pytest.mark.parametrize("extra, status, param", [
    ({"min_p": 0.05}, 400, "min_p"),
    ({"repetition_penalty": 1.1}, 400, "repetition_penalty"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"frequency_penalty": -0.5}, 400, "frequency_penalty"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"logit_bias": {"42": 5}}, 400, "logit_bias"),
    ({"min_p": 2}, 422, "min_p"),
    ({"thinking_token_budget": -1}, 422, "thinking_token_budget"),
    ({"thinking_token_budget": 8, "reasoning_effort": "low"}, 422, "reasoning_effort"),
    ({"reasoning_effort": "maximal"}, 422, "reasoning_effort"),
    ({"stop": ""}, 422, "stop"),
    ({"stop": ["a"] * 17}, 422, "stop"),
    ({"include_stop_str_in_output": "yes"}, 422, "include_stop_str_in_output"),
    ({"include_reasoning": 3}, 422, "include_reasoning"),
    ({"max_completion_tokens": 0}, 422, "max_completion_tokens"),
    ({"max_tokens": 8, "thinking_budget": {"min_tokens": 8}}, 422, "thinking_budget.min_tokens"),
    ({"top_k": -2}, 422, "top_k"),
    ({"messages": [{"role": "user", "content": "hi", "reasoning": "x"}]}, 422, "messages.0.reasoning"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [*MSG, {"role": "assistant", "content": "1", "tool_calls": [{"id": "x"}]},
                   {"role": "user", "content": "hi"}]}, 422, "messages.1.tool_calls"),
    ({"chat_template_kwargs": {"enable_thinking": False}, "thinking_budget": {"min_tokens": 4}}, 422,
     "chat_template_kwargs.enable_thinking"),
])
def test_every_new_field_is_checked_and_named(server, extra, status, param):
    r = post(server, body(**{"max_tokens": 4, **extra}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"], err


def test_neutral_values_clients_send_by_default_are_taken(server):
    neutral = dict(min_p=0, repetition_penalty=1.0, presence_penalty=0, frequency_penalty=0.0, logprobs=False,
                   top_logprobs=0, logit_bias={}, top_k=-1, seed=3, n=1, include_reasoning=False,
                   chat_template_kwargs={"enable_thinking": False}, reasoning_effort="none")
    r = post(server, body(max_tokens=8, **neutral))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"].startswith("Final Answer:") and "reasoning" not in message  # include_reasoning false
    text = post(server, {"model": MODEL, "prompt": "What is 2+2?", "temperature": 0, "max_tokens": 8, "stop": "Answer",
                         "reasoning_effort": "none"}, path="/v1/completions").json()["choices"][0]
    assert text["text"] == "Final" and text["finish_reason"] == "stop" and "reasoning" in text


def test_metrics_and_version(server, engine):
    def scrape():
        families = text_string_to_metric_families(httpx.get(server + "/metrics").text)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    before = scrape()
    ok = [post(server, body(max_tokens=n, thinking_budget=FORCED)).json() for n in (16, 20)]
    assert post(server, body(min_p=0.5)).status_code == 400
    after = scrape()

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("s1kit_requests_total", (("endpoint", "chat"), ("status", "200"))) == 2
    assert grew("s1kit_requests_total", (("endpoint", "chat"), ("status", "400"))) == 1
    for metric, key in [("s1kit_prompt_tokens_total", "prompt_tokens"),
                        ("s1kit_completion_tokens_total", "completion_tokens")]:
        assert grew(metric) == sum(r["usage"][key] for r in ok)
    assert grew("s1kit_thinking_tokens_total") == 24
    assert grew("s1kit_finished_choices_total", (("finish_reason", "length"),)) \
        + grew("s1kit_finished_choices_total", (("finish_reason", "stop"),)) == 2
    assert grew("s1kit_time_to_first_token_seconds_count") == grew("s1kit_request_latency_seconds_count") == 2
    assert after[("s1kit_requests_running", ())] == after[("s1kit_requests_waiting", ())] == 0
    from s1kit import __version__

    assert httpx.get(server + "/version").json() == {"version": __version__, "model": MODEL, "engine": "HFEngine",
                                                     "format": "s1", "max_context": engine.max_context,
                                                     "default_thinking_budget": None}


# ------------------------------------------------------------------ lm-evaluation-harness, a real client

TASK = """\
task: s1kit_gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>", "."]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 48
  thinking_token_budget: 8
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metadata:
  version: 1.0
"""


def test_lm_evaluation_harness_scores_a_gsm8k_style_task_through_the_server(server, reference, tmp_path):
    import lm_eval  # the dev extra installs lm-eval[api]
    from lm_eval.tasks import TaskManager

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"Work it out.\n#### {a}"}) + "\n" for q, a in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    result = lm_eval.simple_evaluate(
        model="local-chat-completions", model_args={"base_url": server + "/v1/chat/completions", "model": MODEL,
                                                    "max_retries": 1},
        tasks=["s1kit_gsm8k_local"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        apply_chat_template=True, log_samples=True)
    # What the engine itself gives each question (thinking cap 8 as thinking_token_budget asked), cut at the first of
    # the task's stop strings as the server must cut it; the harness cuts nothing itself for chat models.
    stops = ["Question:", "</s>", "<|im_end|>", "."]
    expected, cut_any = {}, False
    for (q, _), c in zip(DOCS, reference["docs"]):
        first = min([c.answer.find(s) for s in stops if s in c.answer] or [len(c.answer)])
        assert first < len(c.answer) or c.finish_reason == "stop"  # cut, or the whole answer (the turn ended)
        expected[q] = c.answer[:first].strip()
        cut_any = cut_any or first < len(c.answer)
    assert cut_any  # the stop strings did cut something
    samples = {s["doc"]["question"]: s for s in result["samples"]["s1kit_gsm8k_local"]}
    assert {q: s["resps"][0][0] for q, s in samples.items()} == expected
    assert all(s["arguments"][0][1]["until"] == stops for s in samples.values())  # the stop strings were sent

    def last_number(text):
        found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
        return re.sub(r",|\$|\.$", "", [g for g in found[-1] if g][0]) if found else text

    score = sum(last_number(expected[q]) == a for q, a in DOCS) / len(DOCS)
    assert 0 < score < 1  # right on some, wrong on others: the score says which
    assert result["results"]["s1kit_gsm8k_local"]["exact_match,flexible-extract"] == pytest.approx(score)
