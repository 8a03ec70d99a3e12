"""``BudgetState`` for a whole batch as tensors: the same transitions, no device→host sync per step.

The fast path keeps every row's budget state on the device so that a decode step (model forward, proposal,
forcing, bookkeeping) can be captured in one CUDA graph. Each row gets a small *script table*: the token
sequences the pure machine may force (the opener after an accepted stop, the two cap closings, each wait
string), so loading a forced sequence is a gather. ``tests/test_tensor_budget.py`` drives this and the pure
``BudgetState`` with the same proposals and requires identical emissions, counts and endings.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..budget import BudgetPolicy, BudgetState, ForcingTokens, Kind

# Kinds of emitted tokens (recorded per step; the host rebuilds thinking/answer texts from them): the codes
# of ``budget.Kind``, as plain ints for tensor ops.
THINK, OPENER, PREFIX, ANSWER, END, NONE = (int(k) for k in Kind)
# Phases, as in budget.Phase, plus PAUSE: held at an early-exit probe point until the host decides.
P_THINK, P_ANSWER, P_DONE, P_PAUSE = 0, 1, 2, 3
# Finish reasons.
F_NONE, F_STOP, F_LENGTH = 0, 1, 2
# Script rows: 0 = opener (accepted stop), 1 = cap closing after a newline, 2 = cap closing without one, 3+ = waits.
S_OPENER, S_CAP_NL, S_CAP, S_WAIT = 0, 1, 2, 3
NO_CAP = 1 << 40


def script_of(tokens: ForcingTokens) -> list[list[tuple[int, int]]]:
    """The forced sequences of one row as (token, kind) lists, in script-row order."""
    nl_close = tokens.cap_close_ids(True)
    close = tokens.cap_close_ids(False)
    return [
        [(t, OPENER) for t in tokens.opener_ids],
        [(t, OPENER) for t in nl_close[0]] + [(t, PREFIX) for t in nl_close[1]],
        [(t, OPENER) for t in close[0]] + [(t, PREFIX) for t in close[1]],
        *[[(t, THINK) for t in w] for w in tokens.wait_ids],
    ]


class TensorBudget:
    """Budget states of ``B`` slots on one device; rows are (re)loaded with ``load`` and stepped together."""

    def __init__(self, slots: int, device: torch.device | str, vocab_size: int, newline_table: torch.Tensor,
                 max_script: int = 64, max_scripts: int = 8, max_set: int = 8,
                 sentence_table: torch.Tensor | None = None) -> None:
        dev = torch.device(device)
        z = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=dev)  # noqa: E731
        self.slots, self.device = slots, dev
        self.ends_nl_table = newline_table.to(dev)  # [V] bool: does this token's text end with "\n"
        # [V] bool: does it end a sentence or a line (a cap's grace window closes there)
        self.boundary_table = (newline_table if sentence_table is None else sentence_table | newline_table).to(dev)
        self.grace, self.at_boundary = z(), z(torch.bool)
        # Early exit: probe every N thinking tokens (0: never) and/or before these word tokens; a probe point
        # pauses the slot (its proposal held) until the host resumes it or makes it exit.
        self.probe_every, self.probing, self.probed_at = z(), z(torch.bool), z() - 1
        self.word_set = torch.full((slots, 2 * max_set), -1, dtype=torch.long, device=dev)
        self.held, self.resume, self.exited = z(), z(torch.bool), z(torch.bool)
        self.phase = z() + P_DONE
        self.n_think, self.waits_used, self.n_answer = z(), z(), z()
        self.cap, self.min_think, self.num_waits, self.max_answer = z() + NO_CAP, z(), z(), z() + 1
        self.n_waits_strings = z() + 1
        self.hit_cap, self.ends_nl = z(torch.bool), z(torch.bool)
        self.finish = z()
        self.q_tok = torch.zeros(slots, max_script, dtype=torch.long, device=dev)
        self.q_kind = torch.zeros(slots, max_script, dtype=torch.long, device=dev)
        self.q_len, self.q_pos = z(), z()
        self.s_tok = torch.zeros(slots, max_scripts, max_script, dtype=torch.long, device=dev)
        self.s_kind = torch.zeros(slots, max_scripts, max_script, dtype=torch.long, device=dev)
        self.s_len = torch.zeros(slots, max_scripts, dtype=torch.long, device=dev)
        self.stop_set = torch.full((slots, max_set), -1, dtype=torch.long, device=dev)
        self.end_set = torch.full((slots, max_set), -1, dtype=torch.long, device=dev)
        self.vocab_size = vocab_size
        self._rows = torch.arange(slots, device=dev)

    # ---- host side: (re)initialise a slot ---------------------------------------------------------------
    def load(self, slot: int, policy: BudgetPolicy, tokens: ForcingTokens, cap: int | None) -> None:
        """Start slot ``slot`` afresh for one sequence (a small host→device write, not per step)."""
        scripts = script_of(tokens)
        if len(scripts) > self.s_tok.shape[1] or max(len(s) for s in scripts) > self.s_tok.shape[2]:
            raise ValueError("too many or too long wait strings / closing sequences for the fast path")
        if len(tokens.stop_ids) > self.stop_set.shape[1] or len(tokens.end_ids) > self.end_set.shape[1]:
            raise ValueError("too many stop or end tokens for the fast path")
        s_tok = torch.zeros(self.s_tok.shape[1:], dtype=torch.long)
        s_kind = torch.zeros_like(s_tok)
        s_len = torch.zeros(self.s_tok.shape[1], dtype=torch.long)
        for i, seq in enumerate(scripts):
            s_len[i] = len(seq)
            for j, (t, k) in enumerate(seq):
                s_tok[i, j], s_kind[i, j] = t, k
        stop = torch.full((self.stop_set.shape[1],), -1, dtype=torch.long)
        stop[: len(tokens.stop_ids)] = torch.tensor(sorted(tokens.stop_ids))
        end = torch.full((self.end_set.shape[1],), -1, dtype=torch.long)
        end[: len(tokens.end_ids)] = torch.tensor(sorted(tokens.end_ids))
        # One host->device copy, without a sync (pinned memory, in stream order): the fast path loads rows
        # between chunks while the GPU still decodes.
        if len(tokens.word_ids) > self.word_set.shape[1]:
            raise ValueError("too many early-exit word tokens for the fast path")
        words = torch.full((self.word_set.shape[1],), -1, dtype=torch.long)
        words[: len(tokens.word_ids)] = torch.tensor(sorted(tokens.word_ids), dtype=torch.long)
        packed = torch.cat([s_tok.flatten(), s_kind.flatten(), s_len, stop, end, words])
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        p_tok, p_kind, p_len, p_stop, p_end, p_words = packed.split([s_tok.numel(), s_kind.numel(), len(s_len),
                                                                     len(stop), len(end), len(words)])
        self.s_tok[slot], self.s_kind[slot] = p_tok.view_as(s_tok), p_kind.view_as(s_kind)
        self.s_len[slot], self.stop_set[slot], self.end_set[slot] = p_len, p_stop, p_end
        self.word_set[slot] = p_words
        cap = policy.max_thinking_tokens if cap is None else cap
        vals = {
            "phase": P_THINK, "n_think": 0, "waits_used": 0, "n_answer": 0, "finish": F_NONE,
            "cap": NO_CAP if cap is None else cap, "min_think": policy.min_thinking_tokens,
            "num_waits": policy.num_waits, "max_answer": policy.max_answer_tokens,
            "n_waits_strings": len(tokens.wait_ids), "q_len": 0, "q_pos": 0, "grace": policy.cap_grace,
            "probe_every": (policy.early_exit.every or 0) if policy.early_exit else 0, "probed_at": -1, "held": 0,
        }
        for name, v in vals.items():
            getattr(self, name)[slot] = v
        for name in ("hit_cap", "resume", "exited"):
            getattr(self, name)[slot] = False
        self.probing[slot] = policy.early_exit is not None
        self.ends_nl[slot] = self.at_boundary[slot] = tokens.prompt_ends_with_newline

    def release(self, slot: int, exit: bool) -> None:
        """The host's answer for a slot paused at a probe point: emit the held proposal and go on, or close
        thinking now as at a cap (without counting as a cap hit)."""
        if exit:
            self.exited[slot] = True
            self.phase[slot] = P_THINK
        else:
            self.resume[slot] = True

    def stop_thinking(self, slot: int) -> None:
        """Close the slot's thinking at its next step as ``BudgetState.stop_thinking`` does: the cap becomes the
        thinking so far (so a grace window still lets the sentence end). A device op in stream order: no sync."""
        self.cap[slot : slot + 1] = torch.minimum(self.cap[slot : slot + 1], self.n_think[slot : slot + 1])

    def free(self, slot: int) -> None:
        """Mark a slot unused (it emits nothing until loaded again)."""
        self.phase[slot] = P_DONE

    # ---- device side: one step for every slot, no host sync ---------------------------------------------
    def _load_script(self, mask: torch.Tensor, script: torch.Tensor) -> None:
        tok = self.s_tok[self._rows, script]
        kind = self.s_kind[self._rows, script]
        n = self.s_len[self._rows, script]
        m2 = mask.unsqueeze(1)
        self.q_tok.copy_(torch.where(m2, tok, self.q_tok))
        self.q_kind.copy_(torch.where(m2, kind, self.q_kind))
        self.q_len.copy_(torch.where(mask, n, self.q_len))
        self.q_pos.copy_(torch.where(mask, torch.zeros_like(self.q_pos), self.q_pos))

    def _at_queue_head(self, queue: torch.Tensor) -> torch.Tensor:
        """Each row's entry of ``queue`` at its read position (clamped: an empty queue's value is unused)."""
        return queue.gather(1, self.q_pos.clamp(max=queue.shape[1] - 1).unsqueeze(1)).squeeze(1)

    def step(self, proposed: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume proposals ``[B]``; return (emitted tokens, their kinds). Mirrors ``BudgetState.step`` (with the
        engine's early-exit probe check before it: a probe point pauses the slot instead of emitting)."""
        # A paused slot the host resumed emits its held proposal (it was not a stop, nor a probe point again).
        releasing = (self.phase == P_PAUSE) & self.resume
        proposed = torch.where(releasing, self.held, proposed)
        self.phase.copy_(torch.where(releasing, P_THINK, self.phase))
        self.resume.copy_(self.resume & ~releasing)
        live = (self.phase != P_DONE) & (self.phase != P_PAUSE)
        think = self.phase == P_THINK
        past_cap = self.n_think >= self.cap
        grace_over = (self.grace == 0) | self.at_boundary | (self.n_think >= self.cap + self.grace)
        closing_due = self.exited | (past_cap & grace_over)
        queued = self.q_pos < self.q_len
        head_kind = self._at_queue_head(self.q_kind)
        # A Wait being forced is cut short by the cap.
        cut = live & queued & (head_kind == THINK) & past_cap
        self.q_len.copy_(torch.where(cut, self.q_pos, self.q_len))
        queued = queued & ~cut
        free_think = live & ~queued & think
        is_stop = (proposed.unsqueeze(1) == self.stop_set).any(1)
        # THINK without a queue: the cap closes; a probe point pauses; a stop becomes a Wait or the opener;
        # anything else is thinking.
        capping = free_think & closing_due
        n = self.n_think
        at_every = (self.probe_every > 0) & (n > 0) & (n % self.probe_every.clamp(min=1) == 0)
        is_word = (proposed.unsqueeze(1) == self.word_set).any(1)
        pausing = (free_think & ~capping & ~is_stop & self.probing & (n >= self.min_think) & (n != self.probed_at)
                   & (at_every | is_word))
        self.held.copy_(torch.where(pausing, proposed, self.held))
        self.probed_at.copy_(torch.where(pausing, n, self.probed_at))
        stopping = free_think & ~capping & is_stop
        waiting = stopping & ~past_cap & ((self.waits_used < self.num_waits) | (n < self.min_think))
        accepting = stopping & ~waiting
        self.hit_cap.copy_(self.hit_cap | (capping & ~self.exited))
        script = torch.where(
            capping, torch.where(self.ends_nl, S_CAP_NL, S_CAP),
            torch.where(waiting, S_WAIT + self.waits_used % self.n_waits_strings, S_OPENER))
        loading = capping | stopping
        self._load_script(loading, script)
        self.waits_used.add_(waiting.long())
        self.phase.copy_(torch.where(capping | accepting, P_ANSWER, torch.where(pausing, P_PAUSE, self.phase)))
        from_queue = live & (queued | loading)
        qtok, qkind = self._at_queue_head(self.q_tok), self._at_queue_head(self.q_kind)
        self.q_pos.add_(from_queue.long())
        # ANSWER without a queue: the proposal is the answer, or the end of the turn.
        answering = live & ~from_queue & ~think
        is_end = (proposed.unsqueeze(1) == self.end_set).any(1)
        ending = answering & is_end
        sampled = answering & ~is_end
        self.n_answer.add_(sampled.long())
        too_long = sampled & (self.n_answer >= self.max_answer)
        self.finish.copy_(torch.where(ending, F_STOP, torch.where(too_long, F_LENGTH, self.finish)))
        self.phase.copy_(torch.where(ending | too_long, P_DONE, self.phase))
        plain_think = free_think & ~capping & ~stopping & ~pausing
        emits = live & ~pausing
        emitted = torch.where(from_queue, qtok, torch.where(emits, proposed, torch.full_like(proposed, pad_id)))
        kind = torch.where(from_queue, qkind, torch.where(
            plain_think, THINK, torch.where(ending, END, torch.where(sampled, ANSWER, NONE))))
        thinking = kind == THINK
        self.n_think.add_(thinking.long())
        idx = emitted.clamp(0, self.ends_nl_table.shape[0] - 1)
        self.ends_nl.copy_(torch.where(thinking, self.ends_nl_table[idx], self.ends_nl))
        self.at_boundary.copy_(torch.where(thinking, self.boundary_table[idx], self.at_boundary))
        return emitted, kind


def boundary_tables(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] bool tables, decoded once per tokenizer: does each token's text end with a newline; does it end a
    sentence or a line (``forcing.ends_sentence``, where a graceful cap closes)."""
    from ..forcing import ends_sentence

    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    newline, sentence = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    newline[:n] = torch.tensor([t.endswith("\n") for t in texts])
    sentence[:n] = torch.tensor([ends_sentence(t) for t in texts])
    return newline, sentence


def replay(policy: BudgetPolicy, tokens: ForcingTokens, cap: int | None, proposals: Sequence[int]) -> BudgetState:
    """The pure machine fed the same proposals (tests compare it with the tensor form)."""
    s = BudgetState(policy, tokens, cap)
    for p in proposals:
        if s.done:
            break
        s.step(p)
    return s
