"""Turn a user's request into a checked GenerationRequest, or say exactly which field is wrong."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tokenizers

from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.sampling import SamplingParams

MAX_SEED = 2**64 - 1  # seeds travel as uint64 and seed torch.Generator, which takes at most this


class ValidationError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    details: bool = False
    return_full_text: bool = False
    truncated: bool = field(default=False)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value}")
    return value


def _text(name: str, value: str) -> str:
    """Protobuf only carries valid UTF-8, but a direct caller can pass lone surrogates, which the
    tokenizer rejects with a TypeError and which could never be sent back in a response."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(name, f"must be valid Unicode text ({exc.reason} at {exc.start})") from None
    return value


def validate(
    request_id: str,
    prompt: str,
    params: Mapping[str, Any],
    tokenizer: tokenizers.Tokenizer,
    limits: RequestLimits,
) -> GenerationRequest:
    """params holds only the fields the caller set, named as in GenerateParameters.

    Raises ValidationError naming the first bad field: a GenerateParameters field or "prompt".
    The cheap checks come first, so a bad parameter costs no tokenization of a large prompt.
    """
    if not prompt:
        raise ValidationError("prompt", "must not be empty")
    _text("prompt", prompt)
    do_sample = bool(params.get("do_sample", False))

    max_new_tokens = int(params.get("max_new_tokens", limits.default_max_new_tokens))
    if not 0 < max_new_tokens <= limits.max_new_tokens:
        raise ValidationError(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new_tokens}"
        )

    # Checked whether or not do_sample is set, as text-generation-inference does, so a request that is
    # valid greedy stays valid when sampling is switched on.
    temperature = _finite("temperature", float(params.get("temperature", 1.0)))
    if not temperature >= limits.min_temperature:
        raise ValidationError(
            "temperature",
            f"must be >= {limits.min_temperature} (lower is greedy: leave do_sample off), got {temperature}",
        )
    top_k = int(params.get("top_k", 0))
    if not 0 <= top_k <= limits.max_top_k:
        raise ValidationError("top_k", f"must be in [0, {limits.max_top_k}] (0 disables it), got {top_k}")
    top_p, typical_p = (_finite(name, float(params.get(name, 1.0))) for name in ("top_p", "typical_p"))
    for name, value in (("top_p", top_p), ("typical_p", typical_p)):
        if not 0 < value <= 1:
            raise ValidationError(name, f"must be in (0, 1], got {value}")
    repetition_penalty = _finite("repetition_penalty", float(params.get("repetition_penalty", 1.0)))
    if not limits.min_repetition_penalty <= repetition_penalty <= limits.max_repetition_penalty:
        raise ValidationError(
            "repetition_penalty",
            f"must be in [{limits.min_repetition_penalty}, {limits.max_repetition_penalty}] "
            f"(1 disables it), got {repetition_penalty}",
        )
    if "seed" in params:
        seed = int(params["seed"])
        if not 0 <= seed <= MAX_SEED:
            raise ValidationError("seed", f"must be in [0, 2**64 - 1], got {seed}")
    else:
        seed = secrets.randbits(63)

    stop = tuple(params.get("stop", ()))
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError("stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    for index, sequence in enumerate(stop):
        if not 0 < len(sequence) <= limits.max_stop_sequence_length:
            raise ValidationError(
                "stop",
                f"each stop sequence must have 1 to {limits.max_stop_sequence_length} characters; "
                f"sequence {index} has {len(sequence)}",
            )
        _text("stop", sequence)

    truncate = params.get("truncate")
    if truncate is not None and not 0 < truncate <= limits.max_input_tokens:
        raise ValidationError("truncate", f"must be in [1, {limits.max_input_tokens}], got {truncate}")

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    truncated = False
    if truncate is not None:
        truncated = len(prompt_ids) > truncate
        prompt_ids = prompt_ids[-truncate:]
    if not prompt_ids:
        raise ValidationError("prompt", "encodes to no tokens")
    if len(prompt_ids) > limits.max_input_tokens:
        raise ValidationError(
            "prompt",
            f"has {len(prompt_ids)} tokens, more than max_input_tokens={limits.max_input_tokens}; "
            "shorten it or set truncate",
        )
    if len(prompt_ids) + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            "max_new_tokens",
            f"prompt tokens ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceed "
            f"max_total_tokens={limits.max_total_tokens}",
        )

    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=list(prompt_ids),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=stop,
        ignore_eos=bool(params.get("ignore_eos", False)),
        details=bool(params.get("details", False)),
        return_full_text=bool(params.get("return_full_text", False)),
        truncated=truncated,
    )
