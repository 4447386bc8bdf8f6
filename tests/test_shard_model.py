"""The tensor-parallel BLOOM shard model against transformers' BloomForCausalLM.

W real worker processes (torch.multiprocessing spawn, gloo) each load their slice of a tiny random
checkpoint (n_head 12, vocab 1009: prime, so no W divides it) and run the same ragged steps:
a prefill of sequences of different lengths, decode steps fed HF's greedy tokens, a chunked
prefill joining mid-flight, a multi-token continuation, a freed id reused, prompts of equal length.
The ranks' vocabulary slices, concatenated and trimmed, must equal HF's logits for the last token of
every chunk.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from bloomduo.shard_worker.distributed import all_reduce_sum, backend_for, import_torch_npu
from bloomduo.shard_worker.kv_cache import CachePositionError, KVCache
from bloomduo.shard_worker.model import BloomShardModel, alibi_slopes
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import (
    RULES,
    RowParallel,
    add_all_reduces,
    load_shard,
    rule_for,
    shard_parameters,
    vocab_range,
)
from tests._dist_helpers import (
    TINY,
    make_checkpoint,
    open_checkpoint,
    parameter_bytes,
    relative_error,
    run_rank,
)

# name: (sequence_id, prompt length). "F" reuses C's id after C is freed.
SEQUENCES = {
    **{"A": (0, 5), "B": (1, 9), "C": (2, 3), "D": (3, 10), "F": (2, 6), "G": (4, 4), "H": (5, 4)},
    **{"I": (6, 3), "J": (7, 3), "K": (8, 7)},
}
# Each step: (names to free first, [(name, tokens fed)]); a chunk continues where its sequence stopped.
SCHEDULE = [
    ([], [("A", 5), ("B", 9), ("C", 3)]),  # ragged prefill
    ([], [("A", 1), ("B", 1), ("C", 1)]),  # decode
    ([], [("A", 1), ("B", 1), ("C", 1)]),
    ([], [("A", 1), ("B", 1), ("C", 1), ("D", 4)]),  # D's prompt arrives in chunks
    ([], [("D", 4), ("A", 1), ("B", 1), ("C", 1)]),
    ([], [("A", 1), ("B", 1), ("C", 1), ("D", 2)]),
    (["C"], [("A", 1), ("B", 1), ("D", 1)]),
    ([], [("A", 1), ("B", 1), ("D", 1)]),
    ([], [("A", 1), ("B", 1), ("D", 1)]),  # A's 8th decode
    ([], [("B", 1), ("A", 3), ("D", 1)]),  # several tokens continuing A
    ([], [("A", 1), ("F", 6)]),  # C's id reused
    ([], [("G", 4), ("F", 1), ("H", 4), ("A", 1)]),  # two whole prompts of one length, attending together
    ([], [("H", 1), ("G", 1), ("F", 1)]),
    (["H"], [("I", 3), ("J", 3)]),  # a step of equal-length prompts alone: their rows and slots as slices
    ([], [("K", 7)]),  # one prompt alone, the usual prefill
    ([], [("K", 1), ("I", 1), ("J", 1)]),
]


def _embed(hf, ids: torch.Tensor) -> torch.Tensor:
    """What the gateway sends: word_embeddings then word_embeddings_layernorm."""
    return hf.transformer.word_embeddings_layernorm(hf.transformer.word_embeddings(ids))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Checkpoint, the step plan (inputs per dtype) and HF's logits for every chunk of it."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_bloom")
    hf32 = make_checkpoint(model_dir)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    totals = {name: 0 for name in SEQUENCES}
    for _, chunks in SCHEDULE:
        for name, n in chunks:
            totals[name] += n
    tokens, logits = {}, {"float32": {}, "bfloat16": {}}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, (_, prompt_len) in SEQUENCES.items():
            ids = torch.randint(3, TINY["vocab_size"], (prompt_len,), generator=generator)
            while len(ids) < totals[name]:  # HF's greedy continuation
                next_id = hf32(ids[None]).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id[None]])
            tokens[name] = ids
            logits["float32"][name] = hf32(ids[None]).logits[0]
            logits["bfloat16"][name] = hf16(ids[None]).logits[0]

        steps, expected = [], {"float32": [], "bfloat16": []}
        done = {name: 0 for name in SEQUENCES}
        for free, chunks in SCHEDULE:
            step = {"free": [SEQUENCES[n][0] for n in free], "chunks": [], "hidden": {}}
            rows = []
            for name, n in chunks:
                start = done[name]
                step["chunks"].append((SEQUENCES[name][0], start, n))
                rows.append(tokens[name][start : start + n])
                done[name] += n
            ids = torch.cat(rows)
            step["hidden"] = {"float32": _embed(hf32, ids), "bfloat16": _embed(hf16, ids)}
            for dtype_name in expected:
                expected[dtype_name].append(
                    torch.stack([logits[dtype_name][name][done[name] - 1] for name, _ in chunks])
                )
            steps.append(step)
    plan_path = model_dir / "plan.pt"
    torch.save({"steps": steps}, plan_path)
    return {"model_dir": model_dir, "plan_path": plan_path, "expected": expected, "hf": hf32}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_tensor_parallel_matches_transformers(reference, world_size, tmp_path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    args = (world_size, init_method, str(reference["model_dir"]), str(reference["plan_path"]), str(tmp_path))
    mp.spawn(run_rank, args=args, nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    vocab = TINY["vocab_size"]
    padded = -(-vocab // world_size) * world_size
    assert [r["vocab_range"] for r in ranks] == [
        (i * padded // world_size, (i + 1) * padded // world_size, padded) for i in range(world_size)
    ]
    assert all(r["local_heads"] == TINY["n_head"] // world_size for r in ranks)

    # float32: the sums run in another order (split over ranks, fused attention), measured <= 5 eps;
    # bfloat16: both sides round every layer's output, measured < 1 eps, and may tie-break argmaxes apart.
    for dtype, bound in ((torch.float32, 32), (torch.bfloat16, 2)):
        dtype_name = str(dtype).removeprefix("torch.")
        for step, want in enumerate(reference["expected"][dtype_name]):
            full = torch.cat([r[dtype_name][step] for r in ranks], dim=1)
            assert full.shape == (want.shape[0], padded)
            assert not full[:, vocab:].any(), "padding rows of the LM head must give zero logits"
            got = full[:, :vocab]
            error = relative_error(got, want, dtype)
            assert error < bound, f"W={world_size} {dtype_name} step {step}: |ours - HF| = {error:.3g} eps"
            if dtype == torch.bfloat16:
                assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9

    # Each rank holds ~1/W of the blocks (LayerNorms replicated; row-parallel biases on rank 0) and
    # exactly its slice of the LM head.
    blocks = reference["hf"].transformer.h
    replicated = sum(
        parameter_bytes(b.input_layernorm) + parameter_bytes(b.post_attention_layernorm) for b in blocks
    )
    once = sum(b.self_attention.dense.bias.nbytes + b.mlp.dense_4h_to_h.bias.nbytes for b in blocks)
    split = parameter_bytes(blocks) - replicated - once
    for rank, r in enumerate(ranks):
        assert r["block_bytes"] == split // world_size + replicated + (once if rank == 0 else 0)
        assert r["lm_head_bytes"] == padded // world_size * TINY["hidden_size"] * 4

    # The wrong start_position was refused with a clear message on every rank, and nothing hung.
    assert all("starts at position" in r["position_error"] for r in ranks)
    assert ranks[0]["cache_sequences"] == 8  # A, B, D, F, G, I, J and K (C and H freed)


def test_alibi_slopes_match_transformers():
    for n in (1, 2, 3, 5, 8, 12, 16, 24, 32, 40, 112):
        assert torch.equal(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu"))), n


def test_shards_take_their_slice_of_all_heads_slopes():
    config = BloomConfig(**TINY)
    with torch.device("meta"):
        model = BloomShardModel(config)
    shard_parameters(model, rank=1, world_size=4)
    add_all_reduces(model, group=None)
    attention, mlp = model.h[0].self_attention, model.h[0].mlp
    assert attention.num_heads == 3
    assert torch.equal(attention.alibi_slopes, alibi_slopes(12)[3:6])
    assert not torch.equal(attention.alibi_slopes, alibi_slopes(3))  # the classic bug
    assert attention.query_key_value.weight.shape == (3 * 3 * 8, 96)
    # the ROW layers: wrapped with their all-reduce, bias on rank 0 only
    assert isinstance(attention.dense, RowParallel) and isinstance(mlp.dense_4h_to_h, RowParallel)
    assert attention.dense.linear.weight.shape == (96, 24) and attention.dense.linear.bias is None
    assert mlp.dense_4h_to_h.linear.weight.shape == (96, 96) and mlp.dense_4h_to_h.linear.bias is None
    assert mlp.dense_h_to_4h.weight.shape == (96, 96)
    assert model.lm_head.weight.shape == (1012 // 4, 96)


class _RecordingCheckpoint:
    """A real checkpoint that remembers which ranges were read."""

    def __init__(self, checkpoint) -> None:
        self._checkpoint, self.config, self.reads = checkpoint, checkpoint.config, []

    def __getattr__(self, attr):
        return getattr(self._checkpoint, attr)

    def read(self, name, dim=None, start=0, stop=None):
        tensor = self._checkpoint.read(name, dim, start, stop)
        self.reads.append((name, dim, start, stop, tensor.numel()))
        return tensor


def test_load_shard_reads_only_its_slices(reference):
    checkpoint = _RecordingCheckpoint(open_checkpoint(reference["model_dir"]))
    model = load_shard(checkpoint, 2, 3, device=torch.device("cpu"), dtype=torch.float32)
    reads = {name: (dim, start, stop) for name, dim, start, stop, _ in checkpoint.reads}
    hidden = TINY["hidden_size"]
    assert reads["word_embeddings.weight"] == (0, 674, 1009)  # the last rank: real rows only
    assert reads["h.0.self_attention.query_key_value.weight"] == (0, 2 * 3 * hidden // 3, 3 * hidden)
    assert reads["h.1.mlp.dense_4h_to_h.weight"] == (1, 2 * 4 * hidden // 3, 4 * hidden)
    assert reads["ln_f.weight"] == (None, 0, None)
    assert "h.0.self_attention.dense.bias" not in reads  # counted once: rank 0 holds it
    stored = sum(math.prod(checkpoint.shape(name)) for name in checkpoint.names())
    assert sum(numel for *_, numel in checkpoint.reads) < 0.4 * stored  # ~1/3 plus LayerNorms
    assert model.lm_head.weight.shape == (1011 // 3, hidden)
    assert not model.lm_head.weight[1009 - 674 :].any()  # the padding row


def test_vocab_range():
    assert vocab_range(1009, 0, 1) == (0, 1009, 1009)
    assert vocab_range(1009, 1, 2) == (505, 1010, 1010)
    assert vocab_range(250880, 1, 2) == (125440, 250880, 250880)
    assert vocab_range(10, 2, 3) == (8, 12, 12)


def test_every_parameter_has_a_rule(reference):
    with torch.device("meta"):
        model = BloomShardModel(BloomConfig(**TINY))
    names = [name for name, _ in model.named_parameters()]
    assert {rule_for(name) for name in names} <= set(RULES.values())
    checkpoint = open_checkpoint(reference["model_dir"])
    stored = set(checkpoint.names()) - {"word_embeddings.weight", "word_embeddings_layernorm.weight"}
    stored -= {"word_embeddings_layernorm.bias"}
    assert stored <= set(names)


def test_single_process_cache_lifecycle_and_errors(reference):
    """In-process W=1 (no process group): cache growth, free, errors and their messages."""
    hf = reference["hf"]
    model = load_shard(
        open_checkpoint(reference["model_dir"]), 0, 1, device=torch.device("cpu"), dtype=torch.float32
    )
    cache = model.new_kv_cache(initial_capacity=1)
    ids = torch.arange(10, 30)
    with torch.no_grad():
        hidden = _embed(hf, ids)
        want = hf(ids[None]).logits[0]
    out = model(hidden[:7], [Chunk(5, 0, 7)], cache)
    for pos in range(7, 20):  # one token at a time: the cache grows well past its first capacity
        out = model(hidden[pos : pos + 1], [Chunk(5, pos, 1)], cache)
    assert relative_error(out[0, :1009], want[19], torch.float32) < 32
    assert cache.length(5) == 20 and cache.capacity >= 20
    assert cache.num_sequences == 1 and cache.num_tokens == 20

    with pytest.raises(
        CachePositionError, match="sequence 5: chunk starts at position 19 but the KV cache holds 20"
    ):
        model(hidden[:1], [Chunk(5, 19, 1)], cache)
    with pytest.raises(CachePositionError, match="must start at position 0"):
        model(hidden[:1], [Chunk(6, 3, 1)], cache)
    with pytest.raises(CachePositionError, match="free"):
        model(hidden[:1], [Chunk(5, 0, 1)], cache)
    with pytest.raises(CachePositionError, match="more than once"):
        model(hidden[:2], [Chunk(7, 0, 1), Chunk(7, 1, 1)], cache)
    with pytest.raises(ValueError, match="rows"):
        model(hidden[:3], [Chunk(8, 0, 2)], cache)
    assert cache.length(5) == 20 and cache.num_sequences == 1  # failed steps changed nothing

    assert cache.free(5) and not cache.free(5)
    assert cache.num_sequences == 0 and cache.num_tokens == 0 and cache.length(5) == 0
    out = model(hidden[:4], [Chunk(5, 0, 4)], cache)  # the id is free again
    with torch.no_grad():
        assert relative_error(out[0, :1009], hf(ids[None, :4]).logits[0, -1], torch.float32) < 32


def test_float16_runs_and_is_close(reference):
    hf = copy.deepcopy(reference["hf"]).to(torch.float16)
    model = load_shard(
        open_checkpoint(reference["model_dir"]), 0, 1, device=torch.device("cpu"), dtype=torch.float16
    )
    cache = model.new_kv_cache()
    ids = torch.arange(40, 52)
    with torch.no_grad():
        hidden = _embed(hf, ids)
        want = hf(ids[None]).logits[0]
    prefill = model(hidden[:9], [Chunk(0, 0, 9)], cache)
    decode = model(hidden[9:12], [Chunk(0, 9, 3)], cache)
    assert prefill.dtype == torch.float16 and cache.num_tokens == 12
    assert relative_error(prefill[0, :1009], want[8], torch.float16) < 4
    assert relative_error(decode[0, :1009], want[11], torch.float16) < 4


def test_kv_cache_grows_without_losing_rows():
    cache = KVCache(2, 3, 4, initial_capacity=2, block=2)
    k = torch.randn(3, 5, 4)
    cache.prepare([Chunk(1, 0, 2)])
    cache.write(0, 1, 0, k[:, :2], -k[:, :2])
    cache.commit([Chunk(1, 0, 2)])
    cache.prepare([Chunk(1, 2, 3)])
    keys, values = cache.write(0, 1, 2, k[:, 2:], -k[:, 2:])
    cache.commit([Chunk(1, 2, 3)])
    assert torch.equal(keys, k) and torch.equal(values, -k)
    layout = 2 * cache.num_slots * 3 * cache.capacity * 4  # layers x slots x heads x capacity x head_dim
    initial = 2 * 4 * 3 * 2 * 4  # four slots of capacity two
    assert cache.length(1) == 5 and cache.nbytes == 2 * 4 * max(layout, initial)  # keys and values, float32


def test_kv_cache_gives_a_long_prompt_room_to_decode_and_doubles_while_decoding():
    cache = KVCache(1, 2, 4, initial_slots=2, initial_capacity=128, block=16)
    cache.prepare([Chunk(1, 0, 512)])  # past double the capacity: a quarter more than it needs
    assert cache.capacity == 640
    cache.commit([Chunk(1, 0, 512)])
    for position in range(512, 640):  # its next tokens fit without a copy
        cache.prepare([Chunk(1, position, 1)])
        cache.commit([Chunk(1, position, 1)])
        assert cache.capacity == 640
    cache.prepare([Chunk(1, 640, 1)])  # one past: doubled
    assert cache.capacity == 1280


def test_kv_cache_gives_back_what_a_gone_sequence_made_every_slot_take():
    cache = KVCache(1, 2, 4, initial_slots=2, initial_capacity=128, block=16)
    initial_bytes = cache.nbytes
    k = torch.randn(2, 150, 4)
    cache.prepare([Chunk(1, 0, 150), Chunk(2, 0, 512)])
    cache.write(0, 1, 0, k, -k)
    cache.commit([Chunk(1, 0, 150), Chunk(2, 0, 512)])
    assert cache.capacity == 640 and not cache.shrink_to_fit()  # the long sequence still needs it
    cache.free(2)
    assert cache.shrink_to_fit() and cache.capacity == 304  # twice the longest live sequence
    keys, values = cache.token_views(0, 1, 150)
    assert torch.equal(keys[0], k) and torch.equal(values[0], -k)
    assert not cache.keys[:, :, :, 150:].any()  # past every live row: zeros, as a fresh cache's
    for position in range(150, 161):  # 4 x 161 > 640: no longer a quarter of what it held
        cache.prepare([Chunk(1, position, 1)])
        cache.commit([Chunk(1, position, 1)])
    assert cache.capacity == 304 and not cache.shrink_to_fit()
    cache.clear()
    assert cache.shrink_to_fit() and cache.capacity == 128 and cache.nbytes == initial_bytes
    assert not cache.shrink_to_fit()


def test_kv_cache_a_long_prompt_after_another_reuses_its_capacity():
    """The step that frees one long sequence and brings the next sizes the cache for both at once: no shrink
    to the initial capacity only to grow again (a copy of every initial slot, ~0.3 s a bloom-560m worker)."""
    cache = KVCache(1, 2, 4, initial_slots=8, initial_capacity=128, block=16)
    cache.prepare([Chunk(1, 0, 512)])
    cache.commit([Chunk(1, 0, 512)])
    grown = cache.keys
    assert (cache.num_slots, cache.capacity) == (1, 640)
    cache.free(1)
    cache.prepare([Chunk(2, 0, 500)])
    assert cache.keys is grown and cache.slot(2) == 0


def test_kv_cache_grown_for_a_long_prompt_holds_only_the_slots_in_use():
    cache = KVCache(1, 2, 4, initial_slots=8, initial_capacity=16, block=16)
    initial_bytes = cache.nbytes
    k = torch.randn(2, 5, 4)
    cache.prepare([Chunk(1, 0, 5), Chunk(2, 0, 5), Chunk(3, 0, 5)])
    cache.write(0, 3, 0, k, -k)
    cache.commit([Chunk(1, 0, 5), Chunk(2, 0, 5), Chunk(3, 0, 5)])
    cache.free(1)
    cache.free(2)
    cache.prepare([Chunk(4, 0, 40)])  # capacity grows: sequence 3 and the new one, not all 8 slots
    assert (cache.num_slots, cache.capacity) == (2, 64) and [cache.slot(3), cache.slot(4)] == [0, 1]
    keys, values = cache.token_views(0, 1, 5)
    assert torch.equal(keys[0], k) and torch.equal(values[0], -k)  # moved from slot 2 with its rows
    cache.commit([Chunk(4, 0, 40)])
    cache.prepare([Chunk(5, 0, 1)])  # a newcomer: slots double again, at the grown capacity
    assert (cache.num_slots, cache.capacity, cache.slot(5)) == (4, 64, 2)
    cache.commit([Chunk(5, 0, 1)])
    cache.free(4)
    assert cache.shrink_to_fit() and (cache.num_slots, cache.capacity) == (8, 16)
    assert cache.nbytes == initial_bytes and [cache.slot(3), cache.slot(5)] == [0, 2]
    assert torch.equal(cache.token_views(0, 1, 5)[0][0], k)


def test_kv_cache_lays_a_long_prompt_out_in_the_memory_it_already_holds():
    """[8 slots, 16] and [2 slots, 64] are the same number of elements: the long prompt and the return after
    it re-lay the one block (no fresh memory to fault in), moving the live rows and zeroing all else."""
    cache = KVCache(1, 2, 4, initial_slots=8, initial_capacity=16, block=16)
    block, initial_bytes = cache.keys.untyped_storage().data_ptr(), cache.nbytes
    k = torch.randn(2, 5, 4)
    cache.prepare([Chunk(1, 0, 1), Chunk(3, 0, 5)])
    cache.write(0, 3, 0, k, -k)
    cache.commit([Chunk(1, 0, 1), Chunk(3, 0, 5)])
    cache.free(1)
    cache.keys[:, 5] = cache.values[:, 5] = float("nan")  # what a free slot may hold, zeroed by any re-lay
    cache.prepare([Chunk(4, 0, 40)])
    assert (cache.num_slots, cache.capacity, cache.slot(3)) == (2, 64, 0)
    assert cache.keys.untyped_storage().data_ptr() == block and cache.nbytes == initial_bytes
    assert torch.equal(cache.keys[0, 0, :, :5], k) and torch.equal(cache.values[0, 0, :, :5], -k)
    assert not cache.keys[:, :, :, 5:].any() and not cache.values[:, :, :, 5:].any()
    cache.commit([Chunk(4, 0, 40)])
    cache.free(4)
    assert cache.shrink_to_fit() and (cache.num_slots, cache.capacity, cache.slot(3)) == (8, 16, 0)
    assert cache.keys.untyped_storage().data_ptr() == block and cache.nbytes == initial_bytes
    assert torch.equal(cache.token_views(0, 1, 5)[1][0], -k) and not cache.values[:, 1:].any()


def test_kv_cache_reuses_freed_slots_lowest_first():
    cache = KVCache(1, 2, 4, initial_slots=2, initial_capacity=4)
    cache.prepare([Chunk(10, 0, 1), Chunk(11, 0, 1), Chunk(12, 0, 3)])  # three sequences: slots grow
    assert [cache.slot(s) for s in (10, 11, 12)] == [0, 1, 2] and cache.num_slots >= 3
    cache.commit([Chunk(10, 0, 1), Chunk(11, 0, 1), Chunk(12, 0, 3)])
    assert cache.free(10) and not cache.free(10)
    cache.prepare([Chunk(13, 0, 2)])
    assert cache.slot(13) == 0 and cache.length(12) == 3


def test_batched_single_token_attention_matches_one_by_one():
    """Decode chunks of different lengths attend in one matmul; the result equals attending one by one."""
    torch.manual_seed(0)
    from transformers import BloomConfig

    from bloomduo.shard_worker.model import BloomShardModel

    config = BloomConfig(hidden_size=24, n_head=3, n_layer=2, vocab_size=50)
    model = BloomShardModel(config).eval()
    lengths = [5, 2, 9]
    prompts = [torch.randn(n, 24) for n in lengths]
    step = torch.randn(len(lengths), 24)

    together = model.new_kv_cache(initial_capacity=4)
    for sid, prompt in enumerate(prompts):
        model(prompt, [Chunk(sid, 0, len(prompt))], together)
    batched = model(step, [Chunk(sid, n, 1) for sid, n in enumerate(lengths)], together)

    for sid, prompt in enumerate(prompts):
        alone = model.new_kv_cache()
        model(prompt, [Chunk(0, 0, len(prompt))], alone)
        single = model(step[sid : sid + 1], [Chunk(0, lengths[sid], 1)], alone)
        assert relative_error(batched[sid], single[0], torch.float32) < 8


def test_sequences_decode_on_as_alone_while_the_cache_moves_them():
    """A long prompt grows the cache to the slots in use (the running sequences moved to the lowest slots),
    and freeing it shrinks the cache back: each running sequence's logits stay those of running alone."""
    torch.manual_seed(0)
    config = BloomConfig(hidden_size=24, n_head=3, n_layer=2, vocab_size=50)
    model = BloomShardModel(config).eval()
    prompts = {1: torch.randn(3, 24), 2: torch.randn(2, 24), 3: torch.randn(4, 24)}
    steps = torch.randn(2, 2, 24)
    cache = model.new_kv_cache(initial_capacity=4, initial_slots=8)
    for sid, prompt in prompts.items():
        model(prompt, [Chunk(sid, 0, len(prompt))], cache)
    cache.free(1)
    model(torch.randn(20, 24), [Chunk(9, 0, 20)], cache)  # capacity 16 -> 32: slots 8 -> 4
    assert (cache.num_slots, cache.capacity, cache.slot(2), cache.slot(3)) == (4, 32, 0, 1)
    together = [model(steps[0], [Chunk(2, 2, 1), Chunk(3, 4, 1)], cache)]
    cache.free(9)
    assert cache.shrink_to_fit() and (cache.num_slots, cache.capacity) == (8, 16)
    together.append(model(steps[1], [Chunk(2, 3, 1), Chunk(3, 5, 1)], cache))

    for row, sid in enumerate((2, 3)):
        alone = model.new_kv_cache()
        model(prompts[sid], [Chunk(0, 0, len(prompts[sid]))], alone)
        for step, batched in zip(steps, together, strict=True):
            single = model(step[row : row + 1], [Chunk(0, alone.length(0), 1)], alone)
            assert relative_error(batched[row], single[0], torch.float32) < 8


