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
    # 8-bit PNGs without resizing: the authors' PIL pipeline gives the same pixels
    assert main([*argv[:-4], "--preprocessing", "pil", "--work-dir", str(tmp_path / "pil")]) == 0
    assert json.loads(out.read_text())["c2"] == pytest.approx(report["c2"], abs=1e-12)
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


def _base_argv(p: dict[str, Path], out: Path) -> list[str]:
    return [
        "--images", str(p["images"]), "--activations", str(p["acts"]), "--attributions", str(p["maps"]),
        "--backbone", f"oracle:{p['oracle']}", "--resize", "0", "--crop", "0", "--no-progress",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_offline_without_cached_weights_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _write_inputs(tmp_path)
    argv = _base_argv(p, tmp_path / "r.json")
    argv[argv.index("--backbone") + 1] = "someone/dinov2-never-downloaded+bilinear"
    assert main([*argv, "--offline"]) == 2  # not an OSError traceback
    err = capsys.readouterr().err
    assert "c2score: error:" in err and "--offline" in err and "cache" in err
    assert "someone/dinov2-never-downloaded" in err and "Traceback" not in err
    # a mistyped input file is not blamed on the cache
    argv = _base_argv(p, tmp_path / "r.json")
    argv[argv.index("--activations") + 1] = str(tmp_path / "typo.safetensors")
    assert main([*argv, "--offline"]) == 2
    err = capsys.readouterr().err
    assert "typo.safetensors does not exist" in err and "--offline" not in err


@pytest.mark.parametrize("which", ["acts", "maps", "oracle"])
def test_a_corrupt_file_is_named_in_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    p = _write_inputs(tmp_path)
    p[which].write_bytes(b"not a safetensors file")  # safetensors raises its own error type
    assert main(_base_argv(p, tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert err.startswith("c2score: error:") and str(p[which]) in err
    assert "not a readable safetensors file" in err and "Traceback" not in err


def test_an_undefined_c2_exits_non_zero_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _write_inputs(tmp_path)
    save_file({"activations": torch.zeros(N + 1, 2)}, str(p["acts"]))  # nothing is active
    out = tmp_path / "r.json"
    assert main(_base_argv(p, out)) == 3
    err = capsys.readouterr().err
    assert "C2 is undefined" in err and "no concept could be scored" in err
    assert "--allow-nan" in err
    report = json.loads(out.read_text())  # the report is written all the same
    assert report["c2"] is None and "no concept" in report["c2_undefined_reason"]
    assert main([*_base_argv(p, out), "--allow-nan"]) == 0
