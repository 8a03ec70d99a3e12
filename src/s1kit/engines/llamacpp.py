"""In-process llama.cpp engine (``--engine llamacpp``): GGUF weights stay quantized, rows decode together.

An engine core (``core.py``) over llama.cpp's C API as llama-cpp-python exposes it: each row is one llama.cpp
sequence (``seq_id`` = its slot) in one context, and every step is one ``llama_decode`` of a batch holding one
token per decoding row (a joining row's whole prompt rides in the same batch). The model proposes a token per row
from its logits (greedy argmax, or a seeded draw per row with temperature / top-k / top-p), and the row's
``BudgetState`` says what to emit, as in the plain loop (``hf.py``). A finished row's sequence is removed from the
KV cache and its slot taken by the next queued row.

Memory: the context holds ``n_ctx`` KV cells shared by every sequence (llama.cpp's unified KV cache); a row is
admitted only when the cells its prompt and its longest possible generation need are free (``_fits``), so a
decode never runs out of cells. An early-exit probe decodes the answer opener and prefix and a greedy answer on
the row's own sequence, past its last token, then removes those cells (``llama_memory_seq_rm`` from its position
on): the row goes on as if nothing was decoded.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..budget import BudgetState, FinishReason
from ..errors import RequestError, S1KitError
from ..forcing import ForcingCompiler
from .core import EngineCore, HostPlace, Row, StepOutput
from .probe import normalized_answer


def _lib() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise S1KitError("the llamacpp engine needs llama-cpp-python: pip install 's1kit[cpu]' "
                         "(docs/install.md: prebuilt or built from source)") from None
    return llama_cpp


_QUIET: Any = None  # the no-op log callback, kept alive as long as llama.cpp may call it


def _silence(L: Any) -> None:
    """Route llama.cpp's log lines (hundreds per load) to nowhere."""
    global _QUIET
    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer inside a GGUF file. Building it takes transformers ~10 s for a 150K vocabulary, so it is saved
    under ``$S1KIT_CACHE/tokenizers`` (keyed by the file's path, size and modification time) and read from there."""
    import hashlib

    from transformers import AutoTokenizer

    from ..models import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    saved = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (saved / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tmp = saved.with_name(saved.name + f".tmp-{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, saved)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _Seq(HostPlace):
    """A row's sequence: its slot (= seq_id), the next position, its budget machine and its sampling generator."""

    def __init__(self, slot: int, state: BudgetState, rng: np.random.Generator | None) -> None:
        super().__init__(state)
        self.slot, self.pos, self.rng = slot, 0, rng
        self.cells = 0  # KV cells reserved for it


class LlamaCppEngine(EngineCore):
    """Budget forcing with llama.cpp in this process, on a GGUF file (see the module docstring).

    ``batch_size`` rows decode together; ``n_ctx`` KV cells are shared by them (default: ``batch_size`` times
    ``max_model_len``, itself the model's context or 4,096, whichever is smaller); ``threads`` defaults to the
    machine's cores."""

    def __init__(self, gguf: str | Path, tokenizer: Any, batch_size: int = 8, threads: int | None = None,
                 max_model_len: int | None = None, n_ctx: int | None = None, unified: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L = self._L = _lib()
        _silence(L)
        L.llama_backend_init()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise S1KitError(f"llama.cpp could not load {gguf}")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        trained = L.llama_model_n_ctx_train(self.model)
        self.max_context = min(trained, max_model_len or 4096) if trained > 0 else (max_model_len or 4096)
        eos = [t for t in (L.llama_vocab_eos(vocab), L.llama_vocab_eot(vocab)) if t >= 0]
        self.compile = ForcingCompiler(tokenizer, eos)
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx or batch_size * self.max_context
        p.n_batch = p.n_ubatch = max(512, batch_size)
        p.n_seq_max = batch_size
        # unified: one pool of cells that a long row and a short one share as they need; else n_ctx / batch_size
        # cells for each sequence, attended apart
        p.kv_unified = unified
        self.unified = unified
        p.n_threads = p.n_threads_batch = threads or os.cpu_count() or 1
        p.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, p)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise S1KitError(f"llama.cpp could not make a context of {p.n_ctx} cells for {gguf}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.seq_cells = self.n_ctx if unified else self.n_ctx // batch_size  # the most one sequence may hold
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch = p.n_batch
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._free_slots = list(range(batch_size))
        self._rows: list[Row] = []  # decoding, in slot order of admission
        self._logits: dict[int, np.ndarray] = {}  # slot -> logits of its next token
        self.used_cells = 0

    @classmethod
    def load(cls, ref: str, batch_size: int = 8, threads: int | None = None,
             max_model_len: int | None = None) -> "LlamaCppEngine":
        """Load a bundled name or a ``.gguf`` file (its tokenizer read from the GGUF itself, once: then cached)."""
        from ..models import gguf_file

        path = gguf_file(ref)
        return cls(path, _gguf_tokenizer(path), batch_size=batch_size, threads=threads, max_model_len=max_model_len)

    def close(self) -> None:
        """Free the context and the model."""
        L = self._L
        if getattr(self, "ctx", None):
            L.llama_batch_free(self._batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- the engine core's hooks -----------------------------------------------------------------------

    def _cells(self, row: Row) -> int:
        p, policy = row.prepared, row.request.policy
        cap = p.cap if p.cap is not None else self.max_context
        probe = p.tokens.max_closing_len + policy.early_exit.probe_tokens if policy.early_exit else 0  # a probe's branch
        return len(p.prompt_ids) + cap + policy.cap_grace + p.tokens.max_closing_len + policy.max_answer_tokens + 1 \
            + probe

    def _room(self, waiting: Sequence[Row]) -> int:
        return len(self._free_slots)

    def _fits(self, row: Row) -> bool:
        need = self._cells(row)
        if need > self.seq_cells:  # it would never fit: let it in alone rather than wait forever (the context ends it)
            return not self._rows
        return not self.unified or self.used_cells + need <= self.n_ctx

    def _admit(self, rows: list[Row]) -> None:
        """Give each row a sequence; its prompt is decoded with the next step's batch."""
        for r in rows:
            p = r.prepared
            greedy = r.request.sampling.greedy
            seq = _Seq(self._free_slots.pop(0), BudgetState(r.request.policy, p.tokens, p.cap),
                       None if greedy else np.random.default_rng(r.seed))
            seq.cells = min(self._cells(r), self.seq_cells)
            self.used_cells += seq.cells
            r.slot = seq
            self._rows.append(r)

    def _decode(self) -> list[StepOutput]:
        """One step: the model proposes for every row with logits, each row's machine emits, one batch decodes what
        was emitted (and the prompts of rows that joined)."""
        if not self._rows:
            return []
        feed: list[tuple[_Seq, list[int]]] = []
        stepped: set[Row] = set()
        for r in list(self._rows):
            seq: _Seq = r.slot
            logits = self._logits.get(seq.slot)
            if logits is None:  # joined: its prompt goes in this batch
                feed.append((seq, list(r.prepared.prompt_ids)))
                continue
            st = seq.state
            proposed = self._propose(r, seq, logits)
            if proposed is None:
                continue  # failed alone (reported below)
            if st.probe_due(proposed):
                self._probe(r, seq)
            token = st.step(proposed)
            stepped.add(r)
            if not st.done:
                feed.append((seq, [token]))
        outputs = [r.slot.output(r) for r in list(self._rows) if r in stepped or r.slot.error is not None]
        for out in outputs:
            if out.finish is not None or out.error is not None:
                self._release(out.row)
        if feed:
            self._run(feed)
        return outputs

    def _cancel(self, row: Row) -> None:
        self._release(row)

    def _stop_thinking(self, row: Row) -> None:
        row.slot.state.stop_thinking()

    # -- inside ------------------------------------------------------------------------------------------

    def _release(self, row: Row) -> None:
        seq: _Seq = row.slot
        if row in self._rows:
            self._rows.remove(row)
            self._L.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
            self._logits.pop(seq.slot, None)
            self._free_slots.append(seq.slot)
            self.used_cells -= seq.cells

    def _propose(self, row: Row, seq: _Seq, logits: np.ndarray) -> int | None:
        if seq.rng is None or seq.state.next_is_forced:
            return int(logits.argmax())
        sp = row.request.sampling
        x = logits.astype(np.float64) / sp.temperature
        if sp.top_k:
            kth = np.partition(x, -sp.top_k)[-sp.top_k]
            x = np.where(x < kth, -np.inf, x)
        x -= x.max()
        probs = np.exp(x)
        total = probs.sum()
        if not np.isfinite(total) or total <= 0:
            seq.error = RequestError("cannot sample: the next-token distribution is not finite (NaN or inf logits at "
                                     f"temperature {sp.temperature})")
            seq.state.end(FinishReason.ERROR)
            return None
        probs /= total
        if sp.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of better tokens: keep while below top_p
            cut = np.zeros_like(probs)
            keep = order[before < sp.top_p]
            cut[keep] = probs[keep]
            probs = cut / cut.sum()
        return int(seq.rng.choice(len(probs), p=probs))

    def _run(self, feed: list[tuple[_Seq, list[int]]], keep_logits: bool = True) -> dict[int, np.ndarray]:
        """Decode ``(sequence, tokens)`` pairs in batches of at most ``n_batch`` tokens; each sequence's logits after
        its last token (stored as its next proposal's unless ``keep_logits`` is False; returned either way)."""
        L, b = self._L, self._batch
        got: dict[int, np.ndarray] = {}
        pending = [(seq, toks, i) for seq, toks in feed for i in range(0, len(toks), self.n_batch)]
        while pending:
            n, last, part = 0, {}, []
            while pending and n + min(len(pending[0][1]) - pending[0][2], self.n_batch) <= self.n_batch:
                seq, toks, start = pending.pop(0)
                chunk = toks[start : start + self.n_batch]
                for j, t in enumerate(chunk):
                    b.token[n] = t
                    b.pos[n] = seq.pos + j
                    b.n_seq_id[n] = 1
                    b.seq_id[n][0] = seq.slot
                    b.logits[n] = 0
                    n += 1
                seq.pos += len(chunk)
                if start + len(chunk) == len(toks):
                    b.logits[n - 1] = 1
                    last[seq.slot] = n - 1
                part.append(seq)
            b.n_tokens = n
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise S1KitError(f"llama_decode failed ({rc}) on {n} tokens; the KV cache holds {self.n_ctx} cells")
            for slot, i in last.items():
                got[slot] = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
        if keep_logits:
            self._logits.update(got)
        return got

    def _probe(self, row: Row, seq: _Seq) -> None:
        """An early-exit probe of ``row`` now: the answer opener and prefix and a greedy answer decoded on its own
        sequence past its last token, then those cells removed; the result goes to its machine."""
        L, st = self._L, seq.state
        ee = row.request.policy.early_exit
        start = seq.pos
        try:
            opener, prefix = st.probe_suffix()
            logits = self._run([(seq, list(opener) + list(prefix))], keep_logits=False)[seq.slot]
            answer, probs = [], []
            end = row.prepared.tokens.end_ids
            for _ in range(ee.probe_tokens):
                p = np.exp(logits - logits.max())
                tok = int(p.argmax())
                probs.append(float(p[tok] / p.sum()))
                if tok in end:
                    break
                answer.append(tok)
                if len(answer) == ee.probe_tokens:
                    break
                logits = self._run([(seq, [tok])], keep_logits=False)[seq.slot]
        finally:
            L.llama_memory_seq_rm(self.mem, seq.slot, start, -1)
            seq.pos = start
        text = self.tokenizer.decode(list(prefix) + answer, skip_special_tokens=True)
        st.observe_probe(normalized_answer(text), sum(probs) / len(probs) if probs else 0.0,
                         len(opener) + len(prefix) + len(probs))
