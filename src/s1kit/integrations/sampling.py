"""Drawing a row's next token the way vLLM's sampler would, so that the processor can decide s1's forcing.

vLLM's v1 sampler applies, in order: temperature (below 1e-5 the row is greedy), min-p, then top-k and
top-p, and samples. The processor needs the token s1 would see *before* vLLM samples (a stop must turn
into a Wait instead of being emitted), so for rows that think freely it draws that token itself from the
same distribution and then lets vLLM "sample" a one-hot row. Semantics follow vLLM 0.26: top-k keeps the
logits at least as large as the k-th largest; top-p keeps a token when the probability of the tokens
strictly more likely than it (in sorted order) is below p, and always keeps the most likely one.

Randomness is one uniform per draw, a hash of (seed, output position): reproducible per request whatever
the batch holds, identical on every tensor-parallel rank, and unaffected by steps vLLM discards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# values -> tensor on the logits' device; the processor passes one that copies without blocking the host
ToDevice = Callable[[list, torch.dtype], torch.Tensor]

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is argmax
_MASK64 = (1 << 64) - 1


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from (seed, position): splitmix64 of their mix, 53 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


@dataclass(frozen=True)
class RowSampling:
    """A request's sampling settings as vLLM reads them (``top_k`` 0 or -1 and ``top_p`` 1 mean off)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        """True when vLLM takes the argmax for this row."""
        return self.temperature < GREEDY_BELOW


def _plain_copy(logits: torch.Tensor) -> ToDevice:
    return lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)


def filtered_logits(logits: torch.Tensor, rows: list[RowSampling], to_device: ToDevice | None = None) -> torch.Tensor:
    """``[R, V]`` float32 logits after temperature, min-p, top-k and top-p (dropped tokens at -inf)."""
    to_device = to_device or _plain_copy(logits)
    x = logits.float() / to_device([r.temperature for r in rows], torch.float32).unsqueeze(1)
    if any(r.min_p > 0 for r in rows):
        probs = x.softmax(-1)
        min_p = to_device([r.min_p for r in rows], torch.float32).unsqueeze(1)
        x = x.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, float("-inf"))
    vocab = x.shape[1]
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in rows]
    if all(k == vocab for k in ks) and all(r.top_p >= 1 for r in rows):
        return x
    values, order = x.sort(-1, descending=True)
    k = to_device(ks, torch.long).unsqueeze(1)
    values = values.masked_fill(values < values.gather(1, k - 1), float("-inf"))
    probs = values.softmax(-1)
    above = probs.cumsum(-1) - probs  # mass of the tokens sorted before each one
    top_p = to_device([r.top_p for r in rows], torch.float32).unsqueeze(1)
    drop = above >= top_p
    drop[:, 0] = False
    values = values.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, values)


def draw(logits: torch.Tensor, rows: list[RowSampling], uniforms: torch.Tensor,
         to_device: ToDevice | None = None) -> torch.Tensor:
    """One token per row: the argmax for greedy rows, else inverse-CDF sampling with ``uniforms`` ``[R]``."""
    to_device = to_device or _plain_copy(logits)
    tokens = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled:
        idx = to_device(sampled, torch.long)
        x = filtered_logits(logits.index_select(0, idx), [rows[i] for i in sampled], to_device)
        cdf = x.double().softmax(-1).cumsum(-1)
        target = uniforms.index_select(0, idx).to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=x.shape[1] - 1)
        tokens = tokens.index_copy(0, idx, picked)
    return tokens
