"""``fact demo --fast`` end to end, as a user runs it: the whole method on the concept world.

One real run of the CLI (a subprocess, offline), then the checks a user would make on what it
wrote: the summary's accuracies and completeness error, the figures, the atlas, the model; a
second run with the same ``--out`` resumes without recomputing; one with other settings refuses
and leaves the folder as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _fact(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fact_model.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _fact("demo", "--fast", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_demo_summary_is_complete_and_exact(
    demo_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, proc = demo_run
    s = json.loads((out / "summary.json").read_text())
    # the printed summary is the one saved, and it says where to look
    assert s["text"].strip() in proc.stdout
    assert "atlas" in proc.stdout and str(out) in proc.stdout
    acc = s["accuracy"]
    layers = s["config"]["layers"]
    assert set(acc) == {"bcos_test_top1", *(f"fact_{layer}_test_top1" for layer in layers)}
    chance = 1 / 12  # the default world's classes
    for name, value in acc.items():
        # a trained model, well above chance even in the fast setting
        assert 3 * chance < value <= 1.0, (name, value)
    # Eq. 9 holds on every test image at every layer: float32 rounding only
    assert 0.0 <= s["completeness_error_max"] < 1e-4
    for layer in layers:
        ev = s["evaluation"]["layers"][layer]
        assert ev["max_abs_completeness_error"] <= s["completeness_error_max"]
        for kind in ("fact", "channels"):
            c2 = s["c2"][kind][layer]
            assert c2["n_concepts"] > 0 and -1.0 <= c2["c2"] <= 1.0
        aucs = s["deletion_auc"][layer]
        assert set(aucs) == {"contribution", "saliency", "sobol", "random"}
        # the exact contributions find the important concepts better than chance
        assert aucs["contribution"] < aucs["random"]
        gt = s["groundtruth"]["layers"][layer]
        assert 0.0 <= gt["fraction_recovered"] <= 1.0
    # everything it points to exists
    for path in s["figures"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 1000, path
    assert any("misclassified" in k for k in s["figures"]) or acc["bcos_test_top1"] == 1.0
    assert {"cross_layer", *(f"deletion_{layer}" for layer in layers)} <= set(s["figures"])
    assert Path(s["atlas"]).is_file() and Path(s["atlas"]).name == "index.html"
    assert (Path(s["model"]) / "config.json").is_file()


def test_demo_model_loads_and_explains_exactly(
    demo_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    import torch

    from fact_model import FaCT
    from fact_model.world import ConceptWorld, WorldConfig

    out, _ = demo_run
    s = json.loads((out / "summary.json").read_text())
    model = FaCT.from_pretrained(s["model"])
    world = ConceptWorld(WorldConfig(**s["config"]["world"]))
    images, labels = world.images("test", 8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.cat([x, 1 - x], dim=1)
    explanation = model.explain(x)
    assert explanation.completeness_error.abs().max().item() < 1e-4
    assert (model(x).argmax(1) == torch.from_numpy(labels)).float().mean() > 0.25


def test_second_run_resumes_and_other_settings_refuse(
    demo_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = json.loads((out / "summary.json").read_text())
    again = _fact("demo", "--fast", "--out", str(out), "--no-progress", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json.loads((out / "summary.json").read_text())
    # nothing recomputed: the same figures, the same accuracies, the step files untouched
    assert resumed["accuracy"] == summary["accuracy"]
    assert resumed["seconds"] == summary["seconds"] > 0  # the compute time of the steps
    assert resumed["this_run_seconds"] < summary["seconds"]
    for p in (out / "steps").iterdir():
        assert p.stat().st_mtime_ns == before[p], p
    settled = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = _fact("demo", "--fast", "--seed", "1", "--out", str(out), "--no-progress")
    assert other.returncode != 0
    assert "other settings" in other.stderr and "--overwrite" in other.stderr
    # refused before touching anything: the folder is exactly as it was
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == settled
