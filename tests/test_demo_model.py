"""Demo models load in transformers like released BLOOM checkpoints and behave well enough to test with."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, BloomForCausalLM

from bloomduo.apps.demo_model import (
    PRESETS,
    TOKENIZER_VOCAB_SIZE,
    default_cache_dir,
    demo_config,
    ensure_demo_model,
    train_tokenizer,
    write_demo_model,
)
from bloomduo.core.checkpoint import Checkpoint

MULTILINGUAL = [
    "Hello world! The quick brown fox.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "¿Dónde está el museo del Prado?",
    "def greedy_decode(model, input_ids):\n    return [t for t in input_ids]\n",
    "今天天气很好，我们一起去公园散步吧。",
    "東京は日本の首都です。",
    "Emoji 😀🎉 and flags 🇫🇷 and a family 👨‍👩‍👧 🚀",
    "  leading spaces, tabs\tand\nnewlines  ",
    "",
]
VARIANTS = [
    {},
    {"num_files": 3},
    {"prefix": True},
    {"num_files": 3, "prefix": True},
    {"fmt": "bin"},
    {"fmt": "bin", "num_files": 2, "prefix": True},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny: Path) -> BloomForCausalLM:
    return BloomForCausalLM.from_pretrained(tiny).eval()


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "default"
)
def test_transformers_loads_every_variant(tiny: Path, tmp_path: Path, variant: dict) -> None:
    model_dir = write_demo_model(tmp_path / "m", **variant)
    model, info = BloomForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()

    checkpoint = Checkpoint(model_dir)
    reference = Checkpoint(tiny)
    state = model.state_dict()
    assert checkpoint.names() == reference.names()
    for name in checkpoint.names():
        assert torch.equal(state[f"transformer.{name}"], checkpoint.read(name)), name
        # The weights depend on the seed alone, not on how they are laid out in files.
        assert torch.equal(checkpoint.read(name), reference.read(name)), name


def test_file_layout(tmp_path: Path) -> None:
    sharded = write_demo_model(tmp_path / "sharded", num_files=3, prefix=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == files
    assert all(key.startswith("transformer.") for key in index["weight_map"])
    assert "lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == sum((sharded / name).stat().st_size for name in files) - sum(
        8 + int.from_bytes((sharded / name).read_bytes()[:8], "little") for name in files
    )
    expected = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert expected | set(files) | {"model.safetensors.index.json"} == {p.name for p in sharded.iterdir()}

    single = write_demo_model(tmp_path / "single", fmt="bin")
    assert expected | {"pytorch_model.bin"} == {p.name for p in single.iterdir()}


def test_config_is_a_complete_bloom_config(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "bloom"
    assert config["architectures"] == ["BloomForCausalLM"]
    assert (
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
        config["unk_token_id"],
    ) == (
        1,
        2,
        3,
        0,
    )
    assert config["layer_norm_epsilon"] == 1e-5
    assert config["apply_residual_connection_post_layernorm"] is False
    assert config["pretraining_tp"] == 1
    assert config["slow_but_exact"] is False
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert {key: config[key] for key in PRESETS["tiny"]} == PRESETS["tiny"]


def test_same_arguments_write_the_same_bytes(tmp_path: Path) -> None:
    first = write_demo_model(tmp_path / "a", num_files=3, seed=7)
    second = write_demo_model(tmp_path / "b", num_files=3, seed=7)
    other_seed = write_demo_model(tmp_path / "c", num_files=3, seed=8)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model-00001-of-00003.safetensors").read_bytes() != (
        other_seed / "model-00001-of-00003.safetensors"
    ).read_bytes()


def test_weights_are_not_trivial(tiny: Path) -> None:
    """Zero biases or unit LayerNorms would let tensor-parallel bugs (a bias added twice) go unnoticed."""
    checkpoint = Checkpoint(tiny)
    for name in checkpoint.names():
        values = checkpoint.read(name)
        if name.endswith(".bias"):
            assert values.abs().min() > 0, name
            assert 0.001 < values.std() < 0.1, name
        elif "layernorm" in name or name.startswith("ln_f"):
            assert (values != 1).all(), name
    embeddings = checkpoint.read("word_embeddings.weight")
    assert embeddings.shape == (1030, 96)
    # Rows past the tokenizer are padding, as in BLOOM: never the best token.
    assert (embeddings[TOKENIZER_VOCAB_SIZE:] == 0).all()
    assert (embeddings[:TOKENIZER_VOCAB_SIZE].norm(dim=1) > 0).all()
    down = checkpoint.read("h.0.mlp.dense_4h_to_h.weight")
    assert down.sum(dim=1).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(tmp_path: Path, tiny: Path, dtype: torch.dtype) -> None:
    model_dir = write_demo_model(tmp_path / "m", dtype=dtype, num_files=2)
    model, info = BloomForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.dtype == dtype
    checkpoint = Checkpoint(model_dir)
    assert checkpoint.dtype("h.0.self_attention.dense.weight") == dtype
    # Drawn in float32 and cast: the same model, rounded.
    full = Checkpoint(tiny).read("h.0.self_attention.dense.weight")
    assert torch.equal(checkpoint.read("h.0.self_attention.dense.weight"), full.to(dtype))


def test_presets() -> None:
    tiny = PRESETS["tiny"]
    assert tiny["hidden_size"] % tiny["n_head"] == 0
    assert all(tiny["n_head"] % ranks == 0 for ranks in (1, 2, 3, 4))
    assert tiny["n_head"] & (tiny["n_head"] - 1) != 0  # not a power of two
    assert tiny["vocab_size"] > TOKENIZER_VOCAB_SIZE
    assert tiny["vocab_size"] % 3 and tiny["vocab_size"] % 4
    big = demo_config("bloom-560m", torch.float16)
    assert (big["hidden_size"], big["n_head"], big["n_layer"], big["vocab_size"]) == (1024, 16, 24, 250880)
    assert big["dtype"] == "float16"


def test_bloom_560m_layer_shapes(tmp_path: Path) -> None:
    # Its real vocabulary alone is 257M parameters: one layer and a small vocabulary keep this test fast.
    model_dir = write_demo_model(tmp_path / "m", "bloom-560m", n_layer=1, vocab_size=1024)
    checkpoint = Checkpoint(model_dir)
    assert checkpoint.shape("h.0.self_attention.query_key_value.weight") == (3072, 1024)
    assert checkpoint.shape("h.0.mlp.dense_h_to_4h.weight") == (4096, 1024)
    assert checkpoint.shape("h.0.mlp.dense_4h_to_h.weight") == (1024, 4096)
    assert checkpoint.config.n_head == 16


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        write_demo_model(tmp_path, "bloom-176b")
    with pytest.raises(ValueError, match="fmt must be"):
        write_demo_model(tmp_path, fmt="gguf")
    with pytest.raises(ValueError, match="unknown config overrides"):
        write_demo_model(tmp_path, n_layers=2)
    with pytest.raises(ValueError, match="num_files"):
        write_demo_model(tmp_path, num_files=1000)
    with pytest.raises(ValueError, match="vocab_size"):
        write_demo_model(tmp_path, vocab_size=10)
    with pytest.raises(ValueError, match="divisible"):
        write_demo_model(tmp_path, n_head=7)
    with pytest.raises(ValueError, match="dtype"):
        write_demo_model(tmp_path, dtype=torch.int8)


def test_tokenizer_special_tokens_and_size(tiny: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == TOKENIZER_VOCAB_SIZE
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    auto = AutoTokenizer.from_pretrained(tiny)
    assert (auto.unk_token_id, auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2, 3)
    assert len(auto) == TOKENIZER_VOCAB_SIZE
    assert auto.padding_side == "left"


def test_tokenizer_round_trips_and_both_loaders_agree(tiny: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tiny)
    for text in MULTILINGUAL:
        ids = tokenizer.encode(text).ids
        assert auto(text)["input_ids"] == ids, text  # and no BOS: BLOOM adds none
        assert tokenizer.decode(ids) == text
        assert auto.decode(ids) == text
    # A special token in text is one token, as in BLOOM.
    assert tokenizer.encode("a</s>").ids[-1] == 2


def test_cjk_and_emoji_are_split_across_tokens(tiny: Path) -> None:
    """Streaming must hold back partial UTF-8 characters; the tokenizer has to produce them to test that."""
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    partial = 0
    for text in ("机器学习是人工智能的一个分支", "😀🎉🚀🔥🙏", "東京は日本の首都です"):
        for token_id in tokenizer.encode(text).ids:
            if "\ufffd" in tokenizer.decode([token_id]):
                partial += 1
    assert partial >= 10


def test_tokenizer_training_is_deterministic() -> None:
    assert train_tokenizer().to_str() == train_tokenizer().to_str()


def test_greedy_decoding_does_not_collapse(tiny_model: BloomForCausalLM) -> None:
    """Downstream greedy parity tests only mean something if greedy decoding moves over many tokens."""
    tokenizer = Tokenizer.from_file(str(Path(tiny_model.name_or_path) / "tokenizer.json"))
    for prompt in ("The quick brown fox", "今天天气", "def main(argv):"):
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            out = tiny_model.generate(
                ids, max_new_tokens=32, do_sample=False, pad_token_id=3, eos_token_id=None
            )
        generated = out[0, ids.shape[1] :].tolist()
        assert len(generated) == 32
        assert len(set(generated)) >= 8, (prompt, generated)
        assert max(generated) < TOKENIZER_VOCAB_SIZE  # padding rows are never chosen


def test_top_logits_are_well_separated(tiny_model: BloomForCausalLM) -> None:
    """Near-ties would let float rounding differences between shard layouts flip greedy tokens."""
    ids = torch.randint(4, TOKENIZER_VOCAB_SIZE, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_model(ids).logits[..., :TOKENIZER_VOCAB_SIZE]
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    assert (gaps > 1e-3).float().mean() > 0.95
    assert 0.5 < logits.std() < 2.0


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLOOMDUO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("BLOOMDUO_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "bloomduo"


def test_ensure_demo_model_generates_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLOOMDUO_CACHE", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_model("tiny"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "demo-tiny-v1"] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo-tiny-v1"]  # no staging directories left
    modified = (tmp_path / "demo-tiny-v1" / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model("tiny") == tmp_path / "demo-tiny-v1"
    assert (tmp_path / "demo-tiny-v1" / "model.safetensors").stat().st_mtime_ns == modified
    assert Checkpoint(results[0]).config.n_layer == 3


def test_cli_offers_every_preset():
    from bloomduo.apps.cli import build_parser

    for preset in PRESETS:
        assert build_parser().parse_args(["demo-model", "out", "--preset", preset]).preset == preset
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo-model", "out", "--preset", "bloom-176b"])
