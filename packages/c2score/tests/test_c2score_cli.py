"""The ``c2score`` command: folder + activation table + attribution maps -> JSON report."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from c2score.cli import main

N, S = 24, 16


def _write_inputs(root: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    imgs = root / "images"
    imgs.mkdir()
    masks = torch.zeros(N, 2, S, S)
    pairs_img, pairs_con, pairs_map = [], [], []
    for i in range(N):
        y, x = torch.randint(0, S - 6, (2,), generator=g).tolist()
        masks[i, 1, y : y + 6, x : x + 6] = 1
        masks[i, 0] = 1 - masks[i, 1]
        arr = (masks[i, 1] * 200 + 20).byte().numpy()
        Image.fromarray(np.stack([arr] * 3, -1)).save(imgs / f"{i:03d}.png")
        # concept 0 sits on the square, concept 1 on a random blob
        pairs_img += [i, i]
        pairs_con += [0, 1]
        pairs_map += [masks[i, 1], torch.rand(S, S, generator=g)]
    (imgs / "zz_corrupt.png").write_bytes(b"\x89PNG broken")  # image N: selected, unreadable
    pairs_img += [N, N]
    pairs_con += [0, 1]
    pairs_map += [torch.ones(S, S), torch.ones(S, S)]
    acts = torch.rand(N + 1, 2, generator=g) + 0.1
    paths = {"images": imgs, "acts": root / "acts.safetensors", "maps": root / "maps.safetensors"}
    save_file({"activations": acts}, str(paths["acts"]))
    save_file(
        {
            "image_index": torch.tensor(pairs_img),
            "concept_index": torch.tensor(pairs_con),
            "maps": torch.stack(pairs_map),
        },
        str(paths["maps"]),
    )
    paths["oracle"] = root / "oracle.safetensors"
    save_file({"features": torch.cat([masks, torch.zeros(1, 2, S, S)])}, str(paths["oracle"]))
    return paths


def test_cli_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write_inputs(tmp_path)
    out = tmp_path / "report.json"
    argv = [
        "--images", str(p["images"]), "--activations", str(p["acts"]), "--attributions", str(p["maps"]),
        "--backbone", f"oracle:{p['oracle']}", "--resize", "0", "--crop", "0", "--no-progress",
        "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "run"),
        "--histogram", str(tmp_path / "hist.png"),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["images_skipped"] == {"unreadable_image": 1}
    assert report["counts"]["concepts_scored"] == 2
    cons = dict(zip(report["per_concept"]["concept_id"], report["per_concept"]["consistency"]))
    assert cons[0] > 0.95 and cons[1] < 0.5
    assert report["c2"] == pytest.approx(np.mean(list(cons.values())) - report["baseline"]["mean"])
    captured = capsys.readouterr()
    assert "C2-score" in captured.out
    # matplotlib (the `plot` extra) is in the test group: the histogram must be a real PNG.
    from PIL import Image

    with Image.open(tmp_path / "hist.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    assert sum(report["distribution"]["counts"]) == 2
    assert main(argv) == 0  # a finished work dir: same report again
    assert json.loads(out.read_text())["c2"] == report["c2"]
    save_file({"labels": torch.arange(N + 1) % 2}, str(tmp_path / "labels.safetensors"))
    grouped = [*argv[:-4], "--baseline-groups", str(tmp_path / "labels.safetensors")]
    assert main(grouped) == 0
    assert len(json.loads(out.read_text())["baseline"]["per_group"]) == 2


def test_cli_reports_bad_input_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write_inputs(tmp_path)
    save_file({"activations": torch.rand(N + 5, 2)}, str(p["acts"]))
    argv = [
        "--images", str(p["images"]), "--activations", str(p["acts"]), "--attributions", str(p["maps"]),
        "--backbone", f"oracle:{p['oracle']}", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
