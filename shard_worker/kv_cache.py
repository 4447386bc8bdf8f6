"""Per-sequence key/value cache for the attention heads this worker owns.

Each sequence gets two tensors, keys and values, shaped [num_layers, num_heads, capacity, head_dim],
allocated once and grown geometrically (capacity doubles, rounded to `block` tokens) so a decode
step writes one row in place instead of concatenating the whole cache.

A model step uses the cache in three phases so that a bad request never leaves it half-updated:
`prepare(chunks)` checks every chunk's start_position against the cached length and makes room,
each layer `write()`s its new keys/values and reads back the prefix, then `commit(chunks)` advances
the lengths once all layers ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


class ChunkLike(Protocol):
    sequence_id: int
    start_position: int
    num_tokens: int


class CachePositionError(ValueError):
    """A chunk does not continue its sequence: start_position != number of tokens already cached."""


@dataclass
class _SequenceCache:
    keys: torch.Tensor  # [num_layers, num_heads, capacity, head_dim]
    values: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = 128,
        block: int = 16,
    ) -> None:
        if min(num_layers, num_heads, head_dim, initial_capacity, block) < 1:
            raise ValueError("num_layers, num_heads, head_dim, initial_capacity and block must be >= 1")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.initial_capacity = initial_capacity
        self.block = block
        self._seqs: dict[int, _SequenceCache] = {}

    # ----------------------------------------------------------------- bookkeeping
    def __contains__(self, sequence_id: int) -> bool:
        return sequence_id in self._seqs

    def length(self, sequence_id: int) -> int:
        """Tokens cached for the sequence (0 for one never seen or freed)."""
        seq = self._seqs.get(sequence_id)
        return 0 if seq is None else seq.length

    def capacity(self, sequence_id: int) -> int:
        seq = self._seqs.get(sequence_id)
        return 0 if seq is None else seq.capacity

    def free(self, sequence_id: int) -> bool:
        """Drop a sequence's keys and values; returns whether it was cached. Safe to repeat."""
        return self._seqs.pop(sequence_id, None) is not None

    def clear(self) -> None:
        self._seqs.clear()

    @property
    def sequence_ids(self) -> list[int]:
        return list(self._seqs)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_tokens(self) -> int:
        return sum(seq.length for seq in self._seqs.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the used length)."""
        return sum(seq.keys.nbytes + seq.values.nbytes for seq in self._seqs.values())

    # ----------------------------------------------------------------- one model step
    def prepare(self, chunks: Iterable[ChunkLike]) -> None:
        """Check that every chunk continues its sequence, then make room for its tokens.

        Raises CachePositionError (a ValueError) before changing anything when a chunk's
        start_position differs from the cached length, or a sequence appears twice.
        """
        chunks = list(chunks)
        seen: set[int] = set()
        for chunk in chunks:
            sid = chunk.sequence_id
            if sid in seen:
                raise CachePositionError(f"sequence {sid} appears more than once in the same step")
            seen.add(sid)
            if chunk.num_tokens < 1:
                raise CachePositionError(f"sequence {sid}: a chunk needs at least one token")
            cached = self.length(sid)
            if chunk.start_position != cached:
                hint = (
                    "a new sequence must start at position 0"
                    if sid not in self._seqs
                    else "free() a finished sequence before reusing its id"
                    if chunk.start_position == 0
                    else "the gateway and this worker disagree on the sequence's progress"
                )
                raise CachePositionError(
                    f"sequence {sid}: chunk starts at position {chunk.start_position} but the KV cache "
                    f"holds {cached} tokens ({hint})"
                )
        for chunk in chunks:
            self._reserve(chunk.sequence_id, chunk.start_position + chunk.num_tokens)

    def write(
        self, layer: int, sequence_id: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [num_heads, n, head_dim] at positions start..start+n-1 of one layer.

        Returns views of all keys and values [num_heads, start+n, head_dim] for that layer.
        """
        seq = self._seqs[sequence_id]
        end = start + keys.shape[1]
        seq.keys[layer, :, start:end] = keys
        seq.values[layer, :, start:end] = values
        return seq.keys[layer, :, :end], seq.values[layer, :, :end]

    def commit(self, chunks: Iterable[ChunkLike]) -> None:
        """Advance each sequence's length once every layer has written the chunk."""
        for chunk in chunks:
            self._seqs[chunk.sequence_id].length = chunk.start_position + chunk.num_tokens

    # ----------------------------------------------------------------- storage
    def _round_up(self, n: int) -> int:
        return -(-n // self.block) * self.block

    def _allocate(self, capacity: int) -> torch.Tensor:
        shape = (self.num_layers, self.num_heads, capacity, self.head_dim)
        return torch.empty(shape, device=self.device, dtype=self.dtype)

    def _reserve(self, sequence_id: int, needed: int) -> None:
        seq = self._seqs.get(sequence_id)
        if seq is None:
            capacity = self._round_up(max(needed, self.initial_capacity))
            self._seqs[sequence_id] = _SequenceCache(self._allocate(capacity), self._allocate(capacity))
            return
        if needed <= seq.capacity:
            return
        capacity = self._round_up(max(needed, 2 * seq.capacity))
        keys, values = self._allocate(capacity), self._allocate(capacity)
        keys[:, :, : seq.length] = seq.keys[:, :, : seq.length]
        values[:, :, : seq.length] = seq.values[:, :, : seq.length]
        seq.keys, seq.values = keys, values
