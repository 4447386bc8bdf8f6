"""The committed generated code is exactly what `python -m bloomduo.apps.protogen` makes from proto/."""

from __future__ import annotations

from pathlib import Path

from bloomduo.apps.protogen import REPO_ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "bloomduo" / "v1").iterdir())
    assert fresh, "protoc generated nothing"
    for relative in fresh:
        committed = REPO_ROOT / relative
        assert committed.is_file(), f"{relative} is not committed; run python -m bloomduo.apps.protogen"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale; run python -m bloomduo.apps.protogen"
        )
