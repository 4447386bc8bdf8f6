"""Regenerate the Python gRPC code from proto/: `python -m bloomduo.apps.protogen`.

The generated modules are committed (so an install needs no protoc) and a test checks that they
match what this command produces from the current .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("bloomduo/v1/gateway.proto", "bloomduo/v1/shard.proto")


def generate(out_dir: Path = REPO_ROOT) -> None:
    """Write bloomduo/v1/*_pb2*.py(i) under out_dir."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    (out_dir / "bloomduo" / "v1").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
