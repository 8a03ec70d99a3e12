"""The s1 SFT recipe over TRL's ``SFTTrainer``: paper defaults, loss on the assistant turn only, one
process or many (``accelerate launch`` with the shipped FSDP config).

s1 (Muennighoff et al., 2025, §4 and its training script): lr 1e-5, 5% linear warmup then cosine to 0,
5 epochs, global batch 16, AdamW (0.9, 0.95), weight decay 1e-4, bf16, block size 32,768, FSDP full
shard, gradient checkpointing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import S1KitError, require_int
from .data import build_training_set, load_examples

SUMMARY_FILE = "s1kit-train.json"
FSDP_CONFIG = Path(__file__).with_name("fsdp.yaml")


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of an SFT run; the defaults are s1's."""

    epochs: float = 5.0
    learning_rate: float | None = None  # None: 1e-5 (s1), or 1e-4 with LoRA (adapters need a larger step)
    batch_size: int = 16  # global: micro batch x gradient accumulation x processes
    micro_batch_size: int = 1
    block_size: int = 32768
    warmup_ratio: float = 0.05
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_steps: int | None = None  # stop early (optimizer steps); the schedule spans these steps
    gradient_checkpointing: bool = True
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    truncate: bool = False
    format: str = "s1"
    system: str | None = None
    seed: int = 42
    logging_steps: int = 1
    torch_compile: bool = False
    bf16: bool = True  # bf16 autocast over float32 weights on GPU (s1); False: float32 throughout
    save_steps: int | None = None  # keep a checkpoint (weights + optimizer) every N steps to resume from

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "block_size", "lora_rank", "logging_steps"):
            require_int(name, getattr(self, name))
        if self.save_steps is not None:
            require_int("save_steps", self.save_steps)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")

    @property
    def lr(self) -> float:
        """The learning rate in use."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.lora else 1e-5


def world_size() -> int:
    """Processes in this run (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_active() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def sft_config(recipe: Recipe, out: str | Path, processes: int | None = None) -> Any:
    """TRL's ``SFTConfig`` for ``recipe``: bf16 autocast over float32 weights on GPU (unless off), float32 on CPU."""
    import torch
    from trl import SFTConfig

    processes = processes or world_size()
    per_step = recipe.micro_batch_size * processes
    if recipe.batch_size % per_step:
        raise ValueError(f"batch_size {recipe.batch_size} must be a multiple of micro_batch_size x processes "
                         f"({recipe.micro_batch_size} x {processes})")
    # Under FSDP, checkpoint through FSDP itself when its config asks for it (the Trainer's own would
    # add an all-gather in backward; transformers refuses both at once).
    fsdp_ckpt = fsdp_active() and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    checkpointing = recipe.gradient_checkpointing and not fsdp_ckpt
    # transformers >= 5.18 renamed gradient_checkpointing; use the name this version has (no deprecation noise)
    renamed = "activation_checkpointing" in SFTConfig.__dataclass_fields__
    return SFTConfig(
        **({"activation_checkpointing": checkpointing} if renamed else {"gradient_checkpointing": checkpointing}),
        output_dir=str(out),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps or -1,
        per_device_train_batch_size=recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.batch_size // per_step,
        learning_rate=recipe.lr,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_ratio,  # a float < 1 is a fraction of all steps
        weight_decay=recipe.weight_decay,
        adam_beta1=recipe.adam_beta1,
        adam_beta2=recipe.adam_beta2,  # optimizer: transformers' default, fused AdamW (torch >= 2.8), CPU and GPU
        bf16=recipe.bf16 and torch.cuda.is_available(),
        # float32 without autocast: TF32 tensor cores for the matmuls (~8x plain float32 on an H100)
        tf32=True if not recipe.bf16 and torch.cuda.is_available() else None,
        max_length=None,  # lengths are checked (and cut only when asked) in build_training_set
        packing=False,
        logging_steps=recipe.logging_steps,
        logging_nan_inf_filter=False,  # show a NaN loss as NaN (the filter logs 0.0 instead), so the guard sees it
        save_strategy="steps" if recipe.save_steps else "no",
        save_steps=recipe.save_steps or 500,
        save_total_limit=1,  # the newest is removed only after its successor is complete
        report_to="none",
        disable_tqdm=True,
        seed=recipe.seed,
        torch_compile=recipe.torch_compile,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def lora_config(recipe: Recipe) -> Any:
    """peft's ``LoraConfig`` on every linear layer but the LM head."""
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _progress_callback(report: Callable[[dict], None]) -> Any:
    from transformers import TrainerCallback

    class LossReporter(TrainerCallback):
        """Hands each logged training loss to ``report`` (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                report({"step": state.global_step, "max_steps": state.max_steps, "loss": float(logs["loss"]),
                        "lr": logs.get("learning_rate"), "epoch": state.epoch})

    return LossReporter()


def _divergence_guard() -> Any:
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        """Stops training at the first non-finite loss or gradient norm: a model of NaNs must never be saved."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            bad = {k: logs[k] for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))}
            if bad:
                raise S1KitError(
                    f"training diverged at step {state.global_step} ("
                    + ", ".join(f"{k} {v}" for k, v in bad.items())
                    + "); the model was not saved. Try bf16=False (bf16 autocast diverged where float32 did not, "
                      "docs/training.md), a lower learning_rate or a smaller micro_batch_size")

    return DivergenceGuard()


class _StopRequest:
    """SIGTERM or SIGUSR1 (a job's time limit, a preempting scheduler) during training: save a checkpoint at the
    end of the current step and stop, so ``resume`` loses nothing. A second signal acts as it did before."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.name: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "_StopRequest":
        import signal
        import threading

        # One process only: ranks of a multi-GPU run could see the signal at different steps and save apart.
        if threading.current_thread() is threading.main_thread() and world_size() == 1:
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.name = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def callback(self) -> Any:
        """A TrainerCallback that turns a received signal into save-then-stop at the step's end."""
        from transformers import TrainerCallback

        request = self

        class SaveAndStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if request.name:
                    control.should_save = True
                    control.should_training_stop = True

        return SaveAndStop()


def build_trainer(model: Any, tokenizer: Any, dataset: Any, recipe: Recipe, out: str | Path,
                  on_log: Callable[[dict], None] | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """An ``SFTTrainer`` on a tokenized dataset (``input_ids`` + ``labels``, used as given)."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    if recipe.lora and fsdp_active():
        raise ValueError("lora=True is for a single GPU; multi-GPU FSDP runs train all weights")
    cbs = [_divergence_guard(), *callbacks] + ([_progress_callback(on_log)] if on_log else [])
    trainer = SFTTrainer(model=model, args=sft_config(recipe, out), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config(recipe) if recipe.lora else None,
                         callbacks=cbs)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; on_log reports progress instead
    return trainer


def save(trainer: Any, tokenizer: Any, out: str | Path) -> None:
    """Write a plain transformers checkpoint (LoRA merged into the weights) with its tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # a peft model: bake the adapters in, so DIR loads anywhere
        model = model.merge_and_unload()
        model.config.use_cache = True
        if trainer.args.should_save:
            model.save_pretrained(out)
    else:
        model.config.use_cache = True  # gradient checkpointing turned it off for training
        trainer.save_model(str(out))  # gathers FSDP shards
    if trainer.args.should_save:
        tokenizer.save_pretrained(out)


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``out`` (its trainer state is written last), if any."""
    done = [d for d in out.glob("checkpoint-*") if d.name[11:].isdigit() and (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name[11:]), default=None)


def _remove_checkpoints(out: Path) -> None:
    import shutil

    for d in out.glob("checkpoint-*"):
        shutil.rmtree(d, ignore_errors=True)


def train(model_ref: str, data: str, out: str | Path, recipe: Recipe = Recipe(), split: str = "train",
          question_field: str | None = None, thinking_field: str | None = None, attempt_field: str | None = None,
          on_log: Callable[[dict], None] | None = None, on_data: Callable[[dict], None] | None = None,
          overwrite: bool = False, resume: bool = False) -> dict:
    """Fine-tune ``model_ref`` on an s1K-schema file or dataset id and save to ``out``; returns a summary.

    With ``resume`` a run cut off after a checkpoint (``recipe.save_steps``) continues from its newest one."""
    from ..formats import format_tokens, get_format

    start = time.time()
    out = Path(out)
    if out.is_file():
        raise S1KitError(f"{out} is a file; pick another output directory")
    checkpoint = last_checkpoint(out) if resume and out.is_dir() else None
    if resume and (out / SUMMARY_FILE).is_file():
        raise S1KitError(f"{out} holds a finished model ({SUMMARY_FILE}); nothing to resume")
    if checkpoint is None and not overwrite and out.is_dir() and any(out.iterdir()):
        hint = " or resume=True to continue from its last checkpoint" if last_checkpoint(out) else ""
        raise S1KitError(f"{out} exists and is not an empty directory; pick another output directory, set "
                         f"overwrite=True{hint}")
    if checkpoint is None and out.is_dir():
        _remove_checkpoints(out)  # stale ones from an earlier run must not mix with this one
    examples = load_examples(data, split, question_field, thinking_field, attempt_field)  # bad rows fail first
    import torch
    from transformers import AutoTokenizer

    from ..models import load_model, resolve

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(model_ref))
    except OSError as e:
        raise S1KitError(f"could not load the tokenizer of {model_ref!r}: {str(e).splitlines()[0]}") from None
    fmt = get_format(recipe.format)
    format_tokens(tokenizer, fmt)  # the delimiters generate needs must be single tokens of this vocabulary
    ts = build_training_set(tokenizer, examples, recipe.block_size, fmt, recipe.system, recipe.truncate)
    if on_data:
        on_data(ts.summary())
    gpu = torch.cuda.is_available()
    # float32 master weights: at lr 1e-5 most bf16 updates would round away. LoRA keeps a bf16 base on GPU.
    dtype = torch.bfloat16 if gpu and recipe.lora and recipe.bf16 else torch.float32
    model, _ = load_model(model_ref, device="cpu", dtype=dtype)
    with _StopRequest() as stop:
        trainer = build_trainer(model, tokenizer, ts.to_dataset(), recipe, out, on_log, [stop.callback()])
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.name:
        step = trainer.state.global_step
        raise S1KitError(f"stopped by {stop.name} at step {step} of {trainer.state.max_steps}; checkpoint-{step} "
                         f"is saved in {out}: run the same again with resume=True to continue")
    save(trainer, tokenizer, out)
    if trainer.args.should_save:
        _remove_checkpoints(out)  # the output is a plain model directory; resuming is over
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The Trainer's training_loss sums only this call's steps over all steps: far too low after a resume.
    # The restored log history holds every step, so average that.
    train_loss = sum(losses) / len(losses) if losses and recipe.logging_steps == 1 else result.training_loss
    summary = {
        "model": model_ref, "data": data, "out": str(out), "recipe": asdict(recipe), "learning_rate": recipe.lr,
        "processes": world_size(), "fsdp": fsdp_active(), "device": "cuda" if gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "bf16_autocast": gpu and recipe.bf16, "data_summary": ts.summary(),
        "steps": trainer.state.global_step, "losses": losses,
        "resumed_from": checkpoint.name if checkpoint else None, "train_loss": train_loss,
        "seconds": round(time.time() - start, 1),
    }
    if trainer.args.should_save:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
