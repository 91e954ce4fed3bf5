"""The README's "Explain one image" example runs as written (on a tiny saved model)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fact_model_helpers import fact
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = re.search(
        r"## Explain one image\n\n```python\n(.*?)```", README.read_text(), re.S
    ).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) < 10  # under ten lines
    fact("resnet").save_pretrained(tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        tmp_path / "dog.jpg"
    )
    monkeypatch.chdir(tmp_path)
    exec(
        compile(
            code.replace("path/to/model-or-hub-repo", str(tmp_path / "model")), "README", "exec"
        ),
        {},
    )
    out = capsys.readouterr().out
    top = re.findall(r"\((\d+), (-?[0-9.e+-]+)\)", out.split("completeness error")[0])
    assert len(top) == 5 and "completeness error" in out  # the top 5 (concept, contribution)
    values = [float(v) for _, v in top]
    assert values == sorted(values, reverse=True)
    err = float(out.split("completeness error")[1])
    assert abs(err) < 1e-5
    assert (tmp_path / "concept.png").stat().st_size > 100
