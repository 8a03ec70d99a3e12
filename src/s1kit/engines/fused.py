"""Sibling projections that read the same input, run as one GEMM: q/k/v of attention, gate/up of the MLP.

At decode batch sizes a GEMM is bound by latency, not bytes: on an H200 at batch 32 the three q/k/v GEMMs of
Qwen2.5-1.5B take 15.8 µs a layer and one GEMM over their concatenated weights 5.7 µs
(``benchmarks/decode_kernels.py``). The model's own forward code stays as it is: the siblings are swapped for
``SharedInputLinear`` stand-ins while the fast path runs. The first sibling called computes every sibling's
output in one GEMM; the next ones hand out their slice when they are called on that same input tensor, and
compute their own GEMM otherwise. The original weights become views into the fused one, so no memory is added.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """The fused weight (and bias) of some sibling linears, and the output of the last fused call."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [lin.out_features for lin in linears]
        with torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in linears])
            self.bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
            biases = self.bias.split(self.sizes) if self.bias is not None else [None] * len(linears)
            for lin, w, b in zip(linears, self.weight.split(self.sizes), biases):  # views: no second copy
                lin.weight.data = w
                if b is not None:
                    lin.bias.data = b
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.pending = 0


class SharedInputLinear(nn.Module):
    """Stands in for sibling ``index`` of a ``_Group`` (see the module docstring)."""

    def __init__(self, group: _Group, index: int, original: nn.Linear) -> None:
        super().__init__()
        self.group, self.index, self.original = group, index, original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This sibling's output: a slice of the fused GEMM's when that ran on ``x``, else its own GEMM."""
        g = self.group
        if g.input is x and g.pending:
            g.pending -= 1
            part = g.parts[self.index]
            if not g.pending:  # every sibling has its slice: drop the references
                g.input, g.parts = None, ()
            return part
        if self.index != 0:  # called out of order or on another input: compute alone
            return self.original(x)
        g.input, g.parts = x, F.linear(x, g.weight, g.bias).split(g.sizes, dim=-1)
        g.pending = len(g.sizes) - 1
        return g.parts[0]


def _fusable(linears: list[Any]) -> bool:
    first = linears[0]
    return (all(type(lin) is nn.Linear for lin in linears)
            # accelerate's offloading hooks load weights at call time: a fused copy would go stale
            and not any(hasattr(lin, "_hf_hook") or lin.weight.device.type == "meta" for lin in linears)
            and all(lin.in_features == first.in_features and (lin.bias is None) == (first.bias is None)
                    and lin.weight.dtype == first.weight.dtype and lin.weight.device == first.weight.device
                    for lin in linears))


class FusedProjections:
    """Every sibling group of ``model`` that can be fused (plain ``nn.Linear``s, same input size and bias)."""

    def __init__(self, model: nn.Module) -> None:
        self.swaps: list[tuple[nn.Module, str, nn.Linear, SharedInputLinear]] = []
        for parent in model.modules():
            for names in SIBLINGS:
                linears = [getattr(parent, n, None) for n in names]
                if any(lin is None for lin in linears) or not _fusable(linears):
                    continue
                group = _Group(linears)
                for i, (name, lin) in enumerate(zip(names, linears)):
                    self.swaps.append((parent, name, lin, SharedInputLinear(group, i, lin)))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Swap the stand-ins in for the duration of the block, then put the model's own linears back."""
        for parent, name, _, stand_in in self.swaps:
            setattr(parent, name, stand_in)
        try:
            yield
        finally:
            for parent, name, lin, _ in self.swaps:
                setattr(parent, name, lin)