def test_distributed_helpers():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for("npu:0") == "hccl" and backend_for("cpu") == "gloo"
    with pytest.raises(ValueError, match="backend"):
        backend_for(torch.device("meta"))
    t = torch.ones(3)
    assert all_reduce_sum(t, None) is t and torch.equal(t, torch.ones(3))  # no group: a no-op
    if importlib.util.find_spec("torch_npu") is None:
        with pytest.raises(RuntimeError, match="torch_npu"):
            import_torch_npu()


def test_a_copied_prefix_gives_the_logits_of_a_full_prompt():
    """A new sequence that takes a running one's first P tokens from the cache computes only the rest,
    and ends where computing its whole prompt ends."""
    torch.manual_seed(0)
    config = BloomConfig(hidden_size=24, n_head=3, n_layer=2, vocab_size=50)
    model = BloomShardModel(config).eval()
    shared, own = torch.randn(6, 24), torch.randn(3, 24)

    cache = model.new_kv_cache(initial_capacity=4)
    model(shared, [Chunk(1, 0, 6)], cache)  # the donor, running
    reused = model(own, [Chunk(2, 5, 3, prefix_sequence_id=1)], cache)  # its first 5 tokens, then 3 own
    assert cache.length(2) == 8 and cache.length(1) == 6

    alone = model.new_kv_cache()
    full = model(torch.cat([shared[:5], own]), [Chunk(7, 0, 8)], alone)
    assert relative_error(reused, full, torch.float32) < 8
    # and the copy is the sequence's own from then on: the donor decoding on does not touch it
    step = torch.randn(1, 24)
    model(torch.randn(1, 24), [Chunk(1, 6, 1)], cache)
    copied, own = model(step, [Chunk(2, 8, 1)], cache), model(step, [Chunk(7, 8, 1)], alone)
    assert relative_error(copied, own, torch.float32) < 8


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (Chunk(2, 3, 1, prefix_sequence_id=9), "not a cached sequence"),
        (Chunk(2, 5, 1, prefix_sequence_id=1), "holds 4"),
        (Chunk(2, 0, 1, prefix_sequence_id=1), "a prefix of 0 tokens"),
        (Chunk(1, 4, 1, prefix_sequence_id=1), "is cached already"),
    ],
)
def test_a_bad_prefix_is_refused_before_anything_changes(chunk, message):
    cache = KVCache(1, 2, 4)
    cache.prepare([Chunk(1, 0, 4)])
    cache.commit([Chunk(1, 0, 4)])
    with pytest.raises(CachePositionError, match=message):
        cache.prepare([chunk])
    assert cache.num_sequences == 1 and cache.length(1) == 4


