"""Finish reasons, their precedence, and stop sequences that arrive over several tokens."""

from __future__ import annotations

from collections.abc import Sequence

from bloomduo.gateway.stopping import FinishReason, StoppingCriteria

EOS = 2


def run(criteria: StoppingCriteria, steps: Sequence[tuple[int, str]]) -> list[FinishReason | None]:
    """Feed (token id, piece of text) steps, the way the engine does: with the text generated so far."""
    text = ""
    reasons = []
    for token_id, piece in steps:
        text += piece
        reasons.append(criteria(token_id, text))
    return reasons


def test_length() -> None:
    criteria = StoppingCriteria(max_new_tokens=3, eos_token_id=EOS)
    assert run(criteria, [(10, "a"), (11, "b"), (12, "c")]) == [None, None, FinishReason.LENGTH]


def test_eos_token() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS)
    assert run(criteria, [(10, "a"), (EOS, "")]) == [None, FinishReason.EOS_TOKEN]


def test_ignore_eos_runs_to_the_length() -> None:
    criteria = StoppingCriteria(max_new_tokens=3, eos_token_id=EOS, ignore_eos=True)
    assert run(criteria, [(EOS, ""), (EOS, ""), (EOS, "")]) == [None, None, FinishReason.LENGTH]


def test_no_eos_token_id() -> None:
    criteria = StoppingCriteria(max_new_tokens=2, eos_token_id=None)
    assert run(criteria, [(EOS, ""), (EOS, "")]) == [None, FinishReason.LENGTH]


def test_stop_sequence_within_one_token() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS, stop_sequences=["\n\n"])
    assert run(criteria, [(10, "Hi."), (11, "\n\nNext")]) == [None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_spanning_token_boundaries() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS, stop_sequences=["Observation:"])
    steps = [(10, "Thought: look it up. Obs"), (11, "erv"), (12, "ation"), (13, ":")]
    assert run(criteria, steps) == [None, None, None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_starting_long_before_the_new_text() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS, stop_sequences=["abcdef"])
    assert run(criteria, [(10, "xxxxabcde"), (11, ""), (12, "f")]) == [None, None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_that_is_a_chinese_character() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS, stop_sequences=["。"])
    # "" while the detokenizer holds back an incomplete character.
    assert run(criteria, [(10, "你好"), (11, ""), (12, "。"), (13, "再见")])[:3] == [
        None,
        None,
        FinishReason.STOP_SEQUENCE,
    ]


def test_any_of_several_stop_sequences() -> None:
    criteria = StoppingCriteria(max_new_tokens=10, eos_token_id=EOS, stop_sequences=["END", "停"])
    assert run(criteria, [(10, "go "), (11, "on 停")]) == [None, FinishReason.STOP_SEQUENCE]


def test_text_without_a_stop_sequence_never_stops_early() -> None:
    criteria = StoppingCriteria(max_new_tokens=50, eos_token_id=EOS, stop_sequences=["zz"])
    reasons = run(criteria, [(10, "z a")] * 50)
    assert reasons == [None] * 49 + [FinishReason.LENGTH]


def test_eos_wins_over_a_stop_sequence_and_the_length() -> None:
    criteria = StoppingCriteria(max_new_tokens=1, eos_token_id=EOS, stop_sequences=["stop"])
    assert criteria(EOS, "stop") is FinishReason.EOS_TOKEN


def test_stop_sequence_wins_over_the_length() -> None:
    criteria = StoppingCriteria(max_new_tokens=2, eos_token_id=EOS, stop_sequences=["stop"])
    assert run(criteria, [(10, "st"), (11, "op")]) == [None, FinishReason.STOP_SEQUENCE]
