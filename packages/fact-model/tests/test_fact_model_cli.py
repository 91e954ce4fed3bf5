"""The ``fact`` command line, end to end on tiny models and generated image folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def _clip_folder(tmp: Path) -> Path:
    """A tiny random transformers CLIP saved (model + processor) as a local folder."""
    from test_fact_model_naming import _tiny_clip

    (tmp / "tok").mkdir()
    clip, processor = _tiny_clip(tmp / "tok")
    clip.save_pretrained(tmp / "clip")
    processor.save_pretrained(tmp / "clip")
    return tmp / "clip"


WORDS = ["dog", "cat", "tree", "sky", "road", "wheel", "water", "red car"]


def test_stats_names_concepts_with_a_local_clip_and_the_atlas_takes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fact_model import FaCT
    from fact_model.cli import _dataset
    from fact_model.concepts import LayerConcepts
    from fact_model.naming import load_clip, name_concepts

    model_dir = fact("resnet", ("layer3",)).save_pretrained(tmp_path / "m")
    data = f"imagefolder:{_image_folder(tmp_path / 'images')}"
    clip_dir = _clip_folder(tmp_path)
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    st = tmp_path / "st"
    rc = main([
        "stats", str(model_dir), "--dataset", data, "--out", str(st), "--no-progress",
        "--extent-images", "0", "--batch-size", "4", "--clip-model", str(clip_dir),
        "--vocabulary", str(vocab), "--name-top-k", "3",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "concepts named" in capsys.readouterr().out
    names = json.loads((st / "names_layer3.json").read_text())
    stats = json.loads((st / "stats_layer3.json").read_text())
    n = stats["concepts"]
    assert n == 64 and stats["n_images"] == 12 and len(names["names"]) == n
    assert set(names["names"]) <= set(WORDS) and len(set(names["names"])) > 1
    assert names["layer"] == "layer3" and names["n_words"] == len(WORDS) and names["top_k"] == 3
    assert [c["name"] for c in stats["concept_names"]] == names["names"]
    assert [c["score"] for c in stats["concept_names"]] == names["scores"]
    assert [c["concept"] for c in stats["concept_names"]] == list(range(n))
    assert stats["naming"]["file"] == "names_layer3.json"
    # the names are those of name_concepts called directly on the same model, data and CLIP
    model = FaCT.from_pretrained(model_dir).eval()
    clip, processor = load_clip(str(clip_dir))
    want = name_concepts(
        LayerConcepts(model, "layer3"), _dataset(data, model), WORDS, clip, processor,
        batch_size=4, progress=False, top_k=3,
    )  # fmt: skip
    assert names["names"] == want.names
    np.testing.assert_allclose(names["scores"], want.scores.numpy(), rtol=1e-6, atol=1e-9)

    # fact atlas --names DIR hands every layer's names and scores to build_model_atlas (which
    # the report tests check renders them); the atlas itself is not rebuilt here (slow)
    seen: dict[str, Any] = {}

    def fake_atlas(model: Any, dataset: Any, out_dir: Any, **kwargs: Any) -> Path:
        seen.update(kwargs, model=model)
        return Path(out_dir) / "index.html"

    monkeypatch.setattr("fact_model.report.build_model_atlas", fake_atlas)
    rc = main(["atlas", str(model_dir), "--dataset", data, "--out", str(tmp_path / "a"),
               "--names", str(st)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert seen["concept_names"] == {"layer3": names["names"]}
    assert seen["name_scores"] == {"layer3": names["scores"]}
    assert seen["summary"] == {"concept names (CLIP-Dissect)": {"layer3": "clip, 8 words"}}
    seen.clear()
    assert main(["atlas", str(model_dir), "--dataset", data, "--out", str(tmp_path / "a")]) == 0
    assert seen["concept_names"] is None and seen["name_scores"] is None and not seen["summary"]
    # names of another layer, or of another model's layer, are refused with the reason
    bad = dict(names, layer="layer2")
    (tmp_path / "names_bad.json").write_text(json.dumps(bad))
    rc = main(["atlas", str(model_dir), "--dataset", data, "--out", str(tmp_path / "a"),
               "--names", str(tmp_path / "names_bad.json")])  # fmt: skip
    assert rc == 1 and "does not decompose" in capsys.readouterr().err
    bad = dict(names, names=names["names"][:5], scores=names["scores"][:5])
    (tmp_path / "names_bad.json").write_text(json.dumps(bad))
    rc = main(["atlas", str(model_dir), "--dataset", data, "--out", str(tmp_path / "a"),
               "--names", str(tmp_path / "names_bad.json")])  # fmt: skip
    assert rc == 1 and "has 5 names but layer layer3 has 64" in capsys.readouterr().err


def test_naming_options_fail_early_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = fact("resnet", ("layer3",)).save_pretrained(tmp_path / "m")
    data = f"imagefolder:{_image_folder(tmp_path / 'images')}"
    vocab = tmp_path / "words.txt"
    vocab.write_text("dog\ncat\n")
    base = ["stats", str(model_dir), "--dataset", data, "--out", str(tmp_path / "st")]
    for extra, message in [
        (["--clip-model", str(tmp_path / "no-clip"), "--vocabulary", str(vocab)], "does not exist"),
        (["--clip-model", str(tmp_path), "--vocabulary", str(vocab)], "no config.json"),
        (["--vocabulary", str(vocab)], "--vocabulary needs --clip-model"),
        (["--clip-model", str(tmp_path)], "--clip-model needs --vocabulary"),
        (["--name-top-k", "5"], "naming option"),
        (
            ["--clip-model", str(tmp_path), "--vocabulary", str(tmp_path / "none.txt")],
            "vocabulary file",
        ),
    ]:
        assert main(base + extra) == 1, extra
        assert message in capsys.readouterr().err, extra
    vocab.write_text("\n\n")
    assert main([*base, "--clip-model", str(tmp_path), "--vocabulary", str(vocab)]) == 1
    assert "has no words" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()  # refused before the statistics pass
    rc = main(
        [
            "atlas",
            str(model_dir),
            "--dataset",
            data,
            "--out",
            str(tmp_path / "a"),
            "--names",
            str(tmp_path),
        ]
    )
    assert rc == 1 and "holds no names_<layer>.json" in capsys.readouterr().err
