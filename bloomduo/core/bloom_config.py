"""config.json of a BLOOM checkpoint: the fields bloomduo reads, parsed as transformers' BloomConfig does.

Workers and the gateway read a checkpoint's shape from here rather than through transformers: importing
transformers (it brings huggingface_hub, jinja2 and PIL) cost every worker 25 MiB of resident memory, a
tenth of what a bloom-560m worker may hold beyond its weights and KV cache. tests/test_checkpoint.py
checks that every field equals transformers' reading of the same file.

Defaults, aliases and types are BloomConfig's (transformers 5.x): `n_embed` overrides `hidden_size`,
`num_hidden_layers` and `num_attention_heads` name `n_layer` and `n_head`, and a value of the wrong type
is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# config.json keys transformers reads under another name
_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "torch_dtype": "dtype"}


@dataclass(frozen=True)
class BloomConfig:
    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str | None = None  # the weights' dtype as saved ("float32", "bfloat16", ...), when recorded
    # Set by `bloomduo shard-weights` in the config.json of a cut directory (core/checkpoint.py).
    bloomduo_num_shards: int | None = None
    bloomduo_quantized: str | None = None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BloomConfig:
        """Parse `path`; raises ValueError naming the field for a value of the wrong type (and for bad
        JSON), OSError when it cannot be read."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object, not {type(raw).__name__}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BloomConfig:
        values = {_ALIASES.get(key, key): value for key, value in raw.items()}
        if values.get("n_embed") is not None:
            values["hidden_size"] = values["n_embed"]
        fields = {field.name: field for field in dataclasses.fields(cls)}
        known = {key: value for key, value in values.items() if key in fields}
        for key, value in known.items():
            _check_type(key, value, fields[key].type)
        return cls(**known)


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Raise ValueError unless `value` fits `annotation` (the field's type, as a string: see __future__)."""
    allowed = {part.strip() for part in annotation.split("|")}
    if _kind(value) not in allowed:  # as transformers: no int for a float, no bool for an int
        raise ValueError(f"{name} must be {' or '.join(sorted(allowed))}, not {value!r}")


def _kind(value: Any) -> str:
    """The annotation `value` matches: its type's name (so a bool is no int), "None", or "list[int]"."""
    if value is None:
        return "None"
    if isinstance(value, list) and all(_kind(v) == "int" for v in value):
        return "list[int]"
    return type(value).__name__
