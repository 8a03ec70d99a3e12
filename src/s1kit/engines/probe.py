"""Early-exit probes on an in-process model: the answer a sequence would give if its thinking closed now.

A probe is a side branch: it starts from a copy of the sequence's K/V (so the sequence itself never changes),
feeds the answer opener and prefix that a cap would force, and decodes greedily for up to ``probe_tokens``
tokens. Its answer is normalised as the grader does (``extract_answer`` then ``normalize``) and its confidence
is the mean probability of its greedy tokens. Several sequences' probes run as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .base import cache_kwargs


@dataclass(frozen=True)
class Probe:
    """One sequence's probe: its K/V per layer (``[heads, length, head_dim]`` each, only the columns it attends
    to), the position of its next token, and the tokens to feed (opener + answer prefix)."""

    past: Sequence[tuple[torch.Tensor, torch.Tensor]]
    position: int
    suffix: Sequence[int]
    answer_start: int  # where the answer prefix starts in ``suffix`` (after the opener)
    max_tokens: int  # answer tokens to decode at most
    end_ids: frozenset[int]  # tokens that end the answer


@dataclass(frozen=True)
class ProbeResult:
    """A probe's normalised answer, the mean probability of its greedy tokens, and the tokens it computed."""

    answer: str
    confidence: float
    tokens: int


def normalized_answer(text: str) -> str:
    """The answer in a probe's text, normalised as the grader compares answers."""
    from ..data.grading import extract_answer, normalize

    return normalize(extract_answer(text))


@torch.inference_mode()
def run_probes(model: Any, tokenizer: Any, probes: Sequence[Probe], pad_id: int) -> list[ProbeResult]:
    """Decode every probe (left-padded into one batch) and read back its answer."""
    if not probes:
        return []
    dev = probes[0].past[0][0].device
    n = len(probes)
    width = max(p.past[0][0].shape[1] for p in probes)
    s_len = max(len(p.suffix) for p in probes)
    cache = DynamicCache(config=model.config)
    for layer in range(len(probes[0].past)):
        keys = torch.stack([F.pad(p.past[layer][0], (0, 0, width - p.past[layer][0].shape[1], 0)) for p in probes])
        values = torch.stack([F.pad(p.past[layer][1], (0, 0, width - p.past[layer][1].shape[1], 0)) for p in probes])
        cache.update(keys, values, layer)
    # [context (left-padded) | suffix (left-padded)]: padding anywhere is masked out, positions are explicit.
    attn = torch.zeros(n, width + s_len, dtype=torch.long)
    ids = torch.full((n, s_len), pad_id, dtype=torch.long)
    pos = torch.zeros(n, s_len, dtype=torch.long)
    for i, p in enumerate(probes):
        k = len(p.suffix)
        attn[i, width - p.past[0][0].shape[1]: width] = 1
        attn[i, width + s_len - k:] = 1
        ids[i, s_len - k:] = torch.tensor(list(p.suffix))
        pos[i, s_len - k:] = torch.arange(p.position, p.position + k)
    attn, ids, pos = attn.to(dev), ids.to(dev), pos.to(dev)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    generated: list[list[int]] = [[] for _ in range(n)]
    probs: list[list[float]] = [[] for _ in range(n)]
    live = [True] * n
    for _ in range(max(p.max_tokens for p in probes)):
        dist = out.logits[:, -1].float().softmax(-1)
        p_max, tok = dist.max(-1)
        for i, (t, pm) in enumerate(zip(tok.tolist(), p_max.tolist())):
            if live[i]:
                probs[i].append(pm)
                if t in probes[i].end_ids:
                    live[i] = False
                else:
                    generated[i].append(t)
                    live[i] = len(generated[i]) < probes[i].max_tokens
        if not any(live):
            break
        attn = torch.cat([attn, attn.new_ones((n, 1))], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=attn, position_ids=next_pos, **cache_kwargs(model, cache),
                    use_cache=True)
        next_pos = next_pos + 1
    results = []
    for p, gen, pr in zip(probes, generated, probs):
        text = tokenizer.decode(list(p.suffix[p.answer_start:]) + gen, skip_special_tokens=True)
        results.append(ProbeResult(normalized_answer(text), sum(pr) / len(pr) if pr else 0.0, len(p.suffix) + len(pr)))
    return results
