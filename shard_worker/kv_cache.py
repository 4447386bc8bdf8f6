"""Key/value cache for the attention heads this worker owns, one slot per running sequence.

All sequences share two tensors, keys and values, shaped [num_layers, slots, num_heads, capacity,
head_dim]. A sequence owns a slot until it is freed; slots are handed out lowest first, so the
running batch occupies a compact prefix and a decode step attends over `keys[layer, :n_slots]` as
one batched matmul, with no gather and no per-sequence loop. Both dimensions grow geometrically
(doubling, capacity rounded to `block` tokens), so a decode step writes one row in place.

Every slot takes the longest sequence's capacity, so a long prompt multiplies the cache by the slot count.
At the initial capacity every slot the cache was made for is held (a burst of new sequences does not
stop to grow and zero it); growing past it keeps only the slots in use (to the next power of two, the live
sequences moved to the lowest), and once the sequences that needed the capacity are gone the cache gives
it back (`prepare`, or `shrink_to_fit` between steps). A paged cache (vLLM's block tables) would not take
the memory in the first place.

A model step uses the cache in three phases so that a bad request never leaves it half-updated:
`prepare(chunks)` checks every chunk's start_position against the cached length and makes room,
each layer writes its new keys/values and reads back the prefix, then `commit(chunks)` advances the
lengths once all layers ran.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Protocol

import torch

from bloomduo.core.logs import get_logger
from bloomduo.shard_worker.host_memory import return_freed_memory, use_huge_pages

log = get_logger(__name__)


class ChunkLike(Protocol):
    sequence_id: int
    start_position: int
    num_tokens: int
    prefix_sequence_id: int


class CachePositionError(ValueError):
    """A chunk does not continue its sequence: start_position != number of tokens already cached."""


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
        initial_slots: int = 4,
        block: int = 16,
    ) -> None:
        if min(num_layers, num_heads, head_dim, initial_capacity, initial_slots, block) < 1:
            raise ValueError(
                "num_layers, num_heads, head_dim, initial_capacity, slots and block must be >= 1"
            )
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.block = block
        self.initial_capacity = self._round_up(initial_capacity)
        self.initial_slots = initial_slots
        # The cache never holds less than this many elements per tensor: what it was made with.
        self._initial_elements = self._elements(initial_slots, self.initial_capacity)
        # Zeros, not empty: masked positions get probability exactly 0, and 0 * NaN would still be NaN.
        self._stores = [self._allocate(self._initial_elements) for _ in range(2)]  # keys', values' memory
        self.keys, self.values = (
            self._view(store, initial_slots, self.initial_capacity) for store in self._stores
        )
        self._slots: dict[int, int] = {}
        self._lengths: dict[int, int] = {}
        self._free_slots: list[int] = list(range(initial_slots))

    # ----------------------------------------------------------------- bookkeeping
    def length(self, sequence_id: int) -> int:
        """Tokens cached for the sequence (0 for one never seen or freed)."""
        return self._lengths.get(sequence_id, 0)

    def slot(self, sequence_id: int) -> int:
        return self._slots[sequence_id]

    @property
    def capacity(self) -> int:
        """Tokens each slot can hold before the cache grows."""
        return self.keys.shape[3]

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    def free(self, sequence_id: int) -> bool:
        """Release a sequence's slot; returns whether it was cached. Safe to repeat."""
        slot = self._slots.pop(sequence_id, None)
        if slot is None:
            return False
        del self._lengths[sequence_id]
        bisect.insort(self._free_slots, slot)
        return True

    def clear(self) -> None:
        for sequence_id in list(self._slots):
            self.free(sequence_id)

    @property
    def num_sequences(self) -> int:
        return len(self._slots)

    @property
    def num_tokens(self) -> int:
        return sum(self._lengths.values())

    def slots_free(self, start: int, stop: int) -> bool:
        """Whether slots start..stop-1 exist and no sequence holds them."""
        return stop <= self.num_slots and not any(start <= slot < stop for slot in self._slots.values())

    def reserve_slots(self, slots: int) -> None:
        """Hold at least `slots` slots (reallocating, as a step that needs them would)."""
        self._fit(max(slots, self.num_slots), self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: every slot's capacity, not just the used lengths, and never less than at start."""
        return sum(store.nbytes for store in self._stores)

    # ----------------------------------------------------------------- one model step
    def prepare(self, chunks: Iterable[ChunkLike]) -> None:
        """Check that every chunk continues its sequence, then make room for its tokens.

        A new sequence's chunk with a prefix_sequence_id starts at start_position = P: its first P
        positions are copied from that sequence, which must be cached with at least P tokens.

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
            if chunk.prefix_sequence_id:
                self._check_prefix(chunk)
                continue
            cached = self.length(sid)
            if chunk.start_position != cached:
                hint = (
                    "a new sequence must start at position 0"
                    if sid not in self._slots
                    else "free() a finished sequence before reusing its id"
                    if chunk.start_position == 0
                    else "the gateway and this worker disagree on the sequence's progress"
                )
                raise CachePositionError(
                    f"sequence {sid}: chunk starts at position {chunk.start_position} but the KV cache "
                    f"holds {cached} tokens ({hint})"
                )
        new = [chunk.sequence_id for chunk in chunks if chunk.sequence_id not in self._slots]
        needed_slots = len(self._slots) + len(new)
        ends = (c.start_position + c.num_tokens for c in chunks)
        self._fit(needed_slots, max([*ends, *self._lengths.values()], default=0))
        for sequence_id in new:
            self._slots[sequence_id] = self._free_slots.pop(0)
            self._lengths[sequence_id] = 0
        for chunk in chunks:
            if chunk.prefix_sequence_id:
                self._copy_prefix(chunk.prefix_sequence_id, chunk.sequence_id, chunk.start_position)

    def _check_prefix(self, chunk: ChunkLike) -> None:
        sid, source, length = chunk.sequence_id, chunk.prefix_sequence_id, chunk.start_position
        if sid in self._slots:
            raise CachePositionError(f"sequence {sid} is cached already; only a new sequence takes a prefix")
        if source == sid or source not in self._slots:
            raise CachePositionError(f"sequence {sid}: prefix source {source} is not a cached sequence")
        held = self.length(source)
        if not 1 <= length <= held:
            raise CachePositionError(
                f"sequence {sid}: a prefix of {length} tokens, but sequence {source} holds {held}"
            )

    def _copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give `target` the keys and values of `source`'s first `length` positions, in every layer."""
        src, dst = self._slots[source], self._slots[target]
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        self._lengths[target] = length

    def write(
        self, layer: int, sequence_id: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [num_heads, n, head_dim] at positions start..start+n-1 of one layer.

        Returns views of all keys and values [num_heads, start+n, head_dim] for that layer.
        """
        slot = self._slots[sequence_id]
        end = start + keys.shape[1]
        self.keys[layer, slot, :, start:end] = keys
        self.values[layer, slot, :, start:end] = values
        return self.keys[layer, slot, :, :end], self.values[layer, slot, :, :end]

    def write_prompts(
        self, layer: int, slots: torch.Tensor | slice, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store whole prompts' keys/values [prompts, num_heads, n, head_dim] at positions 0..n-1 of `slots`
        (an index tensor, or a slice of consecutive slots: a plain copy rather than a scatter)."""
        length = keys.shape[2]
        self.keys[layer, slots, :, :length] = keys
        self.values[layer, slots, :, :length] = values

    def write_tokens(
        self,
        layer: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_slots: int,
        kv_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per sequence (keys/values [B, num_heads, head_dim]) at its slot and position.

        Returns the first `num_slots` slots' first `kv_length` positions as views
        [num_slots, num_heads, kv_length, head_dim], ready for one batched attention call.
        """
        self.keys[layer, slots, :, positions] = keys
        self.values[layer, slots, :, positions] = values
        return self.token_views(layer, num_slots, kv_length)

    def token_views(self, layer: int, num_slots: int, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """write_tokens' views without the write, for a kernel that stores the new tokens itself."""
        return self.keys[layer, :num_slots, :, :kv_length], self.values[layer, :num_slots, :, :kv_length]

    def commit(self, chunks: Iterable[ChunkLike]) -> None:
        """Advance each sequence's length once every layer has written the chunk."""
        for chunk in chunks:
            self._lengths[chunk.sequence_id] = chunk.start_position + chunk.num_tokens

    # ----------------------------------------------------------------- storage
    def _round_up(self, n: int) -> int:
        return -(-n // self.block) * self.block

    def _elements(self, slots: int, capacity: int) -> int:
        return self.num_layers * slots * self.num_heads * capacity * self.head_dim

    def _view(self, store: torch.Tensor, slots: int, capacity: int) -> torch.Tensor:
        """The cache's [layers, slots, heads, capacity, head_dim] on the start of a flat store."""
        shape = (self.num_layers, slots, self.num_heads, capacity, self.head_dim)
        return store[: self._elements(slots, capacity)].view(shape)

    def _allocate(self, elements: int) -> torch.Tensor:
        store = torch.zeros(elements, device=self.device, dtype=self.dtype)
        if store.device.type == "cpu":
            # A decode step reads each head's keys and values, a few KiB apart from the next head's, from
            # DRAM (the weights streamed since evicted them): on 4 KiB pages the prefetchers stop at every
            # page and the TLB misses. 16 sequences x 8 heads x 48 keys, 24 layers' caches, one EPYC core:
            # 237 -> 176 us a layer on 2 MiB pages (prefetching the next head in the kernel did nothing).
            use_huge_pages([store])
        return store

    def shrink_to_fit(self) -> bool:
        """Give back capacity the live sequences no longer need, as the next `prepare` would; whether it
        did. For a worker with no step to run (its last sequences just freed)."""
        return self._fit(len(self._slots), max(self._lengths.values(), default=0))

    def _fit(self, needed_slots: int, needed_capacity: int) -> bool:
        """Resize for `needed_slots` sequences of up to `needed_capacity` positions, if the cache is too small
        or holds four times the positions needed; whether it did."""
        slots, capacity = self.num_slots, self.capacity
        if needed_capacity > capacity:
            # Doubling keeps a decode's growth rare; a prompt that jumps past double gets a quarter more than
            # it needs, or its next token would double every slot at once (a 512-token prompt: 32 slots x 1024
            # positions, 1536 MiB a bloom-560m worker, against 640 positions and 960 MiB).
            new_capacity = self._round_up(max(needed_capacity + needed_capacity // 4, 2 * capacity))
            # That capacity times every slot is what a long prompt costs: hold the slots in use instead (a
            # lone 512-token prompt: 1 slot, 30 MiB there, against 960 MiB), and grow them as sequences come.
            new_slots = max(needed_slots, min(slots, 1 << (needed_slots - 1).bit_length()))
        elif capacity > self.initial_capacity and 4 * needed_capacity <= capacity:
            # What a long sequence took, given back once it is gone (nothing else would shrink it), into twice
            # what is needed: a doubling away from growing again, so a sequence that comes and goes does not
            # copy the cache back and forth every step. At the initial capacity, every initial slot again.
            new_capacity = max(self.initial_capacity, self._round_up(2 * needed_capacity))
            new_slots = max(
                needed_slots, self.initial_slots if new_capacity == self.initial_capacity else slots
            )
        elif needed_slots > slots:
            new_capacity = capacity
            # Doubling, but not past the slots the cache was made for unless a step needs more.
            new_slots = max(
                needed_slots, 2 * slots if slots >= self.initial_slots else min(2 * slots, self.initial_slots)
            )
        else:
            return False
        self._resize(new_slots, new_capacity)
        return True

    def _resize(self, new_slots: int, new_capacity: int) -> None:
        """Lay the cache out as [new_slots, new_capacity] (capacity >= every live length); with fewer slots
        than now, the live sequences move to the lowest ones, in slot order.

        Memory is held in one store per tensor of max(the initial block, the new layout) elements: a layout
        that fits the store it has keeps it. A long prompt and the return to the initial layout after it then
        cost a copy and a zeroing of memory already mapped, not a fresh block's page faults and huge-page
        collapse: ~0.6 s of an empty step on an AVX2 EPYC VM (bloom-560m, 722 tokens; 0.11 s without the
        collapse), which the next request waited for."""
        kept = min(self.capacity, new_capacity)
        if new_slots >= self.num_slots:
            moves = [(slice(0, self.num_slots), slice(0, self.num_slots))]
            free = [*self._free_slots, *range(self.num_slots, new_slots)]
        else:
            live = sorted(self._slots.items(), key=lambda item: item[1])
            moves = [(old, new) for new, (_, old) in enumerate(live)]
            self._slots = {sequence_id: new for new, (sequence_id, _) in enumerate(live)}
            free = list(range(len(live), new_slots))
        before = (self.num_slots, self.capacity, self.nbytes)
        elements = max(self._initial_elements, self._elements(new_slots, new_capacity))
        reused = elements == self._stores[0].numel()
        for index, name in enumerate(("keys", "values")):
            if reused:  # the old layout and the new overlap in the store: the rows that stay go aside first
                rows = [
                    (target, getattr(self, name)[:, source, :, :kept].clone()) for source, target in moves
                ]
                resized = self._view(self._stores[index], new_slots, new_capacity).zero_()
            else:
                rows = [(target, getattr(self, name)[:, source, :, :kept]) for source, target in moves]
                self._stores[index] = self._allocate(elements)
                resized = self._view(self._stores[index], new_slots, new_capacity)
            for target, row in rows:
                resized[:, target, :, :kept] = row
            del rows
            setattr(self, name, resized)  # an old store goes now, before the next is made or the trim
        self._free_slots = free
        if self.device.type == "cpu" and not reused:
            # A cache of a few MiB comes from the heap, and glibc keeps what it and a long prompt's steps
            # freed there resident: a bloom-560m int8 worker held 742-869 MiB after one 512-token request,
            # 729-730 with this (idle 724). A resize is rare and copies the cache; the trim takes a few ms.
            return_freed_memory()
        log.info(
            "kv_cache_resized",
            slots=[before[0], new_slots],
            capacity=[before[1], new_capacity],
            bytes=[before[2], self.nbytes],
            reused=reused,
        )
