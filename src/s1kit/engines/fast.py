"""The hf engine's fast path: static KV cache, one CUDA graph per decode step, continuous batching.

Same semantics as the plain loop in ``hf.py`` (the budget machine is ``TensorBudget``, proven equal to
``BudgetState``), built for speed on a GPU:

- ``SlotCache`` holds K/V for ``slots`` rows over ``length`` columns; each slot writes at its own column and
  has its own attention mask and positions, so a finished row's slot takes the next request at once: its
  prompt is prefilled apart and copied into the slot's first columns, and it decodes from there. ``length``
  only has to hold the longest prompt plus the longest generation, and the batch stays full until the queue
  runs dry.
- A decode step (model forward, proposals, forcing, recording) has fixed shapes and no host sync, so on CUDA
  it is captured once per (slots, length) and replayed; the host looks at the rows only every ``sync_every``
  steps, to collect finished rows and refill their slots from the queue.
- Decoding attends over the cache with the query heads of a KV group as the query axis of one call, so
  grouped-query models never copy K/V per step (transformers' SDPA path repeats K/V when a mask is given).
  On a GPU that call is ``decode_attention``'s split-K kernel, which reads only the columns each slot uses
  (SDPA reads the whole static cache: 27 µs a layer over 1,024 columns on an H200, whatever the context
  in use); elsewhere SDPA.
- Sibling projections (q/k/v, gate/up) run as one GEMM each (``fused.py``).

``S1KIT_FUSE=0`` and ``S1KIT_SPLIT_ATTENTION=0`` turn the last two off (A/B measurements, or a model they
do not suit).
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..budget import BudgetPolicy, ForcingTokens
from . import decode_attention
from .fused import FusedProjections
from .reference import LoopTrace
from .tensor_budget import ANSWER, END, NONE, OPENER, P_DONE, PREFIX, THINK, TensorBudget, newline_table

ATTN_NAME = "s1kit_slots"


def slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for ``SlotCache``: decode steps fold the query heads of each KV group into one SDPA call."""
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len == 1:
        q = query.view(b, hkv, hq // hkv, d)  # the G heads of a group act as G queries of that group
        last = kwargs.get("s1kit_last")  # each slot's last column in use, passed down by the decode step
        if last is not None and decode_attention.available(q):
            out = decode_attention.decode_attention(q, key, value, attention_mask[:, 0, 0], last,
                                                    d ** -0.5 if scaling is None else scaling)
        else:
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, hq, d), None  # [B, q_len, H, D], as transformers' attention functions return
    g = hq // hkv
    if g > 1:
        key = key.repeat_interleave(g, dim=1)
        value = value.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, slot_attention)


