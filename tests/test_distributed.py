"""Device and backend selection for cpu, cuda and npu, checked on a CPU-only machine.

An Ascend host is imitated where it matters: a fake torch_npu that exits the interpreter (as the real
one does without CANN), registered as a torch device-backend plugin that `import torch` autoloads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bloomduo.shard_worker.distributed import (
    all_reduce_sum,
    backend_for,
    device_type,
    hccl_environment,
    import_torch_npu,
    init_distributed,
    prepare_device_environment,
    shutdown_distributed,
)

REPO = Path(__file__).resolve().parents[1]
AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"
HCCL_VARS = ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT")


def _unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Remove `name` for this test, and remove it again afterwards should the code under test set it."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("device", "backend"),
    [
        ("cpu", "gloo"),
        ("cuda", "nccl"),
        ("cuda:1", "nccl"),
        ("npu", "hccl"),
        ("npu:0", "hccl"),
        (torch.device("cpu"), "gloo"),
        (torch.device("cuda", 1), "nccl"),
    ],
)
def test_backend_for_each_device(device, backend):
    assert backend_for(device) == backend
    assert device_type(device) == str(device).split(":")[0]


@pytest.mark.parametrize("device", ["mps", "xpu:0", "tpu"])
def test_unknown_device_names_the_choices(device):
    with pytest.raises(ValueError, match=r"no collective backend .*\['cpu', 'cuda', 'npu'\]"):
        backend_for(device)


def test_importing_the_module_does_not_import_torch():
    code = "import sys, shard_worker.distributed; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_autoload_is_turned_off_away_from_the_npu(monkeypatch, device):
    _unset(monkeypatch, AUTOLOAD)
    prepare_device_environment(device)
    assert os.environ[AUTOLOAD] == "0"


def test_a_users_autoload_setting_is_kept(monkeypatch):
    monkeypatch.setenv(AUTOLOAD, "1")
    prepare_device_environment("cpu")
    assert os.environ[AUTOLOAD] == "1"


@pytest.mark.parametrize("device", ["npu", "npu:1"])
def test_autoload_is_left_alone_on_the_npu(monkeypatch, device):
    _unset(monkeypatch, AUTOLOAD)
    prepare_device_environment(device)
    assert AUTOLOAD not in os.environ


def _fake_torch_npu(directory: Path) -> Path:
    """A torch_npu stand-in that exits like the real one without CANN, autoloaded by `import torch`."""
    (directory / "torch_npu.py").write_text(
        "import sys\nsys.exit('libascendcl.so: cannot open shared object file')\n"
    )
    info = directory / "torch_npu-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return directory


def test_an_installed_torch_npu_does_not_break_a_cpu_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{_fake_torch_npu(tmp_path)}{os.pathsep}{REPO}"}
    env.pop(AUTOLOAD, None)
    bare = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "libascendcl" in bare.stderr  # the failure being guarded against

    code = textwrap.dedent(
        """
        from bloomduo.shard_worker.distributed import prepare_device_environment
        prepare_device_environment("cpu")
        import torch
        print(torch.ones(2).sum().item())
        """
    )
    prepared = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.strip() == "2.0"


def test_cuda_without_a_gpu_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"torch\.cuda\.is_available\(\) is False.*--device cpu"):
        init_distributed(0, 1, f"file://{tmp_path / 'rendezvous'}", "cuda:0")
    assert not dist.is_initialized()


def test_npu_without_torch_npu_names_torch_npu_and_cann(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # absent, even on a host that has it
    for name in HCCL_VARS:
        _unset(monkeypatch, name)
    with pytest.raises(RuntimeError, match="needs the torch_npu package") as error:
        init_distributed(0, 1, f"file://{tmp_path / 'rendezvous'}", "npu:0", timeout_s=600)
    assert "CANN" in str(error.value) and "bloomduo[npu]" in str(error.value)
    assert not dist.is_initialized()
    # The HCCL timeouts were derived first: HCCL reads them when torch_npu starts it.
    assert (os.environ["HCCL_CONNECT_TIMEOUT"], os.environ["HCCL_EXEC_TIMEOUT"]) == ("600", "612")


def test_torch_npu_exiting_without_cann_becomes_a_runtime_error(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(_fake_torch_npu(tmp_path)))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(RuntimeError, match=r"CANN not found\?.*set_env\.sh"):
        import_torch_npu()


@pytest.mark.parametrize(
    ("timeout_s", "connect", "exec_"),
    [
        (600, "600", "612"),  # 612 = 9 * 68: 310P rounds down to a multiple of 68 s
        (136, "136", "136"),
        (30, "120", "68"),  # HCCL's minimums
        (0.5, "120", "68"),
        (599.2, "600", "612"),
        (100_000, "7200", "17340"),  # HCCL's maximums
    ],
)
def test_hccl_timeouts_follow_the_group_timeout(timeout_s, connect, exec_):
    expected = {"HCCL_CONNECT_TIMEOUT": connect, "HCCL_EXEC_TIMEOUT": exec_}
    assert hccl_environment(timeout_s, environ={}) == expected


def test_hccl_timeouts_set_by_the_user_win():
    assert hccl_environment(600, environ={"HCCL_EXEC_TIMEOUT": "1800"}) == {"HCCL_CONNECT_TIMEOUT": "600"}
    assert hccl_environment(600, environ=dict.fromkeys(HCCL_VARS, "300")) == {}


def test_single_cpu_rank_needs_no_shared_memory(tmp_path):
    group = init_distributed(0, 1, f"file://{tmp_path / 'rendezvous'}", "cpu", timeout_s=30)
    try:
        assert dist.get_backend(group.process_group) == "gloo"
        assert group.shm is None
        tensor = torch.arange(4.0)
        assert all_reduce_sum(tensor, group) is tensor and tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        shutdown_distributed(group)
        shutdown_distributed(group)  # twice is fine
    assert not dist.is_initialized()


def test_rank_outside_the_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        init_distributed(2, 2, f"file://{tmp_path / 'rendezvous'}", "cpu")
