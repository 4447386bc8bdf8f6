"""The request schema: what a caller may ask of one generation, every default, and the one validator.

Each front builds a GenerationParameters from its own wire format (the gRPC edge from protobuf, the HTTP
front from JSON) and hands it to `validate`, which checks it against RequestLimits and names the field on
every refusal. What comes out, a GenerationRequest, is trusted by the sampler, the stopping criteria
and the engine: nothing downstream checks a bound again.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import tokenizers

from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.errors import ValidationError
from bloomduo.gateway.sampling import SamplingParams

MAX_SEED = 2**64 - 1  # seeds travel as uint64 and seed torch.Generator, which takes at most this
# Alternatives per token, as text-generation-inference's default max_top_n_tokens and OpenAI's `logprobs`.
MAX_TOP_N_TOKENS = 5

# Each sampling stage is off by default: its parameter defaults to the value that leaves the scores as
# they are.
_NEUTRAL = SamplingParams()


@dataclass(frozen=True)
class GenerationParameters:
    """Sampling and stopping parameters, named as in text-generation-inference, in plain Python types.

    A field the caller left unset holds its default; None where the default depends on the server
    (max_new_tokens: RequestLimits.default_max_new_tokens; seed: a random one, returned with the
    result) or means "off" (truncate).
    """

    max_new_tokens: int | None = None
    do_sample: bool = _NEUTRAL.do_sample  # off: greedy
    temperature: float = _NEUTRAL.temperature
    top_k: int = _NEUTRAL.top_k
    top_p: float = _NEUTRAL.top_p
    typical_p: float = _NEUTRAL.typical_p
    repetition_penalty: float = _NEUTRAL.repetition_penalty
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on the generated text
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    return_full_text: bool = False  # prepend the prompt to the returned text
    details: bool = False  # return every token's id, text and logprob
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    decoder_input_details: bool = False  # return every prompt token's logprob (the first has none)
    top_n_tokens: int = 0  # the likeliest tokens, with logprobs, at each generated (and scored prompt) token


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every bound of RequestLimits holds, and every default is filled in."""

    request_id: str
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    details: bool = False
    return_full_text: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int = 0


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value}")
    return value


def _text(name: str, value: str) -> str:
    """Protobuf only carries valid UTF-8, but JSON and direct callers can pass lone surrogates, which the
    tokenizer rejects with a TypeError and which could never be sent back in a response."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(name, f"must be valid Unicode text ({exc.reason} at {exc.start})") from None
    return value


def _sampling(params: GenerationParameters, limits: RequestLimits) -> SamplingParams:
    # Checked whether or not do_sample is set, as text-generation-inference does, so a request that is
    # valid greedy stays valid when sampling is switched on.
    temperature = _finite("temperature", params.temperature)
    if not temperature >= limits.min_temperature:
        raise ValidationError(
            "temperature",
            f"must be >= {limits.min_temperature} (lower is greedy: leave do_sample off), got {temperature}",
        )
    if not 0 <= params.top_k <= limits.max_top_k:
        raise ValidationError(
            "top_k", f"must be in [0, {limits.max_top_k}] (0 disables it), got {params.top_k}"
        )
    for name in ("top_p", "typical_p"):
        value = _finite(name, getattr(params, name))
        if not 0 < value <= 1:
            raise ValidationError(name, f"must be in (0, 1], got {value}")
    penalty = _finite("repetition_penalty", params.repetition_penalty)
    if not limits.min_repetition_penalty <= penalty <= limits.max_repetition_penalty:
        raise ValidationError(
            "repetition_penalty",
            f"must be in [{limits.min_repetition_penalty}, {limits.max_repetition_penalty}] "
            f"(1 disables it), got {penalty}",
        )
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise ValidationError("seed", f"must be in [0, 2**64 - 1], got {params.seed}")
    return SamplingParams(
        do_sample=params.do_sample,
        temperature=temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        typical_p=params.typical_p,
        repetition_penalty=penalty,
        seed=secrets.randbits(63) if params.seed is None else params.seed,
    )


def _check_stop(stop: tuple[str, ...], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError("stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    for index, sequence in enumerate(stop):
        # An empty stop sequence would match before any text and end the request at once.
        if not 0 < len(sequence) <= limits.max_stop_sequence_length:
            raise ValidationError(
                "stop",
                f"each stop sequence must have 1 to {limits.max_stop_sequence_length} characters; "
                f"sequence {index} has {len(sequence)}",
            )
        _text("stop", sequence)


def validate(
    request_id: str,
    prompt: str,
    params: GenerationParameters,
    tokenizer: tokenizers.Tokenizer,
    limits: RequestLimits,
) -> GenerationRequest:
    """The request within every bound of `limits`, or ValidationError naming the first bad field: a
    GenerationParameters field or "prompt".

    The cheap checks come first, so a bad parameter costs no tokenization of a large prompt.
    """
    if not prompt:
        raise ValidationError("prompt", "must not be empty")
    _text("prompt", prompt)
    max_new_tokens = limits.default_max_new_tokens if params.max_new_tokens is None else params.max_new_tokens
    if not 0 < max_new_tokens <= limits.max_new_tokens:
        raise ValidationError(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new_tokens}"
        )
    sampling = _sampling(params, limits)
    _check_stop(params.stop, limits)
    if not 0 <= params.top_n_tokens <= MAX_TOP_N_TOKENS:
        raise ValidationError(
            "top_n_tokens", f"must be in [0, {MAX_TOP_N_TOKENS}] (0 disables it), got {params.top_n_tokens}"
        )
    truncate = params.truncate
    if truncate is not None and not 0 < truncate <= limits.max_input_tokens:
        raise ValidationError("truncate", f"must be in [1, {limits.max_input_tokens}], got {truncate}")

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if truncate is not None:
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
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=list(prompt_ids),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        details=params.details,
        return_full_text=params.return_full_text,
        decoder_input_details=params.decoder_input_details,
        top_n_tokens=params.top_n_tokens,
    )
