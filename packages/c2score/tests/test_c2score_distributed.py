"""A C2 pass split across ``torchrun`` ranks (gloo on CPU) gives the single-process result on
every rank, with skip counts, the per-class baseline and a per-rank resume after a crash."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed" / "c2_worker.py"


def run(out: Path, nproc: int, *extra: str, expect: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"
    ]  # fmt: skip
    proc = subprocess.run(
        [*cmd, str(WORKER), "--out", str(out), *extra], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert (proc.returncode == 0) == (expect == 0), proc.stdout[-3000:] + proc.stderr[-3000:]


def same(a: dict, b: dict) -> None:
    for key, value in a.items():
        if key == "config":
            continue
        if isinstance(value, float):
            assert (math.isnan(value) and math.isnan(b[key])) or b[key] == pytest.approx(
                value, rel=1e-12, abs=1e-12
            ), key
        elif (isinstance(value, list) and value and isinstance(value[0], float)) or (
            isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values())
        ):
            assert b[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert b[key] == value, key


@pytest.mark.parametrize("groups", [False, True])
def test_two_ranks_equal_one_process(tmp_path: Path, groups: bool) -> None:
    flag = ["--groups"] if groups else []
    run(tmp_path / "one", 1, *flag)
    run(tmp_path / "two", 2, *flag)
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert a["skipped_images"] == {"smaller_than_patch": 1} and len(a["consistency"]) >= 5
    assert math.isfinite(a["c2"])
    for rank in (0, 1):
        same(a, json.loads((tmp_path / "two" / f"rank{rank}.json").read_text()))
    assert sorted(p.name for p in (tmp_path / "two" / "work").iterdir()) == [
        "rank-00000-of-00002", "rank-00001-of-00002"
    ]  # fmt: skip


def test_a_rank_killed_mid_pass_resumes_its_share(tmp_path: Path) -> None:
    run(tmp_path / "one", 1)
    run(tmp_path / "three", 3, "--crash-rank", "1", expect=1)
    run(tmp_path / "three", 3)
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    same(a, json.loads((tmp_path / "three" / "rank2.json").read_text()))
