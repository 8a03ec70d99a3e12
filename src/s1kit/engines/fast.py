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
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..budget import Counts, FinishReason, Trace
from ..errors import S1KitError
from . import decode_attention
from .base import cache_kwargs
from .core import Row, StepOutput, admit_from, apply
from .fused import FusedProjections
from .tensor_budget import (ANSWER, F_LENGTH, F_STOP, NONE, P_DONE, P_PAUSE, PREFIX, THINK, TensorBudget,
                           boundary_tables)

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


def max_new_tokens(row: Row) -> int:
    """The most tokens ``row`` can emit (thinking and a cap's grace, closing, answer, end token); its thinking must
    be bounded."""
    p = row.prepared
    cap = p.cap if p.cap is not None else row.request.policy.max_thinking_tokens
    if cap is None:
        raise S1KitError("the fast path needs a thinking cap or a model with a context length "
                         "(max_position_embeddings) to bound each row")
    policy = row.request.policy
    return cap + policy.cap_grace + p.tokens.max_closing_len + policy.max_answer_tokens + 1


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``device`` without a host sync: through pinned memory, in stream order."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Workspace:
    """Buffers (and on CUDA the captured steps, greedy and sampling) for one (slots, length) shape."""

    def __init__(self, dec: "FastDecoder", slots: int, length: int) -> None:
        m, dev = dec.model, dec.device
        layers, kv, head_dim, vocab = _model_dims(m)
        self.slots, self.length, self.k = slots, length, dec.sync_every
        self.kv = SlotCache(layers, slots, kv, length, head_dim, dec.dtype, dev)
        self.tb = TensorBudget(slots, dev, vocab, dec.tables[0], sentence_table=dec.tables[1])
        self.neg = torch.finfo(dec.dtype).min
        # Additive attention mask, kept up to date column by column (0 = attend, dtype min = masked).
        self.mask = torch.full((slots, 1, 1, length), self.neg, dtype=dec.dtype, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.logits = torch.zeros(slots, vocab, dtype=torch.float32, device=dev)
        # What each slot emitted at each step of the current chunk (step i of a chunk writes column i), and the
        # snapshot the host reads after the chunk: ring tokens, ring kinds, phase, finish, waits used, cap hit.
        self.ring_tok = torch.zeros(slots, self.k, dtype=torch.long, device=dev)
        self.ring_kind = torch.full((slots, self.k), NONE, dtype=torch.long, device=dev)
        self.ring_at = torch.zeros(slots, 1, dtype=torch.long, device=dev)  # the step's column, for scatter_
        self.snap = torch.zeros(slots, 2 * self.k + 4, dtype=torch.long, device=dev)
        self.temp = torch.zeros(slots, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_p = torch.ones(slots, device=dev)
        self.dec = dec
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # sample -> captured step
        # Compiled, the budget machine's ~100 small element-wise ops become a few fused kernels.
        self._force_compiled = torch.compile(self._force, dynamic=False) if dec.compile else None

    def _propose(self, sample: bool) -> torch.Tensor:
        greedy = self.logits.argmax(-1)
        if not sample:
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

    def _force(self, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Propose, run the budget machine, record the emitted tokens and unmask their columns."""
        if self.dec.forcing:
            emitted, kind = self.tb.step(self._propose(sample), self.dec.pad_id)
        else:  # plain decoding: every slot emits its proposal, as thinking, until the host stops it
            emitted = self._propose(sample)
            kind = torch.where(self.tb.phase != P_DONE, THINK, NONE)
        rows, col = self.kv.rows, self.kv.col
        # scatter_, not ring[:, i] = ...: a 0-d tensor index would be read on the host (a sync inside the graph)
        self.ring_tok.scatter_(1, self.ring_at, emitted.unsqueeze(1))
        self.ring_kind.scatter_(1, self.ring_at, kind.unsqueeze(1))
        self.mask[rows, 0, 0, col] = torch.where(kind != NONE, 0.0, self.neg).to(self.mask.dtype)
        return emitted, kind

    def _forced(self, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``_force``, compiled where torch.compile manages it. Inductor failed on the sampling variant at 64 slots
        x 4,096 columns on the H200 (torch 2.11, a codegen TypeError); the eager machine is the same computation,
        so such a failure costs speed, not the run (it happens in warm-up, before any graph is captured)."""
        if self._force_compiled is not None:
            try:
                return self._force_compiled(sample)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the eager step
                warnings.warn(f"torch.compile of the budget step failed ({type(e).__name__}: {str(e)[:120]}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                self._force_compiled = None
        return self._force(sample)

    def step(self, sample: bool) -> None:
        """One decode step for every slot: propose, force, record, feed the model. No host sync."""
        emitted, kind = self._forced(sample)
        extra = {"s1kit_last": self.kv.col} if self.dec.split_attention else {}
        out = self.dec.forward(input_ids=emitted.unsqueeze(1), position_ids=self.pos.unsqueeze(1),
                               attention_mask=self.mask, use_cache=True, **{self.dec.cache_arg: self.kv}, **extra)
        self.logits.copy_(out.logits[:, -1].float())
        # A slot that emitted nothing (idle, ended, or paused at a probe point) keeps its position and column:
        # what this step wrote there is masked, and its next token overwrites it.
        moved = (kind != NONE).long()
        self.pos.add_(moved)
        self.kv.col.add_(moved).clamp_(max=self.length - 1)
        self.ring_at.add_(1).remainder_(self.k)

    def capture(self, sample: bool) -> None:
        """Record ``step`` as a CUDA graph (after warm-up runs on a side stream); every slot must be idle."""
        saved = (self.kv.col.clone(), self.pos.clone(), self.ring_at.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step(sample)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip((self.kv.col, self.pos, self.ring_at), saved):
            t.copy_(v)
        graph = torch.cuda.CUDAGraph()
        if sample:  # torch registers only its default generator with a graph; sampling draws from ours
            graph.register_generator_state(self.dec.generator)
        with torch.cuda.graph(graph):
            self.step(sample)
        self.graphs[sample] = graph

    def run_chunk(self, sample: bool) -> None:
        """``k`` decode steps (captured graph replays on CUDA), then the snapshot of what they emitted."""
        graph = self.graphs.get(sample)
        for _ in range(self.k):
            if graph is not None:
                graph.replay()
            else:
                self.step(sample)
        tb = self.tb
        torch.cat([self.ring_tok, self.ring_kind, tb.phase.unsqueeze(1), tb.finish.unsqueeze(1),
                   tb.waits_used.unsqueeze(1), tb.hit_cap.long().unsqueeze(1)], dim=1, out=self.snap)


class _Chunk:
    """A launched chunk: who owned each slot, and its snapshot on its way to the host."""

    def __init__(self, ws: _Workspace, owners: dict[int, Row], pinned: torch.Tensor | None) -> None:
        self.owners = dict(owners)
        if pinned is None:  # CPU: the snapshot is already here
            self.host, self.done = ws.snap.clone(), None
        else:
            self.host = pinned
            pinned.copy_(ws.snap, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> list[list[int]]:
        """The snapshot, once it arrived: one list per slot."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class FastDecoder:
    """Decodes ``Row``s with budget forcing through static slots (see the module docstring).

    The engine core calls ``room`` / ``fits`` / ``admit`` and then ``decode``: controls (aborts, stop-thinking) and
    admissions are written between chunks of ``sync_every`` steps, and each chunk's snapshot is published while the
    next chunk runs (on CUDA, ``pipeline``): the host never waits for the GPU except to read a snapshot that is one
    chunk old.
    ``length`` fixes the cache length (a server, where every request must fit); otherwise each idle period picks
    one that fits what is queued.
    """

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, slots: int = 32, sync_every: int | None = None,
                 use_graphs: bool | None = None, compile: bool | None = None, seed: int | None = None,
                 fuse: bool | None = None, split_attention: bool | None = None, length: int | None = None,
                 pipeline: bool | None = None) -> None:
        self.model, self.tokenizer, self.pad_id = model, tokenizer, pad_id
        [self.cache_arg] = cache_kwargs(model, None)  # the forward's name for the cache, looked up once
        self.device = model.device
        cuda = self.device.type == "cuda"
        self.dtype = next(model.parameters()).dtype
        self.slots = slots
        self.sync_every = sync_every or self.default_sync_every(self.device)
        self.pipeline = cuda if pipeline is None else pipeline
        self.length = length
        self.use_graphs = cuda if use_graphs is None else use_graphs
        # torch.compile fuses the many small kernels of an eager decode step (norms, RoPE, activations),
        # which dominate at decode batch sizes; the compiled step is then captured in the CUDA graph.
        # S1KIT_COMPILE=0 skips it: a sweep over many budgets meets many cache shapes, and each costs a compile,
        # where the eager step in a CUDA graph is only ~10% slower per step.
        if compile is None:
            compile = cuda and _switch_on("S1KIT_COMPILE")
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
        self.tables = boundary_tables(tokenizer, vocab) if tokenizer is not None else (
            torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool))
        self.forcing = True  # False: emit proposals as they are (benchmarks measure what forcing costs)
        self.reset_stats()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else seed)
        self._ws: dict[tuple[int, int, bool], _Workspace] = {}
        self.ws: _Workspace | None = None
        self.owner: dict[int, Row] = {}  # slot -> the row decoding there
        # slot -> the host's record of what the slot emitted (the probes' context) and its probes (the rule's inputs)
        self.host: dict[int, Trace] = {}
        self._pending: _Chunk | None = None
        self._pinned: list[torch.Tensor] = []
        self._flip = 0
        self._spans: list[tuple[str, Any, Any]] = []
        self._probed: dict[int, int] = {}  # slot -> thinking length at its last probe (a pause seen again waits)
        _register_attention()

    @staticmethod
    def default_sync_every(device: torch.device) -> int:
        """Steps per chunk: 16 on a GPU; on a CPU every step is a sync anyway, so publish (and admit) after each."""
        return 16 if device.type == "cuda" else 1

    def reset_stats(self) -> None:
        """Zero the counters: decode steps, decode/prefill seconds, rows, tokens and busy slot-steps."""
        self.stats = {"steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "rows": 0, "tokens": 0, "slot_steps": 0,
                      "busy_slot_steps": 0}

    @property
    def idle(self) -> bool:
        """No row holds a slot and nothing is left to publish."""
        return not self.owner and self._pending is None

    # -- the engine core's hooks -----------------------------------------------------------------------

    @torch.inference_mode()  # a new workspace's tensors and captured steps must be made in inference mode
    def room(self, waiting: Sequence[Row]) -> int:
        """Free slots; when idle, first a workspace that fits every waiting row."""
        if self.idle:
            if not waiting:
                return 0
            self._choose_workspace(waiting)
        return self.ws.slots - len(self.owner)

    def fits(self, row: Row) -> bool:
        """Whether ``row`` fits the workspace (its length, and a captured step for its sampling); a row that does
        not waits until the decoder is idle and picks a bigger one."""
        sample = row.request.sampling.temperature > 0
        return self._need(row) <= self.ws.length and (not self.use_graphs or sample in self.ws.graphs)

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` into free slots (``room`` and ``fits`` said they fit)."""
        ws = self.ws
        slots = [s for s in range(ws.slots) if s not in self.owner][: len(rows)]
        with self._attention(), self._timed("prefill_s"):
            self._prefill(ws, slots, rows, max(len(r.prepared.prompt_ids) for r in rows))
        for s, r in zip(slots, rows):
            r.slot = s
            self.owner[s] = r
            self.host[s] = Trace()

    @torch.inference_mode()
    def decode(self) -> list[StepOutput]:
        """Run one chunk, publish the previous one (see the class)."""
        if self.idle:
            return []
        ws = self.ws
        with self._attention():
            chunk = None
            if self.owner:
                sample = any(r.request.sampling.temperature > 0 for r in self.owner.values())
                with self._timed("decode_s"):
                    ws.run_chunk(sample)
                chunk = _Chunk(ws, self.owner, self._pinned_buffer(ws) if self.device.type == "cuda" else None)
                self.stats["steps"] += ws.k
                self.stats["slot_steps"] += ws.slots * ws.k
                self.stats["busy_slot_steps"] += len(self.owner) * ws.k  # an upper bound: rows end inside
        previous, self._pending = (self._pending, chunk) if self.pipeline else (chunk, None)
        # Outside the slot attention: early-exit probes run on the model as it is.
        return self._publish(ws, previous) if previous is not None else []

    def reset(self) -> None:
        """Forget every row (after a failure); the next admission starts from an idle workspace."""
        self.owner.clear()
        self.host.clear()
        self._pending = None

    @torch.inference_mode()
    def cancel(self, row: Row) -> None:
        """Free ``row``'s slot now; it emits nothing from the next chunk on."""
        self.ws.tb.free(row.slot)
        self.owner.pop(row.slot, None)
        self.host.pop(row.slot, None)

    @torch.inference_mode()
    def stop_thinking(self, row: Row) -> None:
        """Close ``row``'s thinking at its next step, as ``BudgetState.stop_thinking`` does."""
        self.ws.tb.stop_thinking(row.slot)

    def step(self, queue: deque[Row]) -> list[Row]:
        """One step without an engine core (benchmarks and tests): admit from ``queue``, decode, apply the outputs
        to the rows' traces; the rows that published tokens or ended (those are marked done)."""
        take = admit_from(queue, self.room(queue), self.fits) if queue else []
        if take:
            self.admit(take)
        rows = []
        for out in self.decode():
            apply(out)
            if out.row.trace.finish_reason is not None:
                out.row.done, out.row.slot = True, None
            rows.append(out.row)
        return rows

    def run(self, rows: Sequence[Row]) -> None:
        """Decode token-id rows to the end without an engine core (benchmarks and tests): fills ``row.trace``."""
        queue, left = deque(rows), set(rows)
        while left:
            left.difference_update(r for r in self.step(queue) if r.done)

    # -- inside ------------------------------------------------------------------------------------------

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

    @contextmanager
    def _timed(self, stat: str) -> Iterator[None]:
        """Add the block's device time to ``stats[stat]``: at once on a CPU, through CUDA events (read once they
        completed, at a later publish) on a GPU, so that timing never makes the host wait."""
        if self.device.type != "cuda":
            t = time.perf_counter()
            yield
            self.stats[stat] += time.perf_counter() - t
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._spans.append((stat, start, end))

    def _read_spans(self) -> None:
        keep = []
        for stat, start, end in self._spans:
            if end.query():
                self.stats[stat] += start.elapsed_time(end) / 1e3
            else:
                keep.append((stat, start, end))
        self._spans = keep

    def _pinned_buffer(self, ws: _Workspace) -> torch.Tensor:
        """One of two pinned host buffers for snapshots, taken in turn (one may still be read)."""
        if not self._pinned or self._pinned[0].shape != ws.snap.shape:
            self._pinned = [torch.empty(ws.snap.shape, dtype=ws.snap.dtype).pin_memory() for _ in range(2)]
        self._flip ^= 1
        return self._pinned[self._flip]

    def _choose_workspace(self, queue: Sequence[Row], sample: set[bool] | None = None) -> None:
        """A workspace every queued row fits (at the fixed length, if one was set), with the graphs it needs."""
        if self.length is not None:
            length, slots = self.length, self.slots
        else:
            slots = min(self.slots, len(queue))
            if self.use_graphs:  # power-of-two slot counts: fewer shapes to capture (and compile) across calls
                slots = min(self.slots, 1 << (slots - 1).bit_length())
            # A row runs on for up to two chunks after it ended (the host learns of it a chunk late); decode
            # attends over every column in use, so length costs bandwidth; rounded so that shapes, and so
            # captured (compiled) graphs, repeat across calls.
            need = max(self._need(r) for r in queue)
            grain = 512 if self.compile else 64  # coarser when every new length means a new compile
            length = -(-need // grain) * grain
        key = (slots, length, self.forcing)
        ws = self._ws.get(key)
        if ws is None:
            if len(self._ws) >= 2:  # keep memory bounded: drop the oldest shape
                self._ws.pop(next(iter(self._ws)))
            ws = self._ws[key] = _Workspace(self, slots, length)
        self.ws = ws
        ws.mask.fill_(ws.neg)
        for s in range(ws.slots):
            ws.tb.free(s)
        if self.use_graphs:
            wanted = sample if sample is not None else {False} | {r.request.sampling.temperature > 0 for r in queue}
            with self._attention():
                for flag in wanted - ws.graphs.keys():
                    ws.capture(flag)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """With a fixed ``length``: make the workspace and capture both steps (greedy and sampling) now, so that a
        server takes any request at once, never waiting for an idle moment to capture."""
        if self.length is None or not self.idle:
            raise RuntimeError("warm_up needs a fixed length and an idle decoder")
        self._choose_workspace([], sample={False, True})

    def _need(self, row: Row) -> int:
        return len(row.prepared.prompt_ids) + max_new_tokens(row) + 2 * self.sync_every

    def _prefill(self, ws: _Workspace, slots: list[int], rows: list[Row], width: int) -> None:
        """Run the prompts of ``rows`` (left-padded to ``width``) into columns [0, width) of ``slots``."""
        dev = self.device
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            p = r.prepared.prompt_ids
            ids[i, width - len(p):] = torch.tensor(p)
            valid[i, width - len(p):] = True
        ids, valid = _on(dev, ids), _on(dev, valid)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill(~allowed, ws.neg).unsqueeze(1)
        layers, kv, head_dim, _ = _model_dims(self.model)
        tmp = SlotCache(layers, n, kv, width, head_dim, self.dtype, dev)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, tmp))
        idx = _on(dev, torch.tensor(slots))
        for layer in range(layers):
            ws.kv.keys[layer][idx, :, :width] = tmp.keys[layer]
            ws.kv.values[layer][idx, :, :width] = tmp.values[layer]
        row_mask = torch.full((n, ws.length), ws.neg, dtype=self.dtype, device=dev)
        row_mask[:, :width] = torch.where(valid, 0.0, ws.neg).to(self.dtype)
        ws.mask[idx] = row_mask.view(n, 1, 1, -1)
        ws.logits[idx] = out.logits[:, -1].float()
        ws.pos[idx] = valid.long().sum(-1)
        ws.kv.col[idx] = width
        sp = [r.request.sampling for r in rows]
        ws.temp[idx] = _on(dev, torch.tensor([s.temperature for s in sp], dtype=torch.float32))
        ws.top_k[idx] = _on(dev, torch.tensor([s.top_k for s in sp], dtype=torch.long))
        ws.top_p[idx] = _on(dev, torch.tensor([s.top_p for s in sp], dtype=torch.float32))
        for s, r in zip(slots, rows):
            ws.tb.load(s, r.request.policy, r.prepared.tokens, r.prepared.cap)


    def _publish(self, ws: _Workspace, chunk: _Chunk) -> list[StepOutput]:
        """Each slot's emitted tokens, kinds and counters as its row's output; end the rows that finished and free
        their slots."""
        snap = chunk.wait()
        self._read_spans()
        k = ws.k
        outputs: list[StepOutput] = []
        paused: list[tuple[int, Row]] = []
        for s, row in chunk.owners.items():
            if row.done or row.slot != s:  # cancelled since the chunk was launched
                continue
            vals = snap[s]
            emitted = [(tok, kind) for tok, kind in zip(vals[:k], vals[k : 2 * k]) if kind != NONE]  # NONE: idle
            tokens, kinds = [t for t, _ in emitted], [c for _, c in emitted]
            phase, finish, waits_used, hit_cap = vals[2 * k :]
            host = self.host[s]
            if not self.forcing:  # plain decoding ends at the budget
                tokens = tokens[: max(max_new_tokens(row) - len(host.token_ids), 0)]
                kinds = kinds[: len(tokens)]
                if len(host.token_ids) + len(tokens) >= max_new_tokens(row):
                    phase, finish = P_DONE, F_LENGTH
                    ws.tb.free(s)
            host.record(tokens, kinds)
            if phase == P_PAUSE and self._probed.get(s) != len(host.thinking_ids):
                paused.append((s, row))  # at an early-exit probe point: probe, then release it
            end = None
            if phase == P_DONE:
                end = FinishReason.STOP if finish == F_STOP else FinishReason.LENGTH
                self.owner.pop(s, None)
                self._probed.pop(s, None)
                self.stats["rows"] += 1
                self.stats["tokens"] += len(host.token_ids)
            if tokens or end is not None:
                counts = Counts(waits_used, bool(hit_cap), host.early_exit, host.probe_tokens)
                outputs.append(StepOutput(row, tokens, kinds, counts, end))
            if end is not None:
                del self.host[s]
        if paused:
            self._probe(ws, paused)
        return outputs

    def _probe(self, ws: _Workspace, paused: list[tuple[int, Row]]) -> None:
        """Probe rows paused at an early-exit point (one batch, from copies of their slots' K/V), apply the rule,
        and release each slot: go on with its held token, or close its thinking now."""
        from .probe import Probe, run_probes

        probes = []
        for s, row in paused:
            t, tokens = self.host[s], row.prepared.tokens
            ends_nl = tokens.ends_with_newline(t.thinking_ids[-1]) if t.thinking_ids else tokens.prompt_ends_with_newline
            opener, prefix = tokens.cap_close_ids(ends_nl)
            cols = (ws.mask[s, 0, 0] == 0).nonzero().squeeze(1)  # the columns the row attends to
            past = [(ws.kv.keys[i][s][:, cols], ws.kv.values[i][s][:, cols]) for i in range(len(ws.kv.keys))]
            position = len(row.prepared.prompt_ids) + len(t.token_ids)
            probes.append(Probe(past, position, opener + prefix, len(opener),
                                row.request.policy.early_exit.probe_tokens, tokens.end_ids))
        for (s, row), res in zip(paused, run_probes(self.model, self.tokenizer, probes, self.pad_id)):
            t = self.host[s]
            self._probed[s] = len(t.thinking_ids)
            ws.tb.release(s, t.record_probe(row.request.policy.early_exit, res.answer, res.confidence, res.tokens))
