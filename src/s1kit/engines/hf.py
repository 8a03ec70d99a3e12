"""In-process transformers engine: single-pass batched budget forcing over one KV cache.

Per batch: left-padded prompts, one prefill, one decode loop. Each step the model proposes a token for
every row and the row's ``BudgetState`` says what to emit (a forced token simply replaces the sample);
rows that finish are dropped from the batch and the cache. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..budget import BudgetState
from ..formats import render_prompt
from .base import Completion, ForcingCompiler, Request, SamplingParams, context_cap, make_completion


# on_emit(request_index, sample_index, state) -> False to cancel that sequence
OnEmit = Callable[[int, int, BudgetState], "bool | None"]


@dataclass
class _Row:
    request_index: int
    sample_index: int
    prompt_ids: list[int]
    state: BudgetState
    sampling: SamplingParams
    generator: torch.Generator | None


def _generation_eos(model: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class HFEngine:
    """Budget forcing with a transformers causal LM in this process (CPU or GPU)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, fast: bool | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compile = ForcingCompiler(tokenizer, _generation_eos(model))
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._warpers: dict[SamplingParams, LogitsProcessorList] = {}
        # The fast path (static slots, CUDA graphs, continuous batching): default on CUDA.
        self.fast = model.device.type == "cuda" if fast is None else fast
        self._fast: Any = None

    @classmethod
    def load(cls, ref: str, device: str | None = None, dtype: Any = None, batch_size: int = 32,
             fast: bool | None = None) -> "HFEngine":
        """Load a model reference (see ``s1kit.models.load_model``) into an engine."""
        from ..models import load_model

        model, tokenizer = load_model(ref, device=device, dtype=dtype)
        return cls(model, tokenizer, batch_size=batch_size, fast=fast)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    def prepare(self, request: Request) -> tuple[list[int], Any, int | None]:
        """Prompt ids, compiled forcing tokens and effective cap of a request (validates the format)."""
        text = render_prompt(self.tokenizer, request.prompt, request.format, request.system)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        tokens = self.compile(request.format, request.policy)
        return ids, tokens, context_cap(request.policy, tokens, len(ids), self.max_context)

    def generate(
        self,
        requests: Sequence[Request],
        on_progress: Callable[[int], None] | None = None,
        on_emit: OnEmit | None = None,
    ) -> list[Completion]:
        """Completions for ``requests``, ``n`` per request, in request order.

        ``on_emit(request_index, sample_index, state)`` runs after every emitted token (streaming); if it
        returns ``False`` the sequence is cancelled at once (``finish_reason == "cancelled"``).
        """
        if self.fast and on_emit is None and all(r.policy.max_thinking_tokens is not None for r in requests):
            return self._generate_fast(requests, on_progress)
        rows: list[_Row] = []
        prompt_lens = []
        for ri, req in enumerate(requests):
            ids, tokens, cap = self.prepare(req)
            prompt_lens.append(len(ids))
            base_seed = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
            for si in range(req.sampling.n):
                gen = None
                if not req.sampling.greedy:
                    gen = torch.Generator(device=self.device).manual_seed(base_seed + si)
                rows.append(_Row(ri, si, ids, BudgetState(req.policy, tokens, cap), req.sampling, gen))
        # Similar lengths together: less padding per batch.
        order = sorted(rows, key=lambda r: -len(r.prompt_ids))
        for start in range(0, len(order), self.batch_size):
            self._decode(order[start : start + self.batch_size], on_progress, on_emit)
        return [
            make_completion(r.state, self.tokenizer, requests[r.request_index], prompt_lens[r.request_index],
                            r.request_index, r.sample_index)
            for r in rows
        ]

    def fast_stats(self) -> dict | None:
        """The fast path's counters since it started (steps, seconds, rows, tokens, slot use); None if unused."""
        return dict(self._fast.stats) if self._fast is not None else None

    def _generate_fast(self, requests: Sequence[Request], on_progress: Callable[[int], None] | None) -> list[Completion]:
        """The fast path: every request has a thinking cap, so each row's cache needs are bounded."""
        from .fast import FastDecoder, FastRow

        if self._fast is None:
            self._fast = FastDecoder(self.model, self.tokenizer, self.pad_id, slots=self.batch_size)
        seeds = [r.sampling.seed for r in requests if r.sampling.seed is not None]
        if seeds:  # fast-path sampling is seeded per call, not per row
            self._fast.generator.manual_seed(seeds[0])
        rows, index, prompt_lens = [], [], []
        for ri, req in enumerate(requests):
            ids, tokens, cap = self.prepare(req)
            prompt_lens.append(len(ids))
            sp = req.sampling
            for si in range(sp.n):
                rows.append(FastRow(ids, req.policy, tokens, cap, sp.temperature, sp.top_k, sp.top_p))
                index.append((ri, si))
        self._fast.run(rows, on_progress)
        return [make_completion(row.trace, self.tokenizer, requests[ri], prompt_lens[ri], ri, si)
                for row, (ri, si) in zip(rows, index)]

    def _propose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is None or r.state.next_is_forced:
                continue  # greedy, or the proposal would be thrown away
            warp = self._warpers.get(r.sampling)
            if warp is None:
                sp = r.sampling
                warp = LogitsProcessorList([TemperatureLogitsWarper(sp.temperature)])
                if sp.top_k:
                    warp.append(TopKLogitsWarper(sp.top_k))
                if sp.top_p < 1:
                    warp.append(TopPLogitsWarper(sp.top_p))
                self._warpers[r.sampling] = warp
            scores = warp(None, logits[i : i + 1].clone())
            probs = torch.softmax(scores, dim=-1)
            greedy[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return greedy

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], on_progress: Callable[[int], None] | None, on_emit: OnEmit | None) -> None:
        dev = self.device
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attn[i, width - len(r.prompt_ids) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        next_pos = pos[:, -1:] + 1
        active = list(rows)
        while True:
            logits = out.logits[:, -1, :].float()
            emitted = [r.state.step(p) for r, p in zip(active, self._propose(logits, active))]
            if on_emit is not None:
                for r in active:
                    if on_emit(r.request_index, r.sample_index, r.state) is False and not r.state.done:
                        r.state.cancel()
            keep = [i for i, r in enumerate(active) if not r.state.done]
            if on_progress and len(keep) < len(active):
                on_progress(len(active) - len(keep))
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                attn, next_pos = attn[idx], next_pos[idx]
                active = [active[i] for i in keep]
                emitted = [emitted[i] for i in keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            step_ids = torch.tensor(emitted, device=dev).unsqueeze(1)
            out = self.model(input_ids=step_ids, attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                             use_cache=True)
            next_pos = next_pos + 1
