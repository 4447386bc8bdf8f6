"""When a request's generation ends, and why."""

from __future__ import annotations

import enum
from collections.abc import Sequence


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class StoppingCriteria:
    """Called once per generated token; says whether generation ends there.

    Precedence when several apply to the same token: end-of-sequence, then a stop sequence, then the
    length limit. The arguments come from a validated request (request.py): stop sequences are not empty.
    """

    def __init__(
        self,
        *,
        max_new_tokens: int,
        eos_token_id: int | None,
        stop_sequences: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = None if ignore_eos else eos_token_id
        self.stop_sequences = tuple(stop_sequences)
        self.generated_tokens = 0
        self._searched_chars = 0

    def __call__(self, token_id: int, generated_text: str) -> FinishReason | None:
        """generated_text: all the text generated so far, this token's included."""
        self.generated_tokens += 1
        if token_id == self.eos_token_id:
            return FinishReason.EOS_TOKEN
        if self._stop_sequence_in(generated_text):
            return FinishReason.STOP_SEQUENCE
        if self.generated_tokens >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _stop_sequence_in(self, text: str) -> bool:
        # Matches that end within the text searched before were reported then; a new one must end in
        # the new text, so it starts at most len(stop) - 1 characters before it.
        searched, self._searched_chars = self._searched_chars, len(text)
        return any(text.find(stop, max(searched - len(stop) + 1, 0)) != -1 for stop in self.stop_sequences)
