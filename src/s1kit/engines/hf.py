"""In-process transformers engine: an engine core (``core.py``) over one of two decoders.

- ``FastDecoder`` (``fast.py``, the default on CUDA): static slots, one CUDA graph per step, the budget machine
  as tensors, pipelined publishing.
- ``LoopDecoder`` (here, the default on a CPU, and for models the fast path cannot take): the active rows share
  one ``DynamicCache``, left-padded; each step the model proposes a token for every row and the row's
  ``BudgetState`` says what to emit (a forced token replaces the sample). Rows that finish leave the batch and
  the cache; queued rows are prefilled apart and merged in, so the batch stays full.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..budget import BudgetState, FinishReason
from ..errors import RequestError
from ..forcing import ForcingCompiler
from .base import SamplingParams, cache_kwargs
from .core import EngineCore, HostPlace, Row, StepOutput


def _generation_eos(model: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def fast_path_refusal(model: Any) -> str | None:
    """Why the fast path cannot take ``model`` (sliding-window or non-attention layers), or None."""
    kinds = set(getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return f"layer types {sorted(kinds - {'full_attention'})} need their own caches"
    return None


class HFEngine(EngineCore):
    """Budget forcing with a transformers causal LM in this process (CPU or GPU).

    ``batch_size`` rows decode together. ``fast`` picks the decoder (default: the fast path on CUDA).
    ``max_model_len`` fixes the fast path's cache length (a server: requests that cannot fit are refused up
    front); by default each idle period sizes it to what is queued."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, fast: bool | None = None,
                 max_model_len: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compile = ForcingCompiler(tokenizer, _generation_eos(model))
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.fast = model.device.type == "cuda" and fast_path_refusal(model) is None if fast is None else fast
        self.max_model_len: int | None = None
        self._decoder: Any = None
        if max_model_len is not None:
            self._fix_length(max_model_len)

    @classmethod
    def load(cls, ref: str, device: str | None = None, dtype: Any = None, batch_size: int = 32,
             fast: bool | None = None, max_model_len: int | None = None) -> "HFEngine":
        """Load a model reference (see ``s1kit.models.load_model``) into an engine."""
        from ..models import load_model

        model, tokenizer = load_model(ref, device=device, dtype=dtype)
        return cls(model, tokenizer, batch_size=batch_size, fast=fast, max_model_len=max_model_len)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    @property
    def decoder(self) -> Any:
        """The decoder behind the core, made on first use."""
        if self._decoder is None:
            if self.fast:
                from .fast import FastDecoder

                self._decoder = FastDecoder(self.model, self.tokenizer, self.pad_id, slots=self.batch_size,
                                            length=self.max_model_len)
            else:
                self._decoder = LoopDecoder(self)
        return self._decoder

    def _fix_length(self, max_model_len: int) -> None:
        """One cache length for every request: prompts that cannot fit it are refused by ``prepare``."""
        self.max_model_len = max_model_len
        room = max_model_len
        if self.fast:  # a row runs on for up to two chunks after it ended: keep room for them
            from .fast import FastDecoder

            room -= 2 * FastDecoder.default_sync_every(self.model.device)
            if self._decoder is not None:
                self._decoder.length = max_model_len
        self.max_context = min(self.max_context or room, room)

    def warm_up(self) -> None:
        """Get ready to serve: on the fast path, fix the cache length (``max_model_len``, default the model's
        context) and compile and capture its steps now rather than during the first requests."""
        if self.fast:
            if self.max_model_len is None:
                self._fix_length(self.max_context or 4096)
            self.decoder.warm_up()

    def fast_stats(self) -> dict | None:
        """The fast path's counters since it started (steps, seconds, rows, tokens, slot use); None if unused."""
        return dict(self._decoder.stats) if self.fast and self._decoder is not None else None

    def fail(self, error: BaseException) -> None:
        """End every row with ``error`` and start the decoder afresh (its state may be half-updated)."""
        super().fail(error)
        if self._decoder is not None:
            self._decoder.reset()

    def _room(self, waiting: Sequence[Row]) -> int:
        return self.decoder.room(waiting)

    def _fits(self, row: Row) -> bool:
        return self.decoder.fits(row)

    def _admit(self, rows: list[Row]) -> None:
        self.decoder.admit(rows)

    def _decode(self) -> list[StepOutput]:
        return self.decoder.decode()

    def _cancel(self, row: Row) -> None:
        self.decoder.cancel(row)

    def _stop_thinking(self, row: Row) -> None:
        self.decoder.stop_thinking(row)

    def _seed(self, seed: int) -> None:
        if self.fast:  # one generator draws for every slot
            self.decoder.generator.manual_seed(seed)


class _Place(HostPlace):
    """A row's place in the loop's batch: its budget machine and its sampling generator (None for greedy)."""

    def __init__(self, state: BudgetState, generator: torch.Generator | None) -> None:
        super().__init__(state)
        self.generator = generator


def _fail_row(row: Row, problem: str) -> None:
    """End one row with an error of its request's own (the engine core reports it for that request alone)."""
    row.slot.error = RequestError(problem)
    row.slot.state.end(FinishReason.ERROR)