class SlotCache:
    """Per-layer K/V of shape [slots, kv_heads, length, head_dim]; slot ``i`` writes at column ``col[i]``.

    It offers the one method attention layers call (``update``); positions and masks are always passed
    explicitly, so the model never asks it for lengths.
    """

    is_compileable = True

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.col = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = torch.arange(slots, device=device)
        self.length = length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write ``key``/``value`` and return the whole layer: a decode step writes one column per slot, at the
        slot's own; a prefill (into a fresh cache as long as the prompts) writes every column."""
        if key.shape[-2] == 1:
            self.keys[layer_idx][self.rows, :, self.col] = key[:, :, 0]
            self.values[layer_idx][self.rows, :, self.col] = value[:, :, 0]
        else:
            self.keys[layer_idx].copy_(key)
            self.values[layer_idx].copy_(value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused by the fast path (positions are explicit); present for the cache protocol."""
        return 0

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class FastRow:
    """One sequence to decode: prompt ids, its policy, compiled tokens, effective cap and sampling."""

    prompt_ids: list[int]
    policy: BudgetPolicy
    tokens: ForcingTokens
    cap: int | None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    trace: LoopTrace | None = None

    @property
    def max_new(self) -> int:
        """The most tokens this row can emit (thinking, closing, answer, end token)."""
        cap = self.policy.max_thinking_tokens if self.cap is None else self.cap
        t = self.tokens
        close = len(t.newline_ids) + len(t.opener_ids) + len(t.prefix_ids)
        return cap + close + self.policy.max_answer_tokens + 1


def _switch_on(name: str) -> bool:
    """An ``S1KIT_*`` switch of the fast path: on unless the variable is ``0``."""
    return os.environ.get(name, "1") != "0"


def _model_dims(model: Any) -> tuple[int, int, int, int]:
    c = model.config
    c = getattr(c, "text_config", c)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim, c.vocab_size


class _Workspace:
    """Buffers (and on CUDA the captured step) for one (slots, length, sampling) shape."""

    def __init__(self, dec: "FastDecoder", slots: int, length: int, sample: bool) -> None:
        m, dev = dec.model, dec.device
        layers, kv, head_dim, vocab = _model_dims(m)
        self.slots, self.length, self.sample = slots, length, sample
        self.kv = SlotCache(layers, slots, kv, length, head_dim, dec.dtype, dev)
        self.tb = TensorBudget(slots, dev, vocab, dec.nl_table)
        self.neg = torch.finfo(dec.dtype).min
        # Additive attention mask, kept up to date column by column (0 = attend, dtype min = masked).
        self.mask = torch.full((slots, 1, 1, length), self.neg, dtype=dec.dtype, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.logits = torch.zeros(slots, vocab, dtype=torch.float32, device=dev)
        self.rec_tok = torch.zeros(slots, length, dtype=torch.long, device=dev)
        self.rec_kind = torch.full((slots, length), NONE, dtype=torch.long, device=dev)
        self.temp = torch.zeros(slots, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_p = torch.ones(slots, device=dev)
        self.dec = dec
        self.graph: torch.cuda.CUDAGraph | None = None
        # Compiled, the budget machine's ~100 small element-wise ops become a few fused kernels.
        self._force_fn = torch.compile(self._force, dynamic=False) if dec.compile else self._force

    def _propose(self) -> torch.Tensor:
        greedy = self.logits.argmax(-1)
        if not self.sample:
            return greedy
        x = self.logits / self.temp.clamp(min=1e-5).unsqueeze(1)
        srt, order = x.sort(-1, descending=True)
        rank = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        k = torch.where(self.top_k > 0, self.top_k, x.shape[1]).unsqueeze(1)
        probs = srt.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of better tokens: keep while it is below top_p
        keep = (rank < k) & (before < self.top_p.unsqueeze(1))
        srt = srt.masked_fill(~keep, float("-inf"))
        u = torch.rand(srt.shape, device=x.device, generator=self.dec.generator).clamp_(1e-10, 1.0)
        pick = (srt - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max = a draw from softmax(srt)
        sampled = order.gather(1, pick.unsqueeze(1)).squeeze(1)
        return torch.where(self.temp > 0, sampled, greedy)

    def _force(self) -> torch.Tensor:
        """Propose, run the budget machine, record the emitted tokens and unmask their columns."""
        if self.dec.forcing:
            emitted, kind = self.tb.step(self._propose(), self.dec.pad_id)
        else:  # plain decoding: every slot emits its proposal, as thinking, until the host stops it
            emitted = self._propose()
            kind = torch.where(self.tb.phase != P_DONE, THINK, NONE)
        rows, col = self.kv.rows, self.kv.col
        self.rec_tok[rows, col] = emitted
        self.rec_kind[rows, col] = kind
        self.mask[rows, 0, 0, col] = torch.where(kind != NONE, 0.0, self.neg).to(self.mask.dtype)
        return emitted

    def step(self) -> None:
        """One decode step for every slot: propose, force, record, feed the model. No host sync."""
        emitted = self._force_fn()
        extra = {"s1kit_last": self.kv.col} if self.dec.split_attention else {}
        out = self.dec.forward(input_ids=emitted.unsqueeze(1), position_ids=self.pos.unsqueeze(1),
                               attention_mask=self.mask, past_key_values=self.kv, use_cache=True, **extra)
        self.logits.copy_(out.logits[:, -1].float())
        self.pos.add_(1)
        self.kv.col.add_(1).clamp_(max=self.length - 1)  # only idle slots reach the end; they record nothing

    def capture(self) -> None:
        """Record ``step`` as a CUDA graph (after warm-up runs on a side stream, with every slot idle)."""
        saved = (self.kv.col.clone(), self.pos.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.kv.col.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.graph = torch.cuda.CUDAGraph()
        if self.sample:  # torch registers only its default generator with a graph; sampling draws from ours
            self.graph.register_generator_state(self.dec.generator)
        with torch.cuda.graph(self.graph):
            self.step()

    def run_step(self) -> None:
        """Replay the captured step, or run it eagerly (CPU)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class _Timer:
    """Wall time of a block, with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.elapsed = 0.0

    def __enter__(self) -> "_Timer":
        self.sync()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sync()
        self.elapsed = time.perf_counter() - self._t


class FastDecoder:
    """Decodes ``FastRow``s with budget forcing through static slots (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, slots: int = 32, sync_every: int = 16,
                 use_graphs: bool | None = None, compile: bool | None = None, seed: int | None = None,
                 fuse: bool | None = None, split_attention: bool | None = None) -> None:
        self.model, self.tokenizer, self.pad_id = model, tokenizer, pad_id
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.slots, self.sync_every = slots, sync_every
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        # torch.compile fuses the many small kernels of an eager decode step (norms, RoPE, activations),
        # which dominate at decode batch sizes; the compiled step is then captured in the CUDA graph.
        # S1KIT_COMPILE=0 skips it: a sweep over many budgets meets many cache shapes, and each costs a compile,
        # where the eager step in a CUDA graph is only ~10% slower per step.
        if compile is None:
            compile = self.device.type == "cuda" and _switch_on("S1KIT_COMPILE")
        self.compile = compile
        if compile:  # one compiled graph per workspace shape; the default limit (8) would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.forward = torch.compile(model, dynamic=False) if compile else model
        fuse = _switch_on("S1KIT_FUSE") if fuse is None else fuse
        self.fused = FusedProjections(model) if fuse else None
        # The kernel runs only on CUDA; elsewhere slot_attention uses SDPA whatever this says.
        self.split_attention = _switch_on("S1KIT_SPLIT_ATTENTION") if split_attention is None else split_attention
        vocab = _model_dims(model)[3]
        # Without a tokenizer (benchmarks on token ids) no token counts as ending a line.
        self.nl_table = newline_table(tokenizer, vocab) if tokenizer is not None else torch.zeros(vocab, dtype=torch.bool)
        self.forcing = True  # False: emit proposals as they are (benchmarks measure what forcing costs)
        self.reset_stats()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else seed)
        self._ws: dict[tuple[int, int, bool, bool], _Workspace] = {}
        _register_attention()

    def reset_stats(self) -> None:
        """Zero the counters: decode steps, decode/prefill seconds, rows, tokens and busy slot-steps."""
        self.stats = {"steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "rows": 0, "tokens": 0, "slot_steps": 0,
                      "busy_slot_steps": 0}

    def _workspace(self, slots: int, length: int, sample: bool) -> _Workspace:
        key = (slots, length, sample, self.forcing)
        ws = self._ws.get(key)
        if ws is None:
            if len(self._ws) >= 2:  # keep memory bounded: drop the oldest shape
                self._ws.pop(next(iter(self._ws)))
            ws = self._ws[key] = _Workspace(self, slots, length, sample)
            if self.use_graphs:
                with self._attention():
                    ws.capture()
        return ws

    @contextmanager
    def _attention(self) -> Iterator[None]:
        """Route the model's attention through ``slot_attention``, and its sibling projections through fused
        GEMMs, while the fast path runs."""
        cfg = self.model.config
        old = cfg._attn_implementation
        cfg._attn_implementation = ATTN_NAME  # the config setter updates sub-configs too
        try:
            with self.fused.active() if self.fused else nullcontext():
                yield
        finally:
            cfg._attn_implementation = old

    @torch.inference_mode()
    def run(self, rows: Sequence[FastRow], on_progress: Callable[[int], None] | None = None) -> None:
        """Decode every row, filling ``row.trace``; rows share slots, refilled as others finish."""
        if not rows:
            return
        sample = any(r.temperature > 0 for r in rows)
        slots = min(self.slots, len(rows))
        if self.use_graphs:  # power-of-two slot counts: fewer shapes to capture (and compile) across calls
            slots = min(self.slots, 1 << (slots - 1).bit_length())
        queue = deque(sorted(rows, key=lambda r: -len(r.prompt_ids)))
        # Any row fits in any slot: the longest prompt, the longest generation, and the steps a finished row
        # runs on until the next sync. Decode attends over every column, so length costs bandwidth each step;
        # rounded so that shapes, and so captured (compiled) graphs, repeat across calls.
        need = len(queue[0].prompt_ids) + max(r.max_new for r in rows) + self.sync_every
        grain = 512 if self.compile else 64  # coarser when every new length means a new compile
        ws = self._workspace(slots, -(-need // grain) * grain, sample)
        with self._attention():
            self._decode(ws, queue, on_progress)

    def _decode(self, ws: _Workspace, queue: deque, on_progress: Callable[[int], None] | None) -> None:
        ws.mask.fill_(ws.neg)
        ws.rec_kind.fill_(NONE)
        for s in range(ws.slots):
            ws.tb.free(s)
        owner: dict[int, tuple[FastRow, int]] = {}  # slot -> (row, column where its generation starts)
        timer = _Timer(self.device)
        while True:
            free = [s for s in range(ws.slots) if s not in owner]
            take = [(free[i], queue.popleft()) for i in range(min(len(free), len(queue)))]
            if take:  # refill every free slot at once: one prefill for all of them
                width = max(len(r.prompt_ids) for _, r in take)
                with _Timer(self.device) as t:
                    self._prefill(ws, [s for s, _ in take], [r for _, r in take], width)
                self.stats["prefill_s"] += t.elapsed
                owner.update((s, (r, width)) for s, r in take)
            if not owner:
                return
            with timer:
                for _ in range(self.sync_every):
                    ws.run_step()
                phase, cols = torch.stack([ws.tb.phase, ws.kv.col]).tolist()  # the only host sync
            self.stats["steps"] += self.sync_every
            self.stats["decode_s"] += timer.elapsed
            self.stats["slot_steps"] += ws.slots * self.sync_every
            self.stats["busy_slot_steps"] += len(owner) * self.sync_every  # an upper bound: rows end inside
            if not self.forcing:  # plain decoding ends each row at its budget
                phase = [P_DONE if s in owner and cols[s] - owner[s][1] >= owner[s][0].max_new else ph
                         for s, ph in enumerate(phase)]
            finished = [s for s in owner if phase[s] == P_DONE]
            for s in finished:
                row, start = owner.pop(s)
                self._collect(ws, s, row, start, cols[s])
            if on_progress and finished:
                on_progress(len(finished))

    def _prefill(self, ws: _Workspace, slots: list[int], rows: list[FastRow], width: int) -> None:
        """Run the prompts of ``rows`` (left-padded to ``width``) into columns [0, width) of ``slots``."""
        dev = self.device
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            valid[i, width - len(r.prompt_ids):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill(~allowed, ws.neg).unsqueeze(1)
        layers, kv, head_dim, _ = _model_dims(self.model)
        tmp = SlotCache(layers, n, kv, width, head_dim, self.dtype, dev)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=tmp, use_cache=True,
                         logits_to_keep=1)
        idx = torch.tensor(slots, device=dev)
        for layer in range(layers):
            ws.kv.keys[layer][idx, :, :width] = tmp.keys[layer]
            ws.kv.values[layer][idx, :, :width] = tmp.values[layer]
        row_mask = torch.full((n, ws.length), ws.neg, dtype=self.dtype, device=dev)
        row_mask[:, :width] = torch.where(valid, 0.0, ws.neg).to(self.dtype)
        ws.mask[idx] = row_mask.view(n, 1, 1, -1)
        ws.logits[idx] = out.logits[:, -1].float()
        ws.pos[idx] = valid.long().sum(-1)
        ws.kv.col[idx] = width
        ws.rec_kind[idx] = NONE
        for s, r in zip(slots, rows):
            ws.tb.load(s, r.policy, r.tokens, r.cap)
            ws.temp[s], ws.top_k[s], ws.top_p[s] = r.temperature, r.top_k, r.top_p

    def _collect(self, ws: _Workspace, slot: int, row: FastRow, start: int, end: int) -> None:
        toks = ws.rec_tok[slot, start:end].tolist()
        kinds = ws.rec_kind[slot, start:end].tolist()
        t = LoopTrace()
        for tok, k in zip(toks, kinds):
            if k == NONE:
                break
            t.token_ids.append(tok)
            if k == THINK:
                t.thinking_ids.append(tok)
            elif k in (PREFIX, ANSWER):
                t.answer_ids.append(tok)
        t.waits_used = int(ws.tb.waits_used[slot])
        t.hit_cap = bool(ws.tb.hit_cap[slot])
        t.finish_reason = {1: "stop", 2: "length"}.get(int(ws.tb.finish[slot]))
        row.trace = t
        self.stats["rows"] += 1
        self.stats["tokens"] += len(t.token_ids)
        ws.tb.free(slot)
