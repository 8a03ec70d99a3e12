"""Every transition of the pure BudgetState machine (DESIGN.md §2).

These tests use small integer ids instead of a tokenizer: the state machine is pure Python and knows
tokens only as ids, so nothing is mocked here. Engine tests on the real model follow in test_engine.py.
"""

import pytest

from s1kit.budget import BudgetPolicy, BudgetState, ForcingTokens, Phase

IM_START, IM_END, EOS = 100, 101, 102
NL = 9
OPENER = (IM_START, 7, 8)  # "<|im_start|>" "answer" "\n"
PREFIX = (20, 21)  # "Final" " Answer:"
TOKENS = ForcingTokens(
    stop_ids=frozenset({IM_START, IM_END, EOS}),
    end_ids=frozenset({IM_END, EOS}),
    opener_ids=OPENER,
    newline_ids=(NL,),
    prefix_ids=PREFIX,
    wait_ids=((30,), (31, 32)),
    ends_with_newline=lambda t: t in (NL, 40),  # 40: a token like ".\n"
)
ONE_WAIT = ForcingTokens(**{**TOKENS.__dict__, "wait_ids": ((30,),)})
TWO_TOKEN_WAIT = ForcingTokens(**{**TOKENS.__dict__, "wait_ids": ((31, 32),)})


def run(state: BudgetState, proposals: list[int]) -> list[int]:
    """Feed proposals until the state is done or they run out; return what was emitted."""
    out = []
    for p in proposals:
        if state.done:
            break
        out.append(state.step(p))
    return out


def test_unforced_sequence_passes_through_and_ends_on_end_of_turn():
    s = BudgetState(BudgetPolicy(), TOKENS)
    out = run(s, [1, 2, 3, IM_START, 0, 0, 5, 6, IM_END, 77])
    # the proposal <|im_start|> is kept and the rest of the opener forced (the 0 proposals are ignored)
    assert out == [1, 2, 3, IM_START, 7, 8, 5, 6, IM_END]
    assert s.thinking_ids == [1, 2, 3] and s.answer_ids == [5, 6]
    assert (s.done, s.finish_reason, s.hit_cap, s.waits_used) == (True, "stop", False, 0)


def test_end_of_turn_in_think_is_replaced_by_the_whole_opener():
    s = BudgetState(BudgetPolicy(), TOKENS)
    out = run(s, [1, IM_END, 0, 0, 5, EOS])
    assert out == [1, IM_START, 7, 8, 5, EOS]
    assert s.thinking_ids == [1] and s.answer_ids == [5] and s.finish_reason == "stop"


def test_eos_in_think_counts_as_a_stop_attempt_and_can_be_suppressed():
    s = BudgetState(BudgetPolicy(num_waits=1), ONE_WAIT)
    out = run(s, [1, EOS, 2, EOS, 0, 0, 5, EOS])
    assert out == [1, 30, 2, IM_START, 7, 8, 5, EOS]
    assert s.waits_used == 1 and s.thinking_ids == [1, 30, 2]


def test_cap_forces_newline_opener_and_prefix():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=3), TOKENS)
    out = run(s, [1, 2, 3, 4, 0, 0, 0, 0, 0, 5, IM_END])
    assert out == [1, 2, 3, NL, *OPENER, *PREFIX, 5, IM_END]
    assert s.thinking_ids == [1, 2, 3] and s.hit_cap
    assert s.answer_ids == [*PREFIX, 5]  # the forced prefix is part of the answer, the opener is not


def test_cap_after_a_newline_adds_no_second_newline():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=2), TOKENS)
    out = run(s, [1, 40, 4, 0, 0, 0, 0, IM_END])
    assert out == [1, 40, *OPENER, *PREFIX, IM_END]


def test_cap_zero_answers_immediately():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=0), TOKENS)
    assert s.next_is_forced
    out = run(s, [1, 0, 0, 0, 0, 5, EOS])
    assert out == [*OPENER, *PREFIX, 5, EOS]  # the think opener ends in "\n": no newline forced
    assert s.thinking_ids == [] and s.hit_cap


def test_cap_wins_over_a_stop_proposed_exactly_at_the_cap():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=2), TOKENS)
    out = run(s, [1, 2, IM_START, 0, 0, 0, 0, 0, EOS])
    assert out[:4] == [1, 2, NL, IM_START] and s.hit_cap


def test_min_thinking_replaces_early_stops_with_wait():
    s = BudgetState(BudgetPolicy(min_thinking_tokens=4), ONE_WAIT)
    out = run(s, [1, IM_START, 2, IM_END, 3, IM_START, 0, 0, 5, EOS])
    assert out == [1, 30, 2, 30, 3, IM_START, 7, 8, 5, EOS]
    assert s.waits_used == 2 and len(s.thinking_ids) == 5 and not s.hit_cap


def test_num_waits_cycles_wait_strings():
    s = BudgetState(BudgetPolicy(num_waits=3), TOKENS)
    out = run(s, [1, IM_START, IM_START, 0, IM_START, IM_START, 0, 0, EOS])
    # 1st stop -> (30,), 2nd -> (31, 32), 3rd -> (30,) again, 4th accepted
    assert out == [1, 30, 31, 32, 30, IM_START, 7, 8, EOS]
    assert s.waits_used == 3 and s.thinking_ids == [1, 30, 31, 32, 30]


