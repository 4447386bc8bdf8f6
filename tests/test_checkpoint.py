"""Checkpoint reads real checkpoint directories written by demo_model and by transformers itself."""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from structlog.testing import capture_logs
from transformers import BloomForCausalLM

from bloomduo.apps.demo_model import write_demo_model
from bloomduo.core.bloom_config import BloomConfig
from bloomduo.core.checkpoint import Checkpoint, CheckpointError

QKV = "h.1.self_attention.query_key_value.weight"
DENSE = "h.0.self_attention.dense.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "f32": write_demo_model(root / "f32"),
        "bf16": write_demo_model(root / "bf16", dtype=torch.bfloat16),
        "f16": write_demo_model(root / "f16", dtype=torch.float16),
        "sharded": write_demo_model(root / "sharded", num_files=3, prefix=True),
        "bin": write_demo_model(root / "bin", fmt="bin"),
    }


@pytest.mark.parametrize("variant", ["f32", "bf16", "f16", "bin"])
@pytest.mark.parametrize("name", [QKV, DENSE, "word_embeddings.weight", "h.2.mlp.dense_4h_to_h.weight"])
def test_read_slices_equal_the_sliced_full_tensor(models: dict[str, Path], variant: str, name: str) -> None:
    checkpoint = Checkpoint(models[variant])
    full = checkpoint.read(name)
    assert tuple(full.shape) == checkpoint.shape(name)
    assert full.dtype == checkpoint.dtype(name)
    rows, cols = full.shape
    for dim, start, stop, expected in [
        (0, 0, rows // 2, full[: rows // 2]),
        (0, rows // 3, rows, full[rows // 3 :]),
        (1, cols // 4, cols // 2, full[:, cols // 4 : cols // 2]),
        (1, 0, None, full),
        (0, 5, 5, full[5:5]),
    ]:
        part = checkpoint.read(name, dim=dim, start=start, stop=stop)
        assert part.dtype == full.dtype
        assert part.is_contiguous()
        assert torch.equal(part, expected)


def test_read_returns_owned_memory(models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(models["f32"])
    part = checkpoint.read(QKV, dim=0, start=0, stop=96)
    # Its storage is exactly its own bytes, not a window on the whole mapped file.
    assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    expected = part.clone()
    part.zero_()
    assert torch.equal(checkpoint.read(QKV, dim=0, start=0, stop=96), expected)


def test_read_one_dimensional_slices(models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(models["bf16"])
    bias = checkpoint.read("h.0.self_attention.query_key_value.bias")
    assert bias.shape == (288,)
    assert torch.equal(checkpoint.read("h.0.self_attention.query_key_value.bias", 0, 96, 192), bias[96:192])


@pytest.mark.parametrize("variant", ["f32", "bf16", "f16", "sharded", "bin"])
def test_mmap_gives_the_same_values(models: dict[str, Path], variant: str) -> None:
    checkpoint = Checkpoint(models[variant])
    for name in checkpoint.names():
        view = checkpoint.mmap(name)
        assert view.dtype == checkpoint.dtype(name)
        assert tuple(view.shape) == checkpoint.shape(name)
        assert torch.equal(view, checkpoint.read(name)), name


def _kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return sys.platform.startswith("linux") and tuple(int(part) for part in release[:2]) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(5, 14), reason="MADV_POPULATE_READ came with Linux 5.14")
def test_a_populated_mmap_takes_no_page_faults_on_first_read(models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(models["bf16"])
    name = "word_embeddings.weight"

    def faults_reading(view: torch.Tensor) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        view.max()  # reads every page, allocates nothing
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    populated = checkpoint.mmap(name, populate=True)
    assert torch.equal(populated, checkpoint.read(name))
    cold, warm = faults_reading(checkpoint.mmap(name)), faults_reading(checkpoint.mmap(name, populate=True))
    assert warm == 0 < cold, (cold, warm)


def test_mmap_writes_never_reach_the_file(models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(models["bf16"])
    expected = checkpoint.read("word_embeddings.weight")
    checkpoint.mmap("word_embeddings.weight").fill_(7)
    assert torch.equal(Checkpoint(models["bf16"]).read("word_embeddings.weight"), expected)


def test_names_strip_the_transformer_prefix(models: dict[str, Path]) -> None:
    plain = Checkpoint(models["f32"])
    prefixed = Checkpoint(models["sharded"])
    assert plain.names() == prefixed.names()
    assert all(not name.startswith("transformer.") for name in plain.names())
    assert "word_embeddings.weight" in plain.names()
    assert len(plain.names()) == 3 + 12 * 3 + 2  # embeddings and their LayerNorm, 12 per layer, ln_f
    for name in plain.names():
        assert torch.equal(plain.read(name), prefixed.read(name))
    assert plain.has(QKV)
    assert not plain.has("transformer." + QKV)


def test_lm_head_name(models: dict[str, Path], tmp_path: Path) -> None:
    assert Checkpoint(models["f32"]).lm_head_name() == "word_embeddings.weight"
    untied = tmp_path / "untied"
    shutil.copytree(models["f32"], untied)
    save_file({"lm_head.weight": torch.ones(4, 2)}, untied / "model-lm-head.safetensors", {"format": "pt"})
    (untied / "model.safetensors").rename(untied / "model-body.safetensors")
    checkpoint = Checkpoint(untied)
    assert checkpoint.lm_head_name() == "lm_head.weight"
    assert checkpoint.shape("lm_head.weight") == (4, 2)


def test_reads_a_checkpoint_saved_by_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    model = BloomForCausalLM.from_pretrained(models["f32"])
    model.save_pretrained(tmp_path / "saved")
    saved = Checkpoint(tmp_path / "saved")
    original = Checkpoint(models["f32"])
    assert set(saved.names()) - {"lm_head.weight"} == set(original.names())
    assert saved.config.hidden_size == 96
    for name in original.names():
        assert torch.equal(saved.read(name), original.read(name))


def test_sharded_index_and_loose_safetensors_files(models: dict[str, Path], tmp_path: Path) -> None:
    sharded = Checkpoint(models["sharded"])
    index = json.loads((models["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    # Without the index every *.safetensors file in the directory is read.
    loose = tmp_path / "loose"
    shutil.copytree(models["sharded"], loose)
    (loose / "model.safetensors.index.json").unlink()
    loose_checkpoint = Checkpoint(loose)
    assert loose_checkpoint.names() == sharded.names()
    assert torch.equal(loose_checkpoint.read(QKV, 1, 10, 20), sharded.read(QKV, 1, 10, 20))


def test_pytorch_bin_fallback_warns(models: dict[str, Path], tmp_path: Path) -> None:
    with capture_logs() as logs:
        checkpoint = Checkpoint(models["bin"])
    assert any(entry["event"] == "pytorch_bin_fallback" for entry in logs)
    assert checkpoint.names() == Checkpoint(models["f32"]).names()
    sharded_bin = write_demo_model(tmp_path / "sharded-bin", fmt="bin", num_files=2, prefix=True)
    assert (sharded_bin / "pytorch_model.bin.index.json").is_file()
    assert torch.equal(Checkpoint(sharded_bin).read(DENSE, 1, 3, 9), checkpoint.read(DENSE, 1, 3, 9))


def test_config_is_read_from_the_directory(models: dict[str, Path]) -> None:
    config = Checkpoint(models["f32"]).config
    assert (config.hidden_size, config.n_head, config.n_layer, config.vocab_size) == (96, 12, 3, 1030)


# config.json as the bigscience releases and other tools write them: n_embed for hidden_size (bloom-560m's
# era), the generic names of the layer and head counts, torch_dtype, a list of end-of-text ids.
CONFIG_VARIANTS = [
    {"n_embed": 1024, "n_head": 16, "n_layer": 24, "torch_dtype": "bfloat16", "layer_norm_epsilon": 1e-5},
    {"hidden_size": 4096, "n_embed": 4096, "n_head": 32, "n_layer": 30, "vocab_size": 250880},
    {"hidden_size": 96, "num_attention_heads": 12, "num_hidden_layers": 3, "dtype": "float16"},
    {"apply_residual_connection_post_layernorm": True, "eos_token_id": [2, 3], "pad_token_id": 3},
    {"bos_token_id": None, "eos_token_id": None, "unknown_key": {"kept": "out"}, "layer_norm_epsilon": 1e-6},
    {},
]


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_reads_every_field_as_transformers_does(variant: dict, tmp_path: Path) -> None:
    """Workers read config.json without importing transformers; the reading must not differ from it."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(variant))
    ours = BloomConfig.from_json_file(path)
    theirs = transformers.BloomConfig.from_json_file(path)
    for field in dataclasses.fields(BloomConfig):
        if field.name == "dtype":
            want = getattr(theirs, "dtype", None)
            assert ours.dtype == (str(want).removeprefix("torch.") if want is not None else None)
        elif not field.name.startswith("bloomduo_"):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"hidden_size": "wide"}', "hidden_size"),
        ('{"n_head": 12.0}', "n_head"),
        ('{"layer_norm_epsilon": 1}', "layer_norm_epsilon"),
        ('{"n_layer": true}', "n_layer"),
        ('{"apply_residual_connection_post_layernorm": 1}', "apply_residual_connection_post_layernorm"),
        ('{"eos_token_id": [2, "x"]}', "eos_token_id"),
        ('{"bloomduo_num_shards": "2"}', "bloomduo_num_shards"),
        ("[1, 2]", "JSON object"),
        ('{"n_head": 12', "delimiter"),
    ],
)
def test_invalid_config_names_the_field(
    models: dict[str, Path], tmp_path: Path, text: str, field: str
) -> None:
    shutil.copytree(models["f32"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"not a valid BLOOM config: .*{field}"):
        Checkpoint(tmp_path / "m")


def test_workers_do_not_import_transformers() -> None:
    """25 MiB of every worker's resident memory (bloomduo.core.bloom_config)."""
    code = "import sys, bloomduo.apps.cli, bloomduo.shard_worker.server; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_missing_config(models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(models["f32"], tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Checkpoint(tmp_path / "m")


def test_no_weights(models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    shutil.copy(models["f32"] / "config.json", tmp_path / "m")
    with pytest.raises(CheckpointError, match="no weights in"):
        Checkpoint(tmp_path / "m")


def test_index_naming_a_missing_shard(models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(models["sharded"], tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors is listed"):
        Checkpoint(tmp_path / "m")


def test_corrupt_safetensors_file(models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(models["f32"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint(tmp_path / "m")


def test_unknown_tensor_suggests_close_names(models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(models["f32"])
    with pytest.raises(
        CheckpointError, match=r"close names: .*h\.1\.self_attention\.query_key_value\.weight"
    ):
        checkpoint.read("h.1.self_attention.query_key_values.weight")
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        checkpoint.shape("transformer.h.0.nothing")


@pytest.mark.parametrize(
    ("dim", "start", "stop", "message"),
    [(2, 0, 1, "dim 2 is out of range"), (0, 10, 5, r"range \[10, 5\)"), (1, 0, 97, r"range \[0, 97\)")],
)
def test_bad_slices_are_refused(
    models: dict[str, Path], dim: int, start: int, stop: int, message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(models["f32"]).read(DENSE, dim=dim, start=start, stop=stop)


def test_start_without_dim_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="need a dim"):
        Checkpoint(models["f32"]).read(DENSE, start=3)
