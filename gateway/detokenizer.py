"""Incremental detokenization for streaming: the text each new token adds, never part of a character."""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

# What decoding yields for bytes that are not (yet) a whole UTF-8 character, e.g. the first of the
# byte-level tokens that spell one Chinese character or emoji.
REPLACEMENT_CHARACTER = "\ufffd"

# Prompt tokens decoded in front of the generated ones, as text-generation-inference does: a decoder
# that drops the leading space of a decode's first token (SentencePiece) keeps it for the first
# generated word, and the spare tokens cover special tokens at the end of the prompt, which decode to nothing.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text pieces for streaming.

    Text-generation-inference's algorithm: each push decodes two short windows starting at
    prefix_offset, one up to read_offset (already emitted) and one up to the newest token, and
    emits the difference; then the windows move on. Short windows keep the cost per token
    independent of the length of the text. Text that ends in U+FFFD is held back, since the next
    token may complete the character; flush() gives out whatever is still held at the end.

    The pieces joined are what the generated ids add to the decode of the prompt's last few ids.
    With byte-level decoders (BLOOM's) that is exactly
    tokenizer.decode(generated ids, skip_special_tokens=True) whenever the prompt ends on a
    character boundary, as it does when it comes from encoding text; with decoders that drop the
    leading space of a decode (SentencePiece) it keeps the space before the first generated word.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # Context prompt ids, then the generated ones; the offsets index this list.
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._context_text = self._decode(0, len(self._ids))
        self._text = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def push(self, token_id: int) -> str:
        """The text this token adds; "" while the text so far ends in an incomplete character."""
        self._ids.append(token_id)
        piece = self._pending_text()
        if not piece or piece.endswith(REPLACEMENT_CHARACTER):
            return ""
        return self._emit(piece)

    def flush(self) -> str:
        """What is still held back at the end; U+FFFD in it stands for bytes that are not valid UTF-8."""
        piece = self._pending_text()
        return self._emit(piece) if piece else ""

    def _emit(self, piece: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text += piece
        return piece

    def _pending_text(self) -> str:
        """The text the ids after read_offset add to what was emitted."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if new_text.startswith(prefix_text):
            return new_text[len(prefix_text) :]
        # The new ids changed how the window's already emitted part decodes: the window lacks context
        # that decides it. Byte-level decoders never get here. For others, the decode of everything is
        # what the pieces must add up to, so take the difference from that; if even that contradicts
        # what was emitted, no later text can make up for it, and holding back is the least wrong.
        emitted = self._context_text + self._text
        full = self._decode(0, len(self._ids))
        return full[len(emitted) :] if full.startswith(emitted) else ""

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)