def test_forced_wait_tokens_count_as_thinking_and_cap_cuts_a_wait_short():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=3, num_waits=5), TWO_TOKEN_WAIT)
    out = run(s, [1, 2, IM_START, 0, 0, 0, 0, 0, 0, EOS])
    # the wait (31, 32) starts at thinking=2, 31 makes it 3 = cap, so 32 is dropped and the cap closes
    assert out == [1, 2, 31, NL, *OPENER, *PREFIX, EOS]
    assert s.thinking_ids == [1, 2, 31] and s.hit_cap and s.waits_used == 1


def test_min_equal_max_gives_exactly_that_many_thinking_tokens():
    s = BudgetState(BudgetPolicy(min_thinking_tokens=5, max_thinking_tokens=5), ONE_WAIT)
    run(s, [IM_START, IM_START, 1, IM_END, IM_START, 2, 3, 0, 0, 0, 0, 0, 0, EOS])
    assert len(s.thinking_ids) == 5 and s.hit_cap


def test_max_answer_tokens_ends_with_length():
    s = BudgetState(BudgetPolicy(max_answer_tokens=2), TOKENS)
    out = run(s, [IM_START, 0, 0, 5, 6, 7, 8])
    assert out == [*OPENER, 5, 6] and s.finish_reason == "length" and s.done


def test_prefix_does_not_use_the_answer_budget():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=1), TOKENS)
    out = run(s, [0, 0, 0, 0, 0, 5, 6])
    assert out == [*OPENER, *PREFIX, 5] and s.answer_ids == [*PREFIX, 5] and s.finish_reason == "length"


def test_context_cap_overrides_policy():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=100), TOKENS, cap=1)
    run(s, [1, 2, 0, 0, 0, 0, 0, 0, EOS])
    assert s.thinking_ids == [1] and s.hit_cap


def test_step_after_done_raises():
    s = BudgetState(BudgetPolicy(), TOKENS)
    run(s, [IM_START, 0, 0, EOS])
    assert s.phase is Phase.DONE
    with pytest.raises(RuntimeError):
        s.step(1)


def test_next_is_forced_tracks_the_queue():
    s = BudgetState(BudgetPolicy(num_waits=1), TOKENS)
    assert not s.next_is_forced
    s.step(IM_START)  # replaced by the one-token wait (30,)
    assert not s.next_is_forced
    s.step(IM_START)  # accepted: opener queued
    assert s.next_is_forced


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_thinking_tokens": -1}, "max_thinking_tokens must be >= 0"),
        ({"min_thinking_tokens": -2}, "min_thinking_tokens must be >= 0"),
        ({"num_waits": -1}, "num_waits must be >= 0"),
        ({"max_answer_tokens": 0}, "max_answer_tokens must be >= 1"),
        ({"min_thinking_tokens": 10, "max_thinking_tokens": 5}, "exceeds max_thinking_tokens"),
        ({"max_thinking_tokens": 3.5}, "must be an integer"),
        ({"num_waits": True}, "must be an integer"),
        ({"wait_strings": ()}, "wait_strings"),
        ({"wait_strings": ("Wait", "")}, "wait_strings"),
        ({"answer_prefix": None}, "answer_prefix"),
    ],
)
def test_invalid_policies_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BudgetPolicy(**kwargs)


def test_policy_is_immutable_and_normalizes_wait_strings():
    p = BudgetPolicy(wait_strings=["Wait", "Hmm"])
    assert p.wait_strings == ("Wait", "Hmm")
    assert BudgetPolicy(wait_strings="Hmm").wait_strings == ("Hmm",)
    with pytest.raises(AttributeError):
        p.num_waits = 3  # type: ignore[misc]


def test_cancel_ends_the_sequence_and_drops_queued_forced_tokens():
    s = BudgetState(BudgetPolicy(num_waits=1), TOKENS)
    run(s, [1, IM_START])  # a Wait is now queued
    s.cancel()
    assert s.done and s.finish_reason == "cancelled"
    with pytest.raises(RuntimeError):
        s.step(1)


def test_peek_tells_what_step_emits_and_changes_nothing():
    s = BudgetState(BudgetPolicy(max_thinking_tokens=6, num_waits=1), TOKENS)
    for p in [1, IM_END, 0, 2, 3, 4, IM_START, 0, 0, 0, 0, 0, 0, 5]:
        if s.done:
            break
        before = (s.phase, s.waits_used, list(s.thinking_ids), list(s.token_ids), list(s._forced), s.hit_cap)
        peeked = s.peek(p)
        assert before == (s.phase, s.waits_used, list(s.thinking_ids), list(s.token_ids), list(s._forced), s.hit_cap)
        twin = s.clone()
        assert s.step(p) == peeked == twin.step(p)
        assert (twin.token_ids, twin.waits_used, twin.phase) == (s.token_ids, s.waits_used, s.phase)
    assert s.waits_used == 1 and s.hit_cap and twin.token_ids is not s.token_ids
