"""Native store -> datasets (Parquet) -> trainer round trip, offline."""

from __future__ import annotations

import datasets
import torch
from fact_model_helpers import backbone, images

from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.features import FeatureConfig, extract_features
from fact_model.hf_features import HFFeatureSource, export_feature_set
from topk_sae import TrainConfig, train


def _feature_set(tmp_path):
    bb = backbone("resnet")
    x = images(10, seed=51)[:, :3]
    data = IndexedImages(TensorImages(x, torch.arange(10) % 2), eval_transform_for(bb))
    cfg = FeatureConfig(layer="layer2", samples_per_image=3, heldout_per_class=1, batch_size=4)
    return extract_features(bb, data, tmp_path / "fs", cfg, progress=False)


def test_round_trip_through_parquet_streaming_and_the_trainer(tmp_path) -> None:
    fs = _feature_set(tmp_path)
    folder = export_feature_set(fs, tmp_path / "hf", rows_per_file=7)
    assert (folder / "README.md").read_text().count("split: ") == 2
    # Read back like a Hub dataset (the folder's card declares the splits), offline, streaming.
    stream = datasets.load_dataset(str(folder), split="train", streaming=True)
    rows = list(stream)
    assert len(rows) == fs.train.num_rows
    want = fs.train.read(0, fs.train.num_rows)
    got = torch.tensor([r["features"] for r in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [r["image_index"] for r in rows] == fs.train.read(
        0, fs.train.num_rows, "image_index"
    ).tolist()
    held = datasets.load_dataset(str(folder), split="heldout")
    assert len(held) == fs.heldout.num_rows
    # In order, the streaming source yields exactly the store's rows.
    src = HFFeatureSource(stream, batch_size=5, shuffle=False, num_rows=fs.train.num_rows)
    assert src.d_in == fs.train.d_in and len(src) == -(-fs.train.num_rows // 5)
    torch.testing.assert_close(torch.cat(list(src)), want, rtol=0, atol=0)
    # Shuffled streaming: every row once per epoch, the order a function of (seed, epoch).
    shuffled = HFFeatureSource(
        stream, batch_size=4, seed=5, num_rows=fs.train.num_rows, buffer_size=8
    )
    shuffled.set_epoch(2)
    first = torch.cat(list(shuffled))
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, want.tolist()))
    assert not torch.equal(first, want)
    shuffled.set_epoch(2)
    assert torch.equal(torch.cat(list(shuffled)), first)
    # Shuffled map-style source: each epoch a permutation of the rows; resumable mid-epoch.
    local = datasets.load_dataset(str(folder), split="train")
    src = HFFeatureSource(local, batch_size=4, seed=3)
    src.set_epoch(1)
    epoch = list(src)
    assert sorted(map(tuple, torch.cat(epoch).tolist())) == sorted(map(tuple, want.tolist()))
    src.set_epoch(1)
    it = iter(src)
    next(it)
    state = src.state_dict()
    src2 = HFFeatureSource(local, batch_size=4, seed=3)
    src2.load_state_dict(state)
    torch.testing.assert_close(torch.cat(list(src2)), torch.cat(epoch[1:]))
    # The trainer consumes it.
    cfg = TrainConfig(
        n_latents=16,
        k=2,
        epochs=1,
        lr=1e-3,
        warmup_epochs=0.2,
        hold_epochs=0.2,
        progress=False,
        uncentered_warn_ratio=100.0,
        device="cpu",
    )
    result = train(
        cfg,
        HFFeatureSource(stream, batch_size=8, num_rows=fs.train.num_rows),
        out_dir=tmp_path / "sae",
    )
    assert result.model.d_in == fs.train.d_in
