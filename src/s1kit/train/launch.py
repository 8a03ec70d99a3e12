"""Multi-GPU launch: rerun ``s1kit train`` under ``accelerate launch`` with the shipped FSDP config."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Any, Iterable

from ..errors import S1KitError
from .recipe import FSDP_CONFIG

LAUNCH_ONLY = frozenset({"fsdp", "print_launch", "num_gpus"})  # options that must not reach the workers


def rerun_args(ctx: Any, skip: Iterable[str] = LAUNCH_ONLY) -> list[str]:
    """The command-line arguments that reproduce a (typer/click) command's parsed values, minus ``skip``."""
    skip = set(skip)
    args = [ctx.command.name] if ctx.command.name else []
    for p in ctx.command.params:
        if p.name in skip or p.name not in ctx.params:
            continue
        value = ctx.params[p.name]
        if value is None or value == p.default:
            continue
        if getattr(p, "is_flag", False):
            args.append(p.opts[0] if value else p.secondary_opts[0])
        elif p.opts and p.opts[0].startswith("-"):
            args += [p.opts[0], str(value)]
        else:
            args.append(str(value))
    return args


def launch_command(train_args: list[str], processes: int, python: bool = False) -> list[str]:
    """``accelerate launch`` of ``s1kit.cli`` on ``processes`` GPUs with FSDP; ``python=True`` runs the
    launcher through this interpreter (no reliance on ``accelerate`` being on PATH)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"] if python else ["accelerate", "launch"]
    return [*launcher, "--config_file", str(FSDP_CONFIG), "--num_processes", str(processes),
            "-m", "s1kit.cli", *train_args]


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a launch (the one that prints and saves)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def gpu_count() -> int:
    """Visible CUDA devices."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(num_gpus: int | None) -> int:
    """The number of processes to launch; ``S1KitError`` when FSDP cannot run here."""
    have = gpu_count()
    n = have if num_gpus is None else num_gpus
    if have == 0:
        raise S1KitError("fsdp=True needs NVIDIA GPUs and found none; train on one device without it")
    if not 1 <= n <= have:
        raise S1KitError(f"num_gpus {n}: {have} GPU(s) visible")
    return n


def run_launch(command: list[str]) -> None:
    """Run the launch command; ``S1KitError`` if the workers fail (they print their own errors)."""
    print("s1kit: " + shlex.join(command), file=sys.stderr)
    rc = subprocess.run(command).returncode
    if rc != 0:
        raise S1KitError(f"accelerate launch exited with code {rc}")
