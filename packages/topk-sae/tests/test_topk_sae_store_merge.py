"""merge_stores: per-rank stores concatenated by moving shards, resumable after a crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from topk_sae import FeatureStoreWriter, ShardedFeatureStore, merge_stores
from topk_sae import store as store_module


def make_parts(root: Path, sizes: list[int], d: int = 5) -> tuple[list[Path], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    parts, rows = [], []
    start = 0
    for r, n in enumerate(sizes):
        x = torch.randn(n, d, generator=gen)
        path = root / f"rank-{r}"
        with FeatureStoreWriter(
            path, d, shard_rows=4, metadata=("image_index",), attributes={"rank": r}
        ) as w:
            w.append(x, image_index=torch.arange(start, start + n))
        parts.append(path)
        rows.append(x)
        start += n
    return parts, torch.cat(rows)


def test_merge_concatenates_in_order_and_removes_parts(tmp_path: Path) -> None:
    parts, rows = make_parts(tmp_path, [7, 0, 9, 3])
    merged = merge_stores(parts, tmp_path / "all", attributes={"what": "merged"})
    assert merged.num_rows == 19 and merged.complete
    torch.testing.assert_close(merged.read(0, 19), rows, rtol=0, atol=0)
    assert merged.read(0, 19, field="image_index").tolist() == list(range(19))
    assert merged.attributes == {"what": "merged"}
    assert not any(p.exists() for p in parts)
    again = merge_stores(parts, tmp_path / "all")  # already merged: returned as is
    assert again.num_rows == 19
    # reopened from disk like any store
    torch.testing.assert_close(ShardedFeatureStore(tmp_path / "all").read(5, 12), rows[5:12])


def test_merge_resumes_after_a_crash_mid_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts, rows = make_parts(tmp_path, [6, 10])
    real = os.replace
    calls = {"n": 0}

    def flaky(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(store_module.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated crash"):
        merge_stores(parts, tmp_path / "all")
    assert (tmp_path / "all" / store_module.MERGE_PLAN_NAME).exists()
    assert not (tmp_path / "all" / store_module.MANIFEST_NAME).exists()
    monkeypatch.setattr(store_module.os, "replace", real)
    merged = merge_stores(parts, tmp_path / "all")
    torch.testing.assert_close(merged.read(0, 16), rows, rtol=0, atol=0)
    assert not (tmp_path / "all" / store_module.MERGE_PLAN_NAME).exists()


def test_merge_refuses_mixed_layouts_and_incomplete_parts(tmp_path: Path) -> None:
    a, _ = make_parts(tmp_path / "a", [3], d=5)
    b, _ = make_parts(tmp_path / "b", [3], d=6)
    with pytest.raises(ValueError, match="different layouts"):
        merge_stores([*a, *b], tmp_path / "out")
    w = FeatureStoreWriter(tmp_path / "open", 5)
    w.append(torch.zeros(2, 5))
    w.flush()
    with pytest.raises(ValueError, match="not complete"):
        merge_stores([tmp_path / "open"], tmp_path / "out2")


@pytest.mark.parametrize("prefetch", [False, True])
def test_batch_order_does_not_depend_on_shard_layout(tmp_path: Path, prefetch: bool) -> None:
    x = torch.randn(103, 4, generator=torch.Generator().manual_seed(1))
    stores = []
    for i, shard_rows in enumerate((103, 10, 7, 1)):
        with FeatureStoreWriter(tmp_path / str(i), 4, shard_rows=shard_rows) as w:
            w.append(x)
        stores.append(ShardedFeatureStore(tmp_path / str(i)))
    assert [len(s.shards) for s in stores] == [1, 11, 15, 103]
    for epoch in (0, 1):
        runs = []
        for s in stores:
            src = s.source(16, seed=4, shuffle_buffer_rows=40, block_rows=6, prefetch=prefetch)
            src.set_epoch(epoch)
            runs.append(torch.cat(list(src)))
        for other in runs[1:]:
            assert torch.equal(other, runs[0])
        assert sorted(runs[0][:, 0].tolist()) == sorted(x[:, 0].tolist())  # each row once
    # default block size: from the row count, not from the largest shard
    assert stores[0].source(16).block_rows == stores[3].source(16).block_rows
