"""``s1kit train``: the s1 SFT recipe (docs/training.md); defaults are ``Recipe()``'s."""

import shlex
from pathlib import Path
from typing import Optional

import typer

from ..formats import get_format
from ..train.recipe import Recipe
from .app import command, require_extra

RECIPE = Recipe()


@command(epilog="Example: s1kit train --model smollm2-135m --data s1k.jsonl --max-steps 2 --out runs/sft   "
                "then   s1kit generate --model runs/sft --max-thinking 64 \"1+1?\"")
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Bundled name, .gguf file, model dir or HF id."),
    data: str = typer.Option(..., help="s1K-schema data: a .jsonl/.json/.csv/.parquet file or a HF dataset id."),
    out: Path = typer.Option(..., help="Output directory (a plain transformers checkpoint)."),
    epochs: float = typer.Option(RECIPE.epochs, help="Epochs over the data (s1: 5)."),
    lr: Optional[float] = typer.Option(RECIPE.learning_rate, help="Peak learning rate. [default: 1e-5; 1e-4 with --lora]"),
    batch_size: int = typer.Option(RECIPE.batch_size, help="Global batch (s1: 16)."),
    micro_batch_size: int = typer.Option(RECIPE.micro_batch_size, help="Sequences per device per forward."),
    block_size: int = typer.Option(RECIPE.block_size, help="Longest sequence in tokens (s1: 32,768)."),
    truncate: bool = typer.Option(RECIPE.truncate, "--truncate", help="Cut examples longer than --block-size instead "
                                                                      "of failing."),
    lora: bool = typer.Option(RECIPE.lora, "--lora", help="Train LoRA adapters (merged into the saved weights)."),
    lora_rank: int = typer.Option(RECIPE.lora_rank, help="LoRA rank."),
    max_steps: Optional[int] = typer.Option(RECIPE.max_steps, help="Stop after N optimizer steps."),
    format: str = typer.Option(RECIPE.format, "--format", help="Thinking format: s1 or r1 (as in generate)."),
    system: Optional[str] = typer.Option(RECIPE.system, help="System prompt (use the same one in generate)."),
    split: str = typer.Option("train", help="Split of a HF dataset."),
    question_field: Optional[str] = typer.Option(None, help="Question field. [default: question|problem]"),
    thinking_field: Optional[str] = typer.Option(
        None, help="Thinking field. [default: thinking_trajectories|deepseek_thinking_trajectory|thinking]"),
    attempt_field: Optional[str] = typer.Option(None, help="Answer field. [default: attempt|deepseek_attempt|answer]"),
    gradient_checkpointing: bool = typer.Option(RECIPE.gradient_checkpointing,
                                                help="Recompute activations in backward (less memory)."),
    bf16: bool = typer.Option(RECIPE.bf16, "--bf16/--fp32", help="bf16 autocast on GPU (s1), or float32 throughout."),
    seed: int = typer.Option(RECIPE.seed, help="Seed of data order and initialisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what is in a non-empty --out."),
    save_steps: Optional[int] = typer.Option(RECIPE.save_steps, help="Keep a checkpoint every N steps (weights + "
                                             "optimizer); SIGTERM/SIGUSR1 always saves one and stops."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Run on all GPUs with FSDP through accelerate launch."),
    num_gpus: Optional[int] = typer.Option(None, help="GPUs for --fsdp / --print-launch. [default: all]"),
    print_launch: bool = typer.Option(False, "--print-launch", help="Print the accelerate launch line and exit."),
) -> None:
    """Fine-tune with the s1 SFT recipe: loss on thinking + answer only, the format generate uses."""
    from ..train import launch
    from ..train.recipe import train as run_training

    recipe = Recipe(epochs=epochs, learning_rate=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
                    block_size=block_size, max_steps=max_steps, gradient_checkpointing=gradient_checkpointing,
                    lora=lora, lora_rank=lora_rank, lora_alpha=2 * lora_rank, truncate=truncate,
                    format=get_format(format).name, system=system, seed=seed, bf16=bf16, save_steps=save_steps)
    if print_launch or fsdp:
        n = (num_gpus or max(launch.gpu_count(), 1)) if print_launch else launch.check_gpus(num_gpus)
        command_line = launch.launch_command(launch.rerun_args(ctx), n, python=not print_launch)
        if print_launch:
            typer.echo(shlex.join(command_line))
        else:
            launch.run_launch(command_line)
        return
    require_extra("train", "trl", "peft", "datasets")

    def on_data(s: dict) -> None:
        typer.echo(f"data: {s['rows']} rows, {s['tokens']:,} tokens (longest {s['max_length']:,}); "
                   f"{s['over_block']} over the block size {s['block_size']:,}"
                   + (f", {s['truncated']} truncated, {s['dropped']} dropped" if s["truncated"] else ""), err=True)

    def on_log(d: dict) -> None:
        typer.echo(f"step {d['step']}/{d['max_steps']} · loss {d['loss']:.4f} · lr {d['lr'] or 0:.2e}", err=True)

    summary = run_training(model, data, out, recipe, split, question_field, thinking_field, attempt_field,
                           on_log=on_log, on_data=on_data if launch.is_main_process() else None,
                           overwrite=overwrite, resume=resume)
    if launch.is_main_process():
        typer.echo(f"saved {out} ({summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
                   f"{summary['seconds']:.0f} s); try: s1kit generate --model {out} --max-thinking 64 \"1+1?\"")
