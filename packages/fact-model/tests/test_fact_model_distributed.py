"""Feature extraction, SAE training and ``fact train`` under ``torchrun`` (2 ranks, gloo, CPU)
give the single-process result: the same vectors in the same order, the same SAE to float32
reduction-order tolerance, the same held-out selection. A rank killed mid-extraction resumes
its own share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fact_model_helpers import calibrate, fact, images
from PIL import Image
from safetensors.torch import load_file, save_file

import bcos_layers
from fact_model.cli import main
from topk_sae import ShardedFeatureStore

WORKER = Path(__file__).parent / "distributed" / "extract_worker.py"
ANALYSIS = Path(__file__).parent / "distributed" / "analysis_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def launch(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == (expect == 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    net = calibrate(bcos_layers.create("tiny_resnet_bottleneck", num_classes=3), images(24, 5))
    weights = root / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "img" / f"c{c}").mkdir(parents=True)
        for i in range(7):  # 21 images: shares of 8 / 7 training images, odd batch ends
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            arr[8 * c : 8 * c + 12] = 255
            Image.fromarray(arr).save(root / "img" / f"c{c}" / f"{i}.png")
    (root / "img" / "c1" / "broken.png").write_bytes(b"not an image")  # a skip in rank 1's share
    return weights, root / "img"


def worker(
    weights: Path, imgs: Path, out: Path, *extra: str, nproc: int = 1, expect: int = 0
) -> None:
    base = [str(WORKER), "--weights", str(weights), "--images", str(imgs), "--out", str(out)]
    launch(([sys.executable] if nproc == 1 else TORCHRUN) + base + list(extra), expect)


def test_extraction_and_training_equal_one_process_and_resume_per_rank(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, imgs = setup
    worker(weights, imgs, tmp_path / "one")
    # Rank 1 dies after its first flushed batch; rank 0 finishes its share.
    worker(weights, imgs, tmp_path / "two", "--crash-rank", "1", "--crash-after-batches", "2",
           nproc=2, expect=1)  # fmt: skip
    parts = tmp_path / "two" / "features" / "train.parts"
    r0 = ShardedFeatureStore(parts / "rank-00000-of-00002")
    r1 = ShardedFeatureStore(parts / "rank-00001-of-00002", allow_incomplete=True)
    assert r0.attributes["finished"] and not r1.complete
    assert 0 < r1.attributes["images_done"] < 7  # part of its share is on disk
    worker(weights, imgs, tmp_path / "two", nproc=2)  # resumes rank 1's share only
    assert not parts.exists()
    a = load_file(tmp_path / "one" / "result-rank0.safetensors")
    for rank in (0, 1):
        b = load_file(tmp_path / "two" / f"result-rank{rank}.safetensors")
        for key in ("train_image_index", "train_position"):
            assert torch.equal(a[key], b[key]), key
        assert a["train_rows"].shape[0] > 40
        torch.testing.assert_close(b["train_rows"], a["train_rows"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b["heldout_rows"], a["heldout_rows"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b["W_enc"], a["W_enc"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["W_dec"], a["W_dec"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-4, atol=1e-6)
    one = ShardedFeatureStore(tmp_path / "one" / "features" / "train")
    two = ShardedFeatureStore(tmp_path / "two" / "features" / "train")
    assert one.attributes == two.attributes  # provenance, progress and the skip record
    assert one.attributes["skipped"] and one.attributes["skipped"][0][1]


def test_fact_train_under_torchrun_selects_like_one_process(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, imgs = setup
    args = [
        "train", "--backbone", "tiny_resnet_bottleneck", "--backbone-kwargs", '{"num_classes": 3}',
        "--weights", str(weights), "--layer", "layer3", "--dataset", f"imagefolder:{imgs}",
        "--k", "2", "3", "--n-latents", "16", "--lr", "1e-2", "--epochs", "2",
        "--sae-batch-size", "16", "--samples-per-image", "3", "--heldout-per-class", "2",
        "--batch-size", "4", "--no-progress",
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = launch([*TORCHRUN, "-m", "fact_model.cli", *args, "--out", str(tmp_path / "two")])
    assert proc.stdout.count("model saved to") == 1  # rank 0 alone prints
    # the sweep split by grid point (k=2 on rank 0, k=3 on rank 1) selects the same
    launch([*TORCHRUN, "-m", "fact_model.cli", *args, "--parallel", "grid", "--out",
            str(tmp_path / "grid")])  # fmt: skip
    ra = json.loads((tmp_path / "one" / "train_report.json").read_text())
    for other in ("two", "grid"):
        rb = json.loads((tmp_path / other / "train_report.json").read_text())
        la, lb = ra["layers"]["layer3"], rb["layers"]["layer3"]
        assert la["feature_set"] == lb["feature_set"]
        assert la["feature_set"]["skipped"]["skipped"] == 1
        assert [r["name"] for r in la["selected"]] == [r["name"] for r in lb["selected"]]
        assert len(la["runs"]) == len(lb["runs"]) == 2
        for x, y in zip(la["runs"], lb["runs"]):
            assert x["heldout_top1"] == y["heldout_top1"] and x["l0"] == pytest.approx(y["l0"])
            assert x["explained_variance"] == pytest.approx(y["explained_variance"], abs=1e-5)
        assert ra["heldout_evaluation"]["n_images"] == rb["heldout_evaluation"]["n_images"] == 6
        assert ra["heldout_evaluation"]["bcos"] == rb["heldout_evaluation"]["bcos"]
    sweep = json.loads((tmp_path / "grid" / "sweeps" / "layer3" / "sweep.json").read_text())
    assert set(sweep["runs"]) == {r["name"] for r in la["runs"]}  # both ranks' runs recorded
    # fact stats under torchrun writes the single-process statistics (rank 0 alone writes)
    stats = ["stats", str(tmp_path / "one" / "model"), "--dataset", f"imagefolder:{imgs}",
             "--no-progress", "--batch-size", "4", "--top-k", "3", "--extent-images", "1"]  # fmt: skip
    assert main([*stats, "--out", str(tmp_path / "st1")]) == 0
    launch([*TORCHRUN, "-m", "fact_model.cli", *stats, "--out", str(tmp_path / "st2")])
    sa = json.loads((tmp_path / "st1" / "stats_layer3.json").read_text())
    sb = json.loads((tmp_path / "st2" / "stats_layer3.json").read_text())
    assert sa.keys() == sb.keys() and sa["n_images"] == sb["n_images"] == 21
    for key, value in sa.items():
        assert sb[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)
    ta = load_file(tmp_path / "st1" / "stats_layer3.safetensors")
    tb = load_file(tmp_path / "st2" / "stats_layer3.safetensors")
    assert torch.equal(ta["top_images"], tb["top_images"])
    torch.testing.assert_close(tb["frequency"], ta["frequency"])
    for run in la["runs"]:  # the grid-split runs are single-process runs: same SAEs
        sae = Path("sweeps") / "layer3" / "runs" / run["name"] / "model" / "model.safetensors"
        wa, wg = load_file(tmp_path / "one" / sae), load_file(tmp_path / "grid" / sae)
        for key in wa:
            torch.testing.assert_close(wg[key], wa[key], rtol=1e-4, atol=1e-5)
    files = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "model").rglob("*.safetensors")
    )
    assert len(files) == 2  # the backbone and the SAE
    for file in files:
        wa, wb = load_file(tmp_path / "one" / file), load_file(tmp_path / "two" / file)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


def test_statistics_c2_and_deletion_under_torchrun_equal_one_process(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    # The deletion protocol needs readable images: a copy of the folder without the broken one.
    imgs = tmp_path / "img"
    shutil.copytree(setup[1], imgs, ignore=shutil.ignore_patterns("broken.png"))
    fact("resnet", ("layer3",)).save_pretrained(tmp_path / "model")
    base = [str(ANALYSIS), "--model", str(tmp_path / "model"), "--images", str(imgs)]
    launch([sys.executable, *base, "--out", str(tmp_path / "one")])
    launch([*TORCHRUN, *base, "--out", str(tmp_path / "two")])
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert a["stats"]["n_images"] == 21 and a["stats"]["skipped"]["skipped"] == 0
    assert len(a["c2"]["consistency"]) > 3 and a["c2"]["used"] == 21
    assert any(v is not None for v in a["stats"]["extent"])
    for rank in (0, 1):
        b = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert b["stats"]["top_ids"] == a["stats"]["top_ids"]
        assert b["stats"]["skipped"] == a["stats"]["skipped"]
        for key in ("frequency", "entropy", "extent", "top_values"):
            assert b["stats"][key] == pytest.approx(a["stats"][key], rel=1e-5, abs=1e-7), key
        assert b["c2"]["ids"] == a["c2"]["ids"] and b["c2"]["used"] == a["c2"]["used"]
        assert b["c2"]["c2"] == pytest.approx(a["c2"]["c2"], rel=1e-5, abs=1e-7)
        assert b["c2"]["consistency"] == pytest.approx(a["c2"]["consistency"], rel=1e-5, abs=1e-7)
        assert b["deletion"] == pytest.approx(a["deletion"], rel=1e-5, abs=1e-7)


def test_commands_that_do_not_split_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["explain", "nowhere", "nothing.png"]) == 1
    assert "runs in one process" in capsys.readouterr().err
