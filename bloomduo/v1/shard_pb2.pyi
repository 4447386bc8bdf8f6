from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceChunk(_message.Message):
    __slots__ = ("sequence_id", "start_position", "num_tokens", "prefix_sequence_id", "next_token_ids", "top_n", "repetition_penalty", "penalized_token_ids")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PENALIZED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    start_position: int
    num_tokens: int
    prefix_sequence_id: int
    next_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_n: int
    repetition_penalty: float
    penalized_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence_id: _Optional[int] = ..., start_position: _Optional[int] = ..., num_tokens: _Optional[int] = ..., prefix_sequence_id: _Optional[int] = ..., next_token_ids: _Optional[_Iterable[int]] = ..., top_n: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., penalized_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "hidden_states", "sequences", "free_sequence_ids", "request_ids", "full_logits")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    FREE_SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: Tensor
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceChunk]
    free_sequence_ids: _containers.RepeatedScalarFieldContainer[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    full_logits: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., sequences: _Optional[_Iterable[_Union[SequenceChunk, _Mapping]]] = ..., free_sequence_ids: _Optional[_Iterable[int]] = ..., request_ids: _Optional[_Iterable[str]] = ..., full_logits: _Optional[_Iterable[bool]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "logits", "compute_seconds", "best_logit", "best_token", "logsumexp", "scored_logsumexp", "next_token_logit", "top_logit", "top_token")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BEST_LOGIT_FIELD_NUMBER: _ClassVar[int]
    BEST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGSUMEXP_FIELD_NUMBER: _ClassVar[int]
    SCORED_LOGSUMEXP_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_LOGIT_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGIT_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    logits: Tensor
    compute_seconds: float
    best_logit: _containers.RepeatedScalarFieldContainer[float]
    best_token: _containers.RepeatedScalarFieldContainer[int]
    logsumexp: _containers.RepeatedScalarFieldContainer[float]
    scored_logsumexp: _containers.RepeatedScalarFieldContainer[float]
    next_token_logit: _containers.RepeatedScalarFieldContainer[float]
    top_logit: _containers.RepeatedScalarFieldContainer[float]
    top_token: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., best_logit: _Optional[_Iterable[float]] = ..., best_token: _Optional[_Iterable[int]] = ..., logsumexp: _Optional[_Iterable[float]] = ..., scored_logsumexp: _Optional[_Iterable[float]] = ..., next_token_logit: _Optional[_Iterable[float]] = ..., top_logit: _Optional[_Iterable[float]] = ..., top_token: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfoResponse(_message.Message):
    __slots__ = ("protocol_version", "rank", "world_size", "ready", "device", "dtype", "backend", "vocab_start", "vocab_end", "padded_vocab_size", "parameter_bytes", "cached_sequences", "cached_tokens", "local_heads", "model", "group_id", "kv_cache_bytes", "kernels")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_START_FIELD_NUMBER: _ClassVar[int]
    VOCAB_END_FIELD_NUMBER: _ClassVar[int]
    PADDED_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_HEADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    rank: int
    world_size: int
    ready: bool
    device: str
    dtype: str
    backend: str
    vocab_start: int
    vocab_end: int
    padded_vocab_size: int
    parameter_bytes: int
    cached_sequences: int
    cached_tokens: int
    local_heads: int
    model: str
    group_id: str
    kv_cache_bytes: int
    kernels: str
    def __init__(self, protocol_version: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., ready: _Optional[bool] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., backend: _Optional[str] = ..., vocab_start: _Optional[int] = ..., vocab_end: _Optional[int] = ..., padded_vocab_size: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., cached_sequences: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., local_heads: _Optional[int] = ..., model: _Optional[str] = ..., group_id: _Optional[str] = ..., kv_cache_bytes: _Optional[int] = ..., kernels: _Optional[str] = ...) -> None: ...
