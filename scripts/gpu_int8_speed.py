"""Time the int8 weight-only Linears of a GPU worker against float16 at bloom-7b1's shapes (one shard).

Per path, the 30 layers' four Linears and the LM head each hold their own weights (6.9 GB of int8: no
cache holds them), and one "pass" runs all of them at `rows` rows, as a step of the model does:
  float16     F.linear on float16 weights (cuBLAS)
  triton      triton_int8.int8_linear on int8 weights and float32 scales (what --quantize int8 runs)
  dequant     the fallback: the weight widened and scaled per call, then F.linear
Reports the median of the passes' device times (CUDA events) and the weights' bytes over that time, then
sweeps triton tilings on each shape at one row. `--small` runs tiny shapes anywhere (Triton's interpreter
on a CPU) to check the script itself.

    python scripts/gpu_int8_speed.py [--small] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bloomduo.shard_worker import triton_int8
from bloomduo.shard_worker.quantize import per_channel_int8


def shapes(small: bool) -> tuple[int, list[tuple[str, int, int]]]:
    """(layers, [(name, out_features, in_features)] of one layer, then the LM head)."""
    if small:
        return 2, [
            ("qkv", 96, 32),
            ("dense", 32, 32),
            ("h_to_4h", 128, 32),
            ("4h_to_h", 32, 128),
            ("lm_head", 300, 32),
        ]
    h = 4096
    return 30, [
        ("qkv", 3 * h, h),
        ("dense", h, h),
        ("h_to_4h", 4 * h, h),
        ("4h_to_h", h, 4 * h),
        ("lm_head", 250880, h),
    ]


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, run, repeats: int) -> float:
        """Median ms of `run()` over `repeats`, after one warm-up."""
        run()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                run()
                times.append((time.perf_counter() - began) * 1000)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="1,16,512")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer = Timer(device)
    layers, layer_shapes = shapes(args.small)
    generator = torch.Generator(device).manual_seed(0)
    plan = [shape for _ in range(layers) for shape in layer_shapes[:4]] + [layer_shapes[4]]
    half, int8 = [], []
    for _name, out_features, in_features in plan:
        w = torch.randn(out_features, in_features, generator=generator, device=device).mul_(0.02)
        q, scale = per_channel_int8(w)
        half.append(w.half())
        int8.append((q, scale))
        del w
    weight_bytes = {
        "float16": sum(w.numel() * 2 for w in half),
        "triton": sum(q.numel() + s.numel() * 4 for q, s in int8),
    }
    weight_bytes["dequant"] = weight_bytes["triton"]
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "passes": []}
    print(f"{'rows':>5} {'path':>8} {'ms/pass':>9} {'GB/s':>7}")
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {
            k: torch.randn(rows, k, generator=generator, device=device).half() for k in {s[2] for s in plan}
        }
        paths = {
            "float16": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in half],
            "triton": lambda xs=xs: [triton_int8.int8_linear(xs[q.shape[1]], q, s) for q, s in int8],
            "dequant": lambda xs=xs: [
                F.linear(xs[q.shape[1]], q.half() * s.half()[:, None]) for q, s in int8
            ],
        }
        for path, run in paths.items():
            ms = timer(run, args.repeats)
            rate = weight_bytes[path] / ms / 1e6
            results["passes"].append({"rows": rows, "path": path, "ms": ms, "GB_per_s": rate})
            print(f"{rows:>5} {path:>8} {ms:>9.3f} {rate:>7.0f}", flush=True)
    # tilings at one row, each shape on rotating copies (the layers' own weights) so no cache holds them
    results["tilings"] = []
    x1 = {k: torch.randn(1, k, generator=generator, device=device).half() for k in {s[2] for s in plan}}
    print(f"\n{'shape':>8} {'tiling (m,n,k,split)':>22} {'us':>8} {'GB/s':>7}")
    for name, out_features, in_features in layer_shapes:
        copies = [(q, s) for (q, s), shape in zip(int8, plan, strict=True) if shape[0] == name]
        chosen = triton_int8.tiling(
            1,
            out_features,
            in_features,
            8 if device == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count,
        )
        candidates = {chosen} | {
            triton_int8.Tiling(16, n, k, split)
            for n in (32, 64, 128)
            for k in (128, 256)
            for split in (1, chosen.split)
        }
        for tiling in sorted(candidates, key=lambda t: (t.block_n, t.block_k, t.split)):
            ms = timer(
                lambda t=tiling, x=x1[in_features], c=copies: [
                    triton_int8.int8_linear(x, q, s, shape=t) for q, s in c
                ],
                args.repeats,
            )
            us = ms * 1000 / len(copies)
            rate = out_features * in_features / us / 1e3
            mark = " <- chosen" if tiling == chosen else ""
            label = f"{tiling.block_m},{tiling.block_n},{tiling.block_k},{tiling.split}"
            results["tilings"].append(
                {"shape": name, "tiling": label, "us": us, "GB_per_s": rate, "chosen": bool(mark)}
            )
            print(f"{name:>8} {label:>22} {us:>8.1f} {rate:>7.0f}{mark}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