def test_building_a_rank_on_the_meta_device_imports_no_compiler_stack():
    """Meta-tensor ops that run Python decompositions import dynamo and sympy: 70 MiB more resident
    memory in every worker, for shapes alone. A fresh interpreter shows whether any crept back in."""
    script = (
        "import sys\n"
        "from transformers import BloomConfig\n"
        "from bloomduo.shard_worker.tensor_parallel import build_meta_shard\n"
        "build_meta_shard(BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=301), 1, 2)\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_computes_what_sdpa_does(dtype):
    """The CPU's decode attention (two matmuls around a float32 softmax) against the fused kernel, with
    masked keys: float32 a few roundings apart; bfloat16 also rounds each score once to bfloat16."""
    from bloomduo.shard_worker.model import Attention

    torch.manual_seed(0)
    attention = Attention(BloomConfig(hidden_size=64, n_head=4, n_layer=1, vocab_size=50))
    slots, heads, keys_len, head_dim = 5, 4, 37, 16
    q = torch.randn(slots, heads, 1, head_dim).to(dtype)
    k, v = (torch.randn(slots, heads, keys_len, head_dim).to(dtype) for _ in range(2))
    bias = torch.randn(slots, heads, 1, keys_len).to(dtype)
    bias[:, :, :, 30:] = torch.finfo(dtype).min  # shorter sequences' slots see fewer keys
    bias[2, :, :, 4:] = torch.finfo(dtype).min
    want = attention._attention(q, k, v, bias)
    got = attention._one_query_attention(q, k, v, bias)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want, dtype) < 8
    # a masked key changes nothing
    v[:, :, 30:] = 1000.0
    assert torch.equal(attention._one_query_attention(q, k, v, bias), got)
