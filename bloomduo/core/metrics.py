"""Prometheus metrics of the gateway and the shard workers (the names TGI and vLLM users look for).

Each process serves its own registry on its --metrics-port; nothing here is computed on scrape.
"""

from __future__ import annotations

from enum import Enum

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from bloomduo.core.logs import get_logger

log = get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Outcome(str, Enum):
    """How a request ended: the outcome label of bloomduo_requests_total, whichever protocol it came by."""

    OK = "ok"
    INVALID_ARGUMENT = "invalid_argument"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"  # refused while not serving, or failed by a worker fault
    CANCELLED = "cancelled"  # the caller went away

    def __str__(self) -> str:
        # prometheus_client labels with str(); Python 3.11 made that the qualified name for str enums.
        return self.value


# --- gateway
REQUESTS = Counter(
    "bloomduo_requests",
    f"Finished requests by outcome ({', '.join(outcome.value for outcome in Outcome)}) "
    "and, for ok, finish reason",
    ["outcome", "finish_reason"],
)
PREFIX_TOKENS_SHARED = Counter(
    "bloomduo_prefix_tokens_shared_total",
    "Prompt tokens whose keys and values were copied from a running or kept sequence instead of computed",
)
STEP_COST = Gauge(
    "bloomduo_step_cost_seconds",
    "The scheduler's fitted step time: fixed seconds per step, and seconds per token (gateway/step_cost.py)",
    ["part"],
)
QUEUE_SIZE = Gauge("bloomduo_queue_size", "Requests admitted and waiting to join the batch")
BATCH_SIZE = Gauge("bloomduo_batch_size", "Sequences in the running batch")
STEP_BATCH = Histogram("bloomduo_step_sequences", "Sequences per model step", buckets=_BATCH_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram(
    "bloomduo_time_to_first_token_seconds", "From admission to the first token", buckets=_LATENCY_BUCKETS
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "bloomduo_time_per_output_token_seconds",
    "Mean time between tokens of a request after its first",
    buckets=_LATENCY_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "bloomduo_request_duration_seconds", "From admission to the last token", buckets=_LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "bloomduo_queue_time_seconds", "From admission to joining the batch", buckets=_LATENCY_BUCKETS
)
GENERATED_TOKENS = Histogram(
    "bloomduo_generated_tokens", "Tokens generated per finished request", buckets=_TOKEN_BUCKETS
)
STEP_PHASE = Histogram(
    "bloomduo_step_phase_seconds",
    "Time of one model step by phase: embed, shards (wire + workers), worker_compute, sample",
    ["phase"],
    buckets=_LATENCY_BUCKETS,
)

# --- shard worker
WORKER_STEP = Histogram(
    "bloomduo_worker_step_seconds", "Model compute of one step on this worker", buckets=_LATENCY_BUCKETS
)
WORKER_STEP_TOKENS = Histogram(
    "bloomduo_worker_step_tokens", "Tokens (rows) per step on this worker", buckets=_TOKEN_BUCKETS
)
WORKER_CACHED_SEQUENCES = Gauge(
    "bloomduo_worker_cached_sequences", "Sequences holding KV cache on this worker"
)
WORKER_CACHED_TOKENS = Gauge("bloomduo_worker_cached_tokens", "Tokens held in this worker's KV cache")

# --- both
GC_PAUSE = Histogram(
    "bloomduo_gc_pause_seconds",
    "Python's cyclic garbage collections by generation (0, 1, 2: full); each stops every Python thread",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
GC_FROZEN_OBJECTS = Gauge(
    "bloomduo_gc_frozen_objects", "Objects alive once the service loaded, exempt from every collection"
)


def serve_metrics(port: int | None, host: str = "0.0.0.0") -> None:
    """Expose /metrics over HTTP on `port` (None: off)."""
    if port is None:
        return
    start_http_server(port, addr=host)
    log.info("metrics_listening", address=f"{host}:{port}")
