"""oneDNN-packed bfloat16 Linear weights give the same logits as the plain layout, faster."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig

from shard_worker.cpu_weights import PackedLinear, pack_linear_weights, packing_applies
from shard_worker.model import BloomShardModel, Chunk

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU or torch build has no oneDNN bfloat16 matmul (needs AVX512-BF16 or AMX)",
)


def _steps(model: BloomShardModel, hidden: torch.Tensor) -> list[torch.Tensor]:
    """A ragged prefill, a decode step of both sequences, then a chunk joining a decode."""
    cache = model.new_kv_cache(initial_capacity=4)
    return [
        model(hidden[:9], [Chunk(0, 0, 5), Chunk(1, 0, 4)], cache),
        model(hidden[9:11], [Chunk(0, 5, 1), Chunk(1, 4, 1)], cache),
        model(hidden[11:15], [Chunk(0, 6, 1), Chunk(2, 0, 3)], cache),
    ]


@needs_bf16_onednn
def test_packed_weights_give_identical_logits_and_keep_hooks():
    torch.manual_seed(0)
    config = BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=300)
    plain = BloomShardModel(config).eval().to(torch.bfloat16)
    for block in plain.h:  # float32 slopes, as load_shard leaves them
        block.self_attention.alibi_slopes = block.self_attention.alibi_slopes.float()
    packed = BloomShardModel(config).eval().to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    for block in packed.h:
        block.self_attention.alibi_slopes = block.self_attention.alibi_slopes.float()
    calls = []
    packed.h[0].mlp.dense_4h_to_h.register_forward_hook(lambda *_: calls.append(1))

    assert pack_linear_weights(packed) is packed
    linears = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert all(m.weight.is_mkldnn for m in linears)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())

    hidden = torch.randn(15, 64).to(torch.bfloat16)
    for want, got in zip(_steps(plain, hidden), _steps(packed, hidden), strict=True):
        assert torch.equal(want, got)
    assert len(calls) == 3  # the all-reduce hook point still fires once per step


def test_packing_applies_to_bfloat16_cpu_only(monkeypatch):
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cpu = torch.device("cpu")
    assert packing_applies(cpu, torch.bfloat16) == supported
    assert not packing_applies(cpu, torch.float32)  # float32 stays bit for bit with transformers
    assert not packing_applies(torch.device("meta"), torch.bfloat16)
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    assert not packing_applies(cpu, torch.bfloat16)
