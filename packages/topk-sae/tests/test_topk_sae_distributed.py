"""Data-parallel SAE training and evaluation under ``torchrun`` (gloo on CPU) equal one process.

Two and three ranks (uneven shares, and a last batch of 2 rows that leaves one of three ranks
no row at all) train with AuxK active; weights, loss history, dead-latent counts and held-out
metrics must equal the single-process run to float32 reduction-order tolerance. A run killed
after a checkpoint under 2 ranks resumes under 3 ranks (and under 1) to the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from topk_sae import distributed as dist

WORKER = Path(__file__).parent / "distributed" / "sae_worker.py"


def run(out: Path, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(WORKER)]  # fmt: skip
    proc = subprocess.run(
        [*cmd, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def result(out: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(out / f"result-rank{rank}.safetensors"), json.loads(
        (out / f"result-rank{rank}.json").read_text()
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    run(out, 1)
    return out


def assert_same(a: Path, b: Path, ranks_b: int = 1) -> None:
    ta, ja = result(a)
    for r in range(ranks_b):
        tb, jb = result(b, r)
        for key in ("W_enc", "W_dec"):
            torch.testing.assert_close(tb[key], ta[key], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(tb["firing_frequency"], ta["firing_frequency"])
        ha, hb = ja["history"], jb["history"]
        assert len(ha) == len(hb) > 10
        for ea, eb in zip(ha, hb):
            assert (ea["step"], ea["epoch"], ea["k"], ea["num_dead"]) == (
                eb["step"], eb["epoch"], eb["k"], eb["num_dead"]
            )  # fmt: skip
            assert eb["l0"] == pytest.approx(ea["l0"], abs=1e-12)
            for key in ("loss", "mse", "auxk", "fvu_batch", "lr"):
                assert eb[key] == pytest.approx(ea[key], rel=1e-4, abs=1e-6), key
        assert jb["epoch_stats"] == ja["epoch_stats"]  # from summed integer counts: exact
        for key, value in ja["metrics"].items():
            assert jb["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_single_process_run_has_auxk_and_dead_latents(single: Path) -> None:
    _, js = result(single)
    assert js["world_size"] == 1
    assert any(e["auxk"] > 0 for e in js["history"])  # AuxK (global dead set) is exercised
    assert any(e["num_dead"] > 0 for e in js["history"])


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_training_equals_single_process(single: Path, tmp_path: Path, nproc: int) -> None:
    run(tmp_path, nproc)
    _, j = result(tmp_path)
    assert j["world_size"] == nproc
    assert_same(single, tmp_path, ranks_b=nproc)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_resume_with_another_world_size(single: Path, tmp_path: Path) -> None:
    run(tmp_path, 2, "--crash-after", "8")  # checkpoint at step 8 is on disk
    assert not (tmp_path / "run" / "model").exists()
    run(tmp_path, 3)
    assert_same(single, tmp_path, ranks_b=3)


def test_rank_slices_partition_in_order() -> None:
    for n in (0, 1, 2, 5, 50, 51):
        for w in (1, 2, 3, 8):
            parts = [list(range(n))[dist.rank_slice(n, rank_=r, world=w)] for r in range(w)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_resolve_device_never_picks_cuda_implicitly() -> None:
    assert dist.resolve_device(None) == torch.device("cpu")
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            dist.resolve_device("cuda")
