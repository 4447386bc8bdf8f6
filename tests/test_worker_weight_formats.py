"""oneDNN-packed bfloat16 Linear weights: the same matmuls as the plain layout, and a GELU folded into
the MLP's first one that rounds once instead of twice."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig

from bloomduo.shard_worker.cpu_weights import PackedLinear, pack_linear_weights, packing_applies
from bloomduo.shard_worker.model import MLP, BloomShardModel, Chunk

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
def test_packed_model_keeps_its_logits_and_hooks():
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
    for block in packed.h:  # the GELU now runs inside dense_h_to_4h
        assert isinstance(block.mlp.gelu, torch.nn.Identity)
        assert (block.mlp.dense_h_to_4h.activation, block.mlp.dense_h_to_4h.algorithm) == ("gelu", "tanh")

    hidden = torch.randn(15, 64).to(torch.bfloat16)
    for want, got in zip(_steps(plain, hidden), _steps(packed, hidden), strict=True):
        # only the GELU's rounding differs: a few bfloat16 steps of the logits at most
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert len(calls) == 3  # the all-reduce hook point still fires once per step


@needs_bf16_onednn
def test_packed_linear_is_bit_identical_to_the_plain_one():
    torch.manual_seed(1)
    plain = torch.nn.Linear(256, 96).to(torch.bfloat16)
    packed = torch.nn.Linear(256, 96).to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    pack_linear_weights(packed)
    assert type(packed) is PackedLinear
    for rows in (1, 7, 64):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        assert torch.equal(packed(x), plain(x))


@needs_bf16_onednn
def test_folded_gelu_rounds_once_so_it_is_closer_to_float32():
    torch.manual_seed(2)
    config = BloomConfig(hidden_size=256, n_head=4, n_layer=1, vocab_size=8)
    mlp = MLP(config).eval().to(torch.bfloat16)
    fc1 = mlp.dense_h_to_4h
    x = torch.randn(64, 256).to(torch.bfloat16)
    exact = torch.nn.functional.gelu(  # float32 throughout, from the same bfloat16 inputs
        torch.nn.functional.linear(x.float(), fc1.weight.float(), fc1.bias.float()), approximate="tanh"
    )
    unfused = mlp.gelu(fc1(x)).float()
    pack_linear_weights(mlp)
    folded = mlp.gelu(mlp.dense_h_to_4h(x)).float()
    error_folded, error_unfused = (folded - exact).abs().mean(), (unfused - exact).abs().mean()
    assert error_folded < 0.8 * error_unfused, (error_folded, error_unfused)
    # and no output is further from float32 than one bfloat16 rounding of the result
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2**-126)
    assert bool(((folded - exact).abs() <= ulp).all())


def test_packing_applies_to_bfloat16_cpu_only(monkeypatch):
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cpu = torch.device("cpu")
    assert packing_applies(cpu, torch.bfloat16) == supported
    assert not packing_applies(cpu, torch.float32)  # float32 stays bit for bit with transformers
    assert not packing_applies(torch.device("meta"), torch.bfloat16)
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    assert not packing_applies(cpu, torch.bfloat16)
