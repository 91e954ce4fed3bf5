"""An on-disk feature store larger than RAM: safetensors shards + a JSON manifest.

Layout of a store directory::

    manifest.json                 # format, d_in, dtype, metadata fields, shard list
    shard-000000.safetensors      # "features" (rows, d_in) + optional int64 (rows,) metadata
    shard-000001.safetensors
    ...

``FeatureStoreWriter`` appends rows and writes each shard and then the manifest atomically
(temporary file + ``os.replace``), so a killed writer leaves a valid store of its complete
shards and can be resumed. ``ShardedFeatureStore`` validates every shard with
``safetensors.safe_open``, then reads a row range as one sequential file read at the offset
given by the shard's safetensors header, straight into the destination tensor; ``.source()``
serves shuffled training batches whose peak memory is bounded by its shuffle buffer,
independent of the size of the store.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from topk_sae.fileio import atomic_save_tensors, atomic_write_json, read_json

__all__ = [
    "FeatureStoreWriter",
    "ShardInfo",
    "ShardedFeatureStore",
    "StoreSource",
    "merge_stores",
]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "topk-sae-feature-store"
FORMAT_VERSION = 1
FEATURES_KEY = "features"
DEFAULT_SHARD_BYTES = 256 * 2**20
"""Default shard size: large enough for sequential reads, small enough to rewrite cheaply."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ST_DTYPES: dict[tuple[bool, str], torch.dtype] = {
    (True, "F32"): torch.float32,
    (True, "F16"): torch.float16,
    (True, "BF16"): torch.bfloat16,
    (False, "I64"): torch.int64,
}
"""safetensors dtype codes of (is-features, code) pairs a store may hold."""
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ShardInfo(NamedTuple):
    """One shard of a store: its file name, first global row and row count."""

    file: str
    start: int
    num_rows: int


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def _json_roundtrip(data: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-normalised copy of ``data`` (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(dict(data)))
    except (TypeError, ValueError) as err:
        raise TypeError(f"store attributes must be JSON-serialisable: {err}") from err


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported store dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported store dtype {dtype}; choose one of {sorted(_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _as_tensor(x: Tensor | np.ndarray, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x.detach().cpu()
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {root} is not a feature store (create one with "
            "topk_sae.store.FeatureStoreWriter)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"corrupt feature-store manifest {path}: {err}. Rebuild the store, or delete the "
            "manifest and its shards and write them again."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('version')!r}; this topk-sae reads "
            f"version {FORMAT_VERSION}"
        )
    required = ("d_in", "dtype", "metadata_fields", "shards", "num_rows", "complete")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"corrupt feature-store manifest {path}: missing keys {missing}")
    _dtype_name(manifest["dtype"])
    rows = sum(int(s["num_rows"]) for s in manifest["shards"])
    if rows != manifest["num_rows"]:
        raise ValueError(
            f"corrupt feature-store manifest {path}: shards hold {rows} rows but num_rows is "
            f"{manifest['num_rows']}"
        )
    return manifest


class FeatureStoreWriter:
    """Append ``(N, d_in)`` feature rows (and optional int64 per-row metadata) to a store.

    Rows are buffered until ``shard_rows`` are pending, then written as one shard. Each shard and
    then the manifest are replaced atomically, so a crash loses at most the pending rows:
    opening the same path again resumes after the last complete shard (``num_rows`` tells the
    producer where to continue; call ``flush()`` at the producer's own checkpoints to align the
    two). Opening an existing store, complete or not, appends to it. ``close()`` (or leaving
    the ``with`` block without an exception) writes the pending rows and marks the store
    complete. Memory: at most ``shard_rows`` pending rows plus the rows of one ``append``.

    Args:
        path: store directory (created if needed).
        d_in: feature dimension.
        dtype: on-disk dtype (float32, float16 or bfloat16); appended rows must already have it.
        shard_rows: rows per shard; ``None`` aims at 256 MiB shards.
        metadata: names of int64 per-row fields every ``append`` must supply (e.g. image_id).
        nonfinite: what to do with rows holding NaN/Inf: ``"error"`` (raise), ``"drop"`` (skip
            them, counted in the manifest) or ``"keep"`` (no check).
        attributes: JSON-serialisable user metadata stored in the manifest (e.g. where the
            features came from). For a new store they are written as given; for an existing one
            they must equal the stored ones where both have a key (``None``: keep the stored
            ones). ``writer.attributes`` may be changed later: it is saved with every manifest
            write, i.e. atomically together with the next shard (a producer's progress record
            committed with the rows it describes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        d_in: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        shard_rows: int | None = None,
        metadata: Sequence[str] = (),
        nonfinite: Literal["error", "drop", "keep"] = "error",
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        dtype_name = _dtype_name(dtype)
        itemsize = _DTYPES[dtype_name].itemsize
        if shard_rows is None:
            shard_rows = max(1, DEFAULT_SHARD_BYTES // (d_in * itemsize))
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows <= 0:
            raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        fields = list(metadata)
        for name in fields:
            if not _FIELD_RE.match(name) or name == FEATURES_KEY:
                raise ValueError(
                    f"invalid metadata field name {name!r}: use an identifier other than "
                    f"{FEATURES_KEY!r}"
                )
        if len(set(fields)) != len(fields):
            raise ValueError(f"duplicate metadata field names in {fields}")
        if nonfinite not in ("error", "drop", "keep"):
            raise ValueError(f"nonfinite must be 'error', 'drop' or 'keep', got {nonfinite!r}")

        self.path = Path(path)
        self.d_in = d_in
        self.dtype = _DTYPES[dtype_name]
        self.shard_rows = shard_rows
        self.metadata_fields = fields
        self.nonfinite = nonfinite
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self._closed = False

        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST_NAME).exists():
            manifest = _read_manifest(self.path)
            theirs = (manifest["d_in"], manifest["dtype"], list(manifest["metadata_fields"]))
            ours = (d_in, dtype_name, fields)
            if theirs != ours:
                raise ValueError(
                    f"cannot append to the existing store {self.path}: it has (d_in, dtype, "
                    f"metadata) = {theirs}, this writer was opened with {ours}. Open it with the "
                    "same settings, or write to a new directory."
                )
            stored = dict(manifest.get("attributes", {}))
            if attributes is not None:
                given = _json_roundtrip(attributes)
                clash = sorted(k for k in given if k in stored and stored[k] != given[k])
                if clash:
                    detail = "; ".join(
                        f"{k}: stored {stored[k]!r}, given {given[k]!r}" for k in clash
                    )
                    raise ValueError(
                        f"cannot append to the existing store {self.path}: attributes {clash} "
                        f"differ ({detail}). Write to a new directory, or open it with the same "
                        "attributes."
                    )
                stored.update(given)
            self._manifest = manifest
            self._manifest["attributes"] = stored
            self._manifest["complete"] = False
        else:
            stray = [p.name for p in self.path.iterdir() if not p.name.endswith(".tmp")]
            if stray:
                raise ValueError(
                    f"{self.path} is not empty and has no {MANIFEST_NAME} (found {stray[:5]}): "
                    "refusing to write a feature store into it; choose an empty directory."
                )
            self._manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "d_in": d_in,
                "dtype": dtype_name,
                "metadata_fields": fields,
                "shard_rows": shard_rows,
                "num_rows": 0,
                "num_dropped_nonfinite": 0,
                "complete": False,
                "shards": [],
                "attributes": _json_roundtrip(attributes or {}),
            }
        self._remove_leftovers()
        atomic_write_json(self.path / MANIFEST_NAME, self._manifest, indent=1)

    @property
    def attributes(self) -> dict[str, Any]:
        """User metadata saved in the manifest with every shard (mutable; JSON values only)."""
        return self._manifest["attributes"]

    def _remove_leftovers(self) -> None:
        """Delete temporary files and shards a crash wrote without recording them."""
        known = {s["file"] for s in self._manifest["shards"]}
        for item in self.path.iterdir():
            orphan = _SHARD_RE.match(item.name) is not None and item.name not in known
            if item.name.endswith(".tmp") or orphan:
                item.unlink()

    @property
    def num_rows(self) -> int:
        """Rows stored in complete shards (pending rows are not counted)."""
        return int(self._manifest["num_rows"])

    @property
    def num_pending(self) -> int:
        """Rows appended but not yet written to a shard."""
        return self._pending_rows

    def append(self, feats_NC: Tensor | np.ndarray, **metadata: Tensor | np.ndarray) -> None:
        """Add ``N`` rows; ``metadata`` gives one length-``N`` integer vector per declared field."""
        if self._closed:
            raise RuntimeError("this FeatureStoreWriter is closed; open a new one to append")
        feats = _as_tensor(feats_NC, "features")
        if feats.ndim != 2 or feats.shape[1] != self.d_in:
            raise ValueError(
                f"append expects features of shape (N, d_in={self.d_in}), got "
                f"{tuple(feats.shape)}; flatten maps (B, C, H, W) with "
                "x.permute(0, 2, 3, 1).reshape(-1, C) and tokens (B, T, D) with x.reshape(-1, D)."
            )
        if feats.dtype != self.dtype:
            raise TypeError(
                f"features have dtype {feats.dtype} but the store holds {self.dtype}; convert "
                f"explicitly with feats.to({self.dtype}) (no silent precision change)."
            )
        if set(metadata) != set(self.metadata_fields):
            raise ValueError(
                f"append got metadata fields {sorted(metadata)}, the store declares "
                f"{sorted(self.metadata_fields)}; pass exactly those as keyword arguments."
            )
        n = feats.shape[0]
        rows: dict[str, Tensor] = {FEATURES_KEY: feats}
        for name in self.metadata_fields:
            value = _as_tensor(metadata[name], f"metadata {name!r}")
            if value.shape != (n,):
                raise ValueError(
                    f"metadata {name!r} must have shape ({n},) like the features, got "
                    f"{tuple(value.shape)}"
                )
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"metadata {name!r} must be integers, got {value.dtype}")
            rows[name] = value.to(torch.int64)
        if self.nonfinite != "keep":
            finite_N = torch.isfinite(feats).all(dim=1)
            if not bool(finite_N.all()):
                bad = int((~finite_N).sum())
                if self.nonfinite == "error":
                    first = int((~finite_N).nonzero()[0, 0])
                    raise ValueError(
                        f"{bad} of {n} appended rows hold NaN/Inf (first: row {first}); fix the "
                        "producer, or open the writer with nonfinite='drop' to skip such rows."
                    )
                rows = {key: value[finite_N] for key, value in rows.items()}
                self._manifest["num_dropped_nonfinite"] += bad
                n -= bad
        if n == 0:
            return
        # Own a copy: the caller may reuse its buffer before the shard is written.
        self._pending.append({key: value.clone() for key, value in rows.items()})
        self._pending_rows += n
        while self._pending_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)

    def _take_pending(self, count: int) -> dict[str, Tensor]:
        if len(self._pending) == 1:
            merged = self._pending[0]  # no copy when one large append spans several shards
        else:
            merged = {
                key: torch.cat([part[key] for part in self._pending]) for key in self._pending[0]
            }
        head = {key: value[:count].contiguous() for key, value in merged.items()}
        rest = {key: value[count:] for key, value in merged.items()}
        self._pending = [rest] if rest[FEATURES_KEY].shape[0] > 0 else []
        self._pending_rows -= count
        return head

    def _write_shard(self, count: int) -> None:
        tensors = self._take_pending(count)
        shards = self._manifest["shards"]
        name = _shard_name(len(shards))
        final = atomic_save_tensors(tensors, self.path / name, metadata={"format": FORMAT_NAME})
        shards.append({"file": name, "num_rows": count, "nbytes": final.stat().st_size})
        self._manifest["num_rows"] += count
        atomic_write_json(self.path / MANIFEST_NAME, self._manifest, indent=1)

    def flush(self) -> None:
        """Write all pending rows now (as a possibly short shard)."""
        if self._pending_rows > 0:
            self._write_shard(self._pending_rows)

    def close(self) -> None:
        """Write the pending rows and mark the store complete (idempotent)."""
        if self._closed:
            return
        self.flush()
        self._manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST_NAME, self._manifest, indent=1)
        self._closed = True

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep the complete shards, drop pending rows: the store stays resumable.
            self._closed = True


MERGE_PLAN_NAME = "merge-plan.json"


def merge_stores(
    parts: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    attributes: Mapping[str, Any] | None = None,
    remove_parts: bool = True,
) -> ShardedFeatureStore:
    """Concatenate complete stores (e.g. one per rank of a distributed extraction), in the
    order given, into the store ``out`` by moving their shard files: no row is copied.

    The rows of ``out`` are those of ``parts[0]``, then ``parts[1]``, ...; the parts must share
    ``d_in``, dtype and metadata fields. ``attributes`` become the merged store's attributes
    (default: those of ``parts[0]``). The merge is resumable: the list of moves is written
    first (``merge-plan.json`` in ``out``), every move is an atomic rename that a rerun skips
    once done, and the manifest is written last; a crash at any point leaves either the parts
    or the finished store recoverable by calling ``merge_stores`` again with the same
    arguments. ``remove_parts`` deletes the emptied part directories afterwards.
    """
    root = Path(out)
    plan_path = root / MERGE_PLAN_NAME
    if (root / MANIFEST_NAME).is_file() and not plan_path.exists():
        return ShardedFeatureStore(root)  # merged before
    if plan_path.exists():
        plan = read_json(plan_path)
    else:
        if not parts:
            raise ValueError("merge_stores needs at least one part")
        stores = [ShardedFeatureStore(p) for p in parts]  # each must be complete
        layout = [(s.d_in, _dtype_name(s.dtype), s.metadata_fields) for s in stores]
        if any(entry != layout[0] for entry in layout):
            raise ValueError(
                f"cannot merge stores of different layouts (d_in, dtype, metadata): {layout}"
            )
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root} is not empty; merge into a new directory")
        moves, shards, dropped = [], [], 0
        for store in stores:
            manifest = _read_manifest(store.path)
            dropped += int(manifest.get("num_dropped_nonfinite", 0))
            for entry in manifest["shards"]:
                name = _shard_name(len(shards))
                moves.append([str(store.path / entry["file"]), name])
                shards.append({**entry, "file": name})
        d_in, dtype_name, fields = layout[0]
        plan = {
            "parts": [str(s.path) for s in stores],
            "moves": moves,
            "manifest": {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "d_in": d_in,
                "dtype": dtype_name,
                "metadata_fields": fields,
                "shard_rows": max([int(s["num_rows"]) for s in shards], default=1),
                "num_rows": sum(int(s["num_rows"]) for s in shards),
                "num_dropped_nonfinite": dropped,
                "complete": True,
                "shards": shards,
                "attributes": _json_roundtrip(
                    stores[0].attributes if attributes is None else attributes
                ),
            },
        }
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_path, plan, indent=1)
    for src, name in plan["moves"]:
        dst = root / name
        if Path(src).exists():
            os.replace(src, dst)
        elif not dst.exists():
            raise FileNotFoundError(
                f"cannot finish merging into {root}: shard {src} is missing and {dst} was not "
                "moved yet (was a part changed after the merge started?)"
            )
    atomic_write_json(root / MANIFEST_NAME, plan["manifest"], indent=1)
    plan_path.unlink()
    if remove_parts:
        for part in plan["parts"]:
            shutil.rmtree(part, ignore_errors=True)
    return ShardedFeatureStore(root)


class ShardedFeatureStore:
    """Read-only view of a feature store written by ``FeatureStoreWriter``.

    Opening checks the manifest and each shard's size and header (cheap: no data is read).

    Args:
        path: store directory.
        allow_incomplete: also open a store whose writer was not closed (e.g. still running or
            killed); by default that is an error, since the store may be missing rows.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> None:
        if sys.byteorder != "little":
            raise NotImplementedError("reading feature stores needs a little-endian machine")
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if not manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"the feature store {self.path} is not complete (its writer was not closed); "
                "finish writing it, or pass allow_incomplete=True to read its complete shards."
            )
        self.d_in = int(manifest["d_in"])
        self.dtype = _DTYPES[manifest["dtype"]]
        self.metadata_fields: list[str] = list(manifest["metadata_fields"])
        self.num_rows = int(manifest["num_rows"])
        self.complete = bool(manifest["complete"])
        self.attributes: dict[str, Any] = dict(manifest.get("attributes", {}))
        """User metadata written with the store (see ``FeatureStoreWriter(attributes=...)``)."""
        shards: list[ShardInfo] = []
        # Per shard: absolute byte offset of each field's first element in the file.
        self._offsets: list[dict[str, int]] = []
        start = 0
        for entry in manifest["shards"]:
            info = ShardInfo(str(entry["file"]), start, int(entry["num_rows"]))
            self._offsets.append(self._check_shard(info, int(entry["nbytes"])))
            shards.append(info)
            start += info.num_rows
        self.shards = shards
        self._starts = [s.start for s in shards]

    def _check_shard(self, info: ShardInfo, nbytes: int) -> dict[str, int]:
        """Validate a shard against the manifest; return its fields' absolute byte offsets."""
        file = self.path / info.file
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in the manifest is missing")
        if file.stat().st_size != nbytes:
            raise ValueError(
                f"shard {file} has {file.stat().st_size} bytes, the manifest records {nbytes}: "
                "the file is truncated or was replaced; rewrite the store."
            )
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = set(fh.keys())
                sl = fh.get_slice(FEATURES_KEY)
                shape = tuple(sl.get_shape())
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"shard {file} is not a readable safetensors file: {err}") from err
        expected = {FEATURES_KEY, *self.metadata_fields}
        if keys != expected or shape != (info.num_rows, self.d_in):
            raise ValueError(
                f"shard {file} holds {sorted(keys)} with features {shape}; the manifest expects "
                f"{sorted(expected)} with ({info.num_rows}, {self.d_in})"
            )
        # The safetensors layout: u64 little-endian header size N, N bytes of JSON header with
        # each tensor's dtype and [begin, end) byte range relative to the data after the header.
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        offsets = {}
        for name in expected:
            is_features = name == FEATURES_KEY
            entry = header[name]
            dtype = _ST_DTYPES.get((is_features, entry["dtype"]))
            want = self.dtype if is_features else torch.int64
            rows_bytes = info.num_rows * (self.d_in * want.itemsize if is_features else 8)
            begin, end = entry["data_offsets"]
            if dtype != want or end - begin != rows_bytes:
                raise ValueError(
                    f"shard {file}: field {name!r} has dtype {entry['dtype']} and {end - begin} "
                    f"bytes; the manifest expects {want} and {rows_bytes} bytes"
                )
            offsets[name] = 8 + header_len + begin
        return offsets

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"ShardedFeatureStore({str(self.path)!r}, num_rows={self.num_rows}, "
            f"d_in={self.d_in}, dtype={self.dtype}, shards={len(self.shards)})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of feature data in the store."""
        return self.num_rows * self.d_in * self.dtype.itemsize

    def _field_row_bytes(self, field: str) -> int:
        if field == FEATURES_KEY:
            return self.d_in * self.dtype.itemsize
        if field in self.metadata_fields:
            return 8
        raise KeyError(f"unknown field {field!r}; the store has {self.metadata_fields}")

    def read_shard_rows_into(
        self, shard: int, lo: int, hi: int, out: Tensor, field: str = FEATURES_KEY
    ) -> None:
        """Read rows ``[lo, hi)`` of one shard (local indices) straight into ``out``.

        ``out`` must be a contiguous CPU tensor of the field's dtype and shape. One sequential
        file read, no intermediate copy; the GIL is released while reading, so a background
        thread can prefetch while the main thread trains.
        """
        row_bytes = self._field_row_bytes(field)
        info = self.shards[shard]
        if not 0 <= lo <= hi <= info.num_rows:
            raise IndexError(f"rows [{lo}, {hi}) out of range for shard {shard} ({info.num_rows})")
        if (
            not out.is_contiguous()
            or out.device.type != "cpu"
            or out.nbytes != (hi - lo) * row_bytes
        ):
            raise ValueError("out must be a contiguous CPU tensor holding exactly the rows read")
        if hi == lo:
            return
        view = out.view(-1).view(torch.uint8).numpy()
        start = self._offsets[shard][field] + lo * row_bytes
        with open(self.path / info.file, "rb", buffering=0) as fh:
            fh.seek(start)
            done = 0
            while done < view.nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    raise EOFError(f"shard {self.path / info.file} ended early (truncated?)")
                done += got

    def read_shard_rows(self, shard: int, lo: int, hi: int, field: str = FEATURES_KEY) -> Tensor:
        """Rows ``[lo, hi)`` of one shard (local indices) as a new tensor."""
        self._field_row_bytes(field)  # validates the field name
        if field == FEATURES_KEY:
            out = torch.empty((max(0, hi - lo), self.d_in), dtype=self.dtype)
        else:
            out = torch.empty(max(0, hi - lo), dtype=torch.int64)
        self.read_shard_rows_into(shard, lo, hi, out, field)
        return out

    def read(self, start: int, stop: int, field: str = FEATURES_KEY) -> Tensor:
        """Global rows ``[start, stop)`` of ``field`` (features or a metadata field)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.num_rows} rows")
        parts: list[Tensor] = []
        shard = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        while pos < stop:
            info = self.shards[shard]
            hi = min(stop, info.start + info.num_rows)
            if hi > pos:
                parts.append(self.read_shard_rows(shard, pos - info.start, hi - info.start, field))
            pos = max(pos, hi)
            shard += 1
        if not parts:
            dtype = self.dtype if field == FEATURES_KEY else torch.int64
            shape = (0, self.d_in) if field == FEATURES_KEY else (0,)
            return torch.empty(shape, dtype=dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def source(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer_rows: int = 2**18,
        block_rows: int | None = None,
        drop_last: bool = False,
        prefetch: bool = False,
    ) -> StoreSource:
        """A ``BatchSource`` over this store; see ``StoreSource``."""
        return StoreSource(
            self,
            batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer_rows=shuffle_buffer_rows,
            block_rows=block_rows,
            drop_last=drop_last,
            prefetch=prefetch,
        )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class StoreSource:
    """Shuffled float32 batches from a ``ShardedFeatureStore`` (the ``BatchSource`` protocol).

    The store's rows are cut into blocks of ``block_rows`` contiguous rows (global row ranges: a
    block may span two shards, so the order does not depend on where the shards end -- a store
    merged from the parts of a distributed extraction serves the batches of the single-process
    store). Epoch ``e`` visits the blocks in a random order drawn from ``(seed, e)`` and groups
    consecutive blocks
    into windows of at most ``shuffle_buffer_rows`` rows; a window (rows from several random
    places in several shards) is loaded, permuted with a generator seeded by ``(seed, e, window)``,
    and cut into batches that run on into the next window. The order is therefore a pure
    function of ``(seed, epoch)`` and the batch position, so ``state_dict`` is just the epoch and
    the number of batches yielded, and resuming re-reads only the current window.

    Peak memory: one window buffer (``shuffle_buffer_rows * d_in`` in the store dtype; two with
    ``prefetch``) plus two batches -- independent of the store size. Blocks are read straight
    into the window buffer. Larger windows mix better; smaller blocks mix better but read less
    sequentially.

    Args:
        store: the store to read.
        batch_size: rows per batch (only the epoch's last batch may be shorter).
        seed: seed of the data order.
        shuffle: ``False`` reads the store in order (for evaluation).
        shuffle_buffer_rows: rows in one window (the shuffle buffer).
        block_rows: rows per contiguous read; ``None``: ``shuffle_buffer_rows // 16`` (at least
            16 blocks per window), at most the number of rows.
        drop_last: drop the epoch's last batch when it is shorter than ``batch_size``.
        prefetch: read the next window in a background thread while the current one is
            consumed (overlaps disk reads with training; doubles the window memory).
    """

    def __init__(
        self,
        store: ShardedFeatureStore,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer_rows: int = 2**18,
        block_rows: int | None = None,
        drop_last: bool = False,
        prefetch: bool = False,
    ) -> None:
        if store.num_rows == 0:
            raise ValueError(f"the feature store {store.path} holds no rows")
        self.store = store
        self.batch_size = _positive("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.shuffle_buffer_rows = _positive("shuffle_buffer_rows", shuffle_buffer_rows)
        if block_rows is None:
            block_rows = max(1, min(store.num_rows, self.shuffle_buffer_rows // 16))
        self.block_rows = min(_positive("block_rows", block_rows), self.shuffle_buffer_rows)
        self.drop_last = bool(drop_last)
        if self.drop_last and store.num_rows < self.batch_size:
            raise ValueError(
                f"drop_last=True with batch_size={self.batch_size} > {store.num_rows} rows would "
                "yield no batch at all; use a smaller batch size or drop_last=False"
            )
        self.prefetch = bool(prefetch)
        self.d_in = store.d_in
        self.num_rows = store.num_rows
        # Blocks as global row ranges [lo, hi): tiny next to the data.
        self._block_lo = np.arange(0, self.num_rows, self.block_rows, dtype=np.int64)
        self._block_hi = np.minimum(self._block_lo + self.block_rows, self.num_rows)
        self._blocks_per_window = max(1, self.shuffle_buffer_rows // self.block_rows)
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.batch_size
        return -(-self.num_rows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = epoch
        self._position = 0

    def _block_order(self) -> np.ndarray:
        n = len(self._block_lo)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self._epoch, 0]).permutation(n)

    def _window_perm(self, window: int, rows: int) -> Tensor | None:
        if not self.shuffle:
            return None
        rng = np.random.default_rng([self.seed, self._epoch, 1, window])
        return torch.from_numpy(rng.permutation(rows))

    def _load_window(self, blocks: np.ndarray, buffer: Tensor) -> int:
        """Read ``blocks`` into the front of ``buffer``; return the number of rows read."""
        pos = 0
        starts = self.store._starts
        for b in blocks:
            lo, hi = int(self._block_lo[b]), int(self._block_hi[b])
            shard = bisect.bisect_right(starts, lo) - 1
            while lo < hi:  # the pieces of the block in consecutive shards
                info = self.store.shards[shard]
                stop = min(hi, info.start + info.num_rows)
                self.store.read_shard_rows_into(
                    shard, lo - info.start, stop - info.start, buffer[pos : pos + stop - lo]
                )
                pos += stop - lo
                lo = stop
                shard += 1
        return pos

    def _windows(
        self, order: np.ndarray, window_rows: list[int], first: int
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(w, rows of window w)`` for ``w >= first``, reusing one buffer (two when
        prefetching): no per-window allocation for the allocator to fragment."""
        per = self._blocks_per_window
        shape = (max(window_rows), self.d_in)
        n_windows = len(window_rows)
        if not self.prefetch:
            buffer = torch.empty(shape, dtype=self.store.dtype)
            for w in range(first, n_windows):
                rows = self._load_window(order[w * per : (w + 1) * per], buffer)
                yield w, buffer[:rows]
            return
        buffers = [torch.empty(shape, dtype=self.store.dtype) for _ in range(2)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="topk-sae-prefetch") as pool:

            def submit(w: int) -> Future[int]:
                blocks = order[w * per : (w + 1) * per]
                return pool.submit(self._load_window, blocks, buffers[w % 2])

            pending = submit(first)
            for w in range(first, n_windows):
                rows = pending.result()
                if w + 1 < n_windows:
                    pending = submit(w + 1)  # fills the other buffer while this one is used
                yield w, buffers[w % 2][:rows]

    def __iter__(self) -> Iterator[Tensor]:
        n_batches = len(self)
        if self._position >= n_batches:
            return
        order = self._block_order()
        sizes = (self._block_hi - self._block_lo)[order]
        per = self._blocks_per_window
        n_windows = math.ceil(len(order) / per)
        window_rows = [int(sizes[w * per : (w + 1) * per].sum()) for w in range(n_windows)]
        # Locate the first row of the next batch in the stream of windows.
        first, offset = 0, self._position * self.batch_size
        while offset >= window_rows[first]:
            offset -= window_rows[first]
            first += 1
        carry: Tensor | None = None
        windows = self._windows(order, window_rows, first)
        try:
            for w, data in windows:
                rows = data.shape[0]
                perm = self._window_perm(w, rows)
                pos = offset if w == first else 0
                while pos < rows:
                    need = self.batch_size - (0 if carry is None else carry.shape[0])
                    stop = min(rows, pos + need)
                    # Gathering copies; a plain slice must be copied too, since the buffer is
                    # overwritten by the next window while the caller may keep the batch.
                    part = data[pos:stop].clone() if perm is None else data[perm[pos:stop]]
                    pos = stop
                    batch = part if carry is None else torch.cat([carry, part])
                    if batch.shape[0] < self.batch_size:
                        carry = batch
                        continue
                    carry = None
                    self._position += 1
                    yield batch.to(torch.float32)
                    if self._position >= n_batches:
                        return
        finally:
            windows.close()  # stops a prefetch thread when the caller leaves early
        if carry is not None and self._position < n_batches:
            self._position += 1
            yield carry.to(torch.float32)

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
            "block_rows": self.block_rows,
            "drop_last": self.drop_last,
            "num_rows": self.num_rows,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "StoreSource",
            "epoch": self._epoch,
            "position": self._position,
            **self._settings(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, ours in self._settings().items():
            if key in state and state[key] != ours:
                raise ValueError(
                    f"cannot resume: the saved StoreSource has {key}={state[key]!r}, this one has "
                    f"{key}={ours!r}; the batch order would differ. Resume with the same store and "
                    "source settings."
                )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved position {position} is outside [0, {len(self)}]")
        self._epoch = int(state["epoch"])
        self._position = position
