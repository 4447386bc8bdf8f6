"""Read a Hugging Face BLOOM checkpoint directory one tensor, or one slice of a tensor, at a time.

Each tensor-parallel rank reads only its own rows or columns: safetensors files are memory-mapped and
`get_slice` copies out just the requested range, so a rank never holds the full 7B1 checkpoint in RAM.
Directories cut into per-rank files by `bloomduo shard-weights` (written with `write_safetensors`, one
tensor at a time) open here too.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import mmap
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from bloomduo.core.bloom_config import BloomConfig
from bloomduo.core.libc import madvise
from bloomduo.core.logs import get_logger

log = get_logger(__name__)

# Models saved from BloomForCausalLM prefix the body's keys; the bigscience releases do not.
_PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
WORD_EMBEDDINGS = "word_embeddings.weight"

# A directory cut by `bloomduo shard-weights` records its shard count in config.json under this key and
# holds the gateway's tensors in GATEWAY_FILE and each rank's in rank_file_name(rank, num_shards).
NUM_SHARDS_KEY = "bloomduo_num_shards"
GATEWAY_FILE = "gateway.safetensors"
# A cut made with `shard-weights --quantize int8` says so under this key: its Linears' weights are int8.
QUANTIZED_KEY = "bloomduo_quantized"

# safetensors' dtype names; demo_model writes with the same table.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(Exception):
    """A checkpoint directory, file or tensor that cannot be used, with what to do about it."""


def rank_file_name(rank: int, num_shards: int) -> str:
    return f"rank-{rank:05d}-of-{num_shards:05d}.safetensors"


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: its file, its key there, and (safetensors only) its bytes' offsets."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int = 0
    end: int = 0


class Checkpoint:
    """A BLOOM checkpoint directory: config.json plus safetensors (preferred) or pytorch .bin weights.

    Tensor names are normalized: the "transformer." prefix is stripped, "lm_head.weight" is kept as is.
    A directory cut by `bloomduo shard-weights` has `num_shards` set; it serves the gateway's tensors
    (word embeddings and their LayerNorm) by name, and `rank_part` opens one rank's file.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"checkpoint directory {self.model_dir} does not exist or is not a directory"
            )
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{config_path} is missing: point at a Hugging Face BLOOM model directory "
                "(config.json plus weights)"
            )
        try:
            self.config: BloomConfig = BloomConfig.from_json_file(config_path)
        except (OSError, ValueError) as exc:  # bad JSON, a field of the wrong type, unreadable
            raise CheckpointError(f"{config_path} is not a valid BLOOM config: {exc}") from exc
        self.num_shards: int | None = self.config.bloomduo_num_shards
        if self.num_shards is not None and self.num_shards < 1:
            raise CheckpointError(f"{config_path}: {NUM_SHARDS_KEY} must be a positive integer")
        self.quantized: str | None = self.config.bloomduo_quantized
        if self.quantized not in (None, "int8"):
            raise CheckpointError(f'{config_path}: {QUANTIZED_KEY} must be "int8", not {self.quantized!r}')
        self._open(*self._weight_files())

    def rank_part(self, rank: int, world_size: int) -> Checkpoint:
        """Rank `rank`'s file of a directory cut by `bloomduo shard-weights`, as a Checkpoint.

        It holds exactly the tensors that rank's model holds, under the model's parameter names, already
        sliced: read each one whole. The cut must be for `world_size` ranks.
        """
        if self.num_shards is None:
            raise CheckpointError(
                f"{self.model_dir} is a full checkpoint, not one cut by `bloomduo shard-weights`"
            )
        if world_size != self.num_shards:
            raise CheckpointError(
                f"{self.model_dir} was cut for {self.num_shards} shards but the world size is {world_size}: "
                f"serve it with {self.num_shards} shards (bloomduo up --num-shards {self.num_shards}), or "
                f"re-run `bloomduo shard-weights --model <full checkpoint> --num-shards {world_size} "
                f"--out {self.model_dir}`"
            )
        path = self.model_dir / rank_file_name(rank, self.num_shards)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: re-run `bloomduo shard-weights` into {self.model_dir}")
        # Same directory and config; only the weights come from the rank's file.
        part = copy.copy(self)
        part._open([path], True)
        return part

    def _open(self, files: list[Path], is_safetensors: bool) -> None:
        # .bin state dicts stay loaded (memory-mapped): torch.load cannot read one tensor alone.
        self._bin_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._entries: dict[str, _Entry] = {}
        for path in files:
            entries = self._scan_safetensors(path) if is_safetensors else self._scan_bin(path)
            for entry in entries:
                name = _normalize(entry.key)
                if name in self._entries:
                    raise CheckpointError(
                        f"tensor {name} is stored twice ({self._entries[name].path.name}:"
                        f"{self._entries[name].key} and {path.name}:{entry.key}): remove the duplicate"
                    )
                self._entries[name] = entry
        log.info(
            "checkpoint_opened",
            model_dir=str(self.model_dir),
            files=len(files),
            tensors=len(self._entries),
            format="safetensors" if is_safetensors else "pytorch_bin",
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def lm_head_name(self) -> str:
        # BLOOM ties the LM head to the word embeddings, so most checkpoints store only the latter.
        return LM_HEAD if self.has(LM_HEAD) else WORD_EMBEDDINGS

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The tensor, or only indices [start, stop) along `dim`, in its stored dtype.

        The result is contiguous and owns its memory. From safetensors only the requested slice is read.
        """
        entry = self._entry(name)
        index = _slice_index(name, entry.shape, dim, start, stop)
        if entry.path in self._bin_state:
            tensor = self._bin_state[entry.path][entry.key][index]
        else:
            with safe_open(entry.path, framework="pt") as handle:
                tensor = handle.get_slice(entry.key)[index]
        # Both readers hand back views of the memory-mapped file; the caller gets memory of its own.
        return tensor.clone(memory_format=torch.contiguous_format)

    def mmap(self, name: str, *, populate: bool = False) -> torch.Tensor:
        """A zero-copy memory-mapped view of the whole tensor; treat it as read-only.

        Pages are read from disk on first touch and can be dropped by the kernel, so a 250880 x 4096 embedding
        table used for lookups costs only the rows actually looked up. `populate` maps every page now
        (Linux's MADV_POPULATE_READ; elsewhere nothing): a first lookup of rows then waits for no page fault.
        """
        entry = self._entry(name)
        if entry.path in self._bin_state:
            return self._bin_state[entry.path][entry.key]
        nbytes = entry.end - entry.begin
        if nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        # Copy-on-write mapping: nothing a caller does to the tensor can reach the file.
        raw = np.memmap(entry.path, dtype=np.uint8, mode="c", offset=entry.begin, shape=(nbytes,))
        if populate:
            _populate(raw.ctypes.data, nbytes)
        return torch.from_numpy(raw).view(entry.dtype).view(entry.shape)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.model_dir}{hint}")
        return entry

    def _weight_files(self) -> tuple[list[Path], bool]:
        """The weight files to read and whether they are safetensors, in order of preference."""
        if self.num_shards is not None:
            gateway = self.model_dir / GATEWAY_FILE  # the rank files are opened by rank_part
            if not gateway.is_file():
                raise CheckpointError(
                    f"{gateway} is missing: re-run `bloomduo shard-weights` into {self.model_dir}"
                )
            return [gateway], True
        single = self.model_dir / "model.safetensors"
        if single.is_file():
            return [single], True
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            return self._indexed_files(index), True
        loose = sorted(self.model_dir.glob("*.safetensors"))
        if loose:
            return loose, True
        bin_index = self.model_dir / "pytorch_model.bin.index.json"
        single_bin = self.model_dir / "pytorch_model.bin"
        if bin_index.is_file() or single_bin.is_file():
            log.warning(
                "pytorch_bin_fallback",
                model_dir=str(self.model_dir),
                detail="no safetensors weights: the .bin format cannot be read slice by slice, so every "
                "tensor is loaded in full (memory-mapped); convert to safetensors for per-rank slice reads",
            )
            return (self._indexed_files(bin_index) if bin_index.is_file() else [single_bin]), False
        raise CheckpointError(
            f"no weights in {self.model_dir}: expected model.safetensors, model.safetensors.index.json "
            "with its shards, *.safetensors, pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _indexed_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index} is not a valid index (needs a 'weight_map' object): {exc}"
            ) from exc
        files = [self.model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise CheckpointError(
                    f"{path} is listed in {index.name} but missing: download or copy that shard"
                )
        return files

    @staticmethod
    def _scan_safetensors(path: Path) -> list[_Entry]:
        """Parse the header (u64 little-endian length, then JSON) without reading any tensor data."""
        try:
            with path.open("rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_len))
            entries = []
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise CheckpointError(
                        f"{path}: tensor {key} has dtype {info['dtype']}, which bloomduo does not read; "
                        f"supported: {', '.join(SAFETENSORS_DTYPES)}"
                    )
                begin, end = info["data_offsets"]
                data_start = 8 + header_len
                entries.append(
                    _Entry(path, key, tuple(info["shape"]), dtype, data_start + begin, data_start + end)
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
        return entries

    def _scan_bin(self, path: Path) -> list[_Entry]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{path} is not a readable pytorch checkpoint: {exc}") from exc
        self._bin_state[path] = state
        return [_Entry(path, key, tuple(tensor.shape), tensor.dtype) for key, tensor in state.items()]


def _normalize(key: str) -> str:
    return key.removeprefix(_PREFIX)


def _slice_index(
    name: str, shape: tuple[int, ...], dim: int | None, start: int, stop: int | None
) -> tuple[slice, ...]:
    """The index that selects [start, stop) along dim, checked so a bad shard plan fails loudly."""
    if dim is None:
        if start != 0 or stop is not None:
            raise CheckpointError(f"reading {name}: start/stop need a dim")
        return tuple(slice(None) for _ in shape)
    if not 0 <= dim < len(shape):
        raise CheckpointError(f"reading {name}: dim {dim} is out of range for shape {list(shape)}")
    stop = shape[dim] if stop is None else stop
    if not 0 <= start <= stop <= shape[dim]:
        raise CheckpointError(
            f"reading {name}: range [{start}, {stop}) is outside dim {dim} of size {shape[dim]}"
        )
    return tuple(slice(start, stop) if axis == dim else slice(None) for axis in range(len(shape)))


def write_safetensors(
    path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: Iterable[torch.Tensor]
) -> None:
    """Write a safetensors file one tensor at a time, so a file bigger than RAM can be written.

    `layout` maps each tensor's name to its (shape, dtype), in file order; the header is written from it
    first. `tensors` then yields the tensors in that order; each is checked against its layout entry.
    """
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_names[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for (name, (shape, dtype)), tensor in zip(layout.items(), tensors, strict=True):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise CheckpointError(
                    f"writing {path.name}: {name} is {list(tensor.shape)} {tensor.dtype}, "
                    f"expected {list(shape)} {dtype}"
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


_MADV_POPULATE_READ = 22  # Linux >= 5.14


def _populate(address: int, nbytes: int) -> None:
    """Map the pages of [address, address + nbytes) of a file mapping now (nothing where Linux cannot)."""
    start = address - address % mmap.PAGESIZE  # the mapping itself starts at a page boundary
    madvise(start, nbytes + address - start, _MADV_POPULATE_READ)
