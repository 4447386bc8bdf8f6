"""Per-row cost of the gateway's Sampler over a BLOOM-sized vocabulary, on one torch thread.

    python scripts/sampler_timing.py [--vocab 250880] [--repeats 15]

Rows: flat, mid and peaked random logits, and the row of a random checkpoint (`bloomduo demo-model` and the
bench's: all but a thousand logits tied at exactly 0, one a hair away), the worst case for nucleus counting.
Columns: the sampling settings clients send most. Each cell is the median of --repeats whole Sampler calls,
in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bloomduo.gateway.sampling import Sampler, SamplingParams

SETTINGS = {
    "t 0.8": SamplingParams(do_sample=True, temperature=0.8),
    "t 0.8, top-p 0.95": SamplingParams(do_sample=True, temperature=0.8, top_p=0.95),
    "t 0.7, top-k 50, top-p 0.9": SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
    "typical-p 0.9": SamplingParams(do_sample=True, typical_p=0.9),
}


def rows(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tied = torch.zeros(vocab)
    spread = torch.randperm(vocab, generator=generator)[:1000]
    tied[spread] = torch.randn(1000, generator=generator)
    tied[spread[0]] = 1e-4
    return {
        "random checkpoint (tied at 0)": tied,
        "randn (flat)": torch.randn(vocab, generator=generator),
        "randn x 3": torch.randn(vocab, generator=generator) * 3,
        "randn x 6 (peaked)": torch.randn(vocab, generator=generator) * 6,
    }


def median_ms(sampler: Sampler, logits: torch.Tensor, repeats: int) -> float:
    previous = torch.empty(0, dtype=torch.long)
    sampler(logits, previous)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sampler(logits, previous)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250880)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the gateway's sampling threads run
    print(f"| logits ({args.vocab}) | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for name, logits in rows(args.vocab).items():
        cells = [f"{median_ms(Sampler(params), logits, args.repeats):.2f}" for params in SETTINGS.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
