"""summarize: a worker's summary of its vocabulary slice (best logit, its column, log-sum-exp) per row."""

from __future__ import annotations

import pytest
import torch

from bloomduo.core import logprobs
from bloomduo.core.logprobs import summarize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 1000, 1 << 20])  # a row, 3 rows, every row at a time
def test_summarize_in_row_blocks_equals_the_whole_rows_in_float64(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, block_bytes: int
) -> None:
    monkeypatch.setattr(logprobs, "SUMMARY_BLOCK_BYTES", block_bytes)
    rows = (torch.randn(7, 1000, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    rows[2, 17] = rows[2, 900] = rows[2].max() + 1  # a tie: the lower column wins, as argmax's
    best, index, logsumexp = summarize(rows[:, :1000])
    exact = rows.double()
    assert torch.equal(index, exact.argmax(dim=-1))
    assert index[2] == 17
    assert torch.equal(best, exact.max(dim=-1).values.float())
    torch.testing.assert_close(logsumexp.double(), torch.logsumexp(exact, dim=-1), rtol=2e-7, atol=0)
    # The blocks change nothing: each row's sum is computed exactly as when all rows go at once.
    monkeypatch.setattr(logprobs, "SUMMARY_BLOCK_BYTES", 1 << 30)
    assert torch.equal(summarize(rows).logsumexp, logsumexp)
