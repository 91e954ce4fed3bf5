"""Atomic, pickle-free training checkpoints.

Layout under ``<out_dir>/checkpoints/``::

    step-00000120/            one complete checkpoint (written as .tmp-step-...-XXXX, renamed)
        model.safetensors     W_enc, W_dec, input_scale
        optimizer.safetensors Adam moments and step counts ("<param index>.<name>")
        trainer.safetensors   dead-latent counters and the epoch's firing counts
        state.json            step, epoch, data-source position, history, configs, param groups
    latest.json               {"dir": "step-00000120", "step": 120}, replaced atomically

A checkpoint directory becomes visible under its final name only once complete, and
``latest.json`` only ever names complete directories, so a run killed at any moment (even while
writing) resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from topk_sae.fileio import (
    atomic_save_tensors,
    atomic_write_json,
    fsync_directory,
    load_tensors,
    read_json,
    unique_temp_dir,
)

CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on the CPU)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def _optimizer_to_files(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for pid, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{pid}.{name}"] = value
    groups = []
    for group in opt_state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, groups


def _optimizer_from_files(tensors: dict[str, torch.Tensor], groups: list[Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    param_groups = []
    for group in groups:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


class CheckpointManager:
    """Writes and finds checkpoints in ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir: str | Path, keep: int = 1) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def clear(self) -> None:
        """Forget every checkpoint (fresh start with ``resume=False``)."""
        if self.root.exists():
            shutil.rmtree(self.root)

    def save(
        self,
        step: int,
        model_tensors: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        trainer_tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = unique_temp_dir(self.root, prefix=f".tmp-{name}-")
        opt_tensors, groups = _optimizer_to_files(optimizer_state)
        atomic_save_tensors(model_tensors, tmp / "model.safetensors")
        atomic_save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        atomic_save_tensors(trainer_tensors, tmp / "trainer.safetensors")
        full_state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "step": step,
            **state,
            "optimizer_param_groups": groups,
        }
        atomic_write_json(tmp / "state.json", full_state, indent=1)
        if final.exists():  # a re-run of the same step after a crash: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_directory(self.root)  # the rename is durable before latest.json names it
        atomic_write_json(self.pointer, {"dir": name, "step": step})
        self._cleanup(keep_name=name)
        return final

    def _cleanup(self, keep_name: str) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def latest_path(self) -> Path | None:
        if not self.pointer.is_file():
            return None
        pointer = read_json(self.pointer)
        if not isinstance(pointer, dict) or not isinstance(pointer.get("dir"), str):
            raise ValueError(f"{self.pointer} does not name a checkpoint directory: {pointer!r}")
        return self.root / pointer["dir"]

    def load_latest(self) -> Checkpoint | None:
        path = self.latest_path()
        if path is None:
            return None
        state = read_json(path / "state.json")
        if state.get("checkpoint_version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path}: checkpoint version {state.get('checkpoint_version')} is not supported"
            )
        optimizer = _optimizer_from_files(
            load_tensors(path / "optimizer.safetensors"), state.pop("optimizer_param_groups")
        )
        return Checkpoint(
            model=load_tensors(path / "model.safetensors"),
            optimizer=optimizer,
            trainer=load_tensors(path / "trainer.safetensors"),
            state=state,
            path=path,
        )
