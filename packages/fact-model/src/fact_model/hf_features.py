"""Feature sets as Hugging Face ``datasets``: Parquet export, Hub upload, streaming training.

A feature set's stores (``train/``, ``heldout/``) are exported shard by shard to Parquet files
(one row per vector: ``features`` as a fixed-size float list, ``image_index``, ``position``,
``label``) plus a dataset card whose YAML declares the two splits and records the provenance,
so ``datasets.load_dataset(<folder or repo>, split="train", streaming=True)`` reads it like any
Hub dataset. :class:`HFFeatureSource` feeds such a dataset (map-style or streaming) to the
``topk-sae`` trainer as a resumable ``BatchSource``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fact_model._atomic import atomic_path, atomic_write_text
from fact_model.features import FeatureSet
from topk_sae import ShardedFeatureStore

__all__ = ["HFFeatureSource", "export_feature_set", "push_feature_set"]

_FIELDS = ("image_index", "position", "label")


def _write_parquet(
    store: ShardedFeatureStore, folder: Path, split: str, rows_per_file: int
) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    n_files = max(1, math.ceil(store.num_rows / rows_per_file))
    for f in range(n_files):
        lo, hi = f * rows_per_file, min((f + 1) * rows_per_file, store.num_rows)
        feats = store.read(lo, hi).float().numpy()
        flat = pa.array(feats.reshape(-1), type=pa.float32())
        columns = {"features": pa.FixedSizeListArray.from_arrays(flat, store.d_in)}
        for name in _FIELDS:
            columns[name] = pa.array(store.read(lo, hi, name).numpy(), type=pa.int64())
        rel = f"data/{split}-{f:05d}-of-{n_files:05d}.parquet"
        with atomic_path(folder / rel) as tmp:
            pq.write_table(pa.table(columns), str(tmp))
        files.append(rel)
    return files


def export_feature_set(
    features: FeatureSet, out_dir: str | os.PathLike[str], *, rows_per_file: int = 1 << 18
) -> Path:
    """Write the feature set as a Parquet dataset folder (loadable with ``load_dataset``)."""
    out = Path(out_dir)
    splits = {"train": features.train}
    if features.heldout is not None:
        splits["heldout"] = features.heldout
    configs = []
    for split, store in splits.items():
        files = _write_parquet(store, out, split, rows_per_file)
        configs.append({"split": split, "path": files})
    yaml_files = "\n".join(
        f"  - split: {c['split']}\n    path:\n" + "\n".join(f"    - {p}" for p in c["path"])
        for c in configs
    )
    prov = json.dumps(features.provenance, indent=2, sort_keys=True)
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n" + yaml_files + "\n"
        "tags:\n- fact\n- sae-features\n---\n\n"
        f"# FaCT feature set: `{features.provenance.get('layer')}`\n\n"
        "Importance-sampled feature vectors of a B-cos network (FaCT, App. A, Eq. A.1): per "
        "image, positions drawn without replacement with probability proportional to their "
        "absolute contribution to the predicted logit. One row per vector: `features` "
        f"({features.train.d_in} floats), `image_index`, `position` (row-major), `label`.\n\n"
        "```python\nfrom datasets import load_dataset\n"
        "ds = load_dataset('<this repo or folder>', split='train', streaming=True)\n```\n\n"
        f"## Provenance\n\n```json\n{prov}\n```\n"
    )
    atomic_write_text(out / "README.md", card)
    return out


def push_feature_set(
    features: FeatureSet,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload FaCT feature set",
    rows_per_file: int = 1 << 18,
    api: Any = None,
) -> Any:
    """Export to Parquet and upload as a Hub *dataset* repository; returns the ``CommitInfo``."""
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        export_feature_set(features, tmp, rows_per_file=rows_per_file)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="dataset",
            revision=branch,
            create_pr=create_pr,
            commit_message=commit_message,
        )


class HFFeatureSource:
    """A ``topk-sae`` ``BatchSource`` over a ``datasets`` feature dataset (map-style or streaming).

    Map-style datasets are read in a permutation drawn from ``(seed, epoch)``; streaming ones
    visit their shards (Parquet files) in a random order and shuffle rows within windows of
    ``buffer_size`` rows (or are read in order with ``shuffle=False``). Either way the order is
    a function of ``(seed, epoch)`` and the state is the epoch and the number of batches
    yielded, so a resumed run skips to the next batch.

    Args:
        dataset: ``datasets.Dataset`` or ``datasets.IterableDataset`` with a ``features`` column.
        batch_size: rows per batch.
        num_rows: rows per epoch (needed for streaming datasets without split info).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_rows: int | None = None,
        buffer_size: int = 1 << 16,
    ) -> None:
        import datasets

        self.streaming = isinstance(dataset, datasets.IterableDataset)
        if not self.streaming and not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__}"
            )
        cols = dataset.column_names
        if cols is not None and "features" not in cols:
            raise ValueError(f"the dataset has no 'features' column (columns: {cols})")
        if num_rows is None:
            if not self.streaming:
                num_rows = len(dataset)
            else:
                info = dataset.info.splits
                split = str(dataset.split) if dataset.split is not None else None
                if info and split in info and info[split].num_examples:
                    num_rows = int(info[split].num_examples)
        if num_rows is None or num_rows <= 0:
            raise ValueError("num_rows is unknown for this streaming dataset; pass num_rows=")
        self.dataset = dataset.select_columns(["features"])
        self.batch_size = int(batch_size)
        self.seed, self.shuffle, self.buffer_size = int(seed), bool(shuffle), int(buffer_size)
        self.num_rows = int(num_rows)
        first = next(iter(self.dataset if self.streaming else self.dataset.select(range(1))))
        self.d_in = len(first["features"])
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = int(epoch), 0

    def _rows(self, table: Any) -> Tensor:
        """(n, d_in) float32 from an Arrow table's fixed-size-list column (no per-row Python)."""
        col = table.column("features").combine_chunks()
        flat = col.flatten() if hasattr(col, "flatten") else col.values
        arr = flat.to_numpy(zero_copy_only=False).reshape(len(col), self.d_in)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def _stream(self) -> Iterator[Tensor]:
        ds = self.dataset
        if self.streaming:
            yield from self._stream_batches(ds)
            return
        order = (
            np.random.default_rng([self.seed, self._epoch]).permutation(self.num_rows)
            if self.shuffle
            else np.arange(self.num_rows)
        )
        table = ds.with_format("arrow")
        for start in range(0, self.num_rows, self.batch_size):
            yield self._rows(table[order[start : start + self.batch_size]])

    def _stream_batches(self, ds: Any) -> Iterator[Tensor]:
        """Streaming: shards in a random order, rows shuffled within windows of
        ``buffer_size`` rows (``IterableDataset.shuffle`` moves rows one by one in Python)."""
        if not self.shuffle:
            for table in ds.with_format("arrow").iter(batch_size=self.batch_size):
                yield self._rows(table)
            return
        rng = np.random.default_rng([self.seed, self._epoch])
        n_shards = max(1, int(getattr(ds, "num_shards", 1) or 1))
        pending: list[Tensor] = []
        held = 0
        carry = None

        def windows() -> Iterator[Tensor]:
            nonlocal pending, held
            for shard in rng.permutation(n_shards):
                part = ds.shard(num_shards=n_shards, index=int(shard)) if n_shards > 1 else ds
                for table in part.with_format("arrow").iter(batch_size=self.batch_size):
                    pending.append(self._rows(table))
                    held += pending[-1].shape[0]
                    if held >= self.buffer_size:
                        block, pending, held = torch.cat(pending), [], 0
                        yield block[torch.from_numpy(rng.permutation(block.shape[0]))]
            if pending:
                block, pending, held = torch.cat(pending), [], 0
                yield block[torch.from_numpy(rng.permutation(block.shape[0]))]

        for block in windows():
            if carry is not None:
                block = torch.cat([carry, block])
            n_full = block.shape[0] // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                yield block[start : start + self.batch_size]
            carry = block[n_full:] if n_full < block.shape[0] else None
        if carry is not None:
            yield carry

    def __iter__(self) -> Iterator[Tensor]:
        skip = self._position
        for i, batch in enumerate(self._stream()):
            if i < skip:
                continue
            if self._position >= len(self):
                return
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "HFFeatureSource",
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_rows": self.num_rows,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "num_rows", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved source has {key}={state[key]!r}, this one "
                    f"{getattr(self, key)!r}; resume with the same dataset and settings"
                )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
