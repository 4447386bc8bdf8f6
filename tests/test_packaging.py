"""What `pip install .` puts into site-packages: everything under the bloomduo namespace, nothing that
claims a generic top-level name such as `client` or `gateway`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("bloomduo-*.whl")
    return built


def test_the_wheel_installs_only_the_bloomduo_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    project, version = wheel.name.split("-")[:2]  # a platform wheel: it carries the native kernels
    assert {name.split("/", 1)[0] for name in names} == {"bloomduo", f"{project}-{version}.dist-info"}
    assert any(n.startswith("bloomduo/shard_worker/_kernels") and n.endswith(".so") for n in names)
    for module in (
        "bloomduo/client/__init__.py",
        "bloomduo/gateway/server.py",
        "bloomduo/shard_worker/model.py",
        "bloomduo/core/logs.py",
        "bloomduo/apps/cli.py",
        "bloomduo/apps/demo_corpus.txt",
        "bloomduo/v1/gateway_pb2.py",
    ):
        assert module in names


def _run_from(wheel: Path, code: str) -> subprocess.CompletedProcess:
    """`code` run by this interpreter with the wheel first on sys.path, from a folder outside the repo."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=wheel.parent,
        env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_the_sdk_imports_from_the_namespace_and_generic_names_do_not(wheel: Path) -> None:
    ok = _run_from(
        wheel, "from bloomduo.client import Client; import bloomduo.client as c; print(c.__file__)"
    )
    assert ok.returncode == 0, ok.stderr
    assert str(wheel) in ok.stdout
    for generic in ("client", "gateway", "shard_worker"):
        refused = _run_from(wheel, f"import {generic}")
        assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr
