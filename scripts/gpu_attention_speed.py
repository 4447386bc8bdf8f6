"""Time a decode step's attention on a GPU two ways, at bloom-7b1's heads (one shard: 32 x 128):
  sdpa     F.scaled_dot_product_attention with the ALiBi bias as a float mask (Attention._attention)
  unfused  scores, float32 softmax, weighted values (Attention._one_query_attention, the CPU's way)
for B sequences of one query each against kv_length cached keys (views of a larger cache, as the worker's).
Per call: the host's time to issue it (no synchronisation) and the device's time (CUDA events), medians.
Then, as decoding does, a key length that grows by one every call (33 .. 132), with SDPA's default backends
and with cuDNN's attention off (a cuDNN graph is built per shape), naming the backend SDPA picks.

    python scripts/gpu_attention_speed.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, MAX_LENGTH, SLOTS = 32, 128, 2048, 32


def unfused(q, keys, values, bias, scale):
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale + bias.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


def sdpa(q, keys, values, bias, scale):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)


def main() -> None:
    device, dtype, scale = "cuda", torch.float16, HEAD_DIM**-0.5
    cache = torch.randn(2, SLOTS, HEADS, MAX_LENGTH, HEAD_DIM, device=device, dtype=dtype)
    print(f"{'B':>3} {'kv':>5} {'path':>8} {'host us':>8} {'device us':>10} {'max diff':>9}")
    for batch in (1, 16):
        for kv_length in (48, 97, 1000):
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
            keys, values = cache[0, :batch, :, :kv_length], cache[1, :batch, :, :kv_length]
            bias = torch.randn(batch, HEADS, 1, kv_length, device=device, dtype=dtype)
            want = unfused(q.double(), keys.double(), values.double(), bias.double(), scale)
            for name, run in (("sdpa", sdpa), ("unfused", unfused)):
                out = run(q, keys, values, bias, scale)
                diff = (out.double() - want).abs().max().item()
                torch.cuda.synchronize()
                host, device_us = [], []
                for _ in range(7):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    began = time.perf_counter()
                    start.record()
                    for _ in range(50):
                        run(q, keys, values, bias, scale)
                    end.record()
                    host.append((time.perf_counter() - began) / 50 * 1e6)
                    end.synchronize()
                    device_us.append(start.elapsed_time(end) / 50 * 1e3)
                row = f"{batch:>3} {kv_length:>5} {name:>8} {statistics.median(host):>8.1f}"
                print(f"{row} {statistics.median(device_us):>10.1f} {diff:>9.2e}", flush=True)
    print(f"\n{'B':>3} {'cuDNN':>6} {'backend':>22} {'us a call, key length growing':>30}")
    for batch in (1, 16):
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        for cudnn in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            lengths = range(33, 133)
            bias = {n: torch.randn(batch, HEADS, 1, n, device=device, dtype=dtype) for n in lengths}
            views = {n: (cache[0, :batch, :, :n], cache[1, :batch, :, :n]) for n in lengths}
            keys, values = views[33]
            choice = torch._fused_sdp_choice(q, keys, values, bias[33], 0.0, False, scale=scale)
            backend = str(torch.nn.attention.SDPBackend(choice)).split(".")[-1]
            torch.cuda.synchronize()
            began = time.perf_counter()
            for n in lengths:
                sdpa(q, *views[n], bias[n], scale)
            torch.cuda.synchronize()
            per_call = (time.perf_counter() - began) / len(lengths) * 1e6
            print(f"{batch:>3} {'on' if cudnn else 'off':>6} {backend:>22} {per_call:>30.1f}", flush=True)
    torch.backends.cuda.enable_cudnn_sdp(True)


if __name__ == "__main__":
    main()
