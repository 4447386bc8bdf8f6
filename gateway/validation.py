"""Turn a user's request into a checked GenerationRequest, or say exactly which field is wrong."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tokenizers

from gateway.sampling import SamplingParams


@dataclass(frozen=True)
class Limits:
    """Bounds on every request; served by Info so clients can check before sending."""

    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 20
    max_stop_sequences: int = 4
    max_stop_sequence_length: int = 64
    max_batch_size: int = 32
    max_batch_prefill_tokens: int = 4096
    max_concurrent_requests: int = 128
    max_top_k: int = 1024
    max_request_bytes: int = 1024 * 1024


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


def validate(
    request_id: str,
    prompt: str,
    params: Mapping[str, Any],
    tokenizer: tokenizers.Tokenizer,
    limits: Limits,
) -> GenerationRequest:
    """params holds only the fields the caller set, named as in GenerateParameters."""
    if not prompt:
        raise ValidationError("prompt", "must not be empty")
    do_sample = bool(params.get("do_sample", False))

    max_new_tokens = int(params.get("max_new_tokens", limits.default_max_new_tokens))
    if not 0 < max_new_tokens <= limits.max_new_tokens:
        raise ValidationError(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new_tokens}"
        )

    temperature = _finite("temperature", float(params.get("temperature", 1.0)))
    if temperature <= 0:
        raise ValidationError("temperature", f"must be > 0, got {temperature}")
    top_k = int(params.get("top_k", 0))
    if top_k > limits.max_top_k:
        raise ValidationError("top_k", f"must be <= {limits.max_top_k} (0 disables it), got {top_k}")
    for name in ("top_p", "typical_p"):
        value = _finite(name, float(params.get(name, 1.0)))
        if not 0 < value <= 1:
            raise ValidationError(name, f"must be in (0, 1], got {value}")
    repetition_penalty = _finite("repetition_penalty", float(params.get("repetition_penalty", 1.0)))
    if repetition_penalty <= 0:
        raise ValidationError("repetition_penalty", f"must be > 0, got {repetition_penalty}")

    stop: Sequence[str] = tuple(params.get("stop", ()))
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError("stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    for sequence in stop:
        if not sequence or len(sequence) > limits.max_stop_sequence_length:
            raise ValidationError(
                "stop", f"each stop sequence must have 1 to {limits.max_stop_sequence_length} characters"
            )

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    truncate = params.get("truncate")
    truncated = False
    if truncate is not None:
        if not 0 < truncate <= limits.max_input_tokens:
            raise ValidationError("truncate", f"must be in [1, {limits.max_input_tokens}], got {truncate}")
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

    seed = int(params["seed"]) if "seed" in params else secrets.randbits(63)
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=float(params.get("top_p", 1.0)),
        typical_p=float(params.get("typical_p", 1.0)),
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=list(prompt_ids),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop),
        ignore_eos=bool(params.get("ignore_eos", False)),
        details=bool(params.get("details", False)),
        return_full_text=bool(params.get("return_full_text", False)),
        truncated=truncated,
    )
