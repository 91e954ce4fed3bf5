"""The ``fact`` command line, end to end on tiny models and generated image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fact_model_helpers import fact
from PIL import Image

from fact_model.cli import main


def _image_folder(root: Path, n_per_class: int = 6, classes: int = 2, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            arr[..., c % 3] = 255 if i % 2 else arr[..., c % 3]
            Image.fromarray(arr).save(d / f"{i}.png")
    (root / "class_0" / "broken.png").write_bytes(b"not a png")  # skipped, counted, reported
    return root


def test_train_evaluate_explain_stats_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _image_folder(tmp_path / "images")
    common = [
        "--backbone",
        "tiny_resnet",
        "--backbone-kwargs",
        '{"num_classes": 2}',
        "--no-progress",
        "--batch-size",
        "4",
    ]
    rc = main(
        [
            "features",
            *common,
            "--layer",
            "layer3",
            "--dataset",
            f"imagefolder:{data}",
            "--out",
            str(tmp_path / "fs"),
            "--samples-per-image",
            "2",
            "--heldout-per-class",
            "1",
        ]
    )
    assert rc == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
    rc = main([
        "train", *common, "--layer", "layer3", "--dataset", f"imagefolder:{data}", "--out", str(tmp_path / "run"),
        "--k", "2", "--n-latents", "16", "--lr", "1e-2", "--epochs", "1", "--sae-batch-size", "16",
        "--samples-per-image", "2", "--heldout-per-class", "1",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "FaCT layer3: top-1" in out and (tmp_path / "run" / "model" / "config.json").is_file()
    model_dir = str(tmp_path / "run" / "model")
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["layers"]["layer3"]["feature_set"]["skipped"]["skipped"] == 1

    assert (
        main(
            [
                "evaluate",
                model_dir,
                "--dataset",
                f"imagefolder:{data}",
                "--no-progress",
                "--json",
                str(tmp_path / "ev.json"),
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n_images"] == 12 and ev["skipped"]["skipped"] == 1
    assert ev["layers"]["layer3"]["max_abs_completeness_error"] < 1e-5

    img = data / "class_1" / "0.png"
    assert (
        main(["explain", model_dir, str(img), "--top", "2", "--out", str(tmp_path / "expl")]) == 0
    )
    printed = capsys.readouterr().out
    assert "completeness error" in printed and "concept" in printed
    saved = json.loads((tmp_path / "expl" / "0_explanation.json").read_text())
    entry = saved["layers"]["layer3"]
    assert abs(entry["completeness_error"]) < 1e-5 and all(
        Path(p).is_file() for p in entry["attribution_pngs"]
    )

    assert (
        main(
            [
                "stats",
                model_dir,
                "--dataset",
                f"imagefolder:{data}",
                "--out",
                str(tmp_path / "st"),
                "--no-progress",
                "--extent-images",
                "1",
            ]
        )
        == 0
    )
    st = json.loads((tmp_path / "st" / "stats_layer3.json").read_text())
    assert st["concepts"] == 16 and st["n_images"] == 12


def test_failures_exit_non_zero_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = fact("resnet", ("layer3",)).save_pretrained(tmp_path / "m")
    assert main(["explain", str(model_dir), str(tmp_path / "nope.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert main(["explain", str(model_dir), str(tmp_path / "bad.png")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), "--dataset", "world"]) == 1
    assert (
        main(
            [
                "features",
                "--backbone",
                "tiny_resnet",
                "--layer",
                "layer9",
                "--dataset",
                f"imagefolder:{tmp_path}",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 1
    )
    assert "no layer named 'layer9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
