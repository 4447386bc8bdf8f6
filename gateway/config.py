"""The gateway's settings, each with its one default: bounds on a request (served by Info, so clients can
check before sending) apart from how the scheduler batches and when a step counts as stalled.

A field whose metadata has a "help" is also a `bloomduo gateway` flag (and a `bloomduo up` flag that `up`
forwards); bloomduo.apps.flags derives the flags from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bloomduo.core.serving import NO_TLS, TlsFiles

# The gateway's exit status when its shard workers stalled: its supervisor must replace the whole group,
# which `bloomduo up` does; under docker's restart policy the stalled workers leave by their own watchdog.
EXIT_SHARDS_STALLED = 4


def _flag(default, help_text: str, **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on every request; the validator (request.py) names the field that passes one."""

    max_input_tokens: int = _flag(1024, "most prompt tokens a request may have (after truncate)")
    max_total_tokens: int = _flag(2048, "most prompt + new tokens of one request")
    default_max_new_tokens: int = 20
    max_stop_sequences: int = 4
    max_stop_sequence_length: int = 64
    max_concurrent_requests: int = _flag(
        128, "requests in flight (queued or running) before new ones get RESOURCE_EXHAUSTED"
    )
    max_top_k: int = 1024  # the gateway lowers it to the vocabulary size at start
    max_request_bytes: int = 1024 * 1024  # larger messages get RESOURCE_EXHAUSTED from gRPC itself
    # Logits are divided by the temperature and (for repeated tokens) by the repetition penalty. Below
    # these floors the quotient overflows float32 to inf, the softmax turns NaN and the draw fails, which
    # fails every request in the same batch step; a smaller temperature is greedy in all but name.
    min_temperature: float = 1e-3
    min_repetition_penalty: float = 1e-3
    # Above this, repeated negative logits overflow to -inf; were every candidate repeated, no token
    # would be left to draw.
    max_repetition_penalty: float = 1e3

    @property
    def max_new_tokens(self) -> int:
        """A request needs at least one prompt token, so it may ask for the rest of max_total_tokens."""
        return self.max_total_tokens - 1


@dataclass(frozen=True)
class SchedulerSettings:
    """How the engine batches (scheduler.py, step_cost.py)."""

    max_batch_size: int = _flag(
        32, "sequences running at once (bloomduo up sizes the workers' KV caches to it)"
    )
    max_batch_prefill_tokens: int = _flag(
        4096, "prompt tokens one step may carry; longer prompts are computed in chunks over steps"
    )
    # 0 starts every waiting prompt that fits at once, as TGI and vLLM do. Held back, a burst's later
    # prompts start in steps of their own (the split with the least summed time to first token,
    # step_cost.py), but the prompts started first then decode at the pace of those prompt steps and a
    # tail of small decode steps follows: 16 distinct 32-token prompts on a 2-core AVX2 EPYC (bf16),
    # six runs of each alternated, 46.8 tok/s at 4 against 54.0 at 0, TTFT p50 1.70 against 2.16 s,
    # TPOT p50 239 against 165 ms, each request's last token ~10 % earlier at 0.
    max_waiting_steps: int = _flag(
        0,
        "steps a prompt that fits the batch may be held back so a burst starts in the split with the "
        "least summed time to first token (0: all at once, the most tokens/s)",
    )
    # A new prompt that starts like a running sequence copies that prefix's KV cache (vLLM's and TGI's
    # prefix caching, limited to sequences still running, and to finished ones the workers keep while
    # nothing runs: a chat's next turn, a repeated prompt).
    prefix_sharing: bool = _flag(
        True,
        "copy the KV cache of a running sequence's identical prefix instead of computing it again",
    )
    # Kept only while nothing runs (scheduler.py, Scheduler._keep_caches); one chat of up to 2048 tokens.
    prefix_cache_tokens: int = _flag(
        2048,
        "tokens of finished sequences whose KV caches the workers keep while idle, for a next prompt that "
        "starts the same way (a chat's next turn); 0 frees each at once",
    )
    # An idle engine woken by a request waits a few percent of a step for more (a burst), so they share
    # the first step (step_cost.arrival_wait).
    burst_wait: bool = _flag(
        True,
        "at an idle gateway, wait a few percent of a step for the rest of a burst before starting it",
    )


@dataclass(frozen=True)
class StepDeadline:
    """When a step that has not come back means a shard worker stalled (a hung chip, a wedged collective, a
    frozen process): its requests then fail with UNAVAILABLE and the gateway exits for its supervisor to
    replace the group (gateway/engine.py, `Engine.step_deadline`).

    The margins are wide on purpose: a false alarm restarts the whole group, and the fitted cost lags a
    machine that just got busier. The first step after the workers (re)loaded also allocates caches and
    compiles kernels, and its cost is not known yet, so it gets an allowance of its own.
    """

    stall_factor: float = _flag(
        10.0, "a step taking this many times what the gateway measured steps of its size to cost has stalled"
    )
    stall_min_s: float = _flag(5.0, "seconds no step is declared stalled before", flag="--stall-min")
    first_step_timeout_s: float = _flag(
        120.0,
        "seconds the first step after the workers (re)loaded, or any step before the gateway has measured "
        "what steps cost, may take before it has stalled",
        flag="--first-step-timeout",
    )


@dataclass(frozen=True)
class GatewayOptions:
    model_dir: Path
    shard_targets: list[str]
    limits: RequestLimits = field(default_factory=RequestLimits)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    step_deadline: StepDeadline = field(default_factory=StepDeadline)
    shard_ready_timeout_s: float = 3600.0
    shutdown_grace_s: float = _flag(
        30.0, "seconds in-flight streams get to finish on SIGTERM", flag="--shutdown-grace"
    )
    tls: TlsFiles = NO_TLS  # the public port's certificate and key
    shard_tls: TlsFiles = NO_TLS  # towards the workers: their CA, and our client certificate for mTLS
    auth_token: str | None = None  # required as "authorization: Bearer <token>" when set
    log_text: bool = _flag(False, "log prompts and generated text (off: privacy)")
    # The HTTP front (OpenAI and TGI APIs) listens on the gRPC port's host, in the same process and loop.
    http_port: int = _flag(0, "serve the OpenAI and TGI HTTP APIs on this port (0: off)")
    served_model_name: str | None = _flag(
        None, "model id of the HTTP APIs (default: the checkpoint directory's name)"
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template for /v1/chat/completions "
            "(default: tokenizer_config.json's, else plain turns)"
        },
    )
