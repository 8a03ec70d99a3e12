"""The vLLM processor's core in plain torch: one ``BudgetState`` per request over vLLM's persistent batch.

No vLLM import here, so the CPU tests drive exactly this code. A logits processor can only mask logits, so
each step (``apply``) every row with a budget gets one of three treatments:

- its next token is **forced** (a Wait being spelled out, the answer opener, the cap's closing, the answer
  prefix, or the end token once the machine is done): every other logit goes to -inf;
- it **thinks freely**: the processor draws the model's proposal itself, from the row's distribution as
  vLLM's sampler defines it (``sampling.py``); a drawn stop becomes what ``BudgetState`` emits for a stop
  (the Wait's first token, or the opener's), anything else stays, and that one token is left finite. This
  is s1's distribution exactly: a stop is replaced with the probability the model gives it;
- it **answers freely**: untouched; vLLM samples.

The machine learns what was emitted from vLLM's live ``output_tok_ids`` list at the next step and is fed
the proposal behind it (the drawn token, which may be a stop, or the sampled one); if its emission differs
from what vLLM emitted, the row is reported in the log and ended. A step whose token vLLM discards (a
partial prefill) simply adds nothing to the list. Rows that vLLM takes out of the batch unfinished (not
scheduled, preempted) keep their state, keyed by the request's ``SamplingParams`` object, until re-added.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..budget import BudgetPolicy, BudgetState, ForcingTokens, Phase
from ..forcing import ForcingCompiler, context_cap
from ..errors import S1KitError
from .replay import replay
from .sampling import RowSampling, draw, uniform
from .xargs import from_xargs, wants_forcing

log = logging.getLogger("s1kit.vllm")

FREE, FORCED, DRAWN = 0, 1, 2  # what the processor did to a row at the last step


@dataclass(frozen=True)
class RequestParams:
    """What the core reads from one request (vLLM's ``SamplingParams`` carries all of it)."""

    extra_args: dict | None
    sampling: RowSampling = RowSampling()
    seed: int | None = None
    max_tokens: int | None = None
    ending_ids: frozenset[int] = frozenset()  # tokens on which vLLM ends this request (EOS, stop_token_ids)
    penalties: tuple[float, float, float] = (0.0, 0.0, 1.0)  # presence, frequency, repetition


def check_request(params: RequestParams) -> tuple[BudgetPolicy, Any] | None:
    """The request's (policy, format), None without ``s1_`` fields; ``ValueError`` for what forcing cannot honour."""
    if not wants_forcing(params.extra_args):
        return None
    policy, fmt = from_xargs(params.extra_args)
    presence, frequency, repetition = params.penalties
    if presence or frequency or repetition != 1.0:
        raise ValueError(
            "s1 budget forcing draws thinking tokens from the logits before vLLM's penalties, so it cannot honour "
            f"presence_penalty={presence}, frequency_penalty={frequency}, repetition_penalty={repetition}: send "
            "presence_penalty 0, frequency_penalty 0, repetition_penalty 1 (the server may default to the model's "
            "generation_config.json; `vllm serve --generation-config vllm` turns that off)")
    return policy, fmt


class _Row:
    """One request's budget state and what the processor did to it at the last step."""

    __slots__ = ("key", "state", "out", "fed", "proposals", "plan", "slot", "drawn", "sampling", "seed", "end_id",
                 "stop_id", "error", "script")

    def __init__(self, key: Any, state: BudgetState | None, out: list[int], sampling: RowSampling, seed: int,
                 end_id: int | None) -> None:
        self.key, self.state, self.out, self.sampling, self.seed, self.end_id = key, state, out, sampling, seed, end_id
        self.fed = 0  # output tokens the machine has consumed
        self.proposals: list[int] | None = []  # the proposal behind each (to rebuild the machine); None: unknown
        self.plan, self.slot, self.drawn = FREE, -1, None
        self.stop_id = min(state.tokens.stop_ids) if state is not None else -1
        self.error: str | None = None
        self.script: list[int] = []  # tokens forced after an error (its message, then the end token)


class _Readback:
    """One step's drawn proposals, copied to the host without waiting; rows keep the step they were drawn in."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._ready: Any = None
        self._list: list[int] | None = None

    def start(self, proposals: torch.Tensor, asynchronous: bool) -> None:
        """Begin copying ``proposals`` to the host."""
        self._host = proposals.to("cpu", non_blocking=asynchronous)
        if asynchronous:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def get(self, slot: int) -> int:
        """The proposal drawn for ``slot`` (waits for the copy the first time: by then vLLM has synced anyway)."""
        if self._list is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._list = self._host.tolist()
        return self._list[slot]


class BudgetRows:
    """Budget forcing for the rows of one vLLM persistent batch (the processor minus vLLM's interface)."""

    def __init__(self, tokenizer: Any, max_model_len: int | None, device: torch.device | str = "cpu",
                 seed: int = 0, parked: int = 4096) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.device = torch.device(device)
        self.rows: dict[int, _Row] = {}
        self._parked: OrderedDict[int, _Row] = OrderedDict()  # id(key) -> row taken out unfinished
        self._parked_max = parked
        self._compilers: dict[frozenset[int], ForcingCompiler] = {}
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for unseeded requests, equal on every rank
        self._pinned = self.device.type == "cuda"

    # -- the persistent batch -----------------------------------------------------------------------------

    def add(self, index: int, key: Any, params: RequestParams, prompt_ids: Sequence[int] | None,
            out: list[int]) -> None:
        """A request took row ``index``: start (or resume) its machine; ``out`` is vLLM's live output list."""
        self.remove(index)  # vLLM reuses a freed index without listing it as removed
        row = self._parked.pop(id(key), None)
        if row is not None and row.key is key:
            row.out = out
            self.rows[index] = row
            return
        try:
            checked = check_request(params)
        except ValueError as e:  # validate_params normally refused it already (HTTP 400)
            checked, problem = None, str(e)
        else:
            problem = None
            if checked is None:
                return  # not ours: vLLM decodes it untouched
        seed = params.seed if params.seed is not None else int(torch.randint(1 << 62, (1,), generator=self._seeds))
        end_id = self._end_id(params.ending_ids)
        state = None
        if problem is None:
            try:
                state = self._machine(*checked, params, len(prompt_ids or ()))
            except (ValueError, S1KitError) as e:
                problem = str(e)
        if state is not None and out:  # back after its state was dropped: rebuild it from the tokens
            log.warning("s1kit: a request came back with %d output tokens after its state was dropped; "
                        "rebuilding it from them", len(out))
            try:
                state = replay(out, state.policy, state.tokens, state.cap).state
            except S1KitError as e:
                problem = str(e)
        row = _Row(key, state, out, params.sampling, seed, end_id)
        if out:
            row.fed, row.proposals = len(out), None
        if problem is not None:
            self._fail(row, problem)
        self.rows[index] = row

    def remove(self, index: int) -> None:
        """Row ``index`` left the batch (finished, or not scheduled this step: then it may come back)."""
        row = self.rows.pop(index, None)
        if row is not None:
            self._park(row)

    def _park(self, row: _Row) -> None:
        self._parked[id(row.key)] = row
        while len(self._parked) > self._parked_max:
            self._parked.popitem(last=False)

    def move(self, a: int, b: int, swap: bool) -> None:
        """vLLM moved row ``a`` to ``b`` (``swap``: and ``b`` to ``a``)."""
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if rb is not None:
            if swap:
                self.rows[a] = rb
            else:
                self._park(rb)

    # -- compiling a request ------------------------------------------------------------------------------

    def _end_id(self, ending: frozenset[int]) -> int | None:
        eos = self.tokenizer.eos_token_id
        return eos if eos in ending else (min(ending) if ending else None)

    def _machine(self, policy: BudgetPolicy, fmt: Any, params: RequestParams, prompt_len: int) -> BudgetState:
        ending = params.ending_ids
        if not ending:
            raise ValueError("the request has no token that ends it (ignore_eos without stop_token_ids), so the "
                             "answer budget cannot end it")
        compiler = self._compilers.get(ending)
        if compiler is None:  # vLLM's ending tokens end thinking (as stops) and the answer, as in the s1 loop
            compiler = self._compilers[ending] = ForcingCompiler(self.tokenizer, sorted(ending))
        tokens = compiler(fmt, policy)
        forced = {*tokens.opener_ids, *tokens.newline_ids, *tokens.prefix_ids, *(t for w in tokens.wait_ids for t in w)}
        if forced & ending:
            bad = sorted(forced & ending)
            raise ValueError(f"forced token(s) {bad} ({self.tokenizer.decode(bad)!r}) would end the request: they are "
                             "among its stop tokens; drop them from stop_token_ids")
        return BudgetState(policy, tokens, self._cap(policy, tokens, params, prompt_len))

    def _cap(self, policy: BudgetPolicy, tokens: ForcingTokens, params: RequestParams, prompt_len: int) -> int | None:
        """The thinking cap lowered so that thinking, closing, answer and the end token fit ``max_tokens``."""
        limit = params.max_tokens
        if self.max_model_len is not None:
            room = self.max_model_len - prompt_len
            limit = room if limit is None else min(limit, room)
        if limit is None:
            return policy.max_thinking_tokens
        try:
            return context_cap(policy, tokens, 0, limit - 1)
        except S1KitError:
            raise ValueError(f"max_tokens={limit} leaves no room to answer: budget forcing needs max_tokens >= "
                             f"{tokens.max_closing_len} (closing) + s1_max_answer_tokens ({policy.max_answer_tokens}) "
                             "+ 1") from None

    def _fail(self, row: _Row, problem: str) -> None:
        """Refuse a row: log why, write the reason as its output and end it (a budget is never silently dropped)."""
        log.error("s1kit budget forcing refused a request: %s", problem)
        row.error = problem
        row.script = self.tokenizer.encode(f"[s1kit budget forcing refused this request: {problem}]",
                                           add_special_tokens=False)
        if row.end_id is not None:
            row.script.append(row.end_id)
        row.script.reverse()  # popped from the end

    # -- one decode step ----------------------------------------------------------------------------------

    def _sync(self, row: _Row) -> None:
        """Feed the machine the tokens vLLM emitted since the last step, checking each against its own."""
        out, n = row.out, len(row.out)
        if n < row.fed:  # vLLM dropped tokens (a failed KV load): rebuild the machine from its proposals
            state = row.state
            if row.proposals is None:  # unknown since a rebuild: read them from the tokens again
                row.state, row.fed = replay(out, state.policy, state.tokens, state.cap).state, n
            else:
                proposals = row.proposals[:n]
                row.state, row.fed, row.proposals = BudgetState(state.policy, state.tokens, state.cap), 0, []
                for p in proposals:
                    self._feed(row, p, out[row.fed])
        if n == row.fed:
            row.plan = FREE  # nothing new: vLLM discarded last step's token (a partial prefill)
            return
        first = True
        while row.fed < n and row.error is None:
            emitted = out[row.fed]
            if emitted < 0:  # a placeholder of async scheduling (vLLM fills these in before sampling)
                break
            proposal = emitted
            if first and row.plan == DRAWN:
                proposal = row.drawn.get(row.slot)
            first = False
            self._feed(row, proposal, emitted)
        row.plan = FREE

    def _feed(self, row: _Row, proposal: int, emitted: int) -> None:
        state = row.state
        row.fed += 1
        if state.done:
            return  # the end token forced after the machine finished
        expected = state.step(proposal)
        if row.proposals is not None:
            row.proposals.append(proposal)
        if expected != emitted:
            self._fail(row, f"vLLM emitted token {emitted} where budget forcing emits {expected} (output position "
                            f"{row.fed - 1}); another logits processor may have overridden this one")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` ``[batch, V]`` (rows = persistent-batch indices) for this step; returns them."""
        forced_rows, forced_ids, draw_rows, draw_repl, draw_stops, draw_sampling, draw_u = [], [], [], [], [], [], []
        readback = _Readback()
        for index, row in self.rows.items():
            if row.error is None:
                self._sync(row)
            if row.error is not None:
                if row.script:
                    forced_rows.append(index)
                    forced_ids.append(row.script.pop() if len(row.script) > 1 else row.script[0])
                continue
            state = row.state
            if state.done:
                if row.end_id is not None:
                    forced_rows.append(index)
                    forced_ids.append(row.end_id)
                row.plan = FORCED
            elif state.next_is_forced:
                forced_rows.append(index)
                forced_ids.append(state.peek(-1))
                row.plan = FORCED
            elif state.phase is Phase.THINK:
                row.plan, row.slot, row.drawn = DRAWN, len(draw_rows), readback
                draw_rows.append(index)
                draw_repl.append(state.peek(row.stop_id))
                draw_stops.append(state.tokens.stop_ids)
                draw_sampling.append(row.sampling)
                draw_u.append(0.0 if row.sampling.greedy else uniform(row.seed, len(row.out)))
        if not forced_rows and not draw_rows:
            return logits
        targets = [self._to_device(forced_ids)] if forced_rows else []
        if draw_rows:
            targets.append(self._draw(logits, draw_rows, draw_repl, draw_stops, draw_sampling, draw_u, readback))
        rows = self._to_device(forced_rows + draw_rows)
        logits.index_fill_(0, rows, float("-inf"))
        logits.index_put_((rows, torch.cat(targets)), torch.zeros((), device=logits.device))  # one finite logit
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[int], repl: list[int], stops: list[frozenset[int]],
              sampling: list[RowSampling], u: list[float], readback: _Readback) -> torch.Tensor:
        """Each freely thinking row's token: its drawn proposal, or what the machine emits for a stopping one."""
        idx = self._to_device(rows)
        width = max(len(s) for s in stops)
        stop_table = self._to_device([sorted(s) + [-1] * (width - len(s)) for s in stops])
        proposals = draw(logits.index_select(0, idx), sampling, self._to_device(u, torch.float64), self._to_device)
        is_stop = (proposals.unsqueeze(1) == stop_table).any(1)
        readback.start(proposals, self._pinned)  # read at the next step, when vLLM has emitted these rows
        return torch.where(is_stop, self._to_device(repl), proposals)

    def _to_device(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A host list on the device without blocking the host (pinned memory, asynchronous copy), as vLLM does."""
        t = torch.tensor(values, dtype=dtype, pin_memory=self._pinned)
        return t.to(self.device, non_blocking=self._pinned)


def rows_from_updates(core: BudgetRows, removed: Sequence[int], added: Sequence[tuple],
                      moved: Sequence[tuple[int, int, bool]], params_of: Callable[[Any], RequestParams]) -> None:
    """Apply one vLLM ``BatchUpdate`` (in vLLM's order: removed, added, moved) to ``core``."""
    for index in removed:
        core.remove(index)
    for index, params, prompt_ids, out in added:
        core.add(index, params, params_of(params), prompt_ids, out)
    for a, b, swap in moved:
        core.move(a, b, swap)
