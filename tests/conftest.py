"""Fixtures that start the real stack: shard workers and gateway as separate processes on loopback."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from bloomduo.apps.launcher import Stack, StackOptions, free_port
from bloomduo.core.checkpoint import Checkpoint
from bloomduo.gateway.embedding import Embedder


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(**write_demo_model kwargs) -> checkpoint dir, written once per distinct kwargs."""
    from bloomduo.apps.demo_model import write_demo_model

    made: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in made:
            made[key] = write_demo_model(tmp_path_factory.mktemp("model"), **kwargs)
        return made[key]

    return make


@dataclass(frozen=True)
class TinyModel:
    """The tiny demo model as the gateway holds it: checkpoint, tokenizer and float32 embeddings."""

    model_dir: Path
    checkpoint: Checkpoint
    tokenizer: Tokenizer
    embedder: Embedder


@pytest.fixture(scope="session")
def model(demo_model: Callable[..., Path]) -> TinyModel:
    model_dir = demo_model()
    checkpoint = Checkpoint(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return TinyModel(model_dir, checkpoint, tokenizer, Embedder(checkpoint, torch.float32))


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports. A stack started with metrics port P serves its workers'
    metrics on P + 1 .. P + W, so P alone being free is not enough: one of the next was once taken by
    another test's connection and a worker failed to start."""
    for _ in range(100):
        first = free_port()
        with ExitStack() as probes:
            try:
                for port in range(first, first + count):
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


@contextmanager
def running_stack(model_dir: Path, num_shards: int = 2, http_port: int = 0, **options) -> Iterator[Stack]:
    """HTTP stays off unless asked for: stacks of tests run side by side, and `up`'s 8080 is one port."""
    stack = Stack(
        StackOptions(
            model_dir=model_dir,
            num_shards=num_shards,
            port=free_port(),
            http_port=http_port,
            threads_per_shard=1,
            **options,
        )
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def tiny_stack(demo_model: Callable[..., Path]) -> Iterator[Stack]:
    """The product's shape on the tiny demo model: two shard workers and a gateway, shared by many tests."""
    with running_stack(demo_model(), num_shards=2) as stack:
        yield stack
