"""Parallel image decoding (``--workers`` / ``$FACT_DATA_WORKERS``): same batches, same results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fact_model_helpers import fact
from PIL import Image

from fact_model.cli import main
from fact_model.data import (
    WORKERS_ENV,
    IndexedImages,
    default_workers,
    eval_transform_for,
    image_loader,
    open_dataset,
)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / f"c{c}" / f"{i}.png"
            )
    (root / "c1" / "broken.png").write_bytes(b"not an image")
    return root


def test_workers_yield_the_same_batches_in_order(tmp_path: Path) -> None:
    model = fact("resnet", ("layer3",))
    data = IndexedImages(
        open_dataset(f"imagefolder:{_folder(tmp_path)}"), eval_transform_for(model)
    )
    one = list(image_loader(data, batch_size=4, num_workers=0))
    two = list(image_loader(data, batch_size=4, num_workers=2))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.labels, b.labels) and a.skipped == b.skipped
    assert sum(len(b.skipped) for b in two) == 1


def test_cli_workers_option_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WORKERS_ENV, "0")  # restored after the test (main() sets it)
    fact("resnet", ("layer3",)).save_pretrained(tmp_path / "model")
    imgs = _folder(tmp_path / "img")
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"ev{workers}.json"
        assert main(["evaluate", str(tmp_path / "model"), "--dataset", f"imagefolder:{imgs}",
                     "--no-progress", "--batch-size", "4", "--workers", workers,
                     "--json", str(out)]) == 0  # fmt: skip
        runs[workers] = json.loads(out.read_text())
        assert default_workers() == int(workers)
    assert runs["0"] == runs["2"] and runs["0"]["skipped"]["skipped"] == 1
    assert main(["evaluate", str(tmp_path / "model"), "--dataset", f"imagefolder:{imgs}",
                 "--workers", "-1"]) == 1  # fmt: skip
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="FACT_DATA_WORKERS"):
        default_workers()