class LoopDecoder:
    """The plain loop (see the module docstring); ``BudgetState`` steps every row on the host."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine, self.model = engine, engine.model
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.attn = self.next_pos = self.logits = None
        self._warpers: dict[SamplingParams, LogitsProcessorList] = {}

    def room(self, waiting: Sequence[Row]) -> int:
        """Free places in the batch (none while a cache layer cannot take rows that join late)."""
        return self.engine.batch_size - len(self.rows) if not self.rows or self._mergeable() else 0

    def fits(self, row: Row) -> bool:
        """Every row fits: the cache grows with the batch."""
        return True

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` and merge them into the running batch."""
        self._join(rows)

    @torch.inference_mode()
    def decode(self) -> list[StepOutput]:
        """One step for every row: propose, probe where due, let each row's machine say what to emit."""
        if not self.rows:
            return []
        rows = list(self.rows)
        states = [r.slot.state for r in rows]
        proposals = self._propose(self.logits, rows)
        due = [i for i, (st, p) in enumerate(zip(states, proposals)) if st.probe_due(p)]
        if due:  # early exit: probe before emitting; a settled answer closes thinking at this very step
            self._probe(due)
        emitted = [st.step(p) if not st.done else p for st, p in zip(states, proposals)]
        outputs = [r.slot.output(r) for r in rows]
        keep = [i for i, st in enumerate(states) if not st.done]
        if len(keep) < len(rows):
            self._select(keep)
        if self.rows:
            step_ids = torch.tensor([emitted[i] for i in keep], device=self.engine.device).unsqueeze(1)
            self.attn = torch.cat([self.attn, self.attn.new_ones((len(self.rows), 1))], dim=1)
            out = self.model(input_ids=step_ids, attention_mask=self.attn, position_ids=self.next_pos,
                             **cache_kwargs(self.model, self.cache), use_cache=True)
            self.logits = out.logits[:, -1, :].float()
            self.next_pos = self.next_pos + 1
        return outputs

    def reset(self) -> None:
        """Forget every row (after a failure)."""
        self.rows = []
        self.cache = self.attn = self.next_pos = self.logits = None

    @torch.inference_mode()
    def cancel(self, row: Row) -> None:
        """Drop ``row`` from the batch and the cache."""
        self._select([i for i, r in enumerate(self.rows) if r is not row])

    def stop_thinking(self, row: Row) -> None:
        """Close ``row``'s thinking at its next step."""
        row.slot.state.stop_thinking()

    def _probe(self, idx: list[int]) -> None:
        """Run the early-exit probes of rows ``idx`` (one batch, from copies of their K/V) and report them."""
        from .probe import Probe, run_probes

        probes = []
        for i in idx:
            state = self.rows[i].slot.state
            start = int(self.attn[i].argmax())  # the row's first attended column: left padding before it
            past = [(layer.keys[i, :, start:], layer.values[i, :, start:]) for layer in self.cache.layers]
            opener, prefix = state.probe_suffix()
            probes.append(Probe(past, int(self.next_pos[i]), opener + prefix, len(opener),
                                state.policy.early_exit.probe_tokens, state.tokens.end_ids))
        for i, res in zip(idx, run_probes(self.model, self.engine.tokenizer, probes, self.engine.pad_id)):
            self.rows[i].slot.state.observe_probe(res.answer, res.confidence, res.tokens)

    def _mergeable(self) -> bool:
        """Whether queued rows can join a running batch: every cache layer is a plain growing K/V."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def _join(self, new: list[Row]) -> None:
        """Prefill ``new`` rows (left-padded) and merge them into the running batch."""
        dev = self.engine.device
        for r in new:
            p = r.prepared
            greedy = r.request.sampling.greedy
            r.slot = _Place(BudgetState(r.request.policy, p.tokens, p.cap),
                            None if greedy else torch.Generator(device=dev).manual_seed(r.seed))
        width = max(len(r.prepared.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.engine.pad_id, dtype=torch.long)
        attn = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            p = r.prepared.prompt_ids
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(self.model, cache),
                         use_cache=True, logits_to_keep=1)
        logits, next_pos = out.logits[:, -1, :].float(), pos[:, -1:] + 1
        if not self.rows:
            self.cache, self.attn, self.next_pos, self.logits = cache, attn, next_pos, logits
        else:  # pad the shorter side on the left to a common length, then stack the rows
            t_old, t_new = self.attn.shape[1], width
            w = max(t_old, t_new)
            for old_layer, new_layer in zip(self.cache.layers, cache.layers):
                for name in ("keys", "values"):
                    a = F.pad(getattr(old_layer, name), (0, 0, w - t_old, 0))
                    b = F.pad(getattr(new_layer, name), (0, 0, w - t_new, 0))
                    setattr(old_layer, name, torch.cat([a, b]))
            self.attn = torch.cat([F.pad(self.attn, (w - t_old, 0)), F.pad(attn, (w - t_new, 0))])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
        self.rows += new

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` in the batch and the cache; drop columns every remaining row pads."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.attn = self.next_pos = self.logits = None
            return
        idx = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        self.attn, self.next_pos, self.logits = self.attn[idx], self.next_pos[idx], self.logits[idx]
        first = int(self.attn.any(0).long().argmax())  # leading columns that are padding for every row
        if first > 0 and self._mergeable():
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.attn = self.attn[:, first:]

    def _propose(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            gen = r.slot.generator
            if gen is None or r.slot.state.next_is_forced:
                continue  # greedy, or the proposal would be thrown away
            warp = self._warpers.get(r.request.sampling)
            if warp is None:
                sp = r.request.sampling
                warp = LogitsProcessorList([TemperatureLogitsWarper(sp.temperature)])
                if sp.top_k:
                    warp.append(TopKLogitsWarper(sp.top_k))
                if sp.top_p < 1:
                    warp.append(TopPLogitsWarper(sp.top_p))
                self._warpers[sp] = warp
            scores = warp(None, logits[i : i + 1].clone())
            probs = torch.softmax(scores, dim=-1)
            if not bool(torch.isfinite(probs).all()):  # this row alone cannot sample: it fails, the others go on
                _fail_row(r, "cannot sample: the next-token distribution is not finite (NaN or inf logits at "
                             f"temperature {r.request.sampling.temperature})")
                continue
            greedy[i] = int(torch.multinomial(probs, 1, generator=gen))
        return greedy
