"""`bloomduo eval` against the real stack on the tiny demo model: float32 parity shows as full agreement."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bloomduo.apps import eval as bloomduo_eval
from bloomduo.core.dtypes import name_of
from bloomduo.shard_worker.engine import resolve_dtype

# what `--dtype auto` serves int8-dynamic in here: float32 through fbgemm, bfloat16 on the VNNI kernel
INT8_DYNAMIC_DTYPE = name_of(resolve_dtype("auto", torch.bfloat16, torch.device("cpu"), "int8-dynamic"))

TEXT = "The quick brown fox jumps over the lazy dog. 北京是中国的首都。 def add(a, b):\n    return a + b\n"


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bloomduo_eval.add_arguments(parser)
    return bloomduo_eval.run(parser.parse_args(argv))


def _check(report: dict, prompts: int) -> None:
    assert len(report["prompts"]) == prompts
    for row in report["prompts"]:
        assert row["generated_tokens"] == 8
        assert row["agreement"] == 1.0 and row["first_divergence"] is None, row
        assert row["max_abs_logprob_diff"] < 1e-4, row


def test_eval_of_a_running_stack(tiny_stack, demo_model: Callable[..., Path], tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4, encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = ["--model", str(demo_model()), "--target", tiny_stack.target, "--dtype", "float32"]
    assert _run(*argv, "--max-new-tokens", "8", "--text", str(text), "--json", str(out)) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    _check(report, len(bloomduo_eval.DEFAULT_PROMPTS))
    assert report["stack"]["num_shards"] == 2
    text = report["text"]
    assert text["tokens"] > 50 and text["device"] == "cpu"
    rows = {row["variant"]: row for row in text["rows"]}
    reference = rows.pop("transformers float32 (reference)")
    assert reference["mean_kl"] is None and reference["perplexity"] > 1
    # auto on the CPU: every variant, the peers' too (the test environment has the peers extra)
    assert set(rows) == {
        "bloomduo float32",
        "bloomduo bfloat16",
        "bloomduo bfloat16 int8",
        f"bloomduo {INT8_DYNAMIC_DTYPE} int8-dynamic",
        "transformers bfloat16",
        "ctranslate2 int8",
        "openvino int8",
    }
    exact = rows.pop("bloomduo float32")
    assert exact["greedy_agreement"] == 1.0 and exact["max_kl"] < 1e-5
    assert exact["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    for name, row in rows.items():  # 8-bit mantissas or weights: measurably off, and not by much
        assert 0 < row["mean_kl"] <= row["max_kl"] < 0.5, name
        assert row["greedy_agreement"] > 0.5 and row["perplexity"] == pytest.approx(
            reference["perplexity"], rel=0.2
        ), name
    # bloomduo's bfloat16 is no further from float32 than transformers' own bfloat16
    assert rows["bloomduo bfloat16"]["mean_kl"] <= 1.5 * rows["transformers bfloat16"]["mean_kl"]

    printed = capsys.readouterr().out
    assert "'北京是中国的首都，'" in printed and f"bloomduo {INT8_DYNAMIC_DTYPE} int8-dynamic" in printed
    assert "not through the deployed stack" in printed


def test_eval_launches_a_stack_with_a_prompts_file(
    demo_model: Callable[..., Path], tmp_path: Path, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nBonjour 🌍! Les\n", encoding="utf-8")
    argv = ["--model", str(demo_model()), "--prompts", str(prompts)]
    assert _run(*argv, "--max-new-tokens", "8", "--json", str(tmp_path / "eval.json")) == 0
    report = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    _check(report, 2)
    assert report["stack"]["num_shards"] == 2 and "text" not in report
    assert "Bonjour" in capsys.readouterr().out


def test_bad_input_exits_1(demo_model: Callable[..., Path], tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert _run("--model", str(demo_model()), "--prompts", str(empty)) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_a_variant_it_cannot_read_is_named_before_anything_starts(
    demo_model: Callable[..., Path], tmp_path: Path, capsys
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert _run("--model", str(demo_model()), "--text", str(text), "--variants", "float32,bf16+int4") == 1
    err = capsys.readouterr().err
    assert "cannot read 'bf16+int4'" in err and "transformers:DTYPE" in err


def test_variants_parse_and_auto_follows_the_device() -> None:
    parse = bloomduo_eval.eval_precision.parse_variants
    names = [v.name for v in parse("float32, bfloat16+int8-dynamic,transformers:float16", "cpu")]
    assert names == ["bloomduo float32", "bloomduo bfloat16 int8-dynamic", "transformers float16"]
    on_gpu = [v.name for v in parse("auto", "cuda")]
    assert "bloomduo float16 int8" in on_gpu and not any(
        "int8-dynamic" in n or "ctranslate2" in n for n in on_gpu
    )
    with pytest.raises(ValueError, match="names no variant"):
        parse(" , ", "cpu")


def test_kl_agreement_and_perplexity_by_hand() -> None:
    import torch

    compare = bloomduo_eval.eval_precision.compare
    reference = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]))
    candidate = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.3, 0.7]]))
    row = compare(reference, candidate, [0, 0, 1], "by hand")
    kl_second = 0.9 * math.log(0.9 / 0.2) + 0.1 * math.log(0.1 / 0.8)
    assert row.mean_kl == pytest.approx(kl_second / 2) and row.max_kl == pytest.approx(kl_second)
    # argmax of [0.5, 0.5] is the first in both; [0.9, 0.1] against [0.2, 0.8] disagrees
    assert row.greedy_agreement == 0.5
    assert row.perplexity == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2))
