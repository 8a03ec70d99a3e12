"""Thinking formats on SmolLM2's real tokenizer: rendering, training/inference agreement, vocabulary checks."""

import pytest

from s1kit import R1, S1, ThinkingFormat, render_example, render_prompt
from s1kit.forcing import ForcingCompiler
from s1kit.formats import as_messages, format_tokens, get_format
from s1kit.budget import BudgetPolicy


def test_s1_prompt_is_the_chat_template_then_the_think_opener(tokenizer):
    text = render_prompt(tokenizer, "What is 2+2?", S1)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<|im_start|>think\n")
    with_system = render_prompt(tokenizer, "What is 2+2?", S1, system="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_training_example_starts_with_exactly_the_inference_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt, completion = render_example(tokenizer, messages, S1, "2 plus 2 is 4.", "Answer: 4")
    assert prompt == render_prompt(tokenizer, messages, S1)
    assert completion == "2 plus 2 is 4.\n<|im_start|>answer\nAnswer: 4<|im_end|>\n"
    # token level: the prompt tokens are a prefix of the whole example's tokens
    full = tokenizer.encode(prompt + completion, add_special_tokens=False)
    assert full[: len(tokenizer.encode(prompt, add_special_tokens=False))] == tokenizer.encode(prompt, add_special_tokens=False)


def test_s1_tokens_on_smollm2(tokenizer):
    ft = format_tokens(tokenizer, S1)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ft.stop_ids == {im_start, im_end, tokenizer.eos_token_id}
    assert im_end in ft.end_ids
    assert ft.opener_ids[0] == im_start
    assert tokenizer.decode(list(ft.opener_ids)) == "<|im_start|>answer\n"


def test_delimiters_missing_from_the_vocabulary_are_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="'</think>' is not a single token"):
        format_tokens(tokenizer, R1)
    custom = ThinkingFormat("mine", think_open="<reasoning>", stop_tokens=("</reasoning>",), answer_open="Answer:")
    with pytest.raises(ValueError, match="format 'mine'"):
        ForcingCompiler(tokenizer)(custom, BudgetPolicy())


def test_r1_works_once_its_delimiters_are_tokens(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    ft = format_tokens(tok, R1)
    end_think = tok.convert_tokens_to_ids("</think>")
    assert end_think in ft.stop_ids and ft.opener_ids[0] == end_think
    assert render_prompt(tok, "Hi", R1).endswith("<|im_start|>assistant\n<think>\n")


def test_presets_and_validation():
    assert get_format("s1") is S1 and get_format(R1) is R1
    with pytest.raises(ValueError, match="unknown thinking format"):
        get_format("o1")
    with pytest.raises(ValueError, match="stop_tokens"):
        ThinkingFormat("x", think_open="", stop_tokens=(), answer_open="A")
    with pytest.raises(ValueError, match="empty prompt"):
        as_messages("  ")
    with pytest.raises(ValueError, match="'role' and 'content'"):
        as_messages([{"content": "hi"}])
