"""Training throughput of the s1 SFT recipe: tokens/s and MFU, on one process or under ``accelerate launch``.

Trains with the recipe's own code (``s1kit.train.build_trainer``: TRL SFTTrainer, AdamW (0.9, 0.95), cosine
schedule, bf16 autocast over float32 weights, gradient checkpointing) for ``--steps`` optimizer steps and
times the steps after ``--warmup``. Rows are ``--block-size`` tokens long: random token ids (default; the
first eighth masked like a prompt) or an s1K-schema ``--data`` file rendered by the recipe and cut to the
block (cycled to fill the steps).

MFU = achieved model FLOP/s per GPU / ``--peak-tflops`` (989 = H100/H200 SXM dense bf16). Model FLOPs per
token: 6N (N = parameters, tied embeddings once); the second MFU column adds causal attention,
6 * layers * hidden * seq. Recomputation by gradient checkpointing is not counted (that is what MFU means).

    python benchmarks/train_throughput.py --arch qwen2.5-1.5b --steps 12 --json out.json        # 1 GPU
    python benchmarks/train_throughput.py --model DIR --data s1k.jsonl --steps 12                # real weights
    accelerate launch --config_file src/s1kit/train/fsdp.yaml --num_processes 2 \\
        benchmarks/train_throughput.py --arch qwen2.5-1.5b --batch-size 16 --steps 12            # FSDP
    python benchmarks/train_throughput.py --arch tiny --steps 2 --block-size 64                  # CPU smoke run

``--reference RUN.json`` compares this run's loss curve with an earlier one (same data, seed, global batch).
Needs torch, transformers, accelerate, trl, datasets (peft only with the recipe's LoRA option, unused here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, TrainerCallback

from s1kit.train import Recipe, build_trainer

# Qwen2.5 shapes (from the models' published config.json files); "tiny" is for CPU smoke runs.
ARCHS = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


class StepClock(TrainerCallback):
    """Wall time (device synchronised) and input tokens at the end of every optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with pad/eos only: random-id rows need no text, the trainer needs a pad id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def random_rows(n: int, block: int, vocab: int, seed: int) -> dict[str, list[list[int]]]:
    """``n`` rows of ``block`` random ids; the first eighth has no loss (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, block), generator=g)
    labels = ids.clone()
    labels[:, : block // 8] = -100
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}


def data_rows(path: str, tokenizer, block: int, n: int) -> dict[str, list[list[int]]]:
    """An s1K-schema file rendered and masked by the recipe, cut to ``block``, cycled to ``n`` rows."""
    from s1kit.train import build_training_set, load_examples

    rows = build_training_set(tokenizer, load_examples(path), block, truncate=True).rows
    rows = [rows[i % len(rows)] for i in range(n)]
    return {k: [r[k] for r in rows] for k in ("input_ids", "labels")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-1.5b", help="random weights of this shape")
    src.add_argument("--model", help="a model reference (dir, bundled name, HF id) instead of --arch")
    ap.add_argument("--data", help="s1K-schema file (default: random token ids)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="global batch [default: micro x processes]")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no activation recomputation (more memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reference", help="an earlier --json run to compare the loss curve with")
    args = ap.parse_args()
    if not 1 <= args.warmup < args.steps:
        ap.error("need 1 <= --warmup < --steps")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = os.environ.get("RANK", "0") == "0"
    batch = args.batch_size or args.micro_batch_size * world
    torch.manual_seed(args.seed)
    if args.model:
        from s1kit.models import load_model

        model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
        name = args.model
    else:
        config = Qwen2Config(**ARCHS[args.arch], max_position_embeddings=max(32768, args.block_size),
                             rope_theta=1e6, rms_norm_eps=1e-6)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = plain_tokenizer()
        name = f"{args.arch} (random weights)"
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    n_rows = batch * args.steps
    if args.data:
        rows = data_rows(args.data, tokenizer, args.block_size, n_rows)
    else:
        rows = random_rows(n_rows, args.block_size, cfg.vocab_size, args.seed)
    from datasets import Dataset

    recipe = Recipe(epochs=1, learning_rate=args.lr, batch_size=batch, micro_batch_size=args.micro_batch_size,
                    block_size=args.block_size, max_steps=args.steps, gradient_checkpointing=not args.no_grad_ckpt,
                    seed=args.seed, torch_compile=args.compile)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(model, tokenizer, Dataset.from_dict(rows), recipe, out, callbacks=[clock])
        trainer.args.include_num_input_tokens_seen = "non_padding"  # summed over processes by the Trainer
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    (t0, tok0), (t1, tok1) = clock.marks[args.warmup - 1], clock.marks[-1]  # from the end of the warm-up
    timed = len(clock.marks) - args.warmup
    tokens_per_s = (tok1 - tok0) / (t1 - t0)
    per_gpu = tokens_per_s / world
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * args.block_size
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "model": name, "params": params, "device": gpu, "processes": world, "fsdp": trainer.is_fsdp_enabled,
        "block_size": args.block_size, "global_batch": batch, "micro_batch": args.micro_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps, "grad_ckpt": not args.no_grad_ckpt,
        "fsdp_activation_ckpt": os.environ.get("FSDP_ACTIVATION_CHECKPOINTING") == "true",
        "compile": args.compile, "data": args.data or "random ids", "steps": args.steps,
        "timed_steps": timed,
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu,
        "step_s": (t1 - t0) / timed,
        "mfu": 6 * params * per_gpu / (args.peak_tflops * 1e12),
        "mfu_with_attention": (6 * params + attn) * per_gpu / (args.peak_tflops * 1e12),
        "peak_tflops": args.peak_tflops,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "losses": losses,
        "versions": {m.__name__: m.__version__ for m in map(__import__, ("torch", "transformers", "trl", "accelerate"))},
    }
    if args.reference:
        ref = json.load(open(args.reference))["losses"]
        diffs = [abs(a - b) for a, b in zip(losses, ref)]
        result["loss_vs_reference"] = {"reference": args.reference, "steps": len(diffs), "max_abs_diff": max(diffs),
                                       "mean_abs_diff": sum(diffs) / len(diffs)}
    if not main_process:
        return
    # a markdown table (no rich: the GPU image has only torch, transformers, accelerate, peft, trl, datasets)
    mem = result["max_memory_gib"]
    head = ["model", "params", "GPUs", "block", "batch (micro x accum x GPUs)", "tokens/s", "tokens/s/GPU",
            "MFU 6N", "MFU +attn", "mem GiB"]
    row = [name, f"{params / 1e9:.2f} B", str(world), str(args.block_size),
           f"{batch} ({args.micro_batch_size} x {result['grad_accum']} x {world})", f"{tokens_per_s:,.0f}",
           f"{per_gpu:,.0f}", f"{result['mfu']:.1%}", f"{result['mfu_with_attention']:.1%}",
           "–" if mem is None else f"{mem:.1f}"]
    print(f"s1 SFT recipe throughput on {gpu} ({result['versions']})")
    for line in (head, ["---"] * len(head), row):
        print("| " + " | ".join(line) + " |")
    print("loss per step: " + " ".join(f"{x:.4f}" for x in losses))
    if "loss_vs_reference" in result:
        r = result["loss_vs_reference"]
        print(f"vs {r['reference']}: max |Δloss| {r['max_abs_diff']:.4f}, mean {r['mean_abs_diff']:.4f} "
              f"over {r['steps']} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
