"""Property-based tests (hypothesis): random valid and invalid inputs to the server's request schema and to the
benchmark file loaders are accepted or refused with the error a user sees (a 422, one ``error:`` line), never
another exception (a 500, a traceback)."""

import csv
import json
import tempfile
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s1kit import S1KitError
from s1kit.data.benchmarks import load_benchmark
from s1kit.serve.schemas import ChatCompletionRequest, CompletionRequest

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text, half of it with a lone surrogate: JSON can carry "\ud800" and Python's json module reads it (hypothesis's own
# text strategies almost never draw one).
TEXT = st.builds(lambda a, odd, b: a + odd + b, st.text(max_size=6), st.sampled_from(["", "\ud800", "\udfff"]),
                 st.text(max_size=6))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


def _budget():
    fields = {"max_tokens": SCALARS, "min_tokens": SCALARS, "num_waits": SCALARS,
              "wait_strings": st.one_of(TEXT, st.lists(TEXT, max_size=3), JSON), "answer_prefix": SCALARS,
              "max_token": SCALARS}
    return st.one_of(st.integers(-5, 5000), st.fixed_dictionaries({}, optional=fields), JSON)


def _message():
    return st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]),
                                  "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                      {"type": st.just("text"), "text": TEXT}), max_size=2), JSON)},
                                 optional={"name": TEXT, "reasoning_content": TEXT, "extra": JSON})


# Bodies near the schema (its field names, values of any type) and anywhere else.
OPTIONAL = {"n": SCALARS, "temperature": SCALARS, "top_p": SCALARS, "top_k": SCALARS, "seed": SCALARS,
            "max_tokens": SCALARS, "max_completion_tokens": SCALARS, "stream": SCALARS,
            "stream_options": st.one_of(JSON, st.fixed_dictionaries({"include_usage": SCALARS})),
            "thinking_budget": _budget(), "reasoning_effort": st.one_of(TEXT, st.sampled_from(["low", "medium", "high"])),
            "presence_penalty": SCALARS, "stop": JSON, "logprobs": SCALARS, "extra_body": JSON, "user": SCALARS,
            "unknown_field": JSON}
USER = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT.filter(str.strip)})
CHAT = st.one_of(JSON, st.fixed_dictionaries({"model": st.one_of(TEXT, JSON),
                                              "messages": st.one_of(st.lists(_message(), max_size=3), JSON)},
                                             optional=OPTIONAL),
                 st.fixed_dictionaries({"model": st.just("m"), "messages": st.lists(USER, min_size=1, max_size=2)},
                                       optional=OPTIONAL),  # mostly valid: the fields' values are what varies
                 st.fixed_dictionaries({"model": st.just("m"), "messages": st.lists(USER, min_size=1, max_size=2)}))
TEXT_COMPLETION = st.one_of(JSON, st.fixed_dictionaries(
    {"model": TEXT, "prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3), JSON)}, optional=OPTIONAL))


def _accepted_or_422(schema, body) -> None:
    try:
        request = schema.model_validate(body)
    except pydantic.ValidationError:
        return  # the app answers 422 with the messages
    policy, sampling = request.policy(), request.sampling()  # what the server derives must not fail later
    assert policy.max_answer_tokens >= 1 and sampling.n >= 1
    for prompt in request.prompts():
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        for text in texts + list(policy.wait_strings) + [policy.answer_prefix]:
            text.encode("utf-8")  # the tokenizer can take it
    assert sampling.seed is None or -(2**63) <= sampling.seed < 2**63


@SETTINGS
@given(CHAT)
def test_chat_requests_validate_or_are_422(body):
    _accepted_or_422(ChatCompletionRequest, body)


@SETTINGS
@given(TEXT_COMPLETION)
def test_text_completion_requests_validate_or_are_422(body):
    _accepted_or_422(CompletionRequest, body)


def test_a_lone_surrogate_is_a_422_not_a_tokenizer_crash():
    with pytest.raises(pydantic.ValidationError, match="lone surrogate"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi \ud800"}]})


# ------------------------------------------------------------------ benchmark files

NAMES = st.one_of(st.sampled_from(["id", "question", "problem", "Question", "answer", "final_answer", "solution",
                                   "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "unique_id"]), TEXT)
RECORD = st.one_of(st.dictionaries(NAMES, JSON, max_size=5), JSON)
FIELD = st.one_of(st.none(), NAMES)


def _check(path: Path, question_field, answer_field) -> None:
    try:
        bench = load_benchmark(str(path), question_field=question_field, answer_field=answer_field)
    except S1KitError:
        return  # one error line naming the file
    ids = [it.id for it in bench.items]
    assert bench.items and len(set(ids)) == len(ids)
    for it in bench.items:
        golds = (it.gold,) if isinstance(it.gold, str) else it.gold
        assert golds and all(isinstance(t, str) and t for t in (it.question, *golds))
        for text in (it.question, *golds):
            text.encode("utf-8")  # a tokenizer and the sample store can take it


@SETTINGS
@given(records=st.lists(RECORD, max_size=4), suffix=st.sampled_from([".jsonl", ".json"]), question_field=FIELD,
       answer_field=FIELD)
def test_json_benchmark_files_load_or_are_refused(records, suffix, question_field, answer_field):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"bench{suffix}"
        text = "".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records)
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check(path, question_field, answer_field)


@SETTINGS
@given(header=st.lists(NAMES, min_size=1, max_size=4, unique=True), cells=st.lists(st.lists(TEXT), max_size=4),
       question_field=FIELD, answer_field=FIELD)
def test_csv_benchmark_files_load_or_are_refused(header, cells, question_field, answer_field):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.csv"
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(cells)
        _check(path, question_field, answer_field)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=64), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_arbitrary_bytes_are_read_or_refused(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"bench{suffix}"
        path.write_bytes(data)
        _check(path, None, None)
