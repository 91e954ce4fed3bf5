"""The paper protocol split across ``torchrun`` ranks (gloo on CPU): every class is computed
once, by one rank, and every rank returns the single-process curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).parent / "distributed" / "protocol_worker.py"


def run(out: Path, nproc: int) -> None:
    cmd = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(WORKER), "--out", str(out)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_ranks_split_the_classes_and_return_the_single_process_curves(tmp_path: Path) -> None:
    run(tmp_path / "one", 1)
    run(tmp_path / "two", 2)
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert a["calls"] == 5 and len(a["curves"]) == 8
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["calls"] for r in ranks) == [2, 3]  # each class computed once
    for r in ranks:
        assert r["curves"] == a["curves"]
    for name in ("deletion.json", "protocol.json"):
        assert json.loads((tmp_path / "two" / name).read_text()) == json.loads(
            (tmp_path / "one" / name).read_text()
        )
