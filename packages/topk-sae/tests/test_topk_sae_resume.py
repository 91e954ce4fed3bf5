"""Resume after a crash or a SIGKILL gives bit-identical weights to an uninterrupted run (CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from topk_sae import TensorSource, TrainConfig, train
from topk_sae.checkpoint import CheckpointManager

# Dead latents (AuxK active), k-annealing, a checkpoint period that does not divide the 7 steps
# per epoch and a fractional last epoch: all of the trainer's state must survive the restart.
CFG = TrainConfig(
    n_latents=48,
    k=3,
    epochs=2.6,
    lr=1e-2,
    warmup_epochs=0.5,
    hold_epochs=0.3,
    dead_after_tokens=150,
    k_aux=6,
    k_anneal_steps=6,
    k_anneal_start=8,
    checkpoint_every=4,
    progress=False,
    log_every=1,
    deterministic=True,
)


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(420, 12, generator=gen).relu() + 0.1  # uncentred, non-negative


def _source() -> TensorSource:
    return TensorSource(_data(), batch_size=64, seed=5)


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    return train(CFG, _source(), out_dir=tmp_path_factory.mktemp("ref"))


def _assert_same(result, reference) -> None:
    assert torch.equal(result.model.W_enc, reference.model.W_enc)
    assert torch.equal(result.model.W_dec, reference.model.W_dec)
    assert torch.equal(result.model.input_scale, reference.model.input_scale)
    assert result.history == reference.history
    assert result.epoch_stats == reference.epoch_stats


def test_reference_run_exercises_auxk(reference) -> None:
    assert len(reference.history) == 19  # ceil(2.6 * 7)
    assert any(h["auxk"] > 0 for h in reference.history)
    assert reference.history[0]["k"] == 8 and reference.history[-1]["k"] == 3


@pytest.mark.parametrize("crash_at", [6, 9])
def test_resume_after_exception_is_bit_identical(tmp_path: Path, reference, crash_at: int) -> None:
    def boom(step: int, _metrics: dict) -> None:
        if step == crash_at:
            raise Crash

    with pytest.raises(Crash):
        train(CFG, _source(), out_dir=tmp_path, callback=boom)
    ckpt = CheckpointManager(tmp_path).load_latest()
    assert ckpt is not None and ckpt.state["step"] == 4 * (crash_at // 4)
    resumed = train(CFG, _source(), out_dir=tmp_path)  # a fresh source object
    _assert_same(resumed, reference)


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, reference) -> None:
    data_path = tmp_path / "data.safetensors"
    save_file({"x": _data()}, str(data_path))
    out_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json, os, signal, warnings
        from safetensors.torch import load_file
        from topk_sae import TensorSource, TrainConfig, train
        warnings.simplefilter("ignore")
        cfg = TrainConfig.from_dict(json.loads({json.dumps(CFG.to_dict())!r}))

        def kill(step, metrics):
            if step == 11:
                os.kill(os.getpid(), signal.SIGKILL)

        x = load_file({str(data_path)!r})["x"]
        train(cfg, TensorSource(x, batch_size=64, seed=5), out_dir={str(out_dir)!r}, callback=kill)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert CheckpointManager(out_dir).load_latest().state["step"] == 8
    resumed = train(CFG, _source(), out_dir=out_dir)
    _assert_same(resumed, reference)


def test_resume_of_a_finished_run_returns_the_same_model(tmp_path: Path, reference) -> None:
    train(CFG, _source(), out_dir=tmp_path)
    _assert_same(train(CFG, _source(), out_dir=tmp_path), reference)


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    def stop(step: int, _metrics: dict) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(CFG, _source(), out_dir=tmp_path, callback=stop)
    with pytest.raises(ValueError, match=r"different config \(fields \['lr'\]\)"):
        train(dataclasses.replace(CFG, lr=1e-3), _source(), out_dir=tmp_path)
    fresh = train(
        dataclasses.replace(CFG, lr=1e-3, epochs=0.5), _source(), out_dir=tmp_path, resume=False
    )
    assert fresh.history[-1]["step"] == 4


def test_interrupted_checkpoint_write_is_ignored(tmp_path: Path, reference) -> None:
    def boom(step: int, _metrics: dict) -> None:
        if step == 9:
            raise Crash

    with pytest.raises(Crash):
        train(CFG, _source(), out_dir=tmp_path, callback=boom)
    # A half-written checkpoint directory (killed mid-write) must not be picked up.
    partial = tmp_path / "checkpoints" / ".tmp-step-00000012-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    _assert_same(train(CFG, _source(), out_dir=tmp_path), reference)
    assert not partial.exists()
