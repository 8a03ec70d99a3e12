"""Reading a completion that s1kit's vLLM processor forced back into a ``BudgetState`` (client side).

The processor returns only tokens, so the client replays them through the machine: each forced position
must be the machine's own token, an answer token is its own proposal, and a freely thought token either was
drawn as itself or was a stop that the machine replaced. Those two readings differ only where the
replacement (a Wait's first token, or the opener's when it is not itself a stop) could also have been
written by the model, e.g. a model that says "Wait" on its own while Waits are still due. There the reading
changes ``waits_used`` and nothing else that shows, and the tokens cannot tell: ``replay`` takes the
caller's answer where it has one (``choices``: the remote engine asks the server for the greedy argmax at
that position), otherwise the stop reading when the tokens that follow allow it, backtracking on any
contradiction, and it reports the positions it had to guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..budget import BudgetPolicy, BudgetState, ForcingTokens, Phase
from ..errors import S1KitError


@dataclass
class Replayed:
    """The machine after the tokens, the ambiguous positions, and what follows its end (a forced end token)."""

    state: BudgetState
    ambiguous: list[int] = field(default_factory=list)  # positions where a Wait/opener may have been the model's
    guessed: list[int] = field(default_factory=list)  # of those, the ones no choice was given for
    trailing: list[int] = field(default_factory=list)


def _readings(state: BudgetState, token: int, stop: int) -> tuple[bool, bool]:
    """(the token can be what the machine emits for a stop, the token can be a proposal kept as itself)."""
    if state.next_is_forced or state.phase is not Phase.THINK:
        return False, state.peek(token) == token
    as_stop = state.peek(stop) == token
    return as_stop, token not in state.tokens.stop_ids


def replay(tokens: Sequence[int], policy: BudgetPolicy, forcing: ForcingTokens, cap: int | None,
           choices: Mapping[int, bool] | None = None) -> Replayed:
    """Replay ``tokens`` (a forced completion); ``choices[i]`` True reads position i as a replaced stop."""
    choices = choices or {}
    stop = min(forcing.stop_ids)
    state, i = BudgetState(policy, forcing, cap), 0
    before: dict[int, BudgetState] = {}  # ambiguous position -> the state before it (to read it the other way)
    first: dict[int, bool] = {}  # ambiguous position -> read as a stop the first time
    tried: set[int] = set()  # ambiguous positions now read the other way (the first reading led nowhere)
    guessed: list[int] = []
    while i < len(tokens) and not state.done:
        token = tokens[i]
        as_stop, as_itself = _readings(state, token, stop)
        if as_stop and as_itself:
            if i in tried:
                read_stop = not first[i]
            else:
                before[i], read_stop = state.clone(), choices.get(i, True)
                first[i] = read_stop
                if i not in choices:
                    guessed.append(i)
        elif as_stop or as_itself:
            read_stop = as_stop
        else:
            back = [p for p in before if p not in tried]
            if not back:
                raise S1KitError(f"the server's tokens do not follow the budget policy at output position {i} "
                                 f"(token {token}): is the server running s1kit's vLLM processor with the same "
                                 "tokenizer?")
            i = max(back)
            state = before[i].clone()
            tried = {p for p in tried if p < i} | {i}
            before = {p: s for p, s in before.items() if p <= i}
            guessed = [p for p in guessed if p < i]  # the reading at i is no guess now: the other one failed
            continue
        state.step(stop if read_stop else token)
        i += 1
    return Replayed(state, sorted(before), guessed, list(tokens[i:]))
