"""The transformers baseline of `bloomduo bench`, run as its own process; prints its figures as JSON.

    python -m bloomduo.apps.bench_baseline --model DIR --dtype bfloat16 --prompt-ids 1,2,3 --new-tokens 64 \\
        --concurrency 1,16

BloomForCausalLM.generate (greedy, EOS suppressed by min_new_tokens, KV cache on) is measured two ways at
every concurrency level L, against the same closed loop of L clients that the stack faces:
- one at a time, what a naive server does: requests are served in arrival order, one generate call each, so a
  queued request's time to first token includes its wait;
- static batch: the L prompts go in one generate call; the clients wait for the whole batch, then send again.
The prompts all have the same length, so batching adds no padding. At L = 1 both are the same server, so
it is timed once and reported under both names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import BloomForCausalLM
from transformers.generation.streamers import BaseStreamer

from bloomduo.apps.bench import (
    Sample,
    add_baseline_run_arguments,
    progress,
    progress_level,
    requests_for_level,
    rss_bytes,
    summarize_level,
)
from bloomduo.core.dtypes import FLOAT_DTYPES


class StepClock(BaseStreamer):
    """Timestamps every decoding step of a generate call, through the streamer hook.

    generate() puts the prompt first, then each step's new tokens (the whole batch's at once) right after
    choosing them, which is when a streaming server could send them.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class Baseline:
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str, new_tokens: int) -> None:
        self.model = BloomForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.new_tokens = new_tokens

    @torch.inference_mode()
    def step_times(self, prompt_ids: list[int], batch: int) -> list[float]:
        """Generate for `batch` copies of the prompt; return the time each step's tokens were ready."""
        input_ids = torch.tensor([prompt_ids] * batch, device=self.device)
        clock = StepClock()
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            do_sample=False,
            use_cache=True,
            streamer=clock,
            pad_token_id=self.model.config.pad_token_id,
        )
        generated = output.shape[1] - len(prompt_ids)
        if generated != self.new_tokens or len(clock.times) != self.new_tokens:
            raise RuntimeError(
                f"generate made {generated} tokens in {len(clock.times)} steps, not {self.new_tokens}"
            )
        return clock.times


def _sample(arrival: float, times: list[float]) -> Sample:
    return Sample(
        ttft_s=times[0] - arrival,
        tpot_s=(times[-1] - times[0]) / (len(times) - 1),
        generated_tokens=len(times),
    )


def one_at_a_time(baseline: Baseline, prompt_ids: list[int], level: int, requests: int) -> dict[str, Any]:
    samples: list[Sample] = []
    finished: list[float] = []
    start = time.perf_counter()
    for index in range(requests):
        # The first `level` requests arrive together; each later one is sent by the client whose request
        # finished `level` places earlier, and queues behind the others.
        arrival = start if index < level else finished[index - level]
        times = baseline.step_times(prompt_ids, 1)
        finished.append(times[-1])
        samples.append(_sample(arrival, times))
        progress("transformers one at a time", level, len(samples), requests, samples[-1])
    summary = summarize_level(level, samples, finished[-1] - start)
    progress_level("transformers one at a time", summary)
    return summary


def static_batch(baseline: Baseline, prompt_ids: list[int], level: int, requests: int) -> dict[str, Any]:
    samples: list[Sample] = []
    start = time.perf_counter()
    # Whole batches only, so every one has `level` sequences; the last may take a few more requests.
    batches = math.ceil(requests / level)
    for _ in range(batches):
        sent = time.perf_counter()
        times = baseline.step_times(prompt_ids, level)
        samples += [_sample(sent, times)] * level
        progress("transformers static batch", level, len(samples), batches * level, samples[-1])
    summary = summarize_level(level, samples, time.perf_counter() - start)
    progress_level("transformers static batch", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomduo.apps.bench_baseline", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", required=True, choices=FLOAT_DTYPES)
    parser.add_argument("--device", default="cpu")
    add_baseline_run_arguments(parser)
    args = parser.parse_args(argv)

    # Only the JSON may reach stdout, whatever transformers prints along the way.
    out, sys.stdout = sys.stdout, sys.stderr
    # All the machine's cores, as a user of transformers would get on a dedicated box.
    torch.set_num_threads(os.cpu_count() or 1)
    prompt_ids = [int(part) for part in args.prompt_ids.split(",")]
    baseline = Baseline(args.model, getattr(torch, args.dtype), args.device, args.new_tokens)
    if args.warmup:
        baseline.step_times(prompt_ids, args.warmup)
    results: dict[str, Any] = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "device": args.device,
        "one_at_a_time": [],
        "static_batch": [],
    }
    max_rss = 0
    for level in args.concurrency:
        requests = requests_for_level(level, args.requests_per_level)
        one = one_at_a_time(baseline, prompt_ids, level, requests)
        results["one_at_a_time"].append(one)
        # A single client with batches of one is exactly the one-at-a-time server: no need to time it twice.
        results["static_batch"].append(
            one if level == 1 else static_batch(baseline, prompt_ids, level, requests)
        )
        max_rss = max(max_rss, rss_bytes(os.getpid()))
    results["max_rss_bytes"] = max_rss
    json.dump(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
