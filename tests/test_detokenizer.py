"""Incremental detokenization: streamed pieces add up to the decoded text and never split a character."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bloomduo.gateway.detokenizer import REPLACEMENT_CHARACTER, IncrementalDetokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was not amused.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。人工智能正在改变世界。",
    "Emoji time 😀😃😄 👍🏽 ❤️ 🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🇨🇳",
    "Mixed: Hello 世界 🌍 مرحبا Привет мир こんにちは 안녕하세요",
    "Code:\n  def f(x):\n\treturn x + 1\n",
]

TEXTS = [
    "Hello world",
    "你好，世界！",
    "人工智能正在改变世界。",
    "鑫龘𠀀",  # rare characters the training text never saw: one byte token each
    "😀 😃😄",
    "👨‍👩‍👧‍👦 and 👩🏽‍💻",  # ZWJ sequences and a skin tone modifier
    "🇫🇷🇯🇵 🇨🇳",  # flags: pairs of regional indicators
    "Mixed: Hello 世界 🌍 مرحبا Привет мир こんにちは 안녕하세요",
    "  leading, trailing and   inner spaces  ",
    "line one\nline two\r\n\n\ttabbed 中文\n",
    "e\u0301 combining accent, \u00e9 precomposed",
    "\ufffd is a real replacement character, not a broken one",
    "x",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level BPE like BLOOM's, small enough that CJK characters and emoji span several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tokenizer


def stream(
    tokenizer: Tokenizer, ids: Sequence[int], prompt_ids: Sequence[int] = ()
) -> tuple[list[str], str, IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    return pieces, detokenizer.flush(), detokenizer


def assert_well_formed(tokenizer: Tokenizer, ids: Sequence[int], pieces: list[str], flushed: str) -> None:
    expected = tokenizer.decode(list(ids), skip_special_tokens=True)
    assert "".join(pieces) + flushed == expected
    for piece in pieces:
        assert not piece.endswith(REPLACEMENT_CHARACTER)
    if flushed.endswith(REPLACEMENT_CHARACTER):
        assert expected.endswith(REPLACEMENT_CHARACTER)
    for piece in [*pieces, flushed]:
        assert not any("\ud800" <= char <= "\udfff" for char in piece)


def test_test_tokenizer_splits_characters_over_tokens(tokenizer: Tokenizer) -> None:
    for char in ["世", "😀", "🇫", "鑫"]:
        assert len(tokenizer.encode(char).ids) > 1, char


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Question: 你好 👋 ", "ends with an emoji 🎉"])
def test_pieces_add_up_to_the_text(tokenizer: Tokenizer, text: str, prompt: str) -> None:
    ids = tokenizer.encode(text).ids
    pieces, flushed, detokenizer = stream(tokenizer, ids, tokenizer.encode(prompt).ids)
    assert_well_formed(tokenizer, ids, pieces, flushed)
    assert "".join(pieces) == text
    assert flushed == ""
    assert detokenizer.text == text


@pytest.mark.parametrize("text", TEXTS)
def test_text_is_held_back_only_while_it_ends_in_an_incomplete_character(
    tokenizer: Tokenizer, text: str
) -> None:
    ids = tokenizer.encode(text).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    for count, token_id in enumerate(ids, start=1):
        detokenizer.push(token_id)
        decoded = tokenizer.decode(ids[:count])
        if decoded.endswith(REPLACEMENT_CHARACTER):
            # Held back in whole tokens: what is out is the decode of the ids before them.
            assert any(detokenizer.text == tokenizer.decode(ids[:held]) for held in range(count))
        else:
            assert detokenizer.text == decoded


def test_special_tokens_are_skipped_even_inside_a_character(tokenizer: Tokenizer) -> None:
    rng = random.Random(1)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        for _ in range(5):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(len(SPECIAL_TOKENS)))
        pieces, flushed, _ = stream(tokenizer, ids)
        assert_well_formed(tokenizer, ids, pieces, flushed)
        assert "".join(pieces) + flushed == text


@pytest.mark.parametrize("seed", range(6))
def test_random_token_ids_keep_the_invariant(tokenizer: Tokenizer, seed: int) -> None:
    # Random ids make invalid UTF-8 of every kind: lone continuation bytes, truncated sequences.
    rng = random.Random(seed)
    prompt_ids = tokenizer.encode("Prompt 提示 ").ids if seed % 2 else []
    for _ in range(60):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        pieces, flushed, _ = stream(tokenizer, ids, prompt_ids)
        assert_well_formed(tokenizer, ids, pieces, flushed)


def test_incomplete_character_at_the_end_comes_out_of_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀").ids[:-1]
    pieces, flushed, detokenizer = stream(tokenizer, ids)
    assert_well_formed(tokenizer, ids, pieces, flushed)
    assert "".join(pieces).startswith("ok")
    assert flushed.endswith(REPLACEMENT_CHARACTER)
    assert detokenizer.text == tokenizer.decode(ids)


def test_invalid_bytes_inside_the_text_stream_once_followed_by_text(tokenizer: Tokenizer) -> None:
    truncated = tokenizer.encode("世").ids[:1]
    ids = [*truncated, *tokenizer.encode("ab").ids]
    pieces, flushed, _ = stream(tokenizer, ids)
    assert "".join(pieces) == REPLACEMENT_CHARACTER + "ab"
    assert flushed == ""


def test_prompt_context_keeps_the_leading_space_of_sentencepiece_decoders() -> None:
    # Metaspace drops the leading space of a decode's first token; the prompt context keeps it.
    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "▁sat": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    assert tokenizer.decode([3]) == "sat"
    pieces, flushed, _ = stream(tokenizer, [3, 1], prompt_ids=[1, 2])
    assert pieces == [" sat", " the"]
    assert flushed == ""


class _ContextSensitiveTokenizer:
    """A decoder whose window decodes disagree with the whole decode.

    Ids are letters; "~" renders as "=>" when it opens a decode and something follows it.
    """

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join(chr(token_id) for token_id in ids)
        if text.startswith("~") and len(text) > 1:
            return "=>" + text[1:]
        return text


def test_falls_back_to_the_whole_decode_when_windows_disagree() -> None:
    tokenizer = _ContextSensitiveTokenizer()
    ids = [ord(char) for char in "x~ab"]
    detokenizer = IncrementalDetokenizer(tokenizer)  # type: ignore[arg-type]
    pieces = [detokenizer.push(token_id) for token_id in ids]
    assert pieces == ["x", "~", "a", "b"]
    assert detokenizer.flush() == ""
    assert detokenizer.text == tokenizer.decode(ids)
