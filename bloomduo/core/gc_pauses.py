"""Python's cyclic garbage collector, kept off the serving path.

Every collection stops the process's Python threads (the event loop's and a worker's step thread), and a
full one (generation 2) walks every tracked object alive: ~190 thousand in a loaded shard worker and ~220
thousand in a gateway (torch, gRPC, protobuf, the tokenizer, the model's modules). On a 2-core EPYC loading
ran three or four a process (the longest 146-240 ms), and one in the gateway during a 26-request bench took
181 ms, every stream stalled meanwhile. What is alive once a service has loaded lives as long as the process,
so it is frozen out of every later walk (as vLLM freezes its heap after warm-up, and SGLang offers to); the
collector still frees the cycles serving makes. The pauses that remain are timed into
bloomduo_gc_pause_seconds.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from bloomduo.core import metrics
from bloomduo.core.logs import get_logger

log = get_logger(__name__)


def freeze_loaded_heap() -> int:
    """Collect once, then exempt every object still alive from all later collections; their number."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    metrics.GC_FROZEN_OBJECTS.set(frozen)
    log.info("loaded_heap_frozen", objects=frozen)
    return frozen


class _PauseTimer:
    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            metrics.GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - self.started)


_TIMER = _PauseTimer()


def time_pauses() -> None:
    """Time every collection from now on into bloomduo_gc_pause_seconds (once per process however often
    called)."""
    if _TIMER not in gc.callbacks:
        gc.callbacks.append(_TIMER)
